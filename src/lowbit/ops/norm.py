"""batchnorm: eval-mode batch norm over axis 1, ``(x - mean) / sqrt(var + eps) * weight + bias`` (Ioffe & Szegedy
2015); BatchNorm1d on [N, C] or [N, C, L], BatchNorm2d on [N, C, H, W].

layer_norm: ``(x - mean) / sqrt(var + eps) * weight + bias`` with mean and (biased) variance over the last
``len(normalized_shape)`` axes (Ba et al. 2016), never the batch axis: ``nn.LayerNorm`` (as ConvNeXt's blocks use it
on NHWC maps after a permute) and ``F.layer_norm``. Its weight and bias, where it has them, are constants (the
module's own tensors, or the parameters handed to ``F.layer_norm``) of shape ``normalized_shape``, its inputs after
the tensor it normalizes.
"""

from __future__ import annotations

import numpy as np

from ..errors import UnsupportedLayerError
from .schema import MAX_ELEMENTS, Bool, Capture, Ints, Node, Number, OpSchema, Shape, argument, register


def batchnorm(x: np.ndarray, mean: np.ndarray, var: np.ndarray, weight: np.ndarray | None,
              bias: np.ndarray | None, eps: float) -> np.ndarray:
    """Eval-mode batch norm over axis 1: ``(x - mean) / sqrt(var + eps) * weight + bias``."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    factor = (np.float32(1) / np.sqrt(var + np.float32(eps))).astype(np.float32)
    if weight is not None:
        factor = factor * weight
    shift = -mean * factor + (bias if bias is not None else np.float32(0))
    y = (x * factor.reshape(shape)).astype(np.float32, copy=False)
    y += shift.reshape(shape)
    return y


def _shape(node: Node) -> Shape:
    x = node.rank(1, 2, 3)
    if ("weight" in node.tensors) != ("bias" in node.tensors):
        raise node.fail("an affine batch norm stores both weight and bias, a plain one neither")
    wrong = {k: list(s) for k, s in node.tensors.items() if s != x[:1]}
    if wrong:
        raise node.fail(f"its tensors must have shape [{x[0]}] (the input's channels), got {wrong}")
    return x


def _module(m, shape: list[int], where: str) -> dict:
    if not m.track_running_stats:
        raise UnsupportedLayerError(f"{where}: batch norm without running statistics cannot be captured")
    return {"eps": m.eps}


BATCHNORM = register(OpSchema(
    "batchnorm", _shape, tensors=("running_mean", "running_var"), optional=("weight", "bias"),
    attrs={"eps": Number(0, open_low=True)}, module=True,
    capture=Capture(modules=("torch.nn.BatchNorm1d", "torch.nn.BatchNorm2d"), module=_module)))


# ---------------------------------------------------------------- layer norm


def layer_norm(x: np.ndarray, count: int, weight: np.ndarray | None, bias: np.ndarray | None,
               eps: float) -> np.ndarray:
    """torch.nn.functional.layer_norm over the last ``count`` axes, in float32."""
    axes = tuple(range(-count, 0))
    centered = x - x.mean(axis=axes, keepdims=True, dtype=np.float32)
    var = (centered * centered).mean(axis=axes, keepdims=True, dtype=np.float32)
    y = centered * (np.float32(1) / np.sqrt(var + np.float32(eps)))
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y.astype(np.float32, copy=False)


def _affine(xs: list, a: dict) -> tuple:
    """(weight or None, bias or None) among a layer_norm node's inputs."""
    return (xs[1] if a["weight"] else None), (xs[1 + a["weight"]] if a["bias"] else None)


def _layer_norm_shape(node: Node) -> Shape:
    x, a = node.inputs[0], node.attrs
    shape, constant = a["normalized_shape"], node.constant or [False] * len(node.inputs)
    if constant[0]:
        raise node.fail("normalizes a constant; its first input must be a batched tensor")
    if len(node.inputs) != 1 + a["weight"] + a["bias"]:
        raise node.fail(f"takes its input{', weight' * a['weight']}{', bias' * a['bias']}: "
                        f"{1 + a['weight'] + a['bias']} input(s), got {len(node.inputs)}")
    if not 1 <= len(shape) <= len(x) or list(x[len(x) - len(shape):]) != shape:
        raise node.fail(f"normalized_shape {shape} must be the last axes of its input {[-1, *x]} (not the batch)")
    names = ["weight"] * a["weight"] + ["bias"] * a["bias"]
    for name, is_constant, tensor in zip(names, constant[1:], node.inputs[1:]):
        if not is_constant or list(tensor) != shape:
            raise node.fail(f"its {name} must be a constant of shape normalized_shape {shape}, got "
                            f"{list(tensor) if is_constant else [-1, *tensor]}")
    return x


