"""Engine: run a .lowbit file's graph IR with numpy and the native XNOR + popcount kernels, without torch.

``Engine(path).run(x)`` reads the file with :mod:`lowbit.format.container`
(numpy only), then executes the nodes of the stored graph in order:

- linear / conv2d whose weight is stored binary (``binary`` or ``xnor``
  weights, kind ``binary``) and whose input quantizer is ``binary`` (sign):
  :class:`~lowbit.runtime.binary.BinaryLinear` /
  :class:`~lowbit.runtime.binary.BinaryConv2d` (XNOR + popcount, the
  weight's per-channel scale and the bias fused into the GEMM's epilogue);
- every other linear / conv2d (float first and last layers, 8-bit or k-bit
  weights): numpy float32 on the decoded weight values, with the input
  quantizer applied in numpy (``binary``, ``xnor`` activations);
- batchnorm, relu, tanh, hardtanh, pools, reshape, add, mul, concat,
  quant_act: :mod:`lowbit.runtime.ops`.

The outputs equal those of ``lowbit.load(path)`` in eval mode: binary layers
bit for bit up to the float32 rounding of ``dot * scale + bias``, float
layers within float32 tolerance. Nodes the runtime cannot run (grouped or
dilated binary convs, activation quantizers with observed state) raise
:class:`~lowbit.errors.UnsupportedLayerError` when the engine is built.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np

from ..errors import ConfigError, FormatError, UnsupportedLayerError
from ..format.codecs import values
from ..format.container import read_file
from . import ops
from .binary import BinaryConv2d, BinaryLinear
from .kernels import check_threads, select_kernel

_RAW_KINDS = ("float32", "float16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")
_MODULE_OPS = ("linear", "conv2d", "batchnorm", "quant_act")

Step = Callable[[list[np.ndarray]], np.ndarray]


class Engine:
    """A .lowbit model ready to run: ``Engine(path).run(x)`` with ``x`` a float32 batch."""

    def __init__(self, path: str | os.PathLike[str], *, kernel: str | None = None, threads: int | None = None):
        self.kernel = select_kernel(kernel)
        self.threads = check_threads(threads)
        lowbit_file = read_file(path)
        graph = lowbit_file.document["graph"]
        if not isinstance(graph, dict) or not isinstance(graph.get("nodes"), list):
            raise FormatError("bad-graph", f"{os.fspath(path)!r} stores no graph; save it with an example input")
        self._encoded = lowbit_file.tensors
        inputs = graph.get("inputs")
        if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
            raise FormatError("bad-graph", f"the engine runs graphs with one input, got {inputs!r}")
        self.input_name: str = inputs[0].get("name")
        self.input_shape: list[int] | None = inputs[0].get("shape")
        self.binary_layers: list[str] = []
        known = {self.input_name}
        self._steps: list[tuple[str, list[str], Step]] = []
        for node in graph["nodes"]:
            if not isinstance(node, dict) or not isinstance(node.get("name"), str):
                raise FormatError("bad-graph", f"a graph node must be an object with a name, got {str(node)[:80]}")
            args = node.get("inputs")
            if not isinstance(args, list) or not args or not all(a in known for a in args):
                raise FormatError("bad-graph", f"graph node {node['name']!r}: inputs {args!r} must name earlier nodes")
            self._steps.append((node["name"], args, self._build(node)))
            known.add(node["name"])
        outputs = graph.get("outputs")
        if not isinstance(outputs, list) or len(outputs) != 1 or outputs[0] not in known:
            raise FormatError("bad-graph", f"the engine runs graphs with one output naming a node, got {outputs!r}")
        self.output_name: str = outputs[0]

    # ------------------------------------------------------------------ building

    def _tensor(self, node: dict[str, Any], local: str, required: bool = True) -> np.ndarray | None:
        key = node.get("params", {}).get(local)
        enc = self._encoded.get(key) if isinstance(key, str) else None
        if enc is None:
            if required:
                raise FormatError("bad-graph", f"graph node {node['name']!r}: tensor {local!r} ({key!r}) is not stored")
            return None
        array = enc.codes if enc.kind in _RAW_KINDS else values(enc)
        return np.ascontiguousarray(array, dtype=np.float32)

    def _build(self, node: dict[str, Any]) -> Step:
        op, name, attrs = node.get("op"), node["name"], node.get("attrs", {})
        quant = node.get("quant", {})
        where = f"graph node {name!r}"
        if op in ("linear", "conv2d"):
            return self._layer(node, op, attrs, quant, where)
        if op == "batchnorm":
            mean, var = self._tensor(node, "running_mean"), self._tensor(node, "running_var")
            weight, bias = self._tensor(node, "weight", False), self._tensor(node, "bias", False)
            return lambda xs: ops.batchnorm(xs[0], mean, var, weight, bias, float(attrs["eps"]))
        if op == "quant_act":
            return _unary(ops.activation_quantizer(quant.get("output"), where))
        if op in ops.FUNCTIONAL:
            function = ops.FUNCTIONAL[op]
            return lambda xs: function(xs, attrs)
        raise UnsupportedLayerError(f"{where}: op {op!r} is not supported by the runtime; supported: "
                                    f"{', '.join(sorted([*ops.FUNCTIONAL, *_MODULE_OPS]))}")

    def _layer(self, node: dict[str, Any], op: str, attrs: dict, quant: dict, where: str) -> Step:
        enc = self._encoded.get(node.get("params", {}).get("weight"))
        if enc is None:
            raise FormatError("bad-graph", f"{where}: its weight is not stored")
        bias = self._tensor(node, "bias", False)
        output = ops.activation_quantizer(quant.get("output"), where)
        input_spec = quant.get("input")
        binary_input = isinstance(input_spec, dict) and input_spec.get("name") == "binary"
        geometry_ok = op == "linear" or (attrs.get("groups") == 1 and attrs.get("dilation") == [1, 1])
        kernel, threads = self.kernel, self.threads
        if enc.kind == "binary" and binary_input and geometry_ok:
            self.binary_layers.append(node["name"])
            scale = enc.params["scale"].astype(np.float32)
            signs = 2 * enc.codes.astype(np.int8) - 1  # binary codes: 1 stands for +1, 0 for -1
            if op == "linear":
                layer: BinaryLinear | BinaryConv2d = BinaryLinear(signs, scale, bias)
                run: Callable[[np.ndarray], np.ndarray] = _flat(layer, kernel, threads)
            else:
                layer = BinaryConv2d(signs, attrs["stride"], attrs["padding"], scale, bias)
                run = lambda x: layer(np.ascontiguousarray(x, dtype=np.float32), kernel=kernel, threads=threads)
            return _unary(lambda x: output(run(x)))
        quantize = ops.activation_quantizer(input_spec, where)
        weight = self._tensor(node, "weight")
        if op == "linear":
            return _unary(lambda x: output(ops.linear(quantize(x), weight, bias)))
        stride, padding, dilation, groups = attrs["stride"], attrs["padding"], attrs["dilation"], attrs["groups"]
        return _unary(lambda x: output(ops.conv2d(quantize(x), weight, bias, stride, padding, dilation, groups)))

    # ------------------------------------------------------------------ running

    def run(self, x: np.ndarray) -> np.ndarray:
        """The model's output for the float32 batch ``x`` (shape: the graph input's, any batch size)."""
        if not isinstance(x, np.ndarray) or x.dtype != np.float32:
            raise ConfigError(f"engine input must be a float32 numpy array, got "
                              f"{getattr(x, 'dtype', type(x).__name__)}")
        expected = self.input_shape
        if expected is not None and (x.ndim != len(expected) or list(x.shape[1:]) != list(expected[1:])):
            raise ConfigError(f"engine input {self.input_name!r} must have shape [batch, {', '.join(map(str, expected[1:]))}], "
                              f"got {list(x.shape)}")
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
