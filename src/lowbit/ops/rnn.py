"""lstm / gru: the recurrences of ``torch.nn.LSTM`` (Hochreiter & Schmidhuber 1997) and ``torch.nn.GRU`` (Cho et al.
2014), unidirectional, one or more layers, zero initial state, ``batch_first`` or not, in float32 numpy, and their
ONNX form (ONNX's own ``LSTM`` / ``GRU`` ops, one per layer). Imports no torch.

Per layer ``k`` the weights are torch's: ``weight_ih_l{k}`` ``[G H, I]``, ``weight_hh_l{k}`` ``[G H, H]`` and the
optional biases ``bias_ih_l{k}`` / ``bias_hh_l{k}`` ``[G H]``, with the gate blocks in torch's order (``G`` = 4:
i, f, g, o for the LSTM; ``G`` = 3: r, z, n for the GRU)::

    LSTM  i, f, g, o = s(x W_ii + b_ii + h W_hi + b_hi), s(..f..), tanh(..g..), s(..o..)
          c' = f * c + i * g,   h' = o * tanh(c')
    GRU   r = s(x W_ir + b_ir + h W_hr + b_hr),   z = s(x W_iz + b_iz + h W_hz + b_hz)
          n = tanh(x W_in + b_in + r * (h W_hn + b_hn)),   h' = (1 - z) * n + z * h

(``s`` the logistic sigmoid). ONNX orders the gates i, o, f, c (LSTM) and z, r, h (GRU); :func:`onnx_weights`
reorders the blocks, and torch's GRU (the reset gate applied after the hidden product) is ONNX's
``linear_before_reset=1``. Quantized weights reach ONNX dequantized (float initializers): its LSTM / GRU ops take
float weights only.

Bidirectional layers, ``proj_size`` and dropout between layers in train mode are refused by name
(:func:`check_module`).

As graph ops (module ops, like linear) a node reads the module's ``weight_ih_l{k}`` / ``weight_hh_l{k}`` (and
biases) for ``k < num_layers`` (at most :data:`MAX_LAYERS`), has the one quantizer slot ``weight`` (every weight
matrix quantized per gate row with that spec) and outputs torch's ``output`` ``[N, L, H]`` (batch first: the IR
keeps the batch on axis 0, so ``batch_first=False`` is refused at capture); an fx ``getitem`` of item 0 is that
output, reading the final state (item 1) is refused by name.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..errors import UnsupportedLayerError
from .schema import Capture, Int, Node, OpSchema, Shape, register

#: number of gate blocks per kind
GATES = {"lstm": 4, "gru": 3}
#: torch's gate block order -> ONNX's: LSTM i f g o -> i o f c; GRU r z n -> z r h
ONNX_ORDER = {"lstm": (0, 3, 1, 2), "gru": (1, 0, 2)}

#: one layer's weights: (weight_ih, weight_hh, bias_ih or None, bias_hh or None)
LayerWeights = tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # exp of a negative number only: no overflow for large |x|
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(np.float32)


def _affine(x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    y = x @ w.T
    return y if b is None else y + b


def check_module(m: Any, where: str) -> None:
    """UnsupportedLayerError naming ``where`` for a recurrent layer that is bidirectional, has ``proj_size`` or
    drops out between layers in train mode (random)."""
    if getattr(m, "bidirectional", False):
        raise UnsupportedLayerError(f"{where}: a bidirectional {type(m).__name__} is not supported; use "
                                    "bidirectional=False")
    if getattr(m, "proj_size", 0):
        raise UnsupportedLayerError(f"{where}: an LSTM with proj_size={m.proj_size} is not supported; use "
                                    "proj_size=0")
    if getattr(m, "dropout", 0) and getattr(m, "training", False) and getattr(m, "num_layers", 1) > 1:
        raise UnsupportedLayerError(f"{where}: dropout={m.dropout} between layers is random in train mode; "
                                    "call .eval() or use dropout=0")


def _check(kind: str, x: np.ndarray, layers: Sequence[LayerWeights], where: str) -> int:
    if kind not in GATES:
        raise ValueError(f"kind must be one of {sorted(GATES)}, got {kind!r}")
    if x.ndim != 3:
        raise UnsupportedLayerError(f"{where}: takes a 3-D sequence batch, got shape {list(x.shape)}")
    if not layers:
        raise UnsupportedLayerError(f"{where}: has no layers")
    hidden = layers[0][1].shape[1]
    features = x.shape[2]
    for k, (w_ih, w_hh, b_ih, b_hh) in enumerate(layers):
        want_ih = (GATES[kind] * hidden, features if k == 0 else hidden)
        if w_ih.shape != want_ih or w_hh.shape != (GATES[kind] * hidden, hidden) or \
                any(b is not None and b.shape != (GATES[kind] * hidden,) for b in (b_ih, b_hh)):
            raise UnsupportedLayerError(f"{where}: layer {k} weights {list(w_ih.shape)}, {list(w_hh.shape)} do not "
                                        f"fit {kind} with {want_ih[1]} inputs and hidden size {hidden}")
    return hidden


def lstm(x: np.ndarray, layers: Sequence[LayerWeights], batch_first: bool = True,
         where: str = "lstm") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """torch's ``nn.LSTM(x)`` from zero state: ``(output, h_n, c_n)``, ``output`` ``[N, L, H]`` (``[L, N, H]`` if
    not ``batch_first``), ``h_n`` / ``c_n`` ``[num_layers, N, H]``."""
    return _run("lstm", x, layers, batch_first, where)


def gru(x: np.ndarray, layers: Sequence[LayerWeights], batch_first: bool = True,
        where: str = "gru") -> tuple[np.ndarray, np.ndarray]:
    """torch's ``nn.GRU(x)`` from zero state: ``(output, h_n)`` shaped as :func:`lstm`'s."""
    out, h_n, _ = _run("gru", x, layers, batch_first, where)
    return out, h_n


def _run(kind: str, x: np.ndarray, layers: Sequence[LayerWeights], batch_first: bool,
         where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    hidden = _check(kind, x, layers, where)
    seq = np.ascontiguousarray(x.transpose(1, 0, 2) if batch_first else x, dtype=np.float32)  # [L, N, I]
    batch = seq.shape[1]
    h_last, c_last = [], []
    for w_ih, w_hh, b_ih, b_hh in layers:
        inputs = _affine(seq, w_ih, b_ih).astype(np.float32)  # every step's input product at once
        h = np.zeros((batch, hidden), np.float32)
        c = np.zeros((batch, hidden), np.float32)
        outs = np.empty((seq.shape[0], batch, hidden), np.float32)
        for t in range(seq.shape[0]):
            recurrent = _affine(h, w_hh, b_hh)
            if kind == "lstm":
                i, f, g, o = np.split(inputs[t] + recurrent, 4, axis=1)
                c = (_sigmoid(f) * c + _sigmoid(i) * np.tanh(g)).astype(np.float32)
                h = (_sigmoid(o) * np.tanh(c)).astype(np.float32)
            else:
                xr, xz, xn = np.split(inputs[t], 3, axis=1)
                hr, hz, hn = np.split(recurrent, 3, axis=1)
                r, z = _sigmoid(xr + hr), _sigmoid(xz + hz)
                n = np.tanh(xn + r * hn)
                h = ((1 - z) * n + z * h).astype(np.float32)
            outs[t] = h
        seq = outs
        h_last.append(h)
        c_last.append(c)
    out = seq.transpose(1, 0, 2) if batch_first else seq
    return np.ascontiguousarray(out), np.stack(h_last), np.stack(c_last)


def onnx_weights(kind: str, layer: LayerWeights) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ONNX's ``W`` ``[1, G H, I]``, ``R`` ``[1, G H, H]`` and ``B`` ``[1, 2 G H]`` (input then recurrent biases,
    zeros where torch has none) of one torch layer, gate blocks reordered to ONNX's order."""
    w_ih, w_hh, b_ih, b_hh = layer
    rows = w_hh.shape[0]
    hidden = rows // GATES[kind]

    def order(a: np.ndarray) -> np.ndarray:
        blocks = [a[g * hidden:(g + 1) * hidden] for g in range(GATES[kind])]
        return np.concatenate([blocks[g] for g in ONNX_ORDER[kind]]).astype(np.float32)

    zeros = np.zeros(rows, np.float32)
    bias = np.concatenate([order(b_ih if b_ih is not None else zeros), order(b_hh if b_hh is not None else zeros)])
    return order(w_ih)[None], order(w_hh)[None], bias[None]


