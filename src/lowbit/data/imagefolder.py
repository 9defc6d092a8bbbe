"""Folders of image files, one sub-folder per class (the layout of torchvision's ImageFolder).

``imagefolder:DIR`` on the command line (or :class:`ImageFolder` in Python)::

    DIR/cat/0001.jpg         DIR/train/cat/0001.jpg
    DIR/cat/0002.png    or   DIR/train/dog/...
    DIR/dog/a.bmp            DIR/val/cat/...      (or DIR/test/)

Classes are the sub-folders' names in sorted order (label 0 is the first);
each class folder is searched recursively for ``.png``, ``.jpg``, ``.jpeg``
and ``.bmp`` files (any case), taken in sorted path order. Names starting
with a dot are skipped, other files are ignored and symbolic links to
folders inside a class folder are not followed. When DIR holds ``train/``
and ``val/`` (or ``test/``) folders, those are the splits and must hold the
same classes; otherwise DIR itself is every split (name one split's folder,
``imagefolder:DIR/val``, to calibrate and evaluate on it).

Every image gets the usual evaluation transforms: decoded with Pillow and
converted to RGB (or to grayscale for a one-channel model), its shorter side
resized to ``resize`` (bilinear; the longer side ``int(resize * long / short)``),
the centre ``size`` cropped out, scaled to [0, 1] and normalised per channel
with ``mean`` and ``std`` (default ImageNet's; for grayscale their averages,
0.449 and 0.226). ``resize`` defaults to ``round(max(size) * 256 / 224)``, the
256 -> 224 ratio of the ImageNet recipe. The arithmetic is torchvision's
``Resize`` + ``CenterCrop`` + ``ToTensor`` + ``Normalize`` on PIL images.

Images are decoded into memory; loaders decode only the images they select
(a calibration sample, the first ``--limit`` test images).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..errors import ConfigError, DataError

IMAGEFOLDER_PREFIX = "imagefolder:"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_MEAN, GRAY_STD = (0.449,), (0.226,)  # averages of ImageNet's, for one-channel models
DEFAULT_SIZE = 224
RESIZE_RATIO = 256 / 224
MAX_SIZE = 1 << 14  # cap on the crop and resize sides
#: per split, the folder names that hold it when DIR is split
SPLIT_FOLDERS = {"train": ("train",), "test": ("val", "test")}


def _check_side(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SIZE:
        raise ConfigError(f"{what} must be an integer from 1 to {MAX_SIZE}, got {value!r}")
    return value


def _check_stats(values: Sequence[float] | None, what: str, channels: int, positive: bool) -> tuple[float, ...] | None:
    if values is None:
        return None
    values = tuple(values)
    if len(values) != channels:
        raise ConfigError(f"{what} needs {channels} value(s), one per channel; got {len(values)}")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or (positive and value <= 0):
            raise ConfigError(f"{what} values must be finite numbers{' > 0' if positive else ''}, got {value!r}")
    return tuple(float(v) for v in values)


@dataclass(frozen=True)
class ImageFolder:
    """An image-folder dataset and its evaluation transforms (see the module docstring).

    ``size`` is the crop ``(height, width)`` (an int: a square), ``resize``
    the shorter side before the crop, ``channels`` 3 (RGB) or 1 (grayscale),
    ``mean`` / ``std`` one value per channel. Values are checked here
    (ConfigError); the folder is read only when it is listed or loaded.
    """

    root: Path
    size: tuple[int, int] = (DEFAULT_SIZE, DEFAULT_SIZE)
    resize: int | None = None
    channels: int = 3
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        size = (self.size, self.size) if isinstance(self.size, int) else tuple(self.size)
        if len(size) != 2:
            raise ConfigError(f"the image size is (height, width), got {self.size!r}")
        for side in size:
            _check_side(side, "the image size")
        if self.resize is not None:
            _check_side(self.resize, "the resize side")
            if self.resize < max(size):
                raise ConfigError(f"the resize side ({self.resize}) must be at least the crop size "
                                  f"{size[0]}x{size[1]}")
        if self.channels not in (1, 3):
            raise ConfigError(f"image folders give 1 (grayscale) or 3 (RGB) channels, not {self.channels!r}")
        object.__setattr__(self, "root", Path(self.root))
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "mean", _check_stats(self.mean, "the mean", self.channels, False))
        object.__setattr__(self, "std", _check_stats(self.std, "the std", self.channels, True))

    @classmethod
    def parse(cls, text: str, **options: object) -> ImageFolder:
        """``imagefolder:DIR`` as an ImageFolder (``options``: the other fields)."""
        if not text.startswith(IMAGEFOLDER_PREFIX) or not text[len(IMAGEFOLDER_PREFIX):].strip():
            raise ConfigError(f"an image folder is given as {IMAGEFOLDER_PREFIX}DIR, got {text!r}")
        return cls(Path(text[len(IMAGEFOLDER_PREFIX):]).expanduser(), **options)  # type: ignore[arg-type]

    @property
    def name(self) -> str:
        return f"{IMAGEFOLDER_PREFIX}{self.root}"

    def __str__(self) -> str:
        return self.name

    @property
    def resize_to(self) -> int:
        """The shorter side images are resized to before the centre crop."""
        return self.resize if self.resize is not None else round(max(self.size) * RESIZE_RATIO)

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) per channel."""
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if self.channels == 3 else (GRAY_MEAN, GRAY_STD)
        return self.mean or mean, self.std or std

    # ------------------------------------------------------------------ listing

    def _check_root(self) -> None:
        if not self.root.exists():
            raise DataError(f"image folder {self.root} does not exist")
        if not self.root.is_dir():
            raise DataError(f"image folder {self.root} is not a folder")

    def _split_folders(self) -> list[str]:
        return [name for names in SPLIT_FOLDERS.values() for name in names if (self.root / name).is_dir()]

    def split_root(self, split: str) -> Path:
        """The folder whose class sub-folders make up ``split`` ("train" or "test")."""
        self._check_root()
        present = self._split_folders()
        if not present:
            return self.root
        for name in SPLIT_FOLDERS[split]:
            if (self.root / name).is_dir():
                return self.root / name
        wanted = " or ".join(f"{name}/" for name in SPLIT_FOLDERS[split])
        raise DataError(f"image folder {self.root} has {', '.join(f'{p}/' for p in present)} but no {wanted} for "
                        f"the {split} split; name one folder ({IMAGEFOLDER_PREFIX}{self.root / present[0]}) to use "
                        "it for every split")

    def classes(self, split: str = "train") -> list[str]:
        """The class names of ``split``, sorted (a class's label is its index). A split folder beside it
        must hold the same classes."""
        root = self.split_root(split)
        names = _class_names(root)
        if root != self.root:  # split folders: the other split's, when there, must agree
            for other in SPLIT_FOLDERS:
                other_root = next((self.root / n for n in SPLIT_FOLDERS[other] if (self.root / n).is_dir()), None)
                if other != split and other_root is not None and _class_names(other_root) != names:
                    only = sorted(set(names) ^ set(_class_names(other_root)))
                    raise DataError(f"image folders {root} and {other_root} hold different classes "
                                    f"({', '.join(only[:10])}); the splits must hold the same classes")
        return names

    def num_classes(self) -> int:
        """How many classes the dataset has (those of its train split, else its test split)."""
        self._check_root()
        has_train = not self._split_folders() or any((self.root / n).is_dir() for n in SPLIT_FOLDERS["train"])
        return len(self.classes("train" if has_train else "test"))

    def samples(self, split: str) -> list[tuple[Path, int]]:
        """Every image file of ``split`` with its label, class by class, in sorted path order."""
        root = self.split_root(split)
        found = []
        for label, name in enumerate(self.classes(split)):
            files = _image_files(root / name)
            if not files:
                raise DataError(f"class folder {root / name} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            found += [(path, label) for path in files]
        return found

    # ------------------------------------------------------------------ reading

    def read(self, paths: Sequence[Path], progress: bool | None = None, desc: str = "images") -> np.ndarray:
        """The images at ``paths``, transformed, as uint8 ``(N, channels, height, width)``."""
        try:
            from PIL import Image
        except ImportError:  # pragma: no cover - Pillow comes with matplotlib
            raise DataError("reading image folders needs Pillow: pip install pillow") from None
        height, width = self.size
        pixels = np.empty((len(paths), self.channels, height, width), dtype=np.uint8)
        show = sys.stderr.isatty() if progress is None else progress
        for i, path in enumerate(tqdm(paths, desc=desc, disable=not show, leave=False, unit="image")):
            pixels[i] = _transform(Image, path, "RGB" if self.channels == 3 else "L", self.resize_to, self.size)
        return pixels


def image_folder(data: str | ImageFolder) -> ImageFolder | None:
    """``data`` as an ImageFolder when it is one (or names one, ``imagefolder:DIR``), else None."""
    if isinstance(data, ImageFolder):
        return data
    if isinstance(data, str) and data.startswith(IMAGEFOLDER_PREFIX):
        return ImageFolder.parse(data)
    return None


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _class_names(root: Path) -> list[str]:
    try:
        names = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not _hidden(entry.name))
    except OSError as exc:
        raise DataError(f"cannot list image folder {root}: {exc.strerror or exc}") from None
    if not names:
        raise DataError(f"image folder {root} holds no class folders (one sub-folder of images per class)")
    return names


