"""Real image data: folders of images (imagefolder:DIR) and CIFAR-10/100 batch files, written here in tmp_path."""

from __future__ import annotations

import io
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

import lowbit.data.imagefolder as imagefolder
from lowbit.data import ImageFolder, dataset_info, load_dataset, read_batch
from lowbit.data.cifar import cifar_arrays
from lowbit.errors import ConfigError, DataError

MEAN, STD = imagefolder.IMAGENET_MEAN, imagefolder.IMAGENET_STD


def png(path, pixels) -> None:
    """Write uint8 ``pixels`` (H, W, 3) or (H, W) as a PNG (lossless)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(path)


def solid(color, height=8, width=8):
    return np.broadcast_to(np.array(color, dtype=np.uint8), (height, width, 3))


@pytest.fixture
def folder(tmp_path):
    """dog/ (listed second) and cat/ with two and three 8x8 images; files and folders that must be skipped."""
    root = tmp_path / "pets"
    png(root / "dog" / "b.png", solid((255, 128, 0)))
    png(root / "dog" / "a.png", solid((0, 0, 0)))
    png(root / "cat" / "1.png", solid((10, 20, 30)))
    png(root / "cat" / "sub" / "2.png", solid((40, 50, 60)))  # class folders are searched recursively
    Image.fromarray(solid((70, 80, 90)).copy()).save(root / "cat" / "3.JPG", quality=100)  # suffix in any case
    (root / "cat" / "notes.txt").write_text("not an image")
    png(root / "cat" / ".hidden.png", solid((1, 1, 1)))
    png(root / ".cache" / "x.png", solid((1, 1, 1)))
    return root


# ---------------------------------------------------------------------------------------------- image folders


def test_classes_labels_shapes_and_one_normalised_pixel(folder):
    data = ImageFolder(folder, size=8, resize=8)
    assert data.classes() == ["cat", "dog"]
    images, labels = load_dataset(data, "train")
    assert images.shape == (5, 3, 8, 8) and images.dtype == torch.float32
    assert labels.tolist() == [0, 0, 0, 1, 1] and labels.dtype == torch.int64
    # dog/b.png is the last file: (255, 128, 0) -> ((255/255 - 0.485) / 0.229, (128/255 - 0.456) / 0.224, ...)
    expected = [(255 / 255 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, (0 / 255 - 0.406) / 0.225]
    assert images[4, :, 3, 5].tolist() == pytest.approx(expected, abs=1e-6)
    assert torch.allclose(images[4], torch.tensor(expected).reshape(3, 1, 1).expand(3, 8, 8))
    raw, _ = load_dataset(data, "test", normalize=False)  # no split folders: the folder is every split
    assert raw[0, :, 0, 0].tolist() == pytest.approx([10 / 255, 20 / 255, 30 / 255])
    assert raw[2, :, 0, 0].tolist() == pytest.approx([40 / 255, 50 / 255, 60 / 255])  # cat/3.JPG, then cat/sub/


def test_the_name_form_and_dataset_info(folder):
    info = dataset_info(f"imagefolder:{folder}")
    assert info.num_classes == 2 and info.input_shape == (3, 224, 224)
    assert info.mean == MEAN and info.std == STD and info.name == f"imagefolder:{folder}"
    info = dataset_info(ImageFolder(folder, size=(6, 10)))
    assert info.input_shape == (3, 6, 10)
    images, labels = load_dataset(f"imagefolder:{folder}", "train")
    assert images.shape == (5, 3, 224, 224) and len(labels) == 5


def test_shorter_side_resize_then_centre_crop(tmp_path):
    # a 12 wide, 8 high image whose column x holds the value 20 x: no resize at 8, crop columns 2..9
    columns = np.tile((np.arange(12, dtype=np.uint8) * 20)[None, :, None], (8, 1, 3))
    png(tmp_path / "d" / "c" / "wide.png", columns)
    raw, _ = load_dataset(ImageFolder(tmp_path / "d", size=8, resize=8), "train", normalize=False)
    assert (raw[0, 0, 0] * 255).round().tolist() == [20.0 * x for x in range(2, 10)]
    # torchvision's rule: shorter side to 4, longer int(4 * 12 / 8) = 6; crop 4x4 from left round(1.0) = 1
    expected = Image.fromarray(columns).resize((6, 4), Image.BILINEAR).crop((1, 0, 5, 4))
    raw, _ = load_dataset(ImageFolder(tmp_path / "d", size=4, resize=4), "train", normalize=False)
    expected = torch.from_numpy(np.asarray(expected).transpose(2, 0, 1).copy())
    assert torch.equal((raw[0] * 255).round().to(torch.uint8), expected)
    # default resize: round(8 * 256 / 224) = 9
    assert ImageFolder(tmp_path / "d", size=8).resize_to == 9


def test_grayscale_mean_std_options_and_selection(folder):
    data = ImageFolder(folder, size=4, resize=8, channels=1)
    images, _ = load_dataset(data, "train")
    gray = (255 * 299 + 128 * 587 + 0 * 114 + 500) // 1000  # Pillow's L conversion (ITU-R 601-2, rounded)
    assert images.shape == (5, 1, 4, 4)
    assert images[4, 0, 0, 0].item() == pytest.approx((gray / 255 - 0.449) / 0.226, abs=1e-6)
    custom = ImageFolder(folder, size=4, resize=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    images, _ = load_dataset(custom, "train")
    assert images[4, :, 0, 0].tolist() == pytest.approx([(1 - 0.5) / 0.25, (128 / 255 - 0.5) / 0.5, -0.5], abs=1e-6)
    everything, labels = load_dataset(custom, "train")
    picked, picked_labels = load_dataset(custom, "train", select=lambda n: torch.tensor([4, 0, 2]))
    assert torch.equal(picked, everything[[4, 0, 2]]) and picked_labels.tolist() == [1, 0, 0]


def test_only_selected_images_are_decoded(folder, monkeypatch):
    decoded = []
    original = imagefolder._transform
    monkeypatch.setattr(imagefolder, "_transform", lambda *a: decoded.append(a[1].name) or original(*a))
    images, labels = load_dataset(ImageFolder(folder, size=4), "test", select=lambda n: slice(None, 2))
    assert len(images) == 2 and decoded == ["1.png", "3.JPG"]


def test_split_folders(tmp_path):
    root = tmp_path / "data"
    for split, n in (("train", 3), ("val", 1)):
        for label in ("a", "b"):
            for i in range(n):
                png(root / split / label / f"{i}.png", solid((i, 0, 0)))
    data = ImageFolder(root, size=8, resize=8)
    assert len(load_dataset(data, "train")[1]) == 6 and load_dataset(data, "test")[1].tolist() == [0, 1]
    png(root / "val" / "c" / "0.png", solid((0, 0, 0)))
    with pytest.raises(DataError, match=r"hold different classes \(c\)"):
        load_dataset(data, "test")
    only_train = tmp_path / "only"
    png(only_train / "train" / "a" / "0.png", solid((0, 0, 0)))
    with pytest.raises(DataError, match=r"has train/ but no val/ or test/ for the test split; name one folder"):
        load_dataset(ImageFolder(only_train), "test")


def test_folder_errors_name_the_folder_or_file(tmp_path, folder):
    with pytest.raises(DataError, match=f"image folder {tmp_path / 'none'} does not exist"):
        load_dataset(ImageFolder(tmp_path / "none"), "train")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="is not a folder"):
        load_dataset(ImageFolder(tmp_path / "file"), "train")
    png(tmp_path / "flat" / "0.png", solid((0, 0, 0)))
    with pytest.raises(DataError, match=f"image folder {tmp_path / 'flat'} holds no class folders"):
        load_dataset(ImageFolder(tmp_path / "flat"), "train")
    (folder / "empty" / "deeper").mkdir(parents=True)
    (folder / "empty" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=f"class folder {folder / 'empty'} holds no images"):
        load_dataset(ImageFolder(folder), "train")


@pytest.mark.parametrize("content", [b"not an image at all", "truncated"])
def test_unreadable_images_name_the_file(tmp_path, content):
    bad = tmp_path / "d" / "c" / "bad.png"
    png(tmp_path / "d" / "c" / "good.png", solid((0, 0, 0)))
    if content == "truncated":
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
        content = buffer.getvalue()[:200]
    bad.write_bytes(content)
    with pytest.raises(DataError, match=f"cannot read image {bad}"):
        load_dataset(ImageFolder(tmp_path / "d", size=8), "train")


@pytest.mark.parametrize("options, message", [
    ({"size": 0}, "image size must be an integer from 1"),
    ({"size": (4, 4, 4)}, r"\(height, width\)"),
    ({"size": 8, "resize": 7}, r"resize side \(7\) must be at least the crop size 8x8"),
    ({"channels": 2}, "1 \\(grayscale\\) or 3 \\(RGB\\)"),
    ({"mean": (0.5,)}, "the mean needs 3 value"),
    ({"std": (0.5, 0.0, 0.5)}, "std values must be finite numbers > 0"),
])
def test_bad_transform_options(tmp_path, options, message):
    with pytest.raises(ConfigError, match=message):
        ImageFolder(tmp_path, **options)


def test_imagefolder_takes_no_data_dir(folder):
    with pytest.raises(ConfigError, match="takes no data_dir"):
        load_dataset(f"imagefolder:{folder}", "train", data_dir=str(folder))
    with pytest.raises(ConfigError, match="imagefolder:DIR"):
        load_dataset("imagefolder:", "train")


# ------------------------------------------------------------------------------------------------------ CIFAR


class Py2Pickler(pickle._Pickler):
    """Pickles as Python 2 did for the CIFAR files: str and bytes as byte strings, numpy 1's module name."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_byte_string(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_byte_string
    dispatch[str] = save_byte_string


