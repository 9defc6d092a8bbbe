"""Mutation fuzzing of every kind of file lowbit writes, shared by tests/test_fuzz_files.py (a fast slice) and
scripts/fuzz_files.py (the long run).

``model_files(directory)`` writes one small file of each kind (and a w8a8 net through the newer ops); ``mutate(data, rng)`` returns a mutated copy
(flipped bytes, a cut, an edited safetensors header or an edited document value: 0, -1, 2**31 - 1, 2**63,
wrong types, deep nesting); ``check(path)`` sends a file through ``load`` + forward, ``load_state_dict``,
``Engine`` build + run, ``inspect`` and ``lowbit inspect --json``, and returns what each did. It raises
``AssertionError`` when an outcome breaks the contract: an exception that is not a LowbitError, ``load``
and the ``Engine`` disagreeing on whether the file is well formed, or their outputs disagreeing.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit import cli, serialize
from lowbit.errors import FormatError, LowbitError
from lowbit.format.container import pack_safetensors, parse_safetensors
from lowbit.runtime import Engine

#: the shape of one example of the fuzzed models
INPUT_SHAPE = (1, 12, 12)


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(1, 4, 3), bn=nn.BatchNorm2d(4), act=nn.Hardtanh(),
                                     pool=nn.MaxPool2d(2), conv2=nn.Conv2d(4, 8, 3, padding=1), bn2=nn.BatchNorm2d(8),
                                     act2=nn.Hardtanh(), flat=nn.Flatten(), fc=nn.Linear(8 * 5 * 5, 10)))


class OpsNet(nn.Module):
    """A small net through the ops of modern CNNs: silu, chunk, concat, sigmoid gate, mean, pad, ceil-mode max
    pooling, slice, nearest upsampling, transpose, hardswish, softmax."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.conv2, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.Linear(56, 10)

    def forward(self, x):
        y = F.silu(self.conv(x))
        a, b = y.chunk(2, dim=1)
        y = torch.cat([b, a], 1) * torch.sigmoid(y.mean((2, 3), keepdim=True))
        y = F.max_pool2d(F.pad(y, (0, 1, 0, 1)), 2, ceil_mode=True)
        y = F.interpolate(self.conv2(y)[:, :, 1:4], scale_factor=2).transpose(2, 3)
        return torch.softmax(self.fc(F.hardswish(y).mean(-1).flatten(1)), -1)


def _batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(8, *INPUT_SHAPE, generator=generator) for _ in range(2)]


def _quantized(preset: str, model: nn.Module | None = None) -> nn.Module:
    model = lowbit.quantize(tiny_cnn() if model is None else model, preset)
    lowbit.calibrate(model, _batches())
    return model.eval()


def _pruned_kmeans() -> nn.Module:
    model = tiny_cnn()
    with torch.no_grad():
        for layer in (model.conv, model.conv2, model.fc):
            layer.weight[layer.weight.abs() < layer.weight.abs().median()] = 0
    return _quantized("kmeans4")


#: kind -> (model factory, save options, whether a graph is stored)
KINDS: dict[str, tuple[Callable[[], nn.Module], dict[str, Any], bool]] = {
    "w8a8": (lambda: _quantized("w8a8"), {}, True),
    "log": (lambda: _quantized("log4"), {}, True),
    "ternary": (lambda: _quantized("ternary"), {}, True),
    "dc-huffman": (_pruned_kmeans, {"sparse": True, "entropy": "huffman"}, True),
    "dc-ans": (_pruned_kmeans, {"sparse": True, "entropy": "ans"}, True),
    "sparse": (lambda: _quantized("w8"), {"sparse": 4}, True),
    "bnn": (lambda: _quantized("bnn"), {}, True),
    "xnor": (lambda: _quantized("xnor"), {}, True),
    "float-no-graph": (tiny_cnn, {}, False),
    "ops-w8a8": (lambda: _quantized("w8a8", OpsNet()), {}, True),
}


def model_files(directory: Path) -> dict[str, Path]:
    """One file of each kind in ``directory``."""
    files = {}
    for kind, (factory, options, graph) in KINDS.items():
        path = directory / f"{kind}.lowbit"
        example = torch.zeros(1, *INPUT_SHAPE) if graph else None
        model = factory()
        if not graph and hasattr(model, serialize.INPUT_SHAPE_ATTR):
            delattr(model, serialize.INPUT_SHAPE_ATTR)
        lowbit.save(model, path, example, **options)
        files[kind] = path
    return files


# ---------------------------------------------------------------- mutations

#: values a document or header edit writes
HOSTILE_VALUES: list[Any] = [0, -1, 1, 2**31 - 1, 2**31, 2**63, -(2**63), 2**64, 1.5, -0.0, 1e308, "x", "", None,
                             True, False, [], {}, [0, 2**63], [2**31 - 1, 2**31 - 1], [-1], ["F32"], {"name": "x"}]