def _image_files(folder: Path) -> list[Path]:
    def failed(exc: OSError) -> None:
        raise DataError(f"cannot list class folder {exc.filename or folder}: {exc.strerror or exc}")

    found = []
    for directory, subdirs, files in os.walk(folder, onerror=failed):
        subdirs[:] = [d for d in subdirs if not _hidden(d)]
        found += [Path(directory) / f for f in files if not _hidden(f) and f.lower().endswith(IMAGE_SUFFIXES)]
    return sorted(found)


def _transform(image_module: object, path: Path, mode: str, resize: int, size: tuple[int, int]) -> np.ndarray:
    """One image: decoded, shorter side resized, centre-cropped; uint8 ``(channels, height, width)``."""
    Image = image_module
    try:
        with Image.open(path) as opened:  # type: ignore[attr-defined]
            image = opened.convert(mode)
        width, height = image.size
        if width <= height:
            new = (resize, int(resize * height / width))
        else:
            new = (int(resize * width / height), resize)
        if new != image.size:
            image = image.resize(new, Image.BILINEAR)  # type: ignore[attr-defined]
        crop_h, crop_w = size
        top, left = int(round((new[1] - crop_h) / 2.0)), int(round((new[0] - crop_w) / 2.0))
        array = np.asarray(image.crop((left, top, left + crop_w, top + crop_h)), dtype=np.uint8)
    except Exception as exc:  # any decoder failure of a corrupt, truncated or unknown file
        raise DataError(f"cannot read image {path}: {exc or type(exc).__name__}") from None
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
