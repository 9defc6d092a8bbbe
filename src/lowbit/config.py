"""Quantization configs: which quantizers each layer gets, presets by name, versioned JSON.

:func:`lowbit.quantize` converts ``nn.Linear`` and ``nn.Conv2d`` layers. For
each one a :class:`QuantConfig` gives three quantizer specs (``weight``,
``input``, ``output``; a spec is a registered quantizer name, a dict
``{"name": ..., **kwargs}`` or None for float), resolved in this order:

1. the defaults ``config.weight``, ``config.input``, ``config.output``;
2. the first / last layer policy, for the first and the last convertible
   layer in module registration order (``model.named_modules()``; a layer that
   is both takes the ``first`` policy):

   - ``"8bit"`` (default): uniform 8-bit symmetric per-channel weights and
     8-bit affine static inputs, no output quantizer (:data:`EIGHT_BIT`);
   - ``"same"``: like every other layer;
   - ``"float"``: left as the float torch layer;
   - a dict with some of ``weight`` / ``input`` / ``output``: those specs
     replace the defaults (for example ``{"input": None}`` keeps real inputs);

3. the first :class:`LayerRule` in ``config.rules`` that matches the layer:
   ``skip=True`` leaves it float, otherwise every spec the rule names
   replaces the one from steps 1-2 (a rule also overrides the policy).

4. ``ptq``: post-training methods applied in this order whatever the list order (see :mod:`lowbit.ptq`):
   ``"cle"`` (cross-layer equalization, data-free, run by ``quantize``), then by ``calibrate`` after the
   activation ranges: ``"adaround"`` or ``"gptq"`` (weight rounding, at most one), ``"bias"`` (bias
   correction); ``ptq_options`` maps a method to its keyword options, e.g. ``{"adaround": {"steps": 500}}``.

Configs round-trip through :meth:`QuantConfig.to_dict` / :meth:`QuantConfig.to_json`
with a ``version``; reading accepts only known keys and versions (an allowlist)
and raises :class:`~lowbit.errors.ConfigError` otherwise. Presets are data:
:data:`PRESETS` maps each name to a config dict.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, fields
from fnmatch import fnmatchcase
from typing import Any

from torch import nn

from . import quantizers
from .errors import ConfigError

Spec = str | dict[str, Any] | None

CONFIG_VERSION = 1
SUPPORTED_VERSIONS = (1,)

#: a rule field left at this value keeps the spec from the defaults / policy
INHERIT = "inherit"

SLOTS = ("weight", "input", "output")


def uniform_weight(bits: int) -> dict[str, Any]:
    """Uniform symmetric per-output-channel weights, range from each tensor. From 8 bits on the narrow grid
    ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` with ``s = max |w| / (2^(b-1) - 1)``, as torch's and onnxruntime's symmetric
    int8 weights: the largest weight of each channel is a code, not clipped by half a step (EfficientNet-Lite1,
    8-bit weights alone: logits cosine 0.985 against 0.968 on the full grid). Below 8 bits every level counts
    (2 bits: 4 levels, narrow 3), so the full grid ``[-2^(b-1), 2^(b-1) - 1]``."""
    spec = {"name": "uniform", "bits": bits, "symmetric": True, "per_channel": True, "dynamic": True}
    return {**spec, "narrow": True} if bits >= 8 else spec


def uniform_act(bits: int) -> dict[str, Any]:
    """Uniform affine per-tensor activations, range from calibration (min/max observer)."""
    return {"name": "uniform", "bits": bits, "symmetric": False, "dynamic": False}


def token_act(bits: int) -> dict[str, Any]:
    """Uniform affine activations with one range per token (each vector along the last axis), read at run time."""
    return {"name": "uniform", "bits": bits, "symmetric": False, "dynamic": True, "per_token": True}


#: the specs of the "8bit" first/last layer policy
EIGHT_BIT: dict[str, Spec] = {"weight": uniform_weight(8), "input": uniform_act(8), "output": None}
POLICIES = ("8bit", "same", "float")

_LOW_BITS = (2, 3, 4, 5, 6, 8)

#: preset name -> config dict (as read by QuantConfig.from_dict); first/last default to "8bit"
PRESETS: dict[str, dict[str, Any]] = {
    **{f"w{w}a{a}": {"weight": uniform_weight(w), "input": uniform_act(a)}
       for w, a in ((8, 8), (6, 6), (4, 8), (4, 4), (3, 3), (2, 2))},
    **{f"w{w}": {"weight": uniform_weight(w)} for w in (8, 4)},
    # 7-bit weights in every layer: onnxruntime's u8 x s8 kernels cannot saturate on any x86 CPU (docs/onnx.md)
    "w7a8": {"weight": uniform_weight(7), "input": uniform_act(8), "first": "same", "last": "same"},
    **{f"linear{b}": {"weight": {"name": "linear", "bits": b}, "input": uniform_act(8)} for b in _LOW_BITS},
    **{f"log{b}": {"weight": {"name": "log2", "bits": b}, "input": uniform_act(8)} for b in _LOW_BITS},
    "bnn": {"weight": {"name": "binary", "ste": "clipped"}, "input": {"name": "binary", "ste": "clipped"}},
    "xnor": {"weight": {"name": "xnor", "role": "weight"}, "input": {"name": "xnor", "role": "activation"}},
    "bwn": {"weight": {"name": "xnor", "role": "weight"}},
    "ternary": {"weight": {"name": "ternary"}},
    "dorefa-w1a2": {"weight": {"name": "dorefa_weight", "bits": 1}, "input": {"name": "dorefa_act", "bits": 2}},
    "dorefa-w2a2": {"weight": {"name": "dorefa_weight", "bits": 2}, "input": {"name": "dorefa_act", "bits": 2}},
    "dorefa-w1a2g6": {
        "weight": {"name": "dorefa_weight", "bits": 1},
        "input": {"name": "dorefa_act", "bits": 2},
        "output": {"name": "dorefa_grad", "bits": 6},
    },
    # post-training rounding learned per layer (AdaRound): bench/ptq.py and docs/benchmarks.md
    "w4a8-ptq": {"weight": uniform_weight(4), "input": uniform_act(8), "ptq": ["adaround"]},
    "w4a4-ptq": {"weight": uniform_weight(4), "input": {**uniform_act(4), "observer": "mse"}, "ptq": ["adaround"]},
    **{f"kmeans{b}": {"weight": {"name": "kmeans", "bits": b}} for b in (4, 5, 8)},
    # weight-only group-wise uniform (GPTQ / AWQ storage): a scale and zero point per 128 / 64 inputs, every layer
    **{f"w{b}g{g}": {"weight": {"name": "group_uniform", "bits": b, "group_size": g}, "first": "same",
                     "last": "same"} for b, g in ((4, 128), (3, 64))},
    # 8-bit activations with one range per token read at run time (LLM.int8, SmoothQuant): Transformers and RNNs
    "w8a8-dynamic": {"weight": uniform_weight(8), "input": token_act(8), "first": "same", "last": "same"},
    "w4g128-a8-dynamic": {"weight": {"name": "group_uniform", "bits": 4, "group_size": 128}, "input": token_act(8),
                          "first": "same", "last": "same"},
    # weight-only codebooks per group of 64 inputs: k-means levels (SqueezeLLM) and powers of two (Miyashita)
    "w3-kmeans-g64": {"weight": {"name": "group_kmeans", "bits": 3, "group_size": 64}, "first": "same", "last": "same"},
    "w2-log-g64": {"weight": {"name": "group_log2", "bits": 2, "group_size": 64}, "first": "same", "last": "same"},
    **{f"lsq-w{b}a{b}": {"weight": {"name": "lsq", "bits": b, "signed": True},
                         "input": {"name": "lsq", "bits": b, "signed": False}} for b in (2, 3, 4)},
    **{f"pact-w{b}a{b}": {"weight": {"name": "dorefa_weight", "bits": b}, "input": {"name": "pact", "bits": b}}
       for b in (2, 4)},
    **{f"abc-{m}-{n}": {"weight": {"name": "abc_weight", "bases": m}, "input": {"name": "abc_act", "bases": n}}
       for m, n in ((3, 3), (5, 5))},
}


def _check_spec(spec: Any, where: str) -> None:
    """Raise ConfigError unless ``spec`` is None, a known name or a dict that builds a quantizer."""
    if isinstance(spec, quantizers.Quantizer):
        raise ConfigError(f"{where}: a config holds specs (names or dicts), not quantizer objects; use q.spec()")
    try:
        quantizers.get(spec)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _check_keys(data: Any, allowed: tuple[str, ...], where: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a dict, got {type(data).__name__}")
    unknown = sorted(set(data) - set(allowed), key=str)
    if unknown:
        listed = ", ".join(map(repr, unknown))
        raise ConfigError(f"{where} has unknown key(s) {listed}; valid keys: {', '.join(allowed)}")


def _check_policy(policy: Any, where: str) -> None:
    if isinstance(policy, str):
        if policy not in POLICIES:
            valid = ", ".join(POLICIES)
            raise ConfigError(f"{where} policy {policy!r} is not valid; valid: {valid} or a dict of specs")
        return
    _check_keys(policy, SLOTS, where)
    for slot, spec in policy.items():
        _check_spec(spec, f"{where}.{slot}")


def _field_default(cls: type, name: str) -> Any:
    """The default value of dataclass field ``name``."""
    return next(f.default for f in fields(cls) if f.name == name)


@dataclass
class LayerRule:
    """Per-layer override, matched by ``fnmatch`` name ``pattern`` and/or ``layer_type`` (class name).

    A rule needs at least one of the two; with both, both must match. Spec
    fields left at :data:`INHERIT` keep the defaults / policy; ``skip=True``
    leaves the matched layers float.
    """

    pattern: str | None = None
    layer_type: str | None = None
    weight: Spec = INHERIT
    input: Spec = INHERIT
    output: Spec = INHERIT
    skip: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError if the rule cannot be applied."""
        if self.pattern is None and self.layer_type is None:
            raise ConfigError("a LayerRule needs a name 'pattern' or a 'layer_type' (for example 'Conv2d')")
        for key in ("pattern", "layer_type"):
            if getattr(self, key) is not None and not isinstance(getattr(self, key), str):
                raise ConfigError(f"LayerRule.{key} must be a string, got {getattr(self, key)!r}")
        if not isinstance(self.skip, bool):
            raise ConfigError(f"LayerRule.skip must be true or false, got {self.skip!r}")
        overrides = self.overrides()
        if self.skip and overrides:
            raise ConfigError(
                f"LayerRule {self.pattern or self.layer_type!r} has skip=True and specs {sorted(overrides)}; use one"
            )
        for slot, spec in overrides.items():
            _check_spec(spec, f"rule {self.pattern or self.layer_type!r} {slot}")

    def matches(self, name: str, module: nn.Module) -> bool:
        return (self.pattern is None or fnmatchcase(name, self.pattern)) and (
            self.layer_type is None or type(module).__name__ == self.layer_type
        )

    def overrides(self) -> dict[str, Spec]:
        """The specs this rule sets (fields not left at INHERIT)."""
        return {slot: getattr(self, slot) for slot in SLOTS if getattr(self, slot) != INHERIT}

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}
        return {k: v for k, v in data.items() if v != _field_default(LayerRule, k)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerRule:
        _check_keys(data, tuple(f.name for f in fields(cls)), "a rule")
        return cls(**copy.deepcopy(data))


@dataclass
class QuantConfig:
    """Default specs, the first/last layer policy and per-layer rules; see the module docstring."""

    weight: Spec = None
    input: Spec = None
    output: Spec = None
    first: str | dict[str, Spec] = "8bit"
    last: str | dict[str, Spec] = "8bit"
    rules: list[LayerRule] = field(default_factory=list)
    ptq: list[str] = field(default_factory=list)
    ptq_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the field at fault if any part of the config is not valid."""
        if isinstance(self.version, bool) or self.version not in SUPPORTED_VERSIONS:
            raise ConfigError(f"config version {self.version!r} is not supported; supported: {SUPPORTED_VERSIONS}")
        for slot in SLOTS:
            _check_spec(getattr(self, slot), f"config {slot}")
        _check_policy(self.first, "first")
        _check_policy(self.last, "last")
        if not isinstance(self.rules, list) or not all(isinstance(r, LayerRule) for r in self.rules):
            raise ConfigError("config rules must be a list of LayerRule")
        for rule in self.rules:
            rule.validate()
        from .ptq import check_methods  # the methods' options are their functions' keywords

        check_methods(self.ptq, self.ptq_options)

    def layer_specs(
        self, name: str, module: nn.Module, first: bool = False, last: bool = False
    ) -> dict[str, Spec] | None:
        """The weight/input/output specs for layer ``name``, or None to leave it float."""
        specs = {slot: getattr(self, slot) for slot in SLOTS}
        policy = self.first if first else self.last if last else "same"
        convert = policy != "float"
        if policy == "8bit":
            specs.update(EIGHT_BIT)
        elif isinstance(policy, dict):
            specs.update(policy)
        rule = next((r for r in self.rules if r.matches(name, module)), None)
        if rule is not None:
            convert = not rule.skip
            specs.update(rule.overrides())
        return copy.deepcopy(specs) if convert else None

    def to_dict(self) -> dict[str, Any]:
        specs = {slot: copy.deepcopy(getattr(self, slot)) for slot in (*SLOTS, "first", "last")}
        methods = {"ptq": list(self.ptq), "ptq_options": copy.deepcopy(self.ptq_options)} if self.ptq else {}
        return {"version": self.version, **specs, "rules": [r.to_dict() for r in self.rules], **methods}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        """Read a config dict; ``version`` may be left out (the current version is assumed)."""
        _check_keys(data, tuple(f.name for f in fields(cls)), "a config")
        data = copy.deepcopy(data)
        rules = data.pop("rules", [])
        if not isinstance(rules, list):
            raise ConfigError(f"config rules must be a list of rule dicts, got {type(rules).__name__}")
        return cls(**data, rules=[LayerRule.from_dict(r) for r in rules])

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> QuantConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config is not valid JSON: {exc}") from None
        return cls.from_dict(data)


def preset(name: str) -> QuantConfig:
    """The QuantConfig of a named preset (see :data:`PRESETS`)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return QuantConfig.from_dict(PRESETS[name])


def as_config(config: str | dict[str, Any] | QuantConfig) -> QuantConfig:
    """A preset name, a config dict or a QuantConfig, as a validated QuantConfig."""
    if isinstance(config, QuantConfig):
        config.validate()
        return config
    if isinstance(config, str):
        return preset(config)
    if isinstance(config, dict):
        return QuantConfig.from_dict(config)
    raise ConfigError(f"a config is a preset name, a dict or a QuantConfig, not {type(config).__name__}")
