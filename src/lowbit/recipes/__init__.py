"""Named training recipes from the papers (``lowbit train --recipe NAME``): data + one driver.

``get_recipe(name)`` returns a :class:`Recipe` (default network, quantization per stage,
optimizer, schedule, epochs, tricks, the paper's reference); ``train_recipe(name, data, ...)``
trains it and returns a JSON-able result dict; ``recipe_names()`` lists them.
"""

from .driver import (AlphaDecay, ClipLatentWeights, RefreshBatchNorm, TrainTime, square_hinge, stage_epochs,
                     train_recipe)
from .table import RECIPES, Recipe, Stage, float_recipe, get_recipe, recipe_names

__all__ = [
    "RECIPES",
    "AlphaDecay",
    "ClipLatentWeights",
    "Recipe",
    "RefreshBatchNorm",
    "Stage",
    "TrainTime",
    "float_recipe",
    "get_recipe",
    "recipe_names",
    "square_hinge",
    "stage_epochs",
    "train_recipe",
]
