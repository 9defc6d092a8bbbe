"""ReActNet's activations (Liu et al., ECCV 2020; modules in :mod:`lowbit.nn.react`), per channel along axis 1:

- rsign_threshold: ``x - alpha_c``, RSign's learned threshold; the sign is the input quantizer of the binary layer
  that reads it, so the Engine's XNOR kernels pack ``sign(x - alpha_c)`` (the subtraction is exact in sign:
  ``x - alpha_c >= 0`` iff ``x >= alpha_c``).
- rprelu: ``t + zeta_c`` where ``t = x - gamma_c > 0``, else ``beta_c t + zeta_c``.

Their per-channel vectors are the modules' own tensors, stored as constants of shape [C] (the input's channels)
that follow the input. ONNX: Reshape of each vector to [C, 1, ...], then Sub (rsign_threshold); Sub, PRelu, Add
(rprelu: PRelu is ``t`` for ``t >= 0`` and ``beta t`` below, equal to the ``t > 0`` split at ``t = 0``).
"""

from __future__ import annotations

import numpy as np

from .schema import Capture, Node, OpSchema, Shape, register


def _shape(names: tuple[str, ...]):
    def rule(node: Node) -> Shape:
        x = node.inputs[0]
        constant = node.constant or [False] * len(node.inputs)
        if len(node.inputs) != 1 + len(names):
            raise node.fail(f"takes its input and {', '.join(names)}: {1 + len(names)} inputs, got "
                            f"{len(node.inputs)}")
        if constant[0] or not x:
            raise node.fail(f"takes a batched input with channels on axis 1, got {list(x)}")
        for name, is_constant, shape in zip(names, constant[1:], node.inputs[1:]):
            if not is_constant or list(shape) != [x[0]]:
                raise node.fail(f"its {name} must be a constant of shape [{x[0]}] (the input's channels), got "
                                f"{list(shape) if is_constant else [-1, *shape]}")
        return x
    return rule


def channels(v, ndim: int):
    """A [C] vector shaped to broadcast along axis 1 of an ``ndim``-D array (numpy or torch)."""
    return v.reshape(-1, *([1] * (ndim - 2)))


def rsign_threshold(x, alpha):
    """``x - alpha_c`` (numpy or torch arrays alike, float32)."""
    return x - channels(alpha, x.ndim)


def rprelu(x, gamma, beta, zeta):
    """``t + zeta_c`` where ``t = x - gamma_c > 0``, else ``beta_c t + zeta_c``; numpy arrays or torch tensors alike
    (the one formula of the module, the loaded model and the Engine). numpy computes it in place as
    ``max(t, 0) + beta_c min(t, 0) + zeta_c``, the same values (one of the two terms is an exact zero) in fewer
    passes over the map."""
    shifted = x - channels(gamma, x.ndim)
    if isinstance(shifted, np.ndarray):
        below = np.minimum(shifted, np.float32(0))
        shifted -= below
        below *= channels(beta, x.ndim)
        shifted += below
        shifted += channels(zeta, x.ndim)
        return shifted
    negative = channels(beta, x.ndim) * shifted
    return shifted.where(shifted > 0, negative) + channels(zeta, x.ndim)  # torch's Tensor.where(condition, other)


def _onnx_vectors(b, name: str, xs: list[str]) -> list[str]:
    """The node's per-channel initializers reshaped to [C, 1, ...] against its input's rank."""
    shape = b.const(f"{name}.channel_shape", np.array([-1] + [1] * (len(b.shapes[xs[0]]) - 1), np.int64))
    return [b.node("Reshape", [v, shape], f"{name}.{i}") for i, v in enumerate(xs[1:])]


def _rprelu_onnx(b, name: str, xs: list[str], a: dict) -> str:
    gamma, beta, zeta = _onnx_vectors(b, name, xs)
    shifted = b.node("Sub", [xs[0], gamma], f"{name}.shifted")
    return b.node("Add", [b.node("PRelu", [shifted, beta], f"{name}.prelu"), zeta], name)


RSIGN_THRESHOLD = register(OpSchema(
    "rsign_threshold", _shape(("alpha",)), inputs=2, constants=True,
    capture=Capture(modules=("lowbit.nn.react.RSignThreshold",), module_tensors=("alpha",)),
    numpy=lambda xs, a: rsign_threshold(*xs), torch=lambda t, xs, a: rsign_threshold(*xs),
    onnx=lambda b, name, xs, a: b.node("Sub", [xs[0], _onnx_vectors(b, name, xs)[0]], name)))
RPRELU = register(OpSchema(
    "rprelu", _shape(("gamma", "beta", "zeta")), inputs=4, constants=True,
    capture=Capture(modules=("lowbit.nn.react.RPReLU",), module_tensors=("gamma", "beta", "zeta")),
    numpy=lambda xs, a: rprelu(*xs), torch=lambda t, xs, a: rprelu(*xs),
    onnx=_rprelu_onnx))
