"""The graph IR's op schema: what each op declares, and the caps every graph is held to.

An op is one :class:`OpSchema`, registered by name with :func:`register` in
the file of its family (``lowbit/ops/<family>.py``): its input count, the
tensors it reads (``params``), its quantizer slots, each attribute's type,
length and range, how its output shape follows from its inputs' shapes and
tensors, and (for parameter-free ops) its float32 numpy implementation.
:func:`lowbit.ops.validate.validate_graph` reads only these declarations, so
a new op is added by declaring it, and ``lowbit.load``, the Engine,
``lowbit inspect``, ``run``, ``eval`` and ONNX export all accept the same
graphs.

Shapes here are *example shapes*: a tensor's shape without the batch axis
(the IR stores the batch axis as -1). The one exception is a stored tensor
read as a node (op ``constant``, declared ``batchless``): it has no batch
axis, its example shape is the tensor's own shape (recorded as is, without
-1), only ops declared to take ``constants`` accept it as an input, and
their shape rules see which inputs are constants in ``Node.constant``. Caps (each a :class:`FormatError`
naming the node and the limit): a spatial size, padding or output size at
most :data:`MAX_SPATIAL`; at most :data:`MAX_ELEMENTS` elements per example
in any node's output; ranks at most :data:`MAX_RANK`; at most
:data:`MAX_NODES` nodes.

This module imports no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..errors import FormatError

#: the largest spatial size, padding, kernel or stride an op may declare or produce
MAX_SPATIAL = 2**16
#: the most elements one example may have in any node's output (1 GiB of float32)
MAX_ELEMENTS = 2**28
#: the highest rank of a tensor in the graph, batch axis included
MAX_RANK = 8
#: the most nodes a graph may have
MAX_NODES = 100_000
#: the largest finite float32, the bound of a float attribute
FLOAT32_MAX = 3.4028234663852886e38

Shape = tuple[int, ...]


def fail(where: str, message: str) -> FormatError:
    return FormatError("bad-graph", f"{where}: {message}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------- attribute (and spec parameter) types


@dataclass(frozen=True)
class Int:
    """An int in [low, high] (no bound where None)."""

    low: int | None = None
    high: int | None = None

    def check(self, value: object, what: str, where: str) -> int:
        low = -math.inf if self.low is None else self.low
        high = math.inf if self.high is None else self.high
        if not _is_int(value) or not low <= value <= high:  # type: ignore[operator]
            bounds = "" if self.low is None and self.high is None else f" from {self.low} to {self.high}"
            raise fail(where, f"{what} must be an int{bounds}, got {_short(value)}")
        return value  # type: ignore[return-value]


@dataclass(frozen=True)
class Number:
    """A finite number (int or float) in [low, high] (by default float32's range), or (low, high] when
    ``open_low``."""

    low: float = -FLOAT32_MAX
    high: float = FLOAT32_MAX
    open_low: bool = False

    def check(self, value: object, what: str, where: str) -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if ok:
            ok = (self.low < value if self.open_low else self.low <= value) and value <= self.high  # type: ignore
        if not ok:
            bound = f"> {self.low:g}" if self.open_low else f">= {self.low:g}"
            high = "" if self.high == math.inf else f" and <= {self.high:g}"
            raise fail(where, f"{what} must be a finite number {bound}{high}, got {_short(value)}")
        return float(value)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Numbers:
    """A list of ``count`` finite numbers, each in (low, high]."""

    count: int
    low: float
    high: float

    def check(self, value: object, what: str, where: str) -> list[float]:
        kind = Number(self.low, self.high, open_low=True)
        if not isinstance(value, list) or len(value) != self.count:
            raise fail(where, f"{what} must be a list of {self.count} numbers > {self.low:g} and <= {self.high:g}, "
                              f"got {_short(value)}")
        return [kind.check(v, what, where) for v in value]


@dataclass(frozen=True)
class Bool:
    def check(self, value: object, what: str, where: str) -> bool:
        if not isinstance(value, bool):
            raise fail(where, f"{what} must be true or false, got {_short(value)}")
        return value


@dataclass(frozen=True)
class Choice:
    """One of ``values``."""

    values: tuple[Any, ...]

    def check(self, value: object, what: str, where: str) -> Any:
        if not any(value == v and type(value) is type(v) for v in self.values):
            raise fail(where, f"{what} must be one of {', '.join(map(repr, self.values))}, got {_short(value)}")
        return value


@dataclass(frozen=True)
class Ints:
    """A list of ``count`` ints in [low, high] (None: at most ``2 * MAX_RANK`` of them)."""

    count: int | None
    low: int
    high: int

    def check(self, value: object, what: str, where: str) -> list[int]:
        count_ok = isinstance(value, list) and (len(value) == self.count if self.count is not None
                                                else len(value) <= 2 * MAX_RANK)
        if not count_ok or not all(_is_int(v) and self.low <= v <= self.high for v in value):  # type: ignore
            count = self.count if self.count is not None else f"at most {2 * MAX_RANK}"
            raise fail(where, f"{what} must be a list of {count} ints from {self.low} to {self.high}, "
                              f"got {_short(value)}")
        return list(value)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Nullable:
    """None, or a value of ``kind``."""

    kind: Any

    def check(self, value: object, what: str, where: str) -> Any:
        return None if value is None else self.kind.check(value, what, where)


@dataclass(frozen=True)
class ExampleShape:
    """A recorded tensor shape: a list of ints, -1 (the batch axis) first, then sizes >= 1."""

    def check(self, value: object, what: str, where: str) -> list[int]:
        if (not isinstance(value, list) or not 1 <= len(value) <= MAX_RANK or value[0] != -1
                or not all(_is_int(d) and 1 <= d <= MAX_ELEMENTS for d in value[1:])):
            raise fail(where, f"{what} must be a list of at most {MAX_RANK} ints, -1 (the batch) first, then sizes "
                              f"from 1 to {MAX_ELEMENTS}, got {_short(value)}")
        return list(value)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------- the node an op's shape rule sees


@dataclass
class Node:
    """A node being validated: its attributes (checked), its inputs' example shapes and its tensors' shapes."""

    name: str
    op: str
    attrs: dict[str, Any]
    inputs: list[Shape]
    tensors: dict[str, Shape]
    #: per input, whether it is a constant (a stored tensor without the batch axis); empty: none is
    constant: list[bool] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"graph node {self.name!r} ({self.op})"

    def fail(self, message: str) -> FormatError:
        return fail(self.where, message)

    def rank(self, *ranks: int) -> Shape:
        """The single input's example shape, which must have one of ``ranks`` (batch axis not counted)."""
        shape = self.inputs[0]
        if len(shape) not in ranks:
            raise self.fail(f"takes an input of rank {' or '.join(str(r + 1) for r in ranks)} (batch included), "
                            f"got shape {[-1, *shape]}")
        return shape


# ---------------------------------------------------------------- op declarations


@dataclass(frozen=True)
class Capture:
    """How an op is recognised in a model traced by torch.fx (:mod:`lowbit.export.graph` resolves the names).

    ``functions``: dotted names of the functions that call it (``torch.nn.functional.relu``,
    ``operator.add``) and ``Tensor.<method>`` for tensor methods; ``call(args, kwargs, shape, where)``
    returns ``(attrs, tensor arguments)`` of such a call (``shape``: the output's recorded shape).
    ``calls`` gives other functions their own ``call`` (their names are captured too).
    ``modules``: dotted class names of the modules that are it (subclasses included);
    ``module(m, shape, where)`` returns the attributes of such a module. Both raise
    :class:`~lowbit.errors.UnsupportedLayerError` naming ``where`` for a form the op cannot express.
    ``module_tensors``: for a parameter-free op made of a module, the module's tensors (attribute names, in
    order) that become ``constant`` nodes feeding it after its input, where the module has them (not None).
    ``when(args, kwargs)`` / ``module_when(m)``: where several ops declare one function or module class (the
    modes of ``interpolate``), whether a call or a module is this op's; the first op that accepts it is
    chosen, else the first declared (whose capture then names what it supports). ``get_attr(tensor, key,
    where)``: the attributes of a read of a parameter or buffer (an fx ``get_attr`` node), for the one op
    made of those.
    """

    functions: tuple[str, ...] = ()
    call: Callable[[list, dict, list[int], str], tuple[dict[str, Any], list]] | None = None
    modules: tuple[str, ...] = ()
    module: Callable[[Any, list[int], str], dict[str, Any]] = lambda m, shape, where: {}
    #: functions whose arguments another ``call`` reads: name -> call
    calls: dict[str, Callable[[list, dict, list[int], str], tuple[dict[str, Any], list]]] = field(default_factory=dict)
    #: for an op whose placement is "moves": whether this call (args, kwargs, module or None) really only moves
    #: values (a pad does with the value 0, which every affine grid holds)
    moves: Callable[[list, dict, Any], bool] = lambda args, kwargs, m: True
    module_tensors: tuple[str, ...] = ()
    when: Callable[[list, dict], bool] | None = None
    module_when: Callable[[Any], bool] | None = None
    get_attr: Callable[[Any, str, str], dict[str, Any]] | None = None


def unary(args: list, kwargs: dict, shape: list[int], where: str) -> tuple[dict[str, Any], list]:
    """A call on one tensor with no attributes."""
    return {}, args[:1]


def argument(args: list, kwargs: dict, index: int, name: str, default: Any) -> Any:
    """The argument at position ``index`` or keyword ``name`` of a call, else ``default``."""
    return kwargs.get(name, args[index] if len(args) > index else default)


def pair(value: Any) -> list[int]:
    """An int or a pair of ints as a list of two ints."""
    return [int(value), int(value)] if isinstance(value, int) else [int(v) for v in value]


@dataclass(frozen=True)
class OpSchema:
    """One graph op, declared once, with every half of it.

    ``inputs``: how many inputs it takes (None: one or more). ``tensors`` /
    ``optional``: the local names of the tensors it reads (``params``),
    required / optional. ``quant``: its quantizer slots; ``state``: the
    module attributes whose stored state may appear in ``params`` (for
    example ``input_quantizer`` for ``input_quantizer.stats.min_val``).
    ``attrs``: name -> type, ``defaults``: the optional ones' values.
    ``module``: whether a node calls a module (and names its path).
    ``shape(node)`` returns the output's example shape or raises through
    ``node.fail``. ``capture``: how torch.fx calls of it are recognised.
    Parameter-free ops also give their three implementations, none of which
    imports anything: ``numpy(xs, attrs)`` (the Engine, float32),
    ``torch(torch, xs, attrs)`` (``GraphModel``; the torch module is passed
    in) and ``onnx(builder, name, inputs, attrs)`` (the ONNX exporter's
    builder, whose ``node`` and ``const`` add nodes and initializers; returns
    the output's name). Module ops (linear, conv1d, conv2d, conv_transpose2d,
    embedding, batchnorm, quant_act) run their modules in torch, and in :mod:`lowbit.runtime.engine` and
    :mod:`lowbit.export.onnx`, which quantize around them. Any other op
    that reads tensors (``constant``) gets their values after its inputs in
    ``xs``: numpy arrays, the model's tensors, ONNX initializers. The
    builder's ``shapes`` maps an ONNX input's name to its example shape.
    ``batchless``: its output has no batch axis (``constant``);
    ``constants``: it takes such inputs (its shape rule reads
    ``node.constant``); other ops refuse them. ``indices``: its input is an
    int64 graph input (token indices), which only such ops read.
    """

    name: str
    shape: Callable[[Node], Shape]
    inputs: int | None = 1
    tensors: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    quant: tuple[str, ...] = ()
    state: tuple[str, ...] = ()
    attrs: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    batchless: bool = False
    constants: bool = False
    #: its input holds integer token indices (an int64 graph input, which no other op reads: ``embedding``)
    indices: bool = False
    module: bool = False
    capture: Capture = Capture()
    #: how whole-graph quantization treats it (:mod:`lowbit.placement`): "moves" (selects or moves values without
    #: computing new ones, so it commutes with an activation quantizer: pools by max, reshapes, slices, nearest
    #: upsampling), "clips" (a clamp an integer kernel applies for free after a conv or an add: relu, hardtanh),
    #: "joins" (adds, multiplies or concatenates tensors: integer kernels take quantized inputs and requantize
    #: their output), or "" (none of these)
    placement: str = ""
    numpy: Callable[[list[np.ndarray], dict[str, Any]], np.ndarray] | None = None
    torch: Callable[[Any, list, dict[str, Any]], Any] | None = None
    onnx: Callable[[Any, str, list[str], dict[str, Any]], str] | None = None


#: op name -> its schema
REGISTRY: dict[str, OpSchema] = {}


def register(schema: OpSchema) -> OpSchema:
    if schema.name in REGISTRY:
        raise ValueError(f"op {schema.name!r} is declared twice")
    REGISTRY[schema.name] = schema
    return schema


def same_shape(node: Node) -> Shape:
    """The output has the input's shape (element-wise ops)."""
    return node.inputs[0]


def window_size(size: int, kernel: int, stride: int, padding: int, dilation: int, node: Node, axis: str) -> int:
    """Output size of a sliding window, ``floor((size + 2 p - d (k - 1) - 1) / s) + 1``, which must be >= 1."""
    out = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    if out < 1:
        raise node.fail(f"the {axis} window (kernel {kernel}, dilation {dilation}) does not fit an input of size "
                        f"{size} padded by {padding}")
    return out
