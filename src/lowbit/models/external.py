"""Models from outside lowbit: an import path to a constructor, its keyword arguments and a weights file.

``build_external("package.module:function", {"width": 4}, "w.safetensors")``
imports ``package.module`` (the current directory is searched too, after
the installed packages), looks up ``function`` (a dotted path such as ``Class.make``
works), calls it with the keyword arguments, checks that it returned an
``nn.Module`` and loads the weights into it with exactly matching names and
shapes. Weights come from a ``.safetensors`` file or a ``.pt`` / ``.pth``
state_dict read with ``torch.load(..., weights_only=True)`` (no code runs
while it is read); a state_dict saved inside a dict under ``"state_dict"``
or ``"model"`` (the usual training-checkpoint wrapper) is taken from there.

Every failure is a ConfigError that names the import path, the module or
the file at fault: a malformed path, a module that cannot be imported, a
missing attribute, a constructor that raises (its message is kept), a result
that is not an ``nn.Module``, and a weights file that is missing, unreadable
or does not fit the model (missing, unexpected and mis-shaped tensors).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth")
#: keys under which a saved dict may hold the state_dict, in the order they are tried
STATE_DICT_KEYS = ("state_dict", "model")
MAX_NAMES = 8  # tensor names listed per kind of mismatch


def is_import_path(text: str | None) -> bool:
    """True when ``text`` is meant as ``package.module:function`` (it holds a colon), not a model name."""
    return isinstance(text, str) and ":" in text


def parse_import_path(text: str) -> tuple[str, str]:
    """``"package.module:function"`` as (module, attribute path); ConfigError when malformed."""
    module, sep, attribute = text.partition(":")
    if not (sep and module and attribute and all(p.isidentifier() for p in module.split("."))
            and all(p.isidentifier() for p in attribute.split("."))):
        raise ConfigError(f"--model {text!r} is not an import path: give package.module:function (dotted Python "
                          "names, one colon), for example torchvision.models:resnet18 or mymodels:build")
    return module, attribute


def parse_model_args(text: str | None) -> dict[str, Any]:
    """The ``--model-args`` JSON text as a dict of keyword arguments (empty when None)."""
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--model-args is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}): "
                          f"give an object such as '{{\"width\": 4}}'") from None
    if not isinstance(value, dict):
        raise ConfigError(f"--model-args must be a JSON object of keyword arguments, got a JSON "
                          f"{type(value).__name__}: {text!r}")
    return value


def parse_input_shape(text: str | None) -> tuple[int, int, int] | None:
    """``--input-shape C,H,W`` as three positive ints (None when not given)."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ConfigError(f"--input-shape must be C,H,W, three positive integers such as 3,224,224; got {text!r}")
    return int(parts[0]), int(parts[1]), int(parts[2])


def _import(module: str, text: str) -> Any:
    here = os.getcwd()
    added = here not in sys.path and "" not in sys.path
    if added:
        sys.path.append(here)
    importlib.invalidate_caches()  # modules written since the last import are found
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module == exc.name or module.startswith(exc.name + ".")):
            raise ConfigError(f"--model {text!r}: module {module!r} is not importable (no module named "
                              f"{exc.name!r}; is it installed, or on PYTHONPATH?)") from None
        raise ConfigError(f"--model {text!r}: importing module {module!r} failed: {exc}") from None
    except Exception as exc:  # the module's own code failed (a syntax error, a missing dependency, ...)
        raise ConfigError(f"--model {text!r}: importing module {module!r} failed: "
                          f"{type(exc).__name__}: {exc}") from None
    finally:
        if added:
            sys.path.remove(here)


def resolve_constructor(text: str) -> Any:
    """The callable ``text`` (``package.module:function``) names."""
    module_name, attribute = parse_import_path(text)
    target = _import(module_name, text)
    for part in attribute.split("."):
        if not hasattr(target, part):
            where = getattr(target, "__name__", module_name)
            raise ConfigError(f"--model {text!r}: {where!r} has no attribute {part!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"--model {text!r} names a {type(target).__name__}, not a function or class to call")
    return target


def _call_text(text: str, kwargs: Mapping[str, Any]) -> str:
    return f"{text}({', '.join(f'{key}={value!r}' for key, value in kwargs.items())})"


def build_external(text: str, kwargs: Mapping[str, Any] | None = None,
                   weights: str | os.PathLike | None = None) -> nn.Module:
    """The model ``text`` (``package.module:function``) builds from ``kwargs``, with ``weights`` loaded
    (see the module docstring), in eval mode."""
    kwargs = dict(kwargs or {})
    if weights is not None:
        check_weights_path(weights)  # before the import and the construction, which may be slow
    constructor = resolve_constructor(text)
    try:
        model = constructor(**kwargs)
    except Exception as exc:
        raise ConfigError(f"--model: {_call_text(text, kwargs)} raised {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"--model: {_call_text(text, kwargs)} returned a {type(model).__name__}, "
                          "not a torch nn.Module")
    if weights is not None:
        load_weights_file(model, weights, text)
    return model.eval()


def check_weights_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES + TORCH_SUFFIXES:
        raise ConfigError(f"weights {str(path)!r}: give a .safetensors file or a .pt / .pth state_dict "
                          f"(saved with torch.save(model.state_dict(), ...))")
    if not path.is_file():
        raise ConfigError(f"weights {str(path)!r} does not exist" if not path.exists()
                          else f"weights {str(path)!r} is not a file")
    return path


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (see the module docstring), by name."""
    path = check_weights_path(path)
    try:
        if path.suffix.lower() in SAFETENSORS_SUFFIXES:
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated, or (torch.load) holding more than tensors and plain data
        message = " ".join(str(exc).split())[:300]
        raise ConfigError(f"weights {str(path)!r} cannot be read: {type(exc).__name__}: {message}") from None
    return _state_dict(loaded, path)


def _is_tensor_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def _state_dict(loaded: Any, path: Path) -> dict[str, torch.Tensor]:
    if _is_tensor_dict(loaded):
        return dict(loaded)
    if isinstance(loaded, Mapping):
        for key in STATE_DICT_KEYS:
            if _is_tensor_dict(loaded.get(key)):
                return dict(loaded[key])
    kind = type(loaded).__name__
    raise ConfigError(f"weights {str(path)!r} hold a {kind}, not a state_dict: expected a dict of tensors by name "
                      f"(or one under {' or '.join(map(repr, STATE_DICT_KEYS))})")


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_NAMES])
    return shown + (f" and {len(names) - MAX_NAMES} more" if len(names) > MAX_NAMES else "")


def load_weights_file(model: nn.Module, path: str | os.PathLike, label: str = "the model") -> None:
    """Load the weights file ``path`` into ``model`` with ``strict=True``; a ConfigError naming the file lists
    the tensors the file lacks, those the model lacks and those whose shapes differ."""
    state = read_state_dict(path)
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    shapes = [f"{key} {list(state[key].shape)} in the file, {list(expected[key].shape)} in the model"
              for key in expected if key in state and state[key].shape != expected[key].shape]
    problems = []
    if missing:
        problems.append(f"missing keys (in the model, not in the file): {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys (in the file, not in the model): {_names(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch: {_names(shapes)}")
    if problems:
        raise ConfigError(f"weights {str(path)!r} do not fit {label}: " + "; ".join(problems))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # a dtype that cannot be copied, for example
        raise ConfigError(f"weights {str(path)!r} do not load into {label}: {' '.join(str(exc).split())}") from None
