"""Quantizer specs as stored in a file: each registered quantizer's parameters, types and ranges, without torch.

``check_spec(spec, where)`` accepts exactly the specs that
``lowbit.quantizers.get`` builds (a test holds the two together) and returns
the spec with every parameter filled in (defaults for the missing ones), so
the torch-free Engine reads the same numbers a loaded model uses. Anything
else is a :class:`FormatError` naming ``where`` and saying what is valid;
nothing is computed from an unchecked number (no ``2 ** bits`` of a stored
bit width before it is known to lie in the quantizer's range).
"""

from __future__ import annotations

import math
from typing import Any, Callable

from ..errors import FormatError
from .schema import Bool, Choice, Int, Nullable, Number

#: straight-through estimators of the sign (lowbit.quantizers.ste.SIGN_STES)
SIGN_STES = ("identity", "clipped", "approx_sign")
#: range observers (lowbit.quantizers.observers.OBSERVERS)
OBSERVERS = ("minmax", "percentile", "mse", "entropy")
#: k-means initialisations (lowbit.quantizers.kmeans.INITS)
KMEANS_INITS = ("linear", "density", "random")
ROLES = ("weight", "activation")
#: linear's full-scale range must keep the step a normal float32: fsr in [bits - signed - 126, 127]
LINEAR_FSR_HIGH = 127
#: log2's full-scale range
LOG_FSR = (-125, 128)

_STE = Choice(SIGN_STES)

#: quantizer name -> parameter -> (type, default)
SPECS: dict[str, dict[str, tuple[Any, Any]]] = {
    "abc_act": {"bases": (Int(1, 8), 3)},
    "abc_weight": {"bases": (Int(1, 8), 3)},
    "binary": {"ste": (_STE, "clipped")},
    "dorefa_act": {"bits": (Int(1, 8), 2)},
    "dorefa_grad": {"bits": (Int(1, 16), 6), "seed": (Nullable(Int()), None)},
    "dorefa_weight": {"bits": (Int(1, 8), 2)},
    "group_binary": {"group_size": (Int(1, 2**31), 128)},
    "group_log2": {"bits": (Int(2, 6), 4), "group_size": (Int(1, 2**31), 128)},
    "group_kmeans": {"bits": (Int(1, 8), 3), "group_size": (Int(1, 2**31), 128), "iters": (Int(0, 10_000), 30)},
    "group_ternary": {"group_size": (Int(1, 2**31), 128), "threshold": (Number(0, math.inf), 0.7)},
    "group_uniform": {"bits": (Int(2, 8), 4), "group_size": (Int(1, 2**31), 128), "symmetric": (Bool(), False)},
    "kmeans": {"bits": (Int(1, 8), 4), "init": (Choice(KMEANS_INITS), "linear"), "iters": (Int(0, 10_000), 30),
               "seed": (Int(), 0), "keep_zero": (Bool(), False)},
    "linear": {"bits": (Int(2, 16), 4), "fsr": (Nullable(Int()), None), "signed": (Bool(), True),
               "dynamic": (Bool(), True)},
    "log2": {"bits": (Int(2, 8), 4), "fsr": (Nullable(Int(*LOG_FSR)), None), "signed": (Bool(), True),
             "dynamic": (Bool(), True)},
    "lsq": {"bits": (Int(1, 8), 4), "signed": (Bool(), True), "per_channel": (Bool(), False),
            "role": (Choice(ROLES), "weight")},
    "pact": {"bits": (Int(1, 8), 4), "alpha": (Number(0, math.inf, open_low=True), 10.0)},
    "ternary": {"threshold": (Number(0, math.inf), 0.7), "per_channel": (Bool(), False)},
    "uniform": {"bits": (Int(2, 16), 8), "symmetric": (Bool(), False), "per_channel": (Bool(), False),
                "narrow": (Bool(), False), "dynamic": (Bool(), True), "observer": (Choice(OBSERVERS), "minmax"),
                "percentile": (Number(50, 100), 99.99), "per_token": (Bool(), False),
                "token_axis": (Int(-2, 0), -1)},
    "xnor": {"ste": (_STE, "clipped"), "role": (Choice(ROLES), "weight")},
}


def _linear(spec: dict[str, Any], where: str) -> None:
    low = spec["bits"] - int(spec["signed"]) - 126
    if spec["fsr"] is not None and not low <= spec["fsr"] <= LINEAR_FSR_HIGH:
        raise FormatError("bad-spec", f"{where}: linear fsr must be null or an int from {low} to {LINEAR_FSR_HIGH} "
                                      f"for {spec['bits']} bits, got {spec['fsr']!r}")


def _lsq(spec: dict[str, Any], where: str) -> None:
    if spec["signed"] and spec["bits"] < 2:
        raise FormatError("bad-spec", f"{where}: signed lsq needs bits from 2 to 8, got {spec['bits']}")
    if spec["per_channel"] and spec["role"] == "activation":
        raise FormatError("bad-spec", f"{where}: lsq per_channel steps are for role 'weight', not 'activation'")


def _uniform(spec: dict[str, Any], where: str) -> None:
    if spec["per_channel"] and spec["observer"] == "entropy":
        raise FormatError("bad-spec", f"{where}: the uniform entropy observer is per tensor, not per_channel")
    if spec["per_token"] and (spec["per_channel"] or not spec["dynamic"] or spec["observer"] != "minmax"):
        raise FormatError("bad-spec", f"{where}: per_token uniform ranges are read at run time: dynamic true, "
                                      "per_channel false and observer 'minmax'")
    if not spec["per_token"]:  # written only when set, as UniformQuantizer.spec() does
        if spec["token_axis"] != -1:
            raise FormatError("bad-spec", f"{where}: uniform token_axis is for per_token ranges")
        del spec["per_token"], spec["token_axis"]


#: checks across a quantizer's parameters, run after each parameter passed its own
_JOINT: dict[str, Callable[[dict[str, Any], str], None]] = {"linear": _linear, "lsq": _lsq, "uniform": _uniform}


def check_spec(spec: object, where: str) -> dict[str, Any] | None:
    """The full spec (defaults filled in) of a stored quantizer spec, or None for None; FormatError otherwise."""
    if spec is None:
        return None
    name = spec.get("name") if isinstance(spec, dict) else None
    if not isinstance(name, str):
        raise FormatError("bad-spec", f"{where}: a quantizer spec is null or an object with a name, got "
                                      f"{str(spec)[:80]}")
    if name not in SPECS:
        raise FormatError("unknown-quantizer", f"{where}: unknown quantizer {name[:80]!r}; known: "
                                               f"{', '.join(sorted(SPECS))}")
    table = SPECS[name]
    unknown = sorted(set(spec) - {"name", *table})  # type: ignore[arg-type]
    if unknown:
        raise FormatError("bad-spec", f"{where}: quantizer {name!r} takes {', '.join(table) or 'no parameters'}, "
                                      f"not {', '.join(map(repr, unknown))[:120]}")
    full: dict[str, Any] = {"name": name}
    for key, (kind, default) in table.items():
        value = spec.get(key, default)  # type: ignore[union-attr]
        try:
            full[key] = kind.check(value, f"{name} {key}", where)
        except FormatError as exc:
            raise FormatError("bad-spec", exc.message) from None
    if name in _JOINT:
        _JOINT[name](full, where)
    return full
