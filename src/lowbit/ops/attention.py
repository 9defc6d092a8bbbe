"""matmul: ``y = a @ b`` of two batched tensors (torch.matmul / bmm / ``@``), the two products of scaled dot-product
attention, ``softmax(q k^T / sqrt(d) + mask) v`` (Vaswani et al. 2017): both operands are activations, so
whole-graph quantization treats it as a join (``placement = "joins"``: both inputs and the output quantized, as
onnxruntime's QLinearMatMul takes and gives them). The operands have the same rank and the same leading (batch)
axes; ``a``'s last axis is ``b``'s second to last. ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` are
captured as their decomposition into linears, reshapes, transposes, matmuls and a softmax
(:mod:`lowbit.export.transformer`).

attention: ``softmax(q k^T scale + 0) v`` over the last two axes, ``F.scaled_dot_product_attention`` as a custom
attention module calls it (queries, keys, values [..., L, E]; ``scale`` defaults to ``1 / sqrt(E)``, recorded;
``causal`` from ``is_causal``: key ``j`` after query ``i`` gets weight 0, the softmax op's causal form; no mask,
dropout or grouped-query form), a join of its three inputs; ONNX writes it as Transpose, MatMul, Mul, (Add of a
0 / -inf constant where causal), Softmax, MatMul.
"""

from __future__ import annotations

import numpy as np

from ..errors import UnsupportedLayerError
from .activation import causal_scores
from .schema import Bool, Capture, Node, Number, OpSchema, Shape, register


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


# ---------------------------------------------------------------- scaled dot-product attention


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, causal: bool = False) -> np.ndarray:
    """``softmax(q k^T scale) v`` over the last two axes, in float32 (torch's scaled_dot_product_attention);
    ``causal``: each query attends to keys at or before its own position only."""
    from .activation import softmax

    scores = np.matmul(q, np.swapaxes(k, -1, -2)) * np.float32(scale)
    return np.matmul(softmax(scores, -1, causal), v)


def _attention_shape(node: Node) -> Shape:
    q, k, v = node.inputs
    if len(q) < 2 or not len(q) == len(k) == len(v) or not q[:-2] == k[:-2] == v[:-2] or q[-1] != k[-1] \
            or k[-2] != v[-2]:
        raise node.fail(f"attends with queries {[-1, *q]}, keys {[-1, *k]} and values {[-1, *v]}: all need the same "
                        "rank (at least 3, batch included) and leading axes, queries and keys the same last axis, keys "
                        "and values the same length")
    return (*q[:-1], v[-1])


def _attention_call(args: list, kwargs: dict, shape: list[int], where: str) -> tuple[dict, list]:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    given = {**dict(zip(names, args)), **kwargs}
    if given.get("attn_mask") is not None or given.get("dropout_p", 0.0) or given.get("enable_gqa"):
        raise UnsupportedLayerError(f"{where}: scaled_dot_product_attention is captured without a mask, dropout or "
                                    "enable_gqa (is_causal is taken; add a mask to the scores of a decomposed "
                                    "attention)")
    if not isinstance(given.get("is_causal", False), bool):
        raise UnsupportedLayerError(f"{where}: is_causal must be a Python bool, not computed from tensors")
    head = given["query"].meta["tensor_meta"].shape[-1]
    scale = given.get("scale")
    attrs = {"scale": float(scale) if scale is not None else 1.0 / float(np.sqrt(head))}
    if given.get("is_causal"):
        attrs["causal"] = True
    return attrs, [given["query"], given["key"], given["value"]]


def _attention_onnx(b, name: str, xs: list[str], a: dict) -> str:
    rank = len(b.shapes[xs[1]]) + 1
    keys = b.node("Transpose", [xs[1]], f"{name}.keys_t", perm=[*range(rank - 2), rank - 1, rank - 2])
    scores = b.node("MatMul", [xs[0], keys], f"{name}.scores")
    scaled = b.node("Mul", [scores, b.const(f"{name}.scale", np.array(a["scale"], np.float32))], f"{name}.scaled")
    if a["causal"]:
        b.shapes.setdefault(scaled, (*b.shapes[xs[0]][:-1], b.shapes[xs[1]][-2]))
        scaled = causal_scores(b, name, scaled)
    return b.node("MatMul", [b.node("Softmax", [scaled], f"{name}.weights", axis=-1), xs[2]], name)


ATTENTION = register(OpSchema(
    "attention", _attention_shape, inputs=3, placement="joins",
    attrs={"scale": Number(0, open_low=True), "causal": Bool()}, defaults={"causal": False},
    capture=Capture(("torch.nn.functional.scaled_dot_product_attention",), _attention_call),
    numpy=lambda xs, a: attention(xs[0], xs[1], xs[2], a["scale"], a["causal"]),
    torch=lambda t, xs, a: t.nn.functional.scaled_dot_product_attention(xs[0], xs[1], xs[2], is_causal=a["causal"],
                                                                         scale=a["scale"]),
    onnx=_attention_onnx))
