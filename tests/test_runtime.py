"""Engine against the torch model it was saved from (lowbit.load in eval mode); torch-free import."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import lowbit
from lowbit.data import load_dataset
from lowbit.errors import ConfigError, DataError, FormatError, UnsupportedLayerError
from lowbit.models import get_model
from lowbit.runtime import Engine, available_kernels

BINARY = {"name": "binary", "ste": "clipped"}
XNOR_WEIGHT = {"name": "xnor", "ste": "clipped", "role": "weight"}


def binary_config(weight: dict) -> dict:
    return {"weight": weight, "input": BINARY, "first": "float", "last": "float"}


def small_binary_cnn() -> nn.Module:
    """Float first conv, binary convs with padding and stride, BN + hardtanh, a binary and a float linear."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Hardtanh(), nn.MaxPool2d(2),
        nn.Conv2d(16, 70, 3, stride=2, padding=1), nn.BatchNorm2d(70), nn.Hardtanh(),
        nn.Conv2d(70, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.Hardtanh(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(32 * 2 * 2, 50), nn.BatchNorm1d(50), nn.Hardtanh(), nn.Linear(50, 10),
    )
    for m in model.modules():  # non-trivial running statistics
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    return model


def saved(model: nn.Module, config: dict, path, example: torch.Tensor) -> nn.Module:
    quantized = lowbit.quantize(model, config).eval()
    lowbit.save(quantized, path, example_input=example)
    return lowbit.load(path).eval()


def mnist_images(count: int) -> torch.Tensor:
    try:
        images, _ = load_dataset("mnist", "test")
    except DataError as exc:
        pytest.skip(f"MNIST test images are not installed: {exc}")
    return images[:count].float()


def assert_engine_matches(engine: Engine, model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected = model(x).numpy()
    got = engine.run(x.numpy())
    assert got.shape == expected.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    np.testing.assert_array_equal(got.argmax(axis=1), expected.argmax(axis=1))


@pytest.mark.parametrize("kernel", [available_kernels()[0], "numpy"])
def test_lenet5_bnn_matches_torch_on_mnist(tmp_path, kernel):
    images = mnist_images(200)
    path = tmp_path / "lenet5.lowbit"
    model = saved(get_model("lenet5"), binary_config(BINARY), path, images[:1])
    engine = Engine(path, kernel=kernel)
    assert engine.binary_layers == ["conv2", "ip1"]  # first and last layers stay float
    assert_engine_matches(engine, model, images)


@pytest.mark.parametrize("weight", [BINARY, XNOR_WEIGHT], ids=["binary", "xnor"])
def test_binary_cnn_with_padding_stride_and_batchnorm_matches_torch(tmp_path, weight):
    path = tmp_path / "cnn.lowbit"
    x = torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    model = saved(small_binary_cnn(), binary_config(weight), path, x[:1])
    engine = Engine(path)
    assert len(engine.binary_layers) == 3
    assert_engine_matches(engine, model, x)
    assert_engine_matches(engine, model, x[:1])


def test_vgg_small_float_model_runs_in_numpy(tmp_path):
    path = tmp_path / "vgg.lowbit"
    torch.manual_seed(0)
    model = get_model("vgg-small").eval()
    x = torch.randn(3, 1, 28, 28)
    lowbit.save(model, path, example_input=x[:1])
    engine = Engine(path)
    assert engine.binary_layers == []
    assert_engine_matches(engine, lowbit.load(path).eval(), x)


def test_run_rejects_malformed_input(tmp_path):
    path = tmp_path / "cnn.lowbit"
    saved(small_binary_cnn(), binary_config(BINARY), path, torch.zeros(1, 1, 16, 16))
    engine = Engine(path)
    with pytest.raises(ConfigError, match="float32"):
        engine.run(np.zeros((1, 1, 16, 16), np.float64))
    with pytest.raises(ConfigError, match="shape"):
        engine.run(np.zeros((1, 1, 17, 16), np.float32))
    with pytest.raises(ConfigError, match="float32"):
        engine.run([[0.0]])


def test_engine_rejects_files_it_cannot_run(tmp_path):
    path = tmp_path / "nograph.lowbit"
    lowbit.save(get_model("lenet300"), path)
    with pytest.raises(FormatError, match="no graph"):
        Engine(path)
    (tmp_path / "junk.lowbit").write_bytes(b"\x00" * 16)
    with pytest.raises(FormatError):
        Engine(tmp_path / "junk.lowbit")
    path = tmp_path / "w8a8.lowbit"
    model = lowbit.quantize(get_model("lenet300"), "w8a8")
    lowbit.calibrate(model, [torch.randn(4, 1, 28, 28)])
    lowbit.save(model, path, example_input=torch.zeros(1, 1, 28, 28))
    with pytest.raises(UnsupportedLayerError, match="uniform"):
        Engine(path)
    with pytest.raises(ConfigError, match="kernel"):
        Engine(path, kernel="gpu")


def test_runtime_and_format_never_import_torch():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import numpy as np\n"
        "import lowbit.format, lowbit.runtime as r\n"
        "a = r.pack_signs(np.ones((2, 70), np.float32))\n"
        "assert r.binary_gemm(a, a, 70).tolist() == [[70, 70], [70, 70]]\n"
        "assert 'torch' not in sys.modules\n"
        "print(r.available_kernels())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "numpy" in result.stdout


def test_folded_batchnorm_sign_and_packed_pool_match_torch(tmp_path):
    """Bench-style order (binary conv -> max pool -> BN -> hardtanh -> binary conv, flatten -> binary linear),
    BN with gamma < 0 and gamma == 0 channels: the folded engine keeps activations packed and matches torch."""
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Hardtanh(),
        nn.Conv2d(16, 70, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(70), nn.Hardtanh(),
        nn.Conv2d(70, 32, 3, padding=1), nn.BatchNorm2d(32), nn.Hardtanh(),
        nn.Conv2d(32, 24, 3, stride=2, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(24), nn.Hardtanh(),
        nn.Flatten(), nn.Linear(24 * 2 * 2, 80), nn.BatchNorm1d(80), nn.Hardtanh(),
        nn.Linear(80, 40), nn.BatchNorm1d(40), nn.Hardtanh(), nn.Linear(40, 10),
    )
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.uniform_(-3, 3)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(-1.5, 1.5)
            m.weight.data[::5] = 0.0
            m.bias.data.uniform_(-0.3, 0.3)
    path = tmp_path / "folded.lowbit"
    x = torch.randn(32, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    loaded = saved(model, binary_config(BINARY), path, x[:1])
    for kernel in (available_kernels()[0], "numpy"):
        engine = Engine(path, kernel=kernel)
        assert len(engine.binary_layers) == 5 and len(engine.folded) == 4  # all but the last binary layer
        assert_engine_matches(engine, loaded, x)
        assert_engine_matches(engine, loaded, x[:1])