def onnx_rnn(b: Any, name: str, x: str, kind: str, layers: Sequence[LayerWeights], batch_first: bool) -> str:
    """Emit ``layers`` with the exporter's builder ``b`` on the value ``x`` (``[N, L, I]`` if ``batch_first``,
    else ``[L, N, I]``): one ONNX ``LSTM`` / ``GRU`` per layer on float (dequantized) weights, its ``Y``
    ``[L, 1, N, H]`` squeezed to the next layer's input; the output is torch's ``output``."""
    hidden = layers[0][1].shape[1]
    seq = b.node("Transpose", [x], f"{name}.time_major", perm=[1, 0, 2]) if batch_first else x
    axes = b.const(f"{name}.axes", np.array([1], np.int64))
    for k, layer in enumerate(layers):
        w, r, bias = onnx_weights(kind, layer)
        names = [b.const(f"{name}.{part}_l{k}", a) for part, a in (("W", w), ("R", r), ("B", bias))]
        attrs = {"linear_before_reset": 1} if kind == "gru" else {}
        y = b.node(kind.upper(), [seq, *names], f"{name}.l{k}", hidden_size=hidden, **attrs)
        seq = b.node("Squeeze", [y, axes], f"{name}.y{k}")
    return b.node("Transpose", [seq], name, perm=[1, 0, 2]) if batch_first else seq


