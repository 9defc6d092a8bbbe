"""matmul: ``y = a @ b`` of two batched tensors (torch.matmul / bmm / ``@``), the two products of scaled dot-product
attention, ``softmax(q k^T / sqrt(d) + mask) v`` (Vaswani et al. 2017): both operands are activations, so
whole-graph quantization treats it as a join (``placement = "joins"``: both inputs and the output quantized, as
onnxruntime's QLinearMatMul takes and gives them). The operands have the same rank and the same leading (batch)
axes; ``a``'s last axis is ``b``'s second to last. ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` are
captured as their decomposition into linears, reshapes, transposes, matmuls and a softmax
(:mod:`lowbit.export.transformer`).
"""

from __future__ import annotations

import numpy as np

from .schema import Capture, Node, OpSchema, Shape, register


def _shape(node: Node) -> Shape:
    a, b = node.inputs
    if len(a) < 2 or len(a) != len(b) or a[:-2] != b[:-2] or a[-1] != b[-2]:
        raise node.fail(f"multiplies {[-1, *a]} by {[-1, *b]}: both need the same rank (at least 3, batch "
                        "included) and leading axes, and the first's last axis must be the second's second to last")
    return (*a[:-1], b[-1])


def _call(args: list, kwargs: dict, shape: list[int], where: str) -> tuple[dict, list]:
    return {}, [args[0] if args else kwargs["input"], args[1] if len(args) > 1 else kwargs.get("other",
                                                                                                 kwargs.get("mat2"))]


MATMUL = register(OpSchema(
    "matmul", _shape, inputs=2, placement="joins",
    capture=Capture(("torch.matmul", "torch.bmm", "operator.matmul", "Tensor.matmul", "Tensor.bmm"), _call),
    numpy=lambda xs, a: np.matmul(xs[0], xs[1]), torch=lambda t, xs, a: t.matmul(xs[0], xs[1]),
    onnx=lambda b, name, xs, a: b.node("MatMul", xs, name)))
