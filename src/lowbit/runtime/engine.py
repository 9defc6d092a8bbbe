"""Engine: run a .lowbit file's graph IR with numpy and the native XNOR + popcount kernels, without torch.

``Engine(path).run(x)`` reads the file with :mod:`lowbit.format.container`
(numpy only), validates it as ``lowbit.load`` does
(:func:`lowbit.ops.validate_file`: the same files are accepted, with the same
attributes and quantizer specs), then executes the nodes of the stored graph
in order:

- linear / conv2d whose weight is stored binary (``binary`` or ``xnor``
  weights, kind ``binary``) and whose input quantizer is ``binary`` (sign):
  :class:`~lowbit.runtime.binary.BinaryLinear` /
  :class:`~lowbit.runtime.binary.BinaryConv2d` (XNOR + popcount, the
  weight's per-channel scale and the bias fused into the GEMM's epilogue);
- every other layer (linear, conv1d, conv2d, conv_transpose2d: float first
  and last layers, 8-bit or k-bit weights, binary weights of grouped, dilated,
  1-D or transposed convs): numpy float32 on the decoded weight values
  (``_LAYER_FUNCTIONS``), with the input and output quantizers applied in
  numpy (:mod:`lowbit.runtime.activations`: binary, xnor, uniform, linear,
  log2, dorefa_act, pact, lsq, with their observed ranges, clipping levels
  and steps read from the file);
- batchnorm, quant_act and the parameter-free ops (relu, tanh, hardtanh,
  pools, reshape, add, mul, concat, layer_norm, ...): the numpy half of each
  op's declaration in :mod:`lowbit.ops`; a constant is its stored tensor as
  float32, broadcast against the batch by the ops that read it.

Between two binary layers, batch norm, hardtanh, relu, ReActNet's RSign
threshold and RPReLU (where monotone) and max pooling are folded
(:mod:`lowbit.runtime.threshold`) into an integer comparison in the
first layer's GEMM epilogue, so activations stay packed sign bits (pixel
words ``[N, H, W, ceil(C / 64)]``, max pooling as OR / AND of words, a
flatten into a binary linear as a relaid weight); the folded signs equal the
unfused float32 path's bit for bit.

The outputs equal those of ``lowbit.load(path)`` in eval mode: binary layers
bit for bit up to the float32 rounding of ``dot * scale + bias``, float
layers within float32 tolerance (the activation quantizers give torch's bits
on the same input; a float32 matmul summed in another order can move a value
across a rounding boundary). Graphs with more than one input or output and
activation quantizers without a numpy version (abc_act, per-channel ranges)
raise :class:`~lowbit.errors.UnsupportedLayerError` naming the node and the
quantizer when the engine is built; grouped or dilated binary convs, binary
conv1d and transposed convs run as float convs on the decoded signs.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np
from threadpoolctl import ThreadpoolController

from ..errors import ConfigError, FormatError, UnsupportedLayerError
from ..format.codecs import values
from ..format.container import read_file
from ..ops import LAYER_OPS, GraphNode, validate_file
from ..ops.conv import conv1d, conv2d, conv_transpose2d
from ..ops.embedding import embedding
from ..ops.linear import linear
from ..ops.norm import batchnorm
from ..ops.rnn import gru, layer_names, lstm
from .activations import Activation, activation_quantizer
from .binary import BinaryConv2d, BinaryLinear
from .kernels import check_array, check_threads, max_pool_packed, pack_nchw, pack_signs, select_kernel
from .threshold import ChannelOp, Threshold, fold_threshold

_RAW_KINDS = ("float32", "float16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")

Step = Callable[[list[np.ndarray]], np.ndarray]

#: each layer op's float32 numpy computation: (input, weight, bias or None, attrs) -> output
_LAYER_FUNCTIONS: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray | None, dict], np.ndarray]] = {
    "linear": lambda x, w, b, a: linear(x, w, b),
    "conv1d": lambda x, w, b, a: conv1d(x, w, b, a["stride"], a["padding"], a["dilation"], a["groups"]),
    "conv2d": lambda x, w, b, a: conv2d(x, w, b, a["stride"], a["padding"], a["dilation"], a["groups"]),
    "conv_transpose2d": lambda x, w, b, a: conv_transpose2d(x, w, b, a["stride"], a["padding"], a["output_padding"],
                                                            a["dilation"], a["groups"]),
    "embedding": lambda x, w, b, a: embedding(x, w, a["where"]),
}


class Engine:
    """A .lowbit model ready to run: ``Engine(path).run(x)`` with ``x`` a float32 batch."""

    def __init__(self, path: str | os.PathLike[str], *, kernel: str | None = None, threads: int | None = None):
        self.kernel = select_kernel(kernel)
        self.threads = check_threads(threads)
        lowbit_file = read_file(path)
        _, graph = validate_file(lowbit_file)
        if graph is None:
            raise FormatError("bad-graph", f"{os.fspath(path)!r} stores no graph; save it with an example input")
        if len(graph.inputs) != 1 or len(graph.outputs) != 1:
            raise UnsupportedLayerError(f"the engine runs graphs with one input and one output, got inputs "
                                        f"{list(graph.inputs)} and outputs {graph.outputs}")
        self._encoded = lowbit_file.tensors
        (self.input_name, shape), = graph.inputs.items()
        #: the input's element type: float32, or int64 for token indices
        self.input_dtype: str = graph.dtypes.get(self.input_name, "float32")
        #: the input's shape, -1 for the batch axis
        self.input_shape: list[int] = [-1, *shape]
        self.binary_layers: list[str] = []
        self._layers: dict[str, BinaryLinear | BinaryConv2d] = {}
        #: binary layers whose output stays packed: name -> the node names folded into their epilogue
        self.folded: dict[str, list[str]] = {}
        nodes = graph.nodes
        self._nodes = {node.name: node for node in nodes}
        self.output_name: str = graph.outputs[0]
        steps = [self._build(node) for node in nodes]
        self._steps: list[tuple[str, list[str], Step]] = []
        skipped: set[str] = set()
        rename: dict[str, str] = {}
        for index, (node, step) in enumerate(zip(nodes, steps)):
            if node.name in skipped:
                continue
            chain = self._fold_chain(nodes, index) if node.name in self._layers else None
            if chain is not None:
                step, folded, target = chain
                skipped.update(folded)
                rename[target] = node.name
                self.folded[node.name] = folded
            args = [rename[node.name]] if node.name in rename else node.inputs
            self._steps.append((node.name, args, step))
        # numpy's BLAS threads spin between calls; beside the native kernels' threads they oversubscribe the cores
        # (2 cores: a batch-1 run took 3x as long), so float layers run on one BLAS thread where those kernels run
        uses_native_threads = self.binary_layers and self.kernel != "numpy" and self.threads != 1
        self._blas = ThreadpoolController() if uses_native_threads else None

    # ------------------------------------------------------------------ building

    def _tensor(self, node: GraphNode, local: str) -> np.ndarray | None:
        """The float32 values of the node's tensor ``local``, None where it has none (validated: stored)."""
        key = node.params.get(local)
        if key is None:
            return None
        enc = self._encoded[key]
        array = enc.codes if enc.kind in _RAW_KINDS else values(enc)
        return np.ascontiguousarray(array, dtype=np.float32)

    def _build(self, node: GraphNode) -> Step:
        op, attrs = node.op, node.attrs
        if op in LAYER_OPS:
            return self._layer(node)
        if op in ("lstm", "gru"):
            return _unary(self._recurrent(node))
        if op == "batchnorm":
            return _unary(self._batchnorm(node))
        if op == "quant_act":
            return _unary(self._quantizer(node, "output", "quantizer"))
        function = node.schema.numpy
        # a non-module op that reads stored tensors (a constant) gets their values after its inputs
        stored = [self._tensor(node, t) for t in (*node.schema.tensors, *node.schema.optional) if t in node.params]
        if stored:
            return lambda xs: function([*xs, *stored], attrs)
        return lambda xs: function(xs, attrs)

    def _recurrent(self, node: GraphNode) -> ChannelOp:
        """An lstm / gru node: the numpy recurrence on the decoded (quantized) weights; float activations."""
        names = layer_names(node.attrs["num_layers"], "bias_ih_l0" in node.params)
        layers = [(*(self._tensor(node, n) for n in layer), *[None] * (4 - len(layer))) for layer in names]
        run, where = (lstm if node.op == "lstm" else gru), f"layer {node.module!r}"
        return lambda x: run(x, layers, True, where)[0]

    def _batchnorm(self, node: GraphNode) -> ChannelOp:
        mean, var = self._tensor(node, "running_mean"), self._tensor(node, "running_var")
        weight, bias, eps = self._tensor(node, "weight"), self._tensor(node, "bias"), node.attrs["eps"]
        return lambda x: batchnorm(x, mean, var, weight, bias, eps)

    def _layer(self, node: GraphNode) -> Step:
        enc = self._encoded[node.params["weight"]]
        attrs, bias = node.attrs, self._tensor(node, "bias")
        output = self._quantizer(node, "output")
        binary_input = node.quant.get("input", {}).get("name") == "binary"
        geometry_ok = node.op == "linear" or (node.op == "conv2d" and attrs["groups"] == 1
                                              and attrs["dilation"] == [1, 1])
        if enc.kind == "binary" and binary_input and geometry_ok:
            self.binary_layers.append(node.name)
            scale = enc.params["scale"].astype(np.float32)
            signs = 2 * enc.codes.astype(np.int8) - 1  # binary codes: 1 stands for +1, 0 for -1
            if node.op == "linear":
                layer: BinaryLinear | BinaryConv2d = BinaryLinear(signs, scale, bias)
            else:
                layer = BinaryConv2d(signs, attrs["stride"], attrs["padding"], scale, bias)
            self._layers[node.name] = layer
            run = self._binary_run(layer, None, None)
            return _unary(lambda x: output(run(x)))
        quantize = self._quantizer(node, "input")
        weight, function = self._tensor(node, "weight"), _LAYER_FUNCTIONS[node.op]
        attrs = {**attrs, "where": f"layer {node.module!r}"}
        return _unary(lambda x: output(function(quantize(x), weight, bias, attrs)))

    def _quantizer(self, node: GraphNode, slot: str, module: str | None = None) -> Activation:
        """The numpy activation quantizer in ``slot`` ("input" / "output") of ``node`` with its stored state: the
        params under ``<module>.`` (the quantizer's attribute, by default ``<slot>_quantizer``)."""
        module = module or f"{slot}_quantizer"
        state = {}
        for local, key in node.params.items():
            if local.startswith(f"{module}."):
                enc = self._encoded[key]
                state[local[len(module) + 1 :]] = np.asarray(enc.codes if enc.kind in _RAW_KINDS else values(enc))
        return activation_quantizer(node.quant.get(slot), state, f"graph node {node.name!r} {module}")

    def _binary_run(self, layer: BinaryLinear | BinaryConv2d, threshold: Threshold | None,
                    pool: dict | None) -> Callable[[np.ndarray], np.ndarray]:
        """A binary layer on float input or packed signs (uint64: pixel words, or rows of a linear); float
        output, or packed signs through ``threshold`` (then max pooled on the bits with ``pool``'s attrs)."""
        kernel, threads = self.kernel, self.threads
        map_rows: dict[tuple[int, int, int], np.ndarray] = {}

        def run(x: np.ndarray) -> np.ndarray:
            if isinstance(layer, BinaryConv2d):
                if x.dtype != np.uint64:
                    x = np.ascontiguousarray(x, dtype=np.float32)
                    check_array(x, "binary conv input", 4)
                    if x.shape[1] != layer.in_channels:
                        raise ConfigError(f"binary conv input has {x.shape[1]} channels, the layer takes "
                                          f"{layer.in_channels}")
                    x = pack_nchw(x, kernel, threads)
                y = layer.forward_packed(x, kernel, threads, threshold)
                if pool is not None:
                    y = max_pool_packed(y, tuple(pool["kernel"]), tuple(pool["stride"]), tuple(pool["padding"]),
                                        threshold.and_mask, kernel, threads)
                return y
            if x.dtype != np.uint64:
                if threshold is None:
                    return _flat(layer, kernel, threads)(x)
                flat = np.ascontiguousarray(x.reshape(-1, x.shape[-1]), dtype=np.float32)
                x = pack_signs(check_array(flat, "binary linear input", 2), kernel=kernel, threads=threads)
            rows = None
            if x.ndim == 4:  # packed pixel words of a map flattened in NCHW order
                n, h, w, _ = x.shape
                channels = layer.in_features // (h * w)
                if (channels, h, w) not in map_rows:
                    map_rows[(channels, h, w)] = layer.rows_for_map(channels, h, w)
                rows, x = map_rows[(channels, h, w)], x.reshape(n, -1)
            return layer.forward_packed(x, kernel, threads, threshold, rows)

        return run

    def _fold_chain(self, nodes: list[GraphNode], index: int) -> tuple[Step, list[str], str] | None:
        """For the binary layer ``nodes[index]``: if it feeds only per-channel ops (:meth:`_channel_op`), at
        most one max pool and (for a conv) a flatten that end in another binary layer, the step that emits the
        next layer's packed signs, the folded node names and the next layer's name; else None."""
        node = nodes[index]
        if "output" in node.quant:
            return None
        consumers: dict[str, list[GraphNode]] = {}
        for other in nodes[index + 1 :]:
            for a in other.inputs:
                consumers.setdefault(a, []).append(other)
        layer = self._layers[node.name]
        conv = isinstance(layer, BinaryConv2d)
        before: list[ChannelOp] = []
        after: list[ChannelOp] = []
        pool: dict | None = None
        folded: list[str] = []
        current, flattened = node, False
        while True:
            users = consumers.get(current.name, [])
            if current.name == self.output_name or len(users) != 1:
                return None
            nxt = users[0]
            op, attrs = nxt.op, nxt.attrs
            if nxt.name in self._layers:
                break
            channel_op = self._channel_op(nxt) if not flattened else None
            if channel_op is not None:
                (after if pool is not None else before).append(channel_op)
            elif op == "maxpool2d" and conv and pool is None and not flattened and not attrs["ceil_mode"]:
                pool = attrs
            elif op == "reshape" and conv and not flattened and len(nxt.shape) == 1:
                flattened = True
            else:
                return None
            folded.append(nxt.name)
            current = nxt
        target = self._layers[nxt.name]
        if conv:
            if isinstance(target, BinaryLinear) != flattened:
                return None
        elif not isinstance(target, BinaryLinear) or len(node.shape) != 1:
            return None
        k = layer.in_features if not conv else layer.kernel_size[0] * layer.kernel_size[1] * layer.in_channels
        channels = layer.out_features if not conv else layer.out_channels
        threshold = fold_threshold(k, layer.scale, layer.bias, channels, before, after, pool is not None)
        if threshold is None:
            return None
        return _unary(self._binary_run(layer, threshold, pool)), folded, nxt.name

    def _channel_op(self, node: GraphNode) -> ChannelOp | None:
        """The per-channel float32 op of a batchnorm / hardtanh / relu node, or of ReActNet's rsign_threshold /
        rprelu with their stored vectors; None for any other node."""
        if node.op == "batchnorm":
            return self._batchnorm(node)
        function, attrs = node.schema.numpy, node.attrs
        if node.op in ("hardtanh", "relu"):
            return lambda x: function([x], attrs)
        if node.op in ("rsign_threshold", "rprelu"):  # inputs after the first: constant nodes (validated)
            vectors = [self._build(self._nodes[name])([]) for name in node.inputs[1:]]
            return lambda x: function([x, *vectors], attrs)
        return None

    # ------------------------------------------------------------------ running

    def run(self, x: np.ndarray) -> np.ndarray:
        """The model's output for the float32 batch ``x`` (int64 token indices for a model whose graph input is
        int64; shape: the graph input's, any batch size)."""
        if not isinstance(x, np.ndarray) or x.dtype != np.dtype(self.input_dtype):
            raise ConfigError(f"engine input must be a numpy array of {self.input_dtype}, got "
                              f"{getattr(x, 'dtype', type(x).__name__)}")
        expected = self.input_shape
        if expected is not None and (x.ndim != len(expected) or list(x.shape[1:]) != list(expected[1:])):
            raise ConfigError(f"engine input {self.input_name!r} must have shape [batch, {', '.join(map(str, expected[1:]))}], "
                              f"got {list(x.shape)}")
        if self._blas is None:
            return self._execute(x)
        with self._blas.limit(limits=1, user_api="blas"):
            return self._execute(x)

    def _execute(self, x: np.ndarray) -> np.ndarray:
        env = {self.input_name: x}
        for name, args, step in self._steps:
            env[name] = step([env[a] for a in args])
        return env[self.output_name]


def _unary(function: Callable[[np.ndarray], np.ndarray]) -> Step:
    return lambda xs: function(xs[0])


def _flat(layer: BinaryLinear, kernel: str, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    """A binary linear layer over the last axis of an input of any rank (as torch's linear)."""
    def run(x: np.ndarray) -> np.ndarray:
        flat = np.ascontiguousarray(x.reshape(-1, x.shape[-1]), dtype=np.float32)
        return layer(flat, kernel=kernel, threads=threads).reshape(*x.shape[:-1], layer.out_features)
    return run