def py2_pickle(value) -> bytes:
    buffer = io.BytesIO()
    Py2Pickler(buffer, protocol=2).dump(value)
    return buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def cifar_batch(images: np.ndarray, labels, label_key="labels", name="batch") -> dict:
    """The original layout: rows of 1024 red, 1024 green, 1024 blue values."""
    return {"batch_label": name, label_key: list(labels), "data": images.reshape(len(images), 3072),
            "filenames": [f"img_{i}.png" for i in range(len(images))]}


def random_images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)


@pytest.fixture
def cifar10(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = {f"data_batch_{i}": (random_images(2, i), [i, (i + 5) % 10]) for i in range(1, 6)}
    batches["test_batch"] = (random_images(3, 9), [9, 0, 4])
    for name, (images, labels) in batches.items():
        (folder / name).write_bytes(py2_pickle(cifar_batch(images, labels)))
    return tmp_path, batches


def test_cifar10_from_python2_batches(cifar10):
    parent, batches = cifar10
    for where in (parent, parent / "cifar-10-batches-py"):  # the unpacked archive's folder or its parent
        images, labels = load_dataset("cifar10", "train", str(where), normalize=False)
        expected = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
        assert images.shape == (10, 3, 32, 32)
        assert torch.equal((images * 255).round().to(torch.uint8), torch.from_numpy(expected))
        assert labels.tolist() == [1, 6, 2, 7, 3, 8, 4, 9, 5, 0]
    images, labels = load_dataset("cifar10", "test", str(parent))
    pixel = batches["test_batch"][0][2, :, 31, 0]  # red, green, blue of one pixel
    expected = [(pixel[c] / 255 - m) / s for c, (m, s) in enumerate(zip((0.4914, 0.4822, 0.4465),
                                                                         (0.2470, 0.2435, 0.2616)))]
    assert images[2, :, 31, 0].tolist() == pytest.approx(expected, abs=1e-6)
    assert labels.tolist() == [9, 0, 4] and dataset_info("cifar10").input_shape == (3, 32, 32)


def test_cifar100_fine_labels_and_newer_pickles(tmp_path, monkeypatch):
    folder = tmp_path / "cifar100" / "cifar-100-python"
    folder.mkdir(parents=True)
    train, test = random_images(4, 1), random_images(2, 2)
    (folder / "train").write_bytes(py2_pickle({**cifar_batch(train, [0, 99, 50, 7], "fine_labels"),
                                               "coarse_labels": [0, 19, 10, 1]}))
    # re-pickled by Python 3 (protocol 5: numpy's _frombuffer) with str keys
    batch = {"fine_labels": np.array([3, 4]), "data": test.reshape(2, 3072)}
    (folder / "test").write_bytes(pickle.dumps(batch, protocol=5))
    monkeypatch.setenv("LOWBIT_DATA", str(tmp_path))  # $LOWBIT_DATA/cifar100/cifar-100-python
    images, labels = load_dataset("cifar100", "train", normalize=False)
    assert labels.tolist() == [0, 99, 50, 7]
    assert torch.equal((images * 255).round().to(torch.uint8), torch.from_numpy(train))
    images, labels = load_dataset("cifar100", "test")
    assert images.shape == (2, 3, 32, 32) and labels.tolist() == [3, 4] and dataset_info("cifar100").num_classes == 100


class Payload:
    def __reduce__(self):
        return (os.system, ("echo should-not-run > /dev/null",))


def test_cifar_batches_admit_no_other_global(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({"data": Payload(), "labels": []}, protocol=2))
    with pytest.raises(DataError, match=r"cannot read CIFAR batch file .*global posix.system is not allowed"):
        read_batch(path)
    path.write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]}, protocol=2))
    with pytest.raises(DataError, match="global _codecs.encode is not allowed"):  # Python 3's protocol-2 bytes
        read_batch(path)


