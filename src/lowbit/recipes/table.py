"""Training recipes as data: each paper's quantizers, precision policy, optimizer, schedule and tricks.

A :class:`Recipe` says what :func:`lowbit.recipes.train_recipe` does; nothing here trains.
Fixed names are in :data:`RECIPES`; the bit-width families are parsed by :func:`get_recipe`:
``dorefa-w{W}a{A}g{G}`` (G = 32: float gradients), ``lsq-w{B}a{B}``, ``pact-w{B}a{B}`` and
``abc-{M}-{N}``. What comes from the paper and what is lowbit's choice for short CPU runs is
said in each recipe's ``notes``.

Shared choices (lowbit's): the default network is ``small-cnn`` (LeNet-5 sizes in XNOR-Net's
block order, :mod:`lowbit.models.binary_nets`), except the BNN MLP, the Bi-Real ResNet and ReActNet; the
default epochs are short (the papers train for hundreds); latent weights of sign-based
quantizers are clipped to [-1, 1] after every step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from ..config import uniform_act, uniform_weight
from ..errors import ConfigError

Config = dict[str, Any]

#: weight quantizers whose values are signs (their latent weights are clipped; BNN's Glorot lr scale applies)
SIGN_WEIGHTS = ("binary", "xnor")
#: the schedules a recipe may name: the Trainer's, plus BNN's exponential decay to ``final_lr``
SCHEDULES = ("cosine", "exponential", "none")
LOSSES = ("cross_entropy", "square_hinge")
MAX_FAMILY_BITS = 8
#: DoReFa's gradient width meaning "leave gradients float"
FLOAT_GRAD_BITS = 32


@dataclass(frozen=True)
class Stage:
    """One phase of training: a QuantConfig dict (None: float) for ``fraction`` of the epochs."""

    name: str
    config: Config | None
    fraction: float = 1.0


@dataclass(frozen=True)
class Recipe:
    """A named training recipe (see the module docstring).

    - ``stages``: trained in order, each from the weights of the one before (a float stage first is
      the float initialisation); the last stage's config is the recipe's quantization.
    - ``optimizer`` ("adam" / "sgd"), ``lr``, ``weight_decay``, ``schedule`` (per stage; see
      :data:`SCHEDULES`), ``final_lr`` (exponential: the lr reached at the end of the stage).
    - ``loss``: "cross_entropy" or BNN's "square_hinge".
    - ``latent_clip``: clip latent weights of sign-quantized layers to [-c, c] after each step.
    - ``latent_init``: re-draw those weights from U(-c, c) before training (BNN's H = 1 init).
    - ``glorot_lr``: scale the lr of sign-quantized weights by 1 / sqrt(1.5 / (fan_in + fan_out))
      (BNN's ``W_LR_scale = "Glorot"``).
    - ``alpha_decay``: PACT's L2 penalty lambda on the clipping levels.
    - ``bn_refresh``: re-estimate batch-norm running statistics over training batches after every
      epoch, before the test accuracy (see :class:`lowbit.recipes.driver.RefreshBatchNorm`).
    - ``weight_bits`` / ``act_bits``: the middle layers' widths, for tables and plots (32: float).
    """

    name: str
    paper: str
    notes: str
    model: str
    stages: tuple[Stage, ...]
    weight_bits: int
    act_bits: int
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "cosine"
    final_lr: float | None = None
    epochs: int = 10
    batch_size: int = 100
    loss: str = "cross_entropy"
    latent_clip: float | None = None
    latent_init: float | None = None
    glorot_lr: bool = False
    alpha_decay: float = 0.0
    bn_refresh: bool = False

    def __post_init__(self) -> None:
        if not self.stages:
            raise ConfigError(f"recipe {self.name!r} has no stages")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"recipe {self.name!r}: schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        if self.loss not in LOSSES:
            raise ConfigError(f"recipe {self.name!r}: loss {self.loss!r}; valid: {', '.join(LOSSES)}")
        if self.schedule == "exponential" and not (self.final_lr is not None and 0 < self.final_lr <= self.lr):
            raise ConfigError(f"recipe {self.name!r}: the exponential schedule needs 0 < final_lr <= lr")

    @property
    def config(self) -> Config | None:
        """The quantization the recipe ends with (its last stage's config)."""
        return self.stages[-1].config


# ---------------------------------------------------------------- specs

def sign(ste: str = "clipped") -> Config:
    return {"name": "binary", "ste": ste}


def xnor(role: str, ste: str = "clipped") -> Config:
    return {"name": "xnor", "role": role, "ste": ste}


def _quantized(weight: Config | None, act: Config | None = None, first: Any = "float", last: Any = "float",
               **extra: Any) -> Config:
    return {"weight": weight, "input": act, "first": first, "last": last, **extra}


def _one_stage(config: Config) -> tuple[Stage, ...]:
    return (Stage("quantized", config),)


def float_recipe(recipe: Recipe) -> Recipe:
    """The float reference of ``recipe``: same net, optimizer and schedule, no quantizers, one stage."""
    return Recipe(
        name="float", paper="", notes=f"float reference of {recipe.name}", model=recipe.model,
        model_kwargs=dict(recipe.model_kwargs), stages=(Stage("float", None),), weight_bits=32, act_bits=32,
        optimizer=recipe.optimizer, lr=recipe.lr, weight_decay=recipe.weight_decay,
        schedule=recipe.schedule if recipe.schedule != "exponential" else "cosine", epochs=recipe.epochs,
        batch_size=recipe.batch_size,
    )


# --------------------------------------------------------------- the table

BNN_PAPER = ("Courbariaux, Hubara, Soudry, El-Yaniv, Bengio 2016, 'Binarized Neural Networks', arXiv:1602.02830; "
             "Hubara et al., NeurIPS 2016")
XNOR_PAPER = "Rastegari, Ordonez, Redmon, Farhadi 2016, 'XNOR-Net', ECCV 2016, arXiv:1603.05279"
DOREFA_PAPER = "Zhou, Wu, Ni, Zhou, Wen, Zou 2016, 'DoReFa-Net', arXiv:1606.06160"
ABC_PAPER = "Lin, Zhao, Pan 2017, 'Towards Accurate Binary Convolutional Neural Network' (ABC-Net), NeurIPS 2017"
BIREAL_PAPER = "Liu, Wu, Luo, Yang, Liu, Cheng 2018, 'Bi-Real Net', ECCV 2018, arXiv:1808.00278"
LSQ_PAPER = "Esser, McKinstry, Bablani, Appuswamy, Modha 2020, 'Learned Step Size Quantization', ICLR 2020"
PACT_PAPER = "Choi, Wang, Venkataramani, Chuang, Srinivasan, Gopalakrishnan 2018, 'PACT', arXiv:1805.06085"
TWN_PAPER = "Li, Zhang, Liu 2016, 'Ternary Weight Networks', arXiv:1605.04711"
LOG_PAPER = "Miyashita, Lee, Murmann 2016, 'CNNs using logarithmic data representation', arXiv:1603.01025"
REACTNET_PAPER = ("Liu, Shen, Savvides, Cheng 2020, 'ReActNet: Towards Precise Binary Neural Network with Generalized "
                  "Activation Functions', ECCV 2020, arXiv:2003.03488")

BNN_PAPER_NOTES = (
    "paper: sign weights and activations (sign(0) = +1) with the clipped STE 1{|x| <= 1}; first layer's input "
    "real; BN after every layer (the last included); latent weights drawn from U(-1, 1) and clipped to [-1, 1] "
    "after every step; Adam with the lr of each binary layer scaled by 1 / sqrt(1.5 / (fan_in + fan_out)) "
    "(Glorot); lr decayed exponentially every epoch from 3e-3 (to 3e-7 over 1000 epochs); square hinge loss; "
    "batch 100; dropout 0.2 on the input and 0.5 after each hidden layer (MLP)."
)
BNN_NOTES = (
    BNN_PAPER_NOTES + " lowbit, for runs of 15 epochs: the MLP is 3 x 2048 (paper 4096) with input dropout 0.2 "
    "only (0.5 hidden dropout costs 2 pp at 4 epochs), and the lr decays to 3e-5 over the run (decaying to 3e-7 "
    "in a short run stops learning after a few epochs)."
)

RECIPES: dict[str, Recipe] = {
    "bnn": Recipe(
        name="bnn", paper=BNN_PAPER, notes=BNN_NOTES, model="bnn-mlp",
        model_kwargs={"width": 2048, "input_dropout": 0.2, "hidden_dropout": 0.0},
        stages=_one_stage(_quantized(sign(), sign(), first={"input": None}, last="same")),
        weight_bits=1, act_bits=1, lr=3e-3, schedule="exponential", final_lr=3e-5, epochs=15, batch_size=100,
        loss="square_hinge", latent_clip=1.0, latent_init=1.0, glorot_lr=True,
    ),
    "bnn-cnn": Recipe(
        name="bnn-cnn", paper=BNN_PAPER,
        notes=BNN_PAPER_NOTES + (" lowbit: the CNN keeps its first and last layers at 8 bits (weights and inputs) "
                                 "and is small-cnn widened to 32/64 filters, 512 hidden units; the lr decays to "
                                 "3e-7 over the run."),
        model="small-cnn", model_kwargs={"channels": (32, 64), "hidden": 512},
        stages=_one_stage(_quantized(sign(), sign(), first="8bit", last="8bit")),
        weight_bits=1, act_bits=1, lr=3e-3, schedule="exponential", final_lr=3e-7, epochs=10, batch_size=100,
        loss="square_hinge", latent_clip=1.0, latent_init=1.0, glorot_lr=True,
    ),
    "xnor": Recipe(
        name="xnor", paper=XNOR_PAPER,
        notes="paper: weights alpha_c sign(W), alpha_c = mean |W_c| per output channel; inputs sign(I) scaled "
              "by K (here A = mean_c |I| per position, a 1x1 window); block order BN -> BinActiv -> BinConv -> "
              "pool; first and last layers real; Adam. authors' code: latent weights clipped to [-1, 1]. "
              "lowbit: lr 1e-3, cosine decay.",
        model="small-cnn", stages=_one_stage(_quantized(xnor("weight"), xnor("activation"))),
        weight_bits=1, act_bits=1, latent_clip=1.0,
    ),
    "bwn": Recipe(
        name="bwn", paper=XNOR_PAPER,
        notes="paper: Binary-Weight-Network, weights alpha_c sign(W) per output channel, real activations; "
              "first and last layers real; Adam. lowbit: lr 1e-3, cosine decay, latent clip [-1, 1].",
        model="small-cnn", stages=_one_stage(_quantized(xnor("weight"))), weight_bits=1, act_bits=32,
        latent_clip=1.0,
    ),
    "bireal": Recipe(
        name="bireal", paper=BIREAL_PAPER,
        notes="paper: ResNet-18/34 with a real-valued shortcut around every binary 3x3 conv (sign -> conv -> BN "
              "-> + input), ApproxSign gradient for activations, magnitude-aware weights mean|W_c| sign(W) with "
              "the gradient through the scale, real downsampling shortcuts (2x2 average pool, 1x1 conv, BN), "
              "first and last layers real, a stem that pools (7x7 stride-2 conv, 3x3 max pool); initialised "
              "from a real net trained with clip(-1, 1) instead of ReLU, then trained with binary weights and "
              "activations "
              "(Caffe release: SGD momentum 0.9, lr 0.01, steps at 100k and 140k of 180k iterations, no weight "
              "decay; PyTorch release, from scratch: Adam lr 1e-3 decayed linearly to 0 over 256 epochs, batch "
              "512, no weight decay, label smoothing 0.1). lowbit: stem 3x3 conv, BN, 2x2 max pool; widths "
              "48/96/192, one block each (binary stage on 10,000 MNIST images, one epoch per stage: 81% at "
              "16/32/64 without the pool, 96% at 48/96/192 with it); 8 epochs: 2 float (the clip(-1, 1) net), "
              "2 real activations with binary weights, 4 binary (all of MNIST: 99.15%; Fashion-MNIST 92.40%, its "
              "float network 93.67%; at 5 epochs, 1 + 1 + 3, MNIST 99.00% and 98.89% in a re-run; 4 epochs "
              "98.95%); Adam lr 2e-3, cosine per stage, no weight decay, batch 128; batch-norm statistics "
              "re-estimated after every epoch, in eval mode, one norm at a time over 25 training "
              "batches each (the moving averages lag the sign network's weights and cost up to 40 points).",
        model="resnet-small",
        model_kwargs={"block": "bireal", "activation": "hardtanh", "widths": (48, 96, 192), "blocks": (1, 1, 1),
                      "stem_pool": 2},
        stages=(
            Stage("float", None, 0.25),
            Stage("real-activations", _quantized(xnor("weight"), None, rules=[
                {"pattern": "*shortcut*", "skip": True}]), 0.25),
            Stage("binary", _quantized(xnor("weight"), sign("approx_sign"), rules=[
                {"pattern": "*shortcut*", "skip": True}]), 0.5),
        ),
        weight_bits=1, act_bits=1, lr=2e-3, epochs=8, batch_size=128, latent_clip=1.0, bn_refresh=True,
    ),
    "reactnet": Recipe(
        name="reactnet", paper=REACTNET_PAPER,
        notes="paper: ReActNet-A blocks (RSign -> binary 3x3 conv -> BN -> + shortcut -> RPReLU, then the same "
              "with a 1x1 conv; the 1x1 block duplicated where the width doubles), RSign x_b = +1 if x > alpha_c "
              "else -1 and RPReLU with learnable channel-wise alpha, gamma, beta, zeta; ApproxSign gradient for "
              "activations; weights mean|W_c| sign(W) with a clipped straight-through gradient; first and last "
              "layers real; two steps: binary activations with real weights, then binary weights and activations "
              "from step 1's net; Adam lr 5e-4 decayed linearly to 0, batch 256, weight decay 1e-5 in step 1 and "
              "0 in step 2; trained with a distributional loss, the KL divergence to a real-valued ResNet-34 "
              "teacher's outputs (lowbit: pass a teacher where recipe training takes one). lowbit: Bi-Real's "
              "shape (stem 3x3 conv, BN, 2x2 max pool; widths 48/96/192, one block per stage; one epoch per "
              "step on 10,000 Fashion-MNIST images: 76.6% in 72 s, against 65.5% in 107 s at 16/32/64 with "
              "two blocks per stage and no pool, 78.6% in 141 s at 48/96/192 with two), each binary conv with "
              "its own RSign; xnor weights (the gradient "
              "also through mean|W_c|, as in Bi-Real); ties x == alpha give +1 "
              "(lowbit's sign(0) = +1); steps of half the epochs each, Adam lr 1e-3 (short runs learn faster "
              "above the paper's 5e-4: one block per stage, one epoch per step on 10,000 images, 33% at 5e-4, 51% "
              "at 2e-3), cosine per step, no weight decay; "
              "batch-norm statistics re-estimated after every epoch, in eval mode, one norm at a time over 25 "
              "training batches each.",
        model="reactnet", model_kwargs={"widths": (48, 96, 192), "blocks": (1, 1, 1), "stem_pool": 2},
        stages=(
            Stage("binary-activations", _quantized(None, sign("approx_sign")), 0.5),
            Stage("binary", _quantized(xnor("weight"), sign("approx_sign")), 0.5),
        ),
        weight_bits=1, act_bits=1, lr=1e-3, epochs=8, batch_size=128, bn_refresh=True,
    ),
    "ternary": Recipe(
        name="ternary", paper=TWN_PAPER,
        notes="paper: weights alpha {-1, 0, +1}, delta = 0.7 mean |W|, alpha = mean of the |W| above delta, "
              "straight-through gradient; activations real; SGD with momentum 0.9. lowbit: first and last "
              "layers real, lr 0.05, cosine decay, weight decay 1e-4, batch 128.",
        model="small-cnn", stages=_one_stage(_quantized({"name": "ternary"})), weight_bits=2, act_bits=32,
        optimizer="sgd", lr=0.05, weight_decay=1e-4, batch_size=128,
    ),
    "log": Recipe(
        name="log", paper=LOG_PAPER,
        notes="paper: LogQuant weights sign * 2^round(log2|w|) in a full-scale range, 4-bit exponent codes "
              "plus a sign bit, trained quantization-aware with straight-through gradients. lowbit: "
              "activations real, first and last layers real, SGD momentum 0.9 lr 0.05, cosine, batch 128.",
        model="small-cnn", stages=_one_stage(_quantized({"name": "log2", "bits": 4})), weight_bits=5, act_bits=32,
        optimizer="sgd", lr=0.05, weight_decay=1e-4, batch_size=128,
    ),
}


def _dorefa(w: int, a: int, g: int) -> Recipe:
    grad = None if g == FLOAT_GRAD_BITS else {"name": "dorefa_grad", "bits": g, "seed": 0}
    weight = {"name": "dorefa_weight", "bits": w}
    act = {"name": "dorefa_act", "bits": a}
    return Recipe(
        name=f"dorefa-w{w}a{a}g{g}", paper=DOREFA_PAPER,
        notes="paper: weights 2 quantize_k(tanh(w) / (2 max|tanh w|) + 1/2) - 1 (k = 1: E|w| sign(w)), "
              "activations quantize_k(clip(x, 0, 1)), gradients of every layer's output quantized "
              "stochastically to G bits in backward (G = 32: float); first and last layers not quantized; "
              "Adam. lowbit: lr 1e-3, cosine decay, batch 128.",
        model="small-cnn", stages=_one_stage(_quantized(weight, act, output=grad)),
        weight_bits=w, act_bits=a, batch_size=128,
    )


def _lsq(b: int, act_bits: int) -> Recipe:
    """LSQ at ``b`` bits for weights and activations (the family checks ``act_bits == b``)."""
    weight = {"name": "lsq", "bits": b, "signed": True, "role": "weight"}
    act = {"name": "lsq", "bits": b, "signed": False, "role": "activation"}
    eight = {"weight": uniform_weight(8), "input": uniform_act(8), "output": None}
    return Recipe(
        name=f"lsq-w{b}a{b}", paper=LSQ_PAPER,
        notes="paper: learned step per layer with gradient scale 1 / sqrt(N Q_P), step init 2 mean|v| / "
              "sqrt(Q_P); first and last layers at 8 bits; initialised from a trained float net; SGD momentum "
              "0.9 with cosine decay. lowbit: 1/3 of the epochs float, then LSQ; lr 0.02, weight decay 1e-4 "
              "(5e-5 at 2 bits), batch 128.",
        model="small-cnn",
        stages=(Stage("float", None, 1 / 3), Stage("quantized", _quantized(weight, act, first=eight, last=eight),
                                                   2 / 3)),
        weight_bits=b, act_bits=b, optimizer="sgd", lr=0.02, weight_decay=5e-5 if b == 2 else 1e-4,
        batch_size=128,
    )


def _pact(b: int, act_bits: int) -> Recipe:
    """PACT at ``b`` bits for weights and activations (the family checks ``act_bits == b``)."""
    weight = {"name": "dorefa_weight", "bits": b}
    act = {"name": "pact", "bits": b, "alpha": 10.0}
    return Recipe(
        name=f"pact-w{b}a{b}", paper=PACT_PAPER,
        notes="paper: activations clip(x, 0, alpha) quantized to k bits with alpha learned (init 10) and "
              "L2-regularised; weights quantized as in DoReFa. lowbit: first and last layers real, SGD momentum "
              "0.9 lr 0.02, cosine, weight decay 1e-4 and the same lambda on alpha, batch 128.",
        model="small-cnn", stages=_one_stage(_quantized(weight, act)), weight_bits=b, act_bits=b,
        optimizer="sgd", lr=0.02, weight_decay=1e-4, alpha_decay=1e-4, batch_size=128,
    )


def _abc(m: int, n: int) -> Recipe:
    return Recipe(
        name=f"abc-{m}-{n}", paper=ABC_PAPER,
        notes="paper: weights sum_i alpha_i sign(W - mean + u_i std) (M bases, alphas by least squares), "
              "activations sum_n beta_n H_{v_n}(R) (N bases, learned shifts and scales). lowbit: per-tensor "
              "weight bases, first and last layers real, Adam lr 1e-3, cosine decay, batch 128.",
        model="small-cnn",
        stages=_one_stage(_quantized({"name": "abc_weight", "bases": m}, {"name": "abc_act", "bases": n})),
        weight_bits=m, act_bits=n, batch_size=128,
    )


def _dorefa_valid(w: int, a: int, g: int) -> bool:
    return 1 <= w <= MAX_FAMILY_BITS and 1 <= a <= MAX_FAMILY_BITS and (1 <= g <= 16 or g == FLOAT_GRAD_BITS)


def _same_bits_valid(w: int, a: int) -> bool:
    return w == a and 2 <= w <= MAX_FAMILY_BITS


def _bases_valid(m: int, n: int) -> bool:
    return 1 <= m <= MAX_FAMILY_BITS and 1 <= n <= MAX_FAMILY_BITS


#: family -> (name pattern, builder, check of the numbers, the naming rule for error messages)
FAMILIES: dict[str, tuple[re.Pattern[str], Callable[..., Recipe], Callable[..., bool], str]] = {
    "dorefa": (re.compile(r"dorefa-w(\d+)a(\d+)g(\d+)"), _dorefa, _dorefa_valid,
               f"dorefa-w{{W}}a{{A}}g{{G}} with W, A in 1..8 and G in 1..16 or {FLOAT_GRAD_BITS} (float)"),
    "lsq": (re.compile(r"lsq-w(\d+)a(\d+)"), _lsq, _same_bits_valid, "lsq-w{B}a{B} with B in 2..8"),
    "pact": (re.compile(r"pact-w(\d+)a(\d+)"), _pact, _same_bits_valid, "pact-w{B}a{B} with B in 2..8"),
    "abc": (re.compile(r"abc-(\d+)-(\d+)"), _abc, _bases_valid, "abc-{M}-{N} with M, N in 1..8"),
}

#: the family members listed by recipe_names() (any valid member is accepted by get_recipe)
LISTED = ("dorefa-w1a2g6", "dorefa-w1a2g32", "dorefa-w2a2g32", "dorefa-w8a8g8", "lsq-w2a2", "lsq-w3a3",
          "lsq-w4a4", "pact-w2a2", "pact-w3a3", "pact-w4a4", "abc-3-3", "abc-5-5")


def _family_recipe(name: str) -> Recipe | None:
    """The family member called ``name``, None if no family pattern matches; ConfigError out of range."""
    for family, (pattern, build, valid, form) in FAMILIES.items():
        match = pattern.fullmatch(name)
        if match is not None:
            numbers = [int(n) for n in match.groups()]
            if not valid(*numbers):
                raise ConfigError(f"recipe {name!r} is out of range; the {family} recipes are named {form}")
            return build(*numbers)
    return None


def recipe_names() -> list[str]:
    """The fixed recipes and the listed members of the bit-width families."""
    return [*RECIPES, *LISTED]


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``; unknown names raise ConfigError listing the valid ones."""
    if not isinstance(name, str):
        raise ConfigError(f"a recipe name is a string, got {name!r}")
    if name in RECIPES:
        return RECIPES[name]
    recipe = _family_recipe(name)
    if recipe is None:
        forms = "; ".join(form for *_, form in FAMILIES.values())
        raise ConfigError(f"unknown recipe {name!r}; recipes: {', '.join(RECIPES)}; families: {forms}")
    return recipe
