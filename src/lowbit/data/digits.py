"""scikit-learn's digits (UCI optical recognition of handwritten digits): 1,797 8x8 images.

Pixels are integers 0..16. The split is fixed: a stratified
``train_test_split(test_size=360, random_state=0)``, 1,437 train / 360 test
images, each kept in the dataset's own order. Ships with scikit-learn, so it
is always there.
"""

from __future__ import annotations

import numpy as np

DIGITS_TEST_SIZE = 360
DIGITS_SPLIT_SEED = 0


def digits_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """digits ``split`` ("train" or "test") as uint8 images ``(N, 8, 8)`` (0..16) and uint8 labels ``(N,)``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    train, test = train_test_split(
        np.arange(len(bunch.target)), test_size=DIGITS_TEST_SIZE, random_state=DIGITS_SPLIT_SEED, stratify=bunch.target
    )
    rows = np.sort(train if split == "train" else test)
    return bunch.images[rows].astype(np.uint8), bunch.target[rows].astype(np.uint8)
