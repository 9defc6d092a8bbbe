"""Training checkpoints: one safetensors file, written atomically, never pickle.

Layout of a checkpoint file:

- tensors ``model.<key>``: the model's state_dict;
- tensors ``optimizer.<n>``, ``scheduler.<n>``, ``rng.<n>``: every tensor found
  in the optimizer / scheduler state and the RNG states;
- metadata (safetensors metadata is ``str -> str``; each value is JSON):
  ``format`` (:data:`FORMAT`) and the caller's entries, for example ``epoch``,
  ``step``, ``history``, ``optimizer`` and ``scheduler`` (their state_dicts
  with every tensor replaced by ``{"$tensor": "<name>"}``) and ``rng``.

A write goes to a temporary file in the target's directory, is flushed to disk
and then renamed over the target (``os.replace``), so the target is always the
complete old file or the complete new file, never a partial one.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import nn

from ..errors import FormatError, ShapeMismatchError, UnsupportedLayerError
from ..format.atomic import write_atomic

FORMAT = "lowbit.checkpoint/1"
_TENSOR_REF = "$tensor"


def save_checkpoint(path: str | Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
    """Write ``tensors`` and JSON-able ``meta`` to a safetensors file atomically."""
    metadata = {"format": json.dumps(FORMAT), **{key: json.dumps(value) for key, value in meta.items()}}
    write_atomic(path, save(dict(tensors), metadata=metadata))
    return Path(path)


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`: (tensors on CPU, metadata)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as err:
        raise FormatError("not-a-checkpoint", f"{path} is not a safetensors file: {err}") from err
    if metadata.get("format") != json.dumps(FORMAT):
        raise FormatError("not-a-checkpoint", f"{path} has no metadata format {FORMAT!r}; it is not a lowbit checkpoint")
    return tensors, {key: json.loads(value) for key, value in metadata.items()}


def with_prefix(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``tensors`` whose name starts with ``prefix + '.'``, prefix removed."""
    start = len(prefix) + 1
    return {key[start:]: value for key, value in tensors.items() if key.startswith(prefix + ".")}


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict as independent, contiguous CPU tensors (tied weights copied)."""
    out = {}
    for key, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise UnsupportedLayerError(
                f"state_dict entry {key!r} is a {type(value).__name__}, not a tensor; "
                "a checkpoint stores tensors only"
            )
        out[key] = value.detach().to("cpu", copy=True).contiguous()
    return out


def load_model_tensors(model: nn.Module, state: Mapping[str, torch.Tensor], path: str | Path | None = None) -> None:
    """Load ``state`` into ``model`` after checking that names and shapes match exactly.

    Raises ShapeMismatchError naming every tensor whose shape differs, every tensor
    the model has but ``state`` lacks, and every tensor ``state`` has but the model
    lacks; ``path`` (the checkpoint file) is named too when given.
    """
    expected = model.state_dict()
    problems = [
        f"{key!r} is {list(state[key].shape)} in the checkpoint but {list(expected[key].shape)} in the model"
        for key in expected
        if key in state and state[key].shape != expected[key].shape
    ]
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing:
        problems.append(f"missing from the checkpoint: {', '.join(map(repr, missing))}")
    if unexpected:
        problems.append(f"in the checkpoint but not in the model: {', '.join(map(repr, unexpected))}")
    if problems:
        source = f"checkpoint {str(path)!r}" if path is not None else "the checkpoint"
        raise ShapeMismatchError(f"{source} does not match the model's architecture: " + "; ".join(problems))
    model.load_state_dict(dict(state))


def load_weights(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load the model weights of checkpoint ``path`` into ``model``; return its metadata."""
    tensors, meta = load_checkpoint(path)
    load_model_tensors(model, with_prefix(tensors, "model"), path)
    return meta


def split_tensors(state: Any, prefix: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split ``state`` into a JSON-able copy and the tensors it held.

    Each tensor becomes ``{"$tensor": name}`` with ``name = prefix.<n>`` and is
    returned as a CPU copy under that name. Tuples become lists and dict keys
    strings (JSON's rules); :func:`join_tensors` puts the tensors back.
    """
    tensors: dict[str, torch.Tensor] = {}

    def split(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            name = f"{prefix}.{len(tensors)}"
            tensors[name] = value.detach().to("cpu", copy=True).contiguous()
            return {_TENSOR_REF: name}
        if isinstance(value, Mapping):
            return {str(key): split(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [split(item) for item in value]
        return value

    return split(state), tensors


def join_tensors(state: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Invert :func:`split_tensors`: put the tensors back where their references are."""
    if isinstance(state, dict):
        if set(state) == {_TENSOR_REF}:
            return tensors[state[_TENSOR_REF]]
        return {key: join_tensors(value, tensors) for key, value in state.items()}
    if isinstance(state, list):
        return [join_tensors(value, tensors) for value in state]
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: Any, tensors: Mapping[str, torch.Tensor]) -> None:
    """Load an optimizer state saved with :func:`split_tensors` (parameter ids back to ints)."""
    joined = join_tensors(state, tensors)
    joined["state"] = {int(key): value for key, value in joined["state"].items()}
    optimizer.load_state_dict(joined)


def rng_state(generators: Sequence[torch.Generator] = ()) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Snapshot of Python's, NumPy's, torch's (CPU and initialised CUDA) and ``generators``' RNGs."""
    version, words, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {
        "rng.torch": torch.get_rng_state(),
        "rng.numpy": torch.from_numpy(np_keys.astype(np.int64)),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{index}"] = cuda_state
    for index, generator in enumerate(generators):
        tensors[f"rng.generator.{index}"] = generator.get_state()
    meta = {
        "python": [version, list(words), gauss],
        "numpy": [np_kind, int(np_pos), int(np_has_gauss), float(np_gauss)],
    }
    return tensors, meta


def set_rng_state(
    tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], generators: Sequence[torch.Generator] = ()
) -> None:
    """Restore the RNG states captured by :func:`rng_state`."""
    version, words, gauss = meta["python"]
    random.setstate((version, tuple(words), gauss))
    np_kind, np_pos, np_has_gauss, np_gauss = meta["numpy"]
    np.random.set_state((np_kind, tensors["rng.numpy"].numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[f"rng.cuda.{index}"] for index in range(len(with_prefix(tensors, "rng.cuda")))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    for index, generator in enumerate(generators):
        generator.set_state(tensors[f"rng.generator.{index}"])
