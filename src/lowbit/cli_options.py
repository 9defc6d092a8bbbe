"""Options shared by the commands that take a model or a dataset: ``quantize``, ``eval``, ``export``, ``allocate``.

- A model outside lowbit: ``--model package.module:function`` with
  ``--model-args JSON`` (keyword arguments), ``--weights FILE`` (.safetensors,
  or a .pt / .pth state_dict) and ``--input-shape C,H,W`` (else the data's
  shape); built by :mod:`lowbit.models.external`.
- A folder of images, ``--data imagefolder:DIR``, with ``--image-size``,
  ``--resize``, ``--mean`` and ``--std`` (:mod:`lowbit.data.imagefolder`).

Every value is parsed and checked here, before any file is read.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from .errors import ConfigError

MODEL_HELP = ("architecture: a lowbit model name (default: from run.json), or package.module:function, a "
              "constructor to import and call (with --model-args, --weights, --input-shape)")
IMAGE_OPTIONS = ("image_size", "resize", "mean", "std")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """``--model-args``, ``--weights`` and ``--input-shape`` (``--model`` is each command's own)."""
    parser.add_argument("--model-args", default=None, metavar="JSON",
                        help="keyword arguments of the --model package.module:function constructor, a JSON object")
    parser.add_argument("--weights", default=None, metavar="FILE",
                        help="weights of a --model package.module:function: a .safetensors file or a .pt / .pth "
                             "state_dict")
    parser.add_argument("--input-shape", default=None, metavar="C,H,W",
                        help="input shape of a --model package.module:function (default: the dataset's)")


def add_image_options(parser: argparse.ArgumentParser) -> None:
    """The transforms of ``--data imagefolder:DIR``."""
    parser.add_argument("--image-size", default=None, metavar="SIZE",
                        help="with --data imagefolder:DIR: centre crop, S or H,W (default: the model's input size, "
                             "else 224)")
    parser.add_argument("--resize", type=int, default=None, metavar="S",
                        help="with --data imagefolder:DIR: shorter side before the crop (default: size x 256/224)")
    parser.add_argument("--mean", default=None, metavar="M,M,M",
                        help="with --data imagefolder:DIR: per-channel mean (default: ImageNet's)")
    parser.add_argument("--std", default=None, metavar="S,S,S",
                        help="with --data imagefolder:DIR: per-channel std (default: ImageNet's)")


def _listed(options: list[str]) -> str:
    """``--a goes`` / ``--a and --b go``."""
    if len(options) == 1:
        return f"{options[0]} goes"
    return f"{', '.join(options[:-1])} and {options[-1]} go"


def is_external(args: argparse.Namespace) -> bool:
    """True when ``--model`` names an import path (``package.module:function``)."""
    from .models.external import is_import_path

    return is_import_path(getattr(args, "model", None))


def check_model_options(args: argparse.Namespace) -> tuple[dict[str, Any], tuple[int, int, int] | None]:
    """(constructor kwargs, input shape) of the model options, parsed; they go with an import-path ``--model``."""
    from .models.external import check_weights_path, parse_import_path, parse_input_shape, parse_model_args

    given = [f"--{name.replace('_', '-')}" for name in ("model_args", "weights", "input_shape")
             if getattr(args, name, None) is not None]
    if not is_external(args):
        if given:
            raise ConfigError(f"{_listed(given)} with --model package.module:function (a model from "
                              "outside lowbit); a lowbit checkpoint carries its own architecture and weights")
        return {}, None
    parse_import_path(args.model)
    if args.weights is not None:
        check_weights_path(args.weights)
    return parse_model_args(args.model_args), parse_input_shape(args.input_shape)


def _numbers(text: str | None, option: str, kind: type) -> list[Any] | None:
    if text is None:
        return None
    try:
        values = [kind(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"{option} must be comma-separated {'integers' if kind is int else 'numbers'}, "
                          f"got {text!r}") from None
    if kind is float and not all(math.isfinite(v) for v in values):
        raise ConfigError(f"{option} values must be finite, got {text!r}")
    return values


def _image_size(args: argparse.Namespace) -> tuple[int, int] | None:
    size = _numbers(getattr(args, "image_size", None), "--image-size", int)
    if size is None:
        return None
    if len(size) not in (1, 2) or min(size) < 1:
        raise ConfigError(f"--image-size must be S or H,W with positive integers, got {args.image_size!r}")
    return (size[0], size[-1])


def check_image_options(data: Any, args: argparse.Namespace) -> None:
    """The image options of ``args`` parsed and checked against ``data`` alone (no shape, no files)."""
    from .data.imagefolder import IMAGEFOLDER_PREFIX

    set_options = [f"--{name.replace('_', '-')}" for name in IMAGE_OPTIONS if getattr(args, name, None) is not None]
    if set_options and not str(data).startswith(IMAGEFOLDER_PREFIX):
        raise ConfigError(f"{_listed(set_options)} with --data {IMAGEFOLDER_PREFIX}DIR"
                          + ("" if data is None else f", not {str(data)!r} (its size and normalisation are fixed)"))
    _image_size(args)
    _numbers(getattr(args, "mean", None), "--mean", float)
    _numbers(getattr(args, "std", None), "--std", float)
    resize = getattr(args, "resize", None)
    if resize is not None and resize < 1:
        raise ConfigError(f"--resize must be a positive integer, got {resize}")


def data_spec(
    data: Any, args: argparse.Namespace, input_shape: tuple[int, ...] | None = None, *, from_file: bool = False
) -> Any:
    """The dataset ``data`` names (None stays None), with the image options of ``args`` applied.

    ``input_shape`` ``(C, H, W)`` is the model's: an image folder is cropped to
    it (an ``--image-size`` that differs is a ConfigError, unless
    ``from_file``: then the shape only replaces the defaults), and a named
    dataset of another shape is a ConfigError.
    """
    from .data import ImageFolder, dataset_info
    from .data.imagefolder import IMAGEFOLDER_PREFIX

    if isinstance(data, ImageFolder):
        return data
    check_image_options(data, args)
    if data is None:
        return None
    if not str(data).startswith(IMAGEFOLDER_PREFIX):
        if input_shape is not None and not from_file:
            shape = dataset_info(data).input_shape
            if tuple(input_shape) != shape:
                raise ConfigError(f"--input-shape {','.join(map(str, input_shape))} does not match {data} images, "
                                  f"{','.join(map(str, shape))}")
        return data
    size = _image_size(args)
    options: dict[str, Any] = {}
    if input_shape is not None:
        channels, height, width = input_shape
        if size is not None and size != (height, width) and not from_file:
            raise ConfigError(f"--image-size {args.image_size} does not match --input-shape "
                              f"{','.join(map(str, input_shape))}")
        if channels not in (1, 3):
            raise ConfigError(f"the model takes {channels} input channels; image folders give 1 (grayscale) or "
                              "3 (RGB)")
        options.update(size=size or (height, width), channels=channels)
    elif size is not None:
        options["size"] = size
    mean, std = _numbers(getattr(args, "mean", None), "--mean", float), _numbers(getattr(args, "std", None),
                                                                              "--std", float)
    return ImageFolder.parse(str(data), resize=getattr(args, "resize", None), mean=mean, std=std, **options)


def data_label(data: Any) -> str | None:
    """How a dataset is named in results: its name, or ``imagefolder:DIR``."""
    return None if data is None else str(data)


def build_external(args: argparse.Namespace, model_args: dict[str, Any]) -> Any:
    """The model of ``--model package.module:function`` (with ``--model-args`` and ``--weights``)."""
    from .models.external import build_external as build

    return build(args.model, model_args, args.weights)


def input_shape_of(data: Any, input_shape: tuple[int, int, int] | None) -> tuple[int, int, int]:
    """``input_shape``, else the shape of one example of ``data``; ConfigError when neither is known."""
    if input_shape is not None:
        return input_shape
    if data is None:
        raise ConfigError("a --model package.module:function has no recorded input shape: give --input-shape "
                          "C,H,W or --data")
    from .data import dataset_info

    return dataset_info(data).input_shape
