"""Reader for IDX files, the format MNIST and Fashion-MNIST ship in.

An IDX file (LeCun et al., http://yann.lecun.com/exdb/mnist/) is a header
followed by the array in C order, big-endian::

    bytes 0-1   0x00 0x00
    byte  2     element type: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
                0x0D float32, 0x0E float64
    byte  3     number of dimensions d
    4 * d       each dimension as a big-endian uint32
    ...         prod(dims) elements

Files may be gzip-compressed (recognised by their first bytes, whatever
their name). numpy only; no torch.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..errors import DataError

IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
MAX_IDX_BYTES = 1 << 32  # cap on the array size a header may announce (4 GiB)
GZIP_MAGIC = b"\x1f\x8b"
READ_CHUNK = 1 << 24

# The standard file names of MNIST and Fashion-MNIST, each optionally ".gz".
IDX_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _open(path: Path) -> BinaryIO:
    with open(path, "rb") as probe:
        compressed = probe.read(2) == GZIP_MAGIC
    return gzip.open(path, "rb") if compressed else open(path, "rb")


def _read_exact(stream: BinaryIO, n: int, path: Path, what: str) -> bytes:
    """Read exactly ``n`` bytes in bounded chunks, so a lying header allocates nothing large."""
    chunks, have = [], 0
    while have < n:
        chunk = stream.read(min(n - have, READ_CHUNK))
        if not chunk:
            raise DataError(f"IDX file {path} is truncated: {what} needs {n} bytes, found {have}")
        chunks.append(chunk)
        have += len(chunk)
    return b"".join(chunks)


def read_idx(path: str | os.PathLike, ndim: int | None = None) -> np.ndarray:
    """Read one IDX file (raw or gzip) into a native-endian numpy array.

    ``ndim``, when given, is the number of dimensions the file must have.
    Raises :class:`~lowbit.errors.DataError` naming the file when it cannot be
    read or is malformed: bad magic, unknown element type, wrong number of
    dimensions, truncated data or trailing bytes.
    """
    path = Path(path)
    try:
        with _open(path) as stream:
            magic = _read_exact(stream, 4, path, "the header")
            if magic[:2] != b"\x00\x00" or magic[2] not in IDX_DTYPES:
                raise DataError(
                    f"{path} is not an IDX file: magic bytes {magic.hex()} (want 0000 then an element type "
                    f"in {', '.join(f'{c:02x}' for c in IDX_DTYPES)}, then the number of dimensions)"
                )
            dtype, rank = IDX_DTYPES[magic[2]], magic[3]
            if rank == 0 or (ndim is not None and rank != ndim):
                want = f"{ndim}" if ndim is not None else "at least 1"
                raise DataError(f"IDX file {path} has {rank} dimension(s); expected {want}")
            dims = struct.unpack(f">{rank}I", _read_exact(stream, 4 * rank, path, "the dimensions"))
            nbytes = math.prod(dims) * dtype.itemsize
            if nbytes > MAX_IDX_BYTES:
                raise DataError(f"IDX file {path} announces {nbytes} bytes of data (shape {dims}); the cap is {MAX_IDX_BYTES}")
            payload = _read_exact(stream, nbytes, path, f"an array of shape {dims} and type {dtype.str}")
            if stream.read(1):
                raise DataError(f"IDX file {path} has trailing bytes after an array of shape {dims}")
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from None
    return np.frombuffer(payload, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def find_idx(directory: Path, stem: str) -> Path | None:
    """Return ``directory/stem`` or ``directory/stem.gz``, whichever exists."""
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def has_idx_split(directory: Path, split: str) -> bool:
    """True when ``directory`` holds both IDX files of ``split``."""
    return all(find_idx(directory, stem) is not None for stem in IDX_FILES[split])


def read_idx_split(directory: str | os.PathLike, split: str, image_size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Read the images ``(N, image_size, image_size)`` and labels ``(N,)`` of a split.

    ``directory`` holds the standard MNIST file names (``train-images-idx3-ubyte``
    etc., each optionally ``.gz``). Raises DataError when a file is missing or
    the images and labels do not match.
    """
    directory = Path(directory)
    image_stem, label_stem = IDX_FILES[split]
    paths = [find_idx(directory, stem) for stem in (image_stem, label_stem)]
    missing = [f"{stem}[.gz]" for stem, p in zip((image_stem, label_stem), paths) if p is None]
    if missing:
        raise DataError(f"directory {directory} lacks {', '.join(missing)}")
    images, labels = read_idx(paths[0], ndim=3), read_idx(paths[1], ndim=1)
    if images.shape[1:] != (image_size, image_size):
        raise DataError(f"IDX file {paths[0]} holds images of {images.shape[1:]}; expected ({image_size}, {image_size})")
    if len(images) != len(labels):
        raise DataError(f"IDX files {paths[0]} and {paths[1]} disagree: {len(images)} images, {len(labels)} labels")
    return images, labels
