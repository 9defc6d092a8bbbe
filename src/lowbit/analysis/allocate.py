"""Per-layer bit widths under a size budget (or the smallest size under a loss budget).

The model of Zhou, Moosavi-Dezfooli, Cheung & Frossard, "Adaptive
Quantization for Deep Neural Network" (AAAI 2018): the damage of quantizing
several layers is the sum of the damages measured one layer at a time
(:mod:`lowbit.analysis.sensitivity`). Choosing one bit width b_i per layer is
then a multiple-choice knapsack,

    minimise  sum_i loss_i(b_i)   subject to   other_bytes + sum_i bytes_i(b_i) <= budget,

where ``loss_i`` is :meth:`SensitivityTable.cost`: the layer's measure made
non-increasing in bits (isotonic fit) and clipped at 0. Among the choices of
least total loss the one of *largest* total size is returned, so the budget is
spent: measures near float accuracy are flat or zero, and the cheapest of
several equal predictions leaves bytes that more bits would use at no
predicted cost. Total losses within a relative ``TIE_RTOL`` of the least (the
rounding of float sums) count as equal.

Solved exactly by dynamic programming over sizes (not by the paper's closed
form, which assumes a continuous bit width): ``best_c`` = the least total
loss of the layers so far taking exactly ``c`` size units (infinite when no
choice does), ``best'_c = min_b best_{c - u_i(b)} + loss_i(b)``; the answer
is the largest ``c`` within the capacity whose ``best_c`` ties the least.
A size unit is ``granularity`` bytes, 1 by default, so the optimum is exact;
when the budget would need more than ``max_states`` units the granularity
grows to ``ceil(budget / max_states)``. Each layer's bytes are rounded *up*
to whole units, so the chosen widths always fit the budget (the optimum and
the tie-break are then exact for the rounded sizes). ``bytes_i(b)`` is the
layer's size by the summary byte rule, so the predicted size equals
``lowbit.summary(quantized).total_bytes``.

The dual, :func:`allocate_for_loss`, reads the same table of least losses:
the smallest size whose least loss is at most ``max_loss`` (within
``TIE_RTOL``); :func:`allocate_like_uniform` sets ``max_loss`` to the
predicted loss of one bit width for every layer.

A table of ``role="input"`` (per-layer activation bits) is solved the same
way, its sizes being the layers' inputs at batch 1 (no other bytes); the
budget is then one of input bytes. Weights and inputs are allocated apart,
each under its own budget (the additive model makes the two sums
independent), and :func:`combine` merges both into one config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..config import QuantConfig
from ..errors import ConfigError
from .sensitivity import OBJECTIVES, SensitivityTable, layer_config

#: the most size units the dynamic programme keeps before coarsening its granularity
MAX_STATES = 1 << 22
#: total predicted losses within this relative distance of the least are ties (broken toward more bytes)
TIE_RTOL = 1e-9


@dataclass
class Allocation:
    """Chosen weight bits per layer, with the predicted loss (in the objective's units) and size."""

    bits: dict[str, int]
    act_bits: int | None
    objective: str
    predicted_loss: float
    predicted_bytes: int
    granularity: int
    budget_bytes: int | None = None
    max_loss: float | None = None
    role: str = "weight"

    def config(self) -> QuantConfig:
        """The QuantConfig that quantizes each layer's weight (or input, for ``role="input"``) to its chosen
        bits (one rule per layer name)."""
        return layer_config(self.bits, self.act_bits) if self.role == "weight" else layer_config({}, None, self.bits)

    def to_dict(self) -> dict:
        return {"role": self.role, "bits": dict(self.bits), "act_bits": self.act_bits, "objective": self.objective,
                "predicted_loss": self.predicted_loss, "predicted_bytes": self.predicted_bytes,
                "granularity": self.granularity, "budget_bytes": self.budget_bytes, "max_loss": self.max_loss}

    def __str__(self) -> str:
        width = max(len(name) for name in self.bits)
        lines = [f"{name:<{width}}  {b:>2} {self.role} bits" for name, b in self.bits.items()]
        what = "size" if self.role == "weight" else "input bytes at batch 1"
        lines.append(f"predicted {what} {self.predicted_bytes:,} bytes, predicted {self.objective} "
                     f"{self.predicted_loss:.6g}")
        return "\n".join(lines)


def combine(weights: Allocation, inputs: Allocation) -> QuantConfig:
    """One config with the weight bits of ``weights`` and the per-layer input bits of ``inputs``."""
    if weights.role != "weight" or inputs.role != "input":
        raise ConfigError(f"combine takes a weight allocation and an input allocation, got roles "
                          f"{weights.role!r} and {inputs.role!r}")
    return layer_config(weights.bits, None, inputs.bits)


@dataclass
class _Problem:
    """The table as arrays: per layer the candidate bits (by ascending size), their bytes and losses."""

    names: list[str]
    bits: list[list[int]]
    sizes: list[np.ndarray]
    losses: list[np.ndarray]


def _problem(table: SensitivityTable, objective: str) -> _Problem:
    if objective not in OBJECTIVES:
        raise ConfigError(f"unknown objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
    if not table.layers or not table.bits:
        raise ConfigError("the sensitivity table is empty; measure at least one layer and one bit width")
    problem = _Problem(table.layers, [], [], [])
    for name in table.layers:
        costs = table.costs(name, objective)
        order = sorted(table.bits, key=lambda b: (table.row(name, b).bytes, b))
        problem.bits.append(order)
        problem.sizes.append(np.array([table.row(name, b).bytes for b in order], dtype=np.int64))
        problem.losses.append(np.array([costs[b] for b in order], dtype=np.float64))
    return problem


def _least_losses(problem: _Problem, capacity: int, unit: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """``best[c]``: least total loss of choices taking exactly ``c`` units (inf if none), and per layer
    the choice index reaching it."""
    best = np.full(capacity + 1, np.inf)
    best[0] = 0.0
    choices = []
    for sizes, losses in zip(problem.sizes, problem.losses):
        units = -(-sizes // unit)  # ceil: rounded up, so a fit in units is a fit in bytes
        new = np.full(capacity + 1, np.inf)
        choice = np.full(capacity + 1, -1, dtype=np.int16)
        for j, (u, loss) in enumerate(zip(units.tolist(), losses.tolist())):
            if u > capacity:
                continue
            candidate = best[: capacity + 1 - u] + loss
            better = candidate < new[u:]
            new[u:][better] = candidate[better]
            choice[u:][better] = j
        best = new
        choices.append(choice)
    return best, choices


def _fullest_of_least(best: np.ndarray) -> int:
    """The largest number of units whose least loss ties the overall least (within ``TIE_RTOL``)."""
    least = float(np.min(best))
    return int(np.flatnonzero(best <= least + TIE_RTOL * abs(least))[-1])


def _backtrack(problem: _Problem, choices: list[np.ndarray], c: int, unit: int) -> dict[str, int]:
    picked: dict[str, int] = {}
    for index in reversed(range(len(problem.names))):
        j = int(choices[index][c])
        picked[problem.names[index]] = problem.bits[index][j]
        c -= int(-(-problem.sizes[index][j] // unit))
    return {name: picked[name] for name in problem.names}


def _granularity(capacity_bytes: int, granularity: int | None, max_states: int) -> int:
    if granularity is not None:
        if isinstance(granularity, bool) or not isinstance(granularity, int) or granularity < 1:
            raise ConfigError(f"granularity must be a positive number of bytes, got {granularity!r}")
        return granularity
    return max(1, math.ceil(capacity_bytes / max_states))


def _result(table: SensitivityTable, bits: dict[str, int], objective: str, unit: int,
            **budget: float | int | None) -> Allocation:
    size = table.other_bytes + sum(table.row(name, b).bytes for name, b in bits.items())
    loss = sum(table.cost(name, b, objective) for name, b in bits.items())
    return Allocation(bits=bits, act_bits=table.act_bits, objective=objective, predicted_loss=loss,
                      predicted_bytes=size, granularity=unit, role=table.role, **budget)


def smallest_bytes(table: SensitivityTable) -> int:
    """The size of the smallest choice for every layer (the least budget that can be met)."""
    return table.other_bytes + sum(min(table.row(n, b).bytes for b in table.bits) for n in table.layers)


def allocate_bits(
    table: SensitivityTable,
    budget_bytes: int,
    objective: str = "loss",
    granularity: int | None = None,
    max_states: int = MAX_STATES,
) -> Allocation:
    """Per-layer bits of least predicted ``objective`` whose total size is at most ``budget_bytes``;
    of several with the least, the largest.

    Exact multiple-choice knapsack by dynamic programming over sizes; see the
    module docstring for the costs, the tie-break, the units and their
    rounding. Raises ConfigError when even the smallest bit widths exceed the budget.
    """
    problem = _problem(table, objective)
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int):
        raise ConfigError(f"budget_bytes must be an integer number of bytes, got {budget_bytes!r}")
    least = smallest_bytes(table)
    if budget_bytes < least:
        raise ConfigError(f"a budget of {budget_bytes:,} bytes is below the smallest model these bit widths "
                          f"give ({least:,} bytes, every layer at its smallest width)")
    available = budget_bytes - table.other_bytes
    unit = _granularity(available, granularity, max_states)
    best, choices = _least_losses(problem, available // unit, unit)
    if not np.isfinite(best).any():
        raise ConfigError(f"no choice fits {budget_bytes:,} bytes at a granularity of {unit} bytes "
                          f"(sizes are rounded up to whole units); pass granularity=1")
    bits = _backtrack(problem, choices, _fullest_of_least(best), unit)
    return _result(table, bits, objective, unit, budget_bytes=budget_bytes)


def allocate_for_loss(
    table: SensitivityTable,
    max_loss: float,
    objective: str = "accuracy",
    granularity: int | None = None,
    max_states: int = MAX_STATES,
) -> Allocation:
    """The smallest per-layer bits whose predicted ``objective`` (summed over layers) is at most ``max_loss``.

    With ``objective="accuracy"`` the loss is the predicted accuracy drop as
    a fraction (0.01 = one percentage point). Same dynamic programme as
    :func:`allocate_bits`, up to the size of the largest choices.
    """
    problem = _problem(table, objective)
    if not isinstance(max_loss, (int, float)) or isinstance(max_loss, bool) or not math.isfinite(max_loss) \
            or max_loss < 0:
        raise ConfigError(f"max_loss must be a finite number >= 0, got {max_loss!r}")
    largest = sum(int(sizes[-1]) for sizes in problem.sizes)
    unit = _granularity(largest, granularity, max_states)
    best, choices = _least_losses(problem, sum(-(-int(sizes[-1]) // unit) for sizes in problem.sizes), unit)
    fits = np.flatnonzero(best <= max_loss + TIE_RTOL * max_loss)
    if len(fits) == 0:
        raise ConfigError(f"no choice of bit widths keeps the predicted {objective} within {max_loss}; "
                          f"the least possible is {float(np.min(best)):.6g}")
    bits = _backtrack(problem, choices, int(fits[0]), unit)
    return _result(table, bits, objective, unit, max_loss=float(max_loss))


def allocate_like_uniform(
    table: SensitivityTable,
    bits: int,
    objective: str = "loss",
    granularity: int | None = None,
    max_states: int = MAX_STATES,
) -> Allocation:
    """The smallest per-layer bits predicted to lose no more than every layer at ``bits``: Zhou et al.'s
    "smaller model at equal accuracy". :func:`allocate_for_loss` with ``max_loss = sum_i loss_i(bits)``;
    the all-``bits`` model itself qualifies, so the result is never larger."""
    if bits not in table.bits:
        raise ConfigError(f"{bits} bits is not a candidate of the sensitivity table; candidates: {table.bits}")
    uniform = sum(table.cost(name, bits, objective) for name in table.layers)
    return allocate_for_loss(table, uniform, objective, granularity, max_states)