#: the most stacked layers a stored lstm / gru node may have
MAX_LAYERS = 8


def layer_names(num_layers: int, bias: bool = True) -> list[tuple[str, ...]]:
    """The parameter names of each layer, ``(weight_ih_lk, weight_hh_lk[, bias_ih_lk, bias_hh_lk])``."""
    names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh") if bias else ("weight_ih", "weight_hh")
    return [tuple(f"{n}_l{k}" for n in names) for k in range(num_layers)]


def _shape_of(kind: str):
    def shape(node: Node) -> Shape:
        x = node.rank(2)
        layers, hidden, gates = node.attrs["num_layers"], node.attrs["hidden_size"], GATES[kind]
        bias = "bias_ih_l0" in node.tensors
        expected = {}
        for k, names in enumerate(layer_names(layers, bias)):
            expected[names[0]] = (gates * hidden, x[1] if k == 0 else hidden)
            expected[names[1]] = (gates * hidden, hidden)
            expected.update({n: (gates * hidden,) for n in names[2:]})
        got = {k: tuple(v) for k, v in node.tensors.items()}
        if got != expected:
            raise node.fail(f"its tensors {got} do not fit a {kind} of {layers} layer(s), hidden size {hidden} on "
                            f"{x[1]} features; expected {expected}")
        return (x[0], hidden)
    return shape


def _module(m: Any, shape: list[int], where: str) -> dict:
    check_module(m, where)
    if not m.batch_first:
        raise UnsupportedLayerError(f"{where}: the graph IR keeps the batch on axis 0; build the "
                                    f"{type(m).__name__} with batch_first=True (and feed it [N, L, features])")
    if m.num_layers > MAX_LAYERS:
        raise UnsupportedLayerError(f"{where}: at most {MAX_LAYERS} stacked layers, got {m.num_layers}")
    return {"hidden_size": m.hidden_size, "num_layers": m.num_layers}


def _schema(kind: str, module: str) -> OpSchema:
    names = [n for layer in layer_names(MAX_LAYERS) for n in layer]
    return OpSchema(kind, _shape_of(kind), tensors=("weight_ih_l0", "weight_hh_l0"),
                    optional=tuple(n for n in names if n not in ("weight_ih_l0", "weight_hh_l0")),
                    quant=("weight",), attrs={"hidden_size": Int(1, 1 << 16), "num_layers": Int(1, MAX_LAYERS)},
                    module=True, capture=Capture(modules=(module,), module=_module))


LSTM = register(_schema("lstm", "torch.nn.LSTM"))
GRU = register(_schema("gru", "torch.nn.GRU"))
