"""Where a quantized graph quantizes its activations: once per tensor, where an integer deployment would.

:func:`place` works on a model traced by ``torch.fx`` whose weight layers :func:`lowbit.quantize` has already
converted. It marks the tensors to quantize, each with one activation spec:

1. the input of every quantized layer, with that layer's ``input`` spec (the layer's own choice wins);
2. when the activation spec is an affine integer one (``uniform``, the int8 deployment case), also the output of
   every quantized layer that is read by anything but linear / conv layers (whose own input specs decide), and
   the inputs and output of every op that joins tensors (``add``, ``sub``, ``mul``, ``concat``: residual adds,
   squeeze-and-excitation products, concatenations), which integer kernels (QLinearAdd, QLinearMul,
   QLinearConcat) take quantized and requantize; an op with one tensor operand (``x * 0.5``, ``1 - x``: a Python
   number is no tensor) joins nothing. Binary and other training-time activation specs quantize layer inputs only
   (a Bi-Real shortcut stays real-valued).
3. when the activation spec is dynamic uniform (per tensor or per token, ranges read at run time: nothing to
   requantize), also the operands of every product of two activations (matmul, attention), each right
   operand per column; a dynamic mark stays where it is asked for (a row moved by a reshape is another row).

A mark moves to where one quantizer serves everyone:

- back through ops that only move values (max pooling, reshapes, transposes, slices, nearest upsampling, their
  ``placement`` "moves" in :mod:`lowbit.ops`): they commute with a monotone quantizer, so quantizing their input
  is the same, bit for bit, and the ONNX export repeats the quantization after them;
- forward over a clamp that is a layer's or a join's only consumer (relu, relu6 / hardtanh, also over a batch
  norm kept for training): integer kernels apply it for free, and its output is the tensor a device stores.

Every tensor is then quantized once, in one place, with one observer for all its consumers: the input
quantizer of its one consumer if that is a quantized layer (directly or through ops that only move values),
else the output quantizer of the quantized layer
that produced it, else a :class:`~lowbit.nn.QuantAct` inserted after its producer (module path
``quant_acts.<node>``). Two consumers asking for different specs get the one with more bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from .export.graph import is_stored, node_schema
from .export.transformer import attention_mask
from .nn import QuantAct
from .quantizers import Quantizer, get

#: the module that holds the activation quantizers placed on graph edges
ACTS = "quant_acts"
#: activation quantizers whose tensors integer kernels requantize at joins and layer outputs
AFFINE_INTEGER = ("uniform",)
#: ops multiplying activations -> how many activation operands they take (the last one is the right operand)
PRODUCTS = {"matmul": 2, "attention": 3}


@dataclass
class _Mark:
    spec: dict[str, Any] | str
    from_layer: bool  # asked for by a consumer layer's own input spec

    def rank(self) -> tuple[bool, int]:
        bits = self.spec.get("bits", 0) if isinstance(self.spec, dict) else 0
        return self.from_layer, bits or 0


def _is_tensor(a: Any) -> bool:
    """Whether ``a`` is a batched tensor of the graph (not a stored one, nor an attention mask checked on its
    way to the scores it is added to)."""
    checked_mask = a.op == "call_function" and a.target is attention_mask if isinstance(a, fx.Node) else False
    return isinstance(a, fx.Node) and not is_stored(a) and not checked_mask


class _Graph:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        output = next(n for n in gm.graph.nodes if n.op == "output")
        self.outputs = set(output.all_input_nodes)

    def placement(self, node: fx.Node) -> str:
        schema = node_schema(node, self.modules)
        if schema is None:
            return ""
        module = self.modules[node.target] if node.op == "call_module" else None
        if schema.placement == "moves" and not schema.capture.moves(list(node.args), dict(node.kwargs), module):
            return ""
        return schema.placement

    def settle(self, node: fx.Node) -> fx.Node:
        """Back through ops that only move values."""
        while self.placement(node) == "moves" and node.args and _is_tensor(node.args[0]) and \
                getattr(node_schema(node.args[0], self.modules), "name", None) != "split":  # a piece of a chunk
            node = node.args[0]
        return node

    def sole_layer(self, node: fx.Node, layers: dict[fx.Node, Any]) -> fx.Node | None:
        """The quantized layer that alone reads ``node``, directly or through ops that only move values."""
        while len(node.users) == 1 and node not in self.outputs:
            user = next(iter(node.users))
            if user.args[0] is not node:
                return None
            if user in layers:
                return user
            if self.placement(user) != "moves":
                return None
            node = user
        return None

    def only_layers_read(self, node: fx.Node, layers: dict[fx.Node, Any]) -> bool:
        """Whether every reader of ``node``, through ops that only move values, is a linear / conv call."""
        readers = [node]
        while readers:
            node = readers.pop()
            for user in node.users:
                if user in layers and user.args[0] is node:
                    continue
                if self.placement(user) != "moves" or user.args[0] is not node:
                    return False
                readers.append(user)
        return True

    def clamped(self, node: fx.Node) -> fx.Node:
        """Forward over a lone clamp (and a batch norm before it)."""
        for _ in range(2):
            if len(node.users) != 1 or node in self.outputs:
                return node
            user = next(iter(node.users))
            schema = node_schema(user, self.modules)
            if schema is None or schema.name not in ("relu", "hardtanh", "batchnorm") or user.args[0] is not node:
                return node
            node = user
        return node


def place(gm: fx.GraphModule, layers: dict[fx.Node, dict[str, Any]], edge_spec: Any,
          inputs: dict[fx.Node, Any] | None = None) -> list[str]:
    """Quantize the activations of traced, weight-converted ``gm`` in place; returns the QuantAct paths added.

    ``layers``: each linear / conv call node -> its ``input`` / ``output`` specs (None: the layer stays float).
    ``edge_spec``: the activation spec of the config, used at layer outputs and joins when it is affine integer.
    ``inputs``: other call nodes (recurrent layers) -> the spec of their first input.
    """
    g = _Graph(gm)
    marks: dict[fx.Node, _Mark] = {}

    def mark(node: fx.Node, spec: Any, from_layer: bool) -> None:
        if spec is None:
            return
        if _name(spec) in AFFINE_INTEGER and not reads_range_at_run_time(spec):
            node = g.settle(node)  # a sign, a learned or a dynamic quantizer stays where its layer reads it
        new = _Mark(spec, from_layer)
        if node not in marks or new.rank() > marks[node].rank():
            marks[node] = new

    quantized = {node: specs for node, specs in layers.items() if specs is not None}
    for node, spec in (inputs or {}).items():
        mark(node.args[0], spec, True)
    for node, specs in quantized.items():
        mark(node.args[0], specs.get("input"), True)
        if specs.get("output") is not None:
            mark(node, specs["output"], True)
    if reads_range_at_run_time(edge_spec):
        for node in gm.graph.nodes:
            count = PRODUCTS.get(getattr(node_schema(node, g.modules), "name", None), 0)
            for i, a in enumerate(node.args[:count]):
                mark(a, _operand_spec(edge_spec, right=i == count - 1), False)
    elif _name(edge_spec) in AFFINE_INTEGER:
        for node in quantized:
            output = g.clamped(node)
            if not g.only_layers_read(output, layers):  # else the reading layers' input specs decide
                mark(output, edge_spec, False)
        for node in gm.graph.nodes:
            tensors = _flat_tensors(node.args)
            if g.placement(node) == "joins" and len(tensors) >= 2:
                for a in tensors:
                    mark(a, edge_spec, False)
                mark(g.clamped(node), edge_spec, False)
    for node in list(marks):  # graph outputs stay float unless a layer asks for them
        if node in g.outputs and not marks[node].from_layer:
            del marks[node]
    return _assign(gm, g, marks, quantized)


def reads_range_at_run_time(spec: Any) -> bool:
    """Whether activation spec ``spec`` is dynamic uniform (per tensor or per token), read off each input."""
    q = None if spec is None else get(spec)
    return q is not None and q.name == "uniform" and q.spec()["dynamic"]


def _operand_spec(spec: Any, right: bool) -> dict[str, Any]:
    """The dynamic spec of a product's operand: per token, the right operand (``b`` of ``a @ b``, the values of
    an attention) takes a range per column, so that its scales, like the rows' of ``a``, factor out of the sums."""
    full = get(spec).spec()
    return {**full, "token_axis": -2} if right and full.get("per_token") else full