@pytest.mark.parametrize("batch, message", [
    ("truncated", "cannot read CIFAR batch file"),
    ([1, 2], "holds a list, not a dict"),
    ({b"labels": [0]}, "lacks b'data' or b'labels'"),
    ({b"data": np.zeros((1, 100), np.uint8), b"labels": [0]},
     r"b'data' is uint8 \(1, 100\); expected uint8 \(N, 3072\)"),
    ({b"data": np.zeros((1, 3072), np.float32), b"labels": [0]}, "b'data' is float32"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "must be 2 integer labels"),
    ({b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]}, r"labels outside 0..9 \(from 10 to 10\)"),
])
def test_malformed_cifar_batches_name_the_file(tmp_path, batch, message):
    path = tmp_path / "test_batch"
    data = py2_pickle(cifar_batch(random_images(2, 0), [1, 2])) if batch == "truncated" else py2_pickle(batch)
    path.write_bytes(data[: len(data) // 2] if batch == "truncated" else data)
    with pytest.raises(DataError, match=message) as error:
        read_batch(path)
    assert str(path) in str(error.value)


def test_missing_cifar_files_and_folders(cifar10, tmp_path, monkeypatch):
    parent, _ = cifar10
    (parent / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3 does not exist"):
        load_dataset("cifar10", "train", str(parent))
    with pytest.raises(DataError, match=r"cifar10 test batches not found \(looked in .*nowhere \(not a folder\)\)"):
        cifar_arrays("cifar10", "test", tmp_path / "nowhere")
    monkeypatch.delenv("LOWBIT_DATA", raising=False)
    with pytest.raises(DataError, match=r"LOWBIT_DATA/cifar100 \(not set\).*cifar-100-python.tar.gz.*needs test"):
        load_dataset("cifar100", "test")