def _layer_norm_call(args: list, kwargs: dict, shape: list[int], where: str) -> tuple[dict, list]:
    normalized = argument(args, kwargs, 1, "normalized_shape", None)
    weight, bias = argument(args, kwargs, 2, "weight", None), argument(args, kwargs, 3, "bias", None)
    normalized = [normalized] if isinstance(normalized, int) else normalized
    if not isinstance(normalized, (list, tuple)) or not all(isinstance(n, int) for n in normalized):
        raise UnsupportedLayerError(f"{where}: layer_norm is captured with normalized_shape given as ints, got "
                                    f"{normalized!r}")
    return _layer_norm_attrs(normalized, argument(args, kwargs, 4, "eps", 1e-5), weight is not None,
                             bias is not None, shape, where), [args[0], *(t for t in (weight, bias) if t is not None)]


def _layer_norm_attrs(normalized, eps: float, weight: bool, bias: bool, shape: list[int], where: str) -> dict:
    if len(normalized) >= len(shape):
        raise UnsupportedLayerError(f"{where}: a layer norm over the batch axis cannot be captured")
    return {"normalized_shape": [int(n) for n in normalized], "eps": float(eps), "weight": weight, "bias": bias}


def _layer_norm_onnx(b, name: str, xs: list[str], a: dict) -> str:
    """LayerNormalization (opset >= 17; a weight of ones where there is none), else its primitive ops."""
    weight, bias = _affine(xs, a)
    count = len(a["normalized_shape"])
    if b.opset >= 17:
        scale = weight or b.const(f"{name}.scale", np.ones(a["normalized_shape"], np.float32))
        return b.node("LayerNormalization", [xs[0], scale, *([bias] if bias else [])], name, axis=-count,
                      epsilon=a["eps"])
    axes = list(range(-count, 0))  # opset < 18: ReduceMean takes its axes as an attribute
    centered = b.node("Sub", [xs[0], b.node("ReduceMean", [xs[0]], f"{name}.mean", axes=axes)], f"{name}.centered")
    var = b.node("ReduceMean", [b.node("Mul", [centered, centered], f"{name}.square")], f"{name}.var", axes=axes)
    std = b.node("Sqrt", [b.node("Add", [var, b.const(f"{name}.eps", np.array(a["eps"], np.float32))],
                                 f"{name}.var_eps")], f"{name}.std")
    steps = [("Div", std), *((("Mul", weight),) if weight else ()), *((("Add", bias),) if bias else ())]
    y = centered
    for i, (op, operand) in enumerate(steps):
        y = b.node(op, [y, operand], name if i == len(steps) - 1 else f"{name}.{op.lower()}")
    return y


LAYER_NORM = register(OpSchema(
    "layer_norm", _layer_norm_shape, inputs=None, constants=True,
    attrs={"normalized_shape": Ints(None, 1, MAX_ELEMENTS), "eps": Number(0, open_low=True), "weight": Bool(),
           "bias": Bool()},
    capture=Capture(("torch.nn.functional.layer_norm",), _layer_norm_call, ("torch.nn.LayerNorm",),
                    lambda m, shape, where: _layer_norm_attrs(m.normalized_shape, m.eps, m.weight is not None,
                                                              m.bias is not None, shape, where),
                    module_tensors=("weight", "bias")),
    numpy=lambda xs, a: layer_norm(xs[0], len(a["normalized_shape"]), *_affine(xs, a), a["eps"]),
    torch=lambda t, xs, a: t.nn.functional.layer_norm(xs[0], a["normalized_shape"], *_affine(xs, a), a["eps"]),
    onnx=_layer_norm_onnx))