def _name(spec: Any) -> str | None:
    return spec.get("name") if isinstance(spec, dict) else spec


def _flat_tensors(args: Any) -> list[fx.Node]:
    """The tensor nodes among ``args``, lists (``torch.cat``'s) included."""
    found: list[fx.Node] = []
    for a in args:
        if isinstance(a, (list, tuple)):
            found += _flat_tensors(a)
        elif _is_tensor(a):
            found.append(a)
    return found


def _assign(gm: fx.GraphModule, g: _Graph, marks: dict[fx.Node, _Mark], layers: dict[fx.Node, Any]) -> list[str]:
    added: list[str] = []
    taken = {path.split(".")[0] for path in g.modules}
    holder = ACTS if ACTS not in taken else next(f"{ACTS}_{i}" for i in range(1, len(taken) + 2)
                                                 if f"{ACTS}_{i}" not in taken)
    for node, mark in marks.items():
        quantizer = get(mark.spec)
        consumer = g.sole_layer(node, layers)
        if consumer is not None:
            g.modules[consumer.target].input_quantizer = quantizer
        elif node in layers:
            g.modules[node.target].output_quantizer = quantizer
        else:
            path = f"{holder}.{node.name}"
            gm.add_submodule(path, QuantAct(quantizer))
            with gm.graph.inserting_after(node):
                q = gm.graph.call_module(path, (node,))
            node.replace_all_uses_with(q, delete_user_cb=lambda user: user is not q)
            added.append(path)
    return added


def input_quantizers(model: nn.Module) -> dict[int, Quantizer]:
    """id(layer) -> the quantizer of the tensor a quantized layer of a traced model reads when its own input slot
    is empty: the QuantAct or producing layer's output quantizer the graph applies, through value-moving ops."""
    if not isinstance(model, fx.GraphModule):
        return {}
    g = _Graph(model)
    found: dict[int, Quantizer] = {}
    for node in model.graph.nodes:
        layer = g.modules.get(node.target) if node.op == "call_module" else None
        has_slot = layer is not None and "input_quantizer" in layer._modules
        if not has_slot or layer.input_quantizer is not None:
            continue
        source = node.args[0]
        while isinstance(source, fx.Node):
            module = g.modules.get(source.target) if source.op == "call_module" else None
            quantizer = module.quantizer if isinstance(module, QuantAct) else getattr(module, "output_quantizer", None)
            if quantizer is not None:
                found[id(layer)] = quantizer
                break
            if g.placement(source) != "moves" or not source.args:
                break
            source = source.args[0]
    return found