#: a placeholder that ``_dumps`` writes as deeply nested JSON
NESTED = "\u0000nested"


def _dumps(value: Any, rng: random.Random) -> str:
    depth = rng.choice([100, 700, 5000])
    return json.dumps(value).replace(json.dumps(NESTED), "[" * depth + "0" + "]" * depth)


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into a JSON value (the root excluded)."""
    found = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        found.append((*prefix, key))
        found += _paths(child, (*prefix, key))
    return found


#: document keys whose values an edit aims at half the time: what the graph's readers compute from
FOCUS = {"attrs", "shape", "quant", "inputs", "input_shape", "layers"}


def _edit(value: Any, rng: random.Random) -> Any:
    """``value`` with one node set to a hostile value (or a number nudged, or deep nesting)."""
    paths = _paths(value)
    focused = [p for p in paths if FOCUS & set(p)]
    if focused and rng.random() < 0.5:
        paths = focused
    if not paths:
        return value
    path = rng.choice(paths)
    parent = value
    for key in path[:-1]:
        parent = parent[key]
    old = parent[path[-1]]
    roll = rng.random()
    if roll < 0.05:
        new: Any = NESTED
    elif roll < 0.35 and isinstance(old, int) and not isinstance(old, bool):
        new = old + rng.choice([-2, -1, 1, 2, 1000, -old, old * 2**20])
    else:
        new = rng.choice(HOSTILE_VALUES)
    parent[path[-1]] = new
    return value


def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _join(header: dict[str, Any], body: bytes, rng: random.Random) -> bytes:
    text = _dumps(header, rng).encode()
    return struct.pack("<Q", len(text)) + text + body


def mutate(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """(what was done, the mutated bytes) of a valid .lowbit file."""
    kind = rng.choice(["bytes", "cut", "header", "document", "document", "document"])
    if kind == "bytes":
        blob = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            blob[rng.randrange(len(blob))] = rng.randrange(256)
        return kind, bytes(blob)
    if kind == "cut":
        return kind, data[: rng.randrange(len(data))]
    header, body = _split(data)
    if kind == "header":
        metadata = header.pop("__metadata__")
        header = _edit(header, rng)
        header["__metadata__"] = metadata
        return kind, _join(header, body, rng)
    arrays, metadata, _ = parse_safetensors(data)
    document = _edit(json.loads(metadata["lowbit"]), rng)
    return kind, pack_safetensors(dict(arrays), {"lowbit": _dumps(document, rng)})


# ---------------------------------------------------------------- consumers


def _attempt(function: Callable[[], Any]) -> tuple[Any, BaseException | None]:
    try:
        return function(), None
    except LowbitError as exc:
        return None, exc


def _forward(path: Path, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return lowbit.load(path)(x).numpy()


def _inspect_command(path: Path) -> dict[str, Any]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        status = cli.main(["inspect", str(path), "--json"])
    data = json.loads(out.getvalue())
    assert status in (0, 2) and (status == 0) == ("error" not in data), (status, data)
    return data


def check(path: Path) -> dict[str, str]:
    """Run every consumer on ``path``; return consumer -> "ok" or the LowbitError's class (and code)."""
    x = torch.randn(3, *INPUT_SHAPE, generator=torch.Generator().manual_seed(1))
    torch_out, load_error = _attempt(lambda: _forward(path, x))
    _, state_error = _attempt(lambda: lowbit.load_state_dict(path))
    engine_out, engine_error = _attempt(lambda: Engine(path).run(x.numpy()))
    _, inspect_error = _attempt(lambda: serialize.inspect_file(path))
    _inspect_command(path)
    malformed = {name: isinstance(error, FormatError) for name, error in
                 [("load", load_error), ("load_state_dict", state_error), ("inspect", inspect_error)]}
    if not (isinstance(engine_error, FormatError) and "stores no graph" in str(engine_error)):
        malformed["engine"] = isinstance(engine_error, FormatError)
    assert len(set(malformed.values())) == 1, f"readers disagree on whether the file is malformed: {malformed}; " \
        f"load: {load_error!r}, engine: {engine_error!r}, load_state_dict: {state_error!r}, inspect: {inspect_error!r}"
    if torch_out is not None and engine_out is not None:
        scale = float(np.nanmax(np.abs(np.where(np.isfinite(torch_out), torch_out, 0)), initial=1.0))
        np.testing.assert_allclose(engine_out, torch_out, rtol=1e-3, atol=0.05 * scale,
                                   err_msg="load and the Engine compute different outputs")
    return {name: "ok" if error is None else f"{type(error).__name__}[{getattr(error, 'code', '')}]"
            for name, error in [("load", load_error), ("load_state_dict", state_error), ("engine", engine_error),
                                ("inspect", inspect_error)]}
