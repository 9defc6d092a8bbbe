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
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lowbit.format.container import read_file
from lowbit.errors import CalibrationError, ConfigError, DataError, FormatError, UnsupportedLayerError
from lowbit.models import get_model
from lowbit.nn import QuantAct
from lowbit.quantizers import get
from lowbit.runtime import Engine, available_kernels
from lowbit.runtime.activations import activation_quantizer

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


def test_float_layers_run_on_one_blas_thread_beside_the_native_kernels(tmp_path):
    """numpy's spinning BLAS threads would compete with the kernels' threads for the cores."""
    from threadpoolctl import threadpool_info

    def blas_threads() -> list[int]:
        return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]

    if available_kernels()[0] == "numpy" or not blas_threads():
        pytest.skip("needs the native kernels and a BLAS behind numpy")
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "lenet5.lowbit"
    saved(get_model("lenet5"), binary_config(BINARY), path, x[:1])
    engine = Engine(path, threads=2)
    seen: list[list[int]] = []
    name, args, first = engine._steps[0]  # the float first conv, a numpy matmul
    engine._steps[0] = (name, args, lambda xs: seen.append(blas_threads()) or first(xs))
    before = blas_threads()
    engine.run(x.numpy())
    assert seen == [[1] * len(before)] and blas_threads() == before  # limited during the run, restored after
    assert Engine(path, threads=1)._blas is None and Engine(path, kernel="numpy", threads=2)._blas is None


def test_trained_lenet5_bnn_matches_torch_on_the_whole_mnist_test_set(tmp_path):
    """A binary LeNet-5 after a short quantization-aware run: the same argmax on all 10,000 test images."""
    from lowbit import workflow

    images = mnist_images(10_000)
    trained = workflow.train("lenet5", "mnist", epochs=1, out_dir=tmp_path / "run", quant=binary_config(BINARY),
                             limit=2_000, lr=0.002, progress=False)
    path = tmp_path / "lenet5.lowbit"
    lowbit.save(trained.model.eval(), path, example_input=images[:1])
    model, engine = lowbit.load(path).eval(), Engine(path)
    assert engine.binary_layers == ["conv2", "ip1"]
    with torch.no_grad():
        expected = torch.cat([model(images[i:i + 2_000]) for i in range(0, 10_000, 2_000)]).numpy()
    got = np.concatenate([engine.run(images[i:i + 2_000].numpy()) for i in range(0, 10_000, 2_000)])
    labels = load_dataset("mnist", "test")[1].numpy()
    assert (expected.argmax(1) == labels).mean() > 0.5  # trained (about 66%), not random weights (chance: 10%)
    np.testing.assert_array_equal(got.argmax(axis=1), expected.argmax(axis=1))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


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
    path = tmp_path / "abc.lowbit"
    model = lowbit.quantize(get_model("lenet300"), "abc-3-3")
    lowbit.calibrate(model, [torch.randn(4, 1, 28, 28)])
    lowbit.save(model, path, example_input=torch.zeros(1, 1, 28, 28))
    with pytest.raises(UnsupportedLayerError, match="'ip2' input_quantizer.*abc_act"):
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


# ---------------------------------------------------------------- activation quantizers (numpy vs torch)

#: torch quantizer spec -> how its state is set before eval: ("calibrate", tensor), ("alpha" | "step", value)
QUANTIZER_CASES = {
    # static ranges chosen so the scale is a power of two and half-steps are exact ties
    "uniform-static-tie": ({"name": "uniform", "bits": 8, "dynamic": False}, ("calibrate", [-8.0, 7.9375])),
    "uniform-static": ({"name": "uniform", "bits": 4, "dynamic": False}, ("calibrate", [-0.37, 2.9])),
    "uniform-static-positive": ({"name": "uniform", "bits": 3, "dynamic": False}, ("calibrate", [0.3, 1.7])),
    "uniform-symmetric-narrow": ({"name": "uniform", "bits": 4, "symmetric": True, "narrow": True,
                                  "dynamic": False}, ("calibrate", [-1.3, 0.6])),
    "uniform-percentile-static": ({"name": "uniform", "bits": 8, "dynamic": False, "observer": "percentile"},
                                  ("calibrate", [-1.0, 0.0, 0.5, 3.0])),
    "uniform-dynamic": ({"name": "uniform", "bits": 8}, None),
    "uniform-dynamic-symmetric": ({"name": "uniform", "bits": 5, "symmetric": True}, None),
    "linear-fixed": ({"name": "linear", "bits": 4, "fsr": 1}, None),
    "linear-unsigned-dynamic": ({"name": "linear", "bits": 3, "signed": False}, None),
    "linear-static": ({"name": "linear", "bits": 5, "dynamic": False}, ("calibrate", [-0.3, 2.5])),
    "log2-fixed": ({"name": "log2", "bits": 3, "fsr": 2}, None),
    "log2-unsigned-dynamic": ({"name": "log2", "bits": 2, "signed": False}, None),
    "log2-static": ({"name": "log2", "bits": 4, "dynamic": False}, ("calibrate", [-4.0, 1.0])),
    "log2-wide-underflow": ({"name": "log2", "bits": 8, "fsr": -100}, None),
    "dorefa_act-1": ({"name": "dorefa_act", "bits": 1}, None),
    "dorefa_act-2": ({"name": "dorefa_act", "bits": 2}, None),
    "pact-tie": ({"name": "pact", "bits": 2}, ("alpha", 1.5)),
    "pact": ({"name": "pact", "bits": 4}, ("alpha", 2.7)),
    "pact-floor": ({"name": "pact", "bits": 3}, ("alpha", -1.0)),
    "lsq-unsigned-tie": ({"name": "lsq", "bits": 4, "signed": False, "role": "activation"}, ("step", 0.25)),
    "lsq-signed": ({"name": "lsq", "bits": 3, "signed": True}, ("step", 0.173)),
    "dorefa_grad": ({"name": "dorefa_grad", "bits": 6}, None),
    "binary": ({"name": "binary"}, None),
    "xnor": ({"name": "xnor", "role": "activation"}, None),
}


def torch_and_numpy(spec: dict, setup: tuple | None):
    """The torch quantizer in eval mode with its state set, and the runtime's numpy version of it."""
    q = get(spec)
    if setup is not None:
        kind, value = setup
        if kind == "calibrate":
            q.calibrating = True
            q(torch.tensor(value))
            q.calibrating = False
        else:
            with torch.no_grad():
                getattr(q, kind).fill_(value)
            if kind == "step":
                q.initialized.fill_(True)
    q.eval()
    state = {k: v.detach().numpy() for k, v in q.state_dict().items()}
    return q, activation_quantizer(q.spec(), state, "test")


def edge_values() -> np.ndarray:
    """0, -0, every half-step of the power-of-two grids above, powers of two and their log-domain rounding
    thresholds, values far outside every range, subnormals and random values, as one [4, 2, N] batch."""
    halves = (np.arange(-300, 300, dtype=np.float32) + np.float32(0.5)) / np.float32(16)
    powers = np.ldexp(np.float32(1), np.arange(-12, 6)).astype(np.float32)
    thresholds = (powers * np.float32(np.sqrt(2))).astype(np.float32)
    near = np.concatenate([np.nextafter(thresholds, np.float32(0)), np.nextafter(thresholds, np.float32(9))])
    special = np.array([0.0, -0.0, 1e-45, -1e-45, 1e-39, 1.5, 0.75, 0.125, 1e30, -1e30, 3.4e38],
                       dtype=np.float32)
    noise = np.random.default_rng(0).normal(0, 2, 200).astype(np.float32)
    values = np.concatenate([halves, powers, -powers, thresholds, -thresholds, near, -near, special, noise])
    values = np.concatenate([values, np.zeros(-len(values) % 8, np.float32)])
    return values.reshape(4, 2, -1)


@pytest.mark.parametrize("case", list(QUANTIZER_CASES))
def test_activation_quantizer_equals_torch_bit_for_bit(case):
    q, quantize = torch_and_numpy(*QUANTIZER_CASES[case])
    x = edge_values()
    with torch.no_grad():
        expected = q(torch.from_numpy(x)).numpy()
    got = quantize(x)
    assert got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_array_equal(got, expected)


def test_activation_quantizer_hand_worked_grids():
    """Uniform 8-bit on [-8, 7.9375]: s = 1/16, z = 128, ties to even, clamped to [-8, 7.9375]; PACT 2-bit,
    alpha 1.5: s = 0.5; LSQ unsigned 4-bit, step 0.25: codes 0..15; DoReFa 2-bit: levels 0, 1/3, 2/3, 1."""
    x = np.array([[0.0, 1 / 32, 3 / 32, 5 / 32, -1 / 32, 100.0, -100.0, 0.75, 1.25]], dtype=np.float32)
    uniform = torch_and_numpy(*QUANTIZER_CASES["uniform-static-tie"])[1]
    np.testing.assert_array_equal(uniform(x), [[0.0, 0.0, 2 / 16, 2 / 16, 0.0, 7.9375, -8.0, 0.75, 1.25]])
    pact = torch_and_numpy(*QUANTIZER_CASES["pact-tie"])[1]
    np.testing.assert_array_equal(pact(x), [[0.0, 0.0, 0.0, 0.0, 0.0, 1.5, 0.0, 1.0, 1.0]])
    lsq = torch_and_numpy(*QUANTIZER_CASES["lsq-unsigned-tie"])[1]
    np.testing.assert_array_equal(lsq(np.array([0.125, 0.375, -1.0, 9.0], np.float32)), [0.0, 0.5, 0.0, 3.75])
    dorefa = activation_quantizer({"name": "dorefa_act", "bits": 2}, {}, "test")
    got = dorefa(np.array([-1.0, 0.5, 0.9, 2.0], np.float32))
    np.testing.assert_allclose(got, [0.0, 2 / 3, 1.0, 1.0], rtol=1e-7)


@settings(max_examples=40, deadline=None)
@given(
    case=st.sampled_from([c for c in QUANTIZER_CASES if c not in ("binary", "xnor")]),
    x=hnp.arrays(np.float32, st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 5)),
                 elements=st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True)
                 | st.sampled_from([0.0, -0.0, 0.5, 1.0])),
)
def test_activation_quantizer_property_equals_torch(case, x):
    """Any float32 input, constants, subnormals, NaN and Inf included: the same values, or the same error."""
    q, quantize = torch_and_numpy(*QUANTIZER_CASES[case])
    if not np.isfinite(x).all():
        with pytest.raises(CalibrationError, match="NaN/Inf"):
            quantize(x)
        with pytest.raises(CalibrationError):
            q(torch.from_numpy(x))
        return
    with torch.no_grad():
        expected = q(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(quantize(x), expected)


@settings(max_examples=40, deadline=None)
@given(
    bits=st.integers(2, 8),
    level=st.floats(2.0**-20, 1e4, width=32),
    low=st.floats(-1e4, 1e4, width=32),
    width=st.floats(0, 1e4, width=32),
    seed=st.integers(0, 2**16),
)
def test_activation_quantizer_with_any_learned_or_observed_state_equals_torch(bits, level, low, width, seed):
    """Random PACT alphas, LSQ steps, static uniform / linear / log2 ranges (constants included: width 0)."""
    high = float(np.float32(low) + np.float32(width))
    cases = [({"name": "pact", "bits": bits}, ("alpha", level)),
             ({"name": "lsq", "bits": bits, "signed": bool(seed % 2)}, ("step", level)),
             ({"name": "uniform", "bits": bits, "symmetric": bool(seed % 2), "dynamic": False},
              ("calibrate", [low, high])),
             ({"name": "linear", "bits": bits, "dynamic": False}, ("calibrate", [low, high])),
             ({"name": "log2", "bits": bits, "dynamic": False}, ("calibrate", [low, high]))]
    x = np.random.default_rng(seed).normal(low, max(width, level), (2, 3, 50)).astype(np.float32)
    for spec, setup in cases:
        q, quantize = torch_and_numpy(spec, setup)
        with torch.no_grad():
            expected = q(torch.from_numpy(x)).numpy()
        np.testing.assert_array_equal(quantize(x), expected, err_msg=str(spec))


@pytest.mark.parametrize("spec, state, error, message", [
    ({"name": "uniform", "bits": 8, "per_channel": True, "dynamic": False}, {"stats.min_val": np.zeros(3, np.float32),
     "stats.max_val": np.ones(3, np.float32)}, UnsupportedLayerError, "per-channel"),
    ({"name": "uniform", "bits": 8, "observer": "mse"}, {}, UnsupportedLayerError, "dynamic 'mse'"),
    ({"name": "uniform", "bits": 8, "dynamic": False}, {}, CalibrationError, "no observed range"),
    ({"name": "lsq", "bits": 4, "signed": False}, {"step": np.float32(1), "initialized": np.bool_(False)},
     CalibrationError, "never initialised"),
    ({"name": "pact", "bits": 4}, {}, UnsupportedLayerError, "'alpha'"),
    ({"name": "ternary"}, {}, UnsupportedLayerError, "ternary"),
    ({"name": "xnor", "role": "weight"}, {}, UnsupportedLayerError, "xnor"),
])
def test_activation_quantizer_rejects_what_it_cannot_run(spec, state, error, message):
    with pytest.raises(error, match=message) as info:
        activation_quantizer(get(spec).spec(), state, "graph node 'conv1' input_quantizer")
    assert "graph node 'conv1' input_quantizer" in str(info.value)


def test_activation_quantizer_spec_missing_a_field_is_a_format_error():
    with pytest.raises(FormatError, match="'conv1'.*'symmetric'"):
        activation_quantizer({"name": "uniform", "bits": 8, "dynamic": False}, {}, "graph node 'conv1' input_quantizer")


def test_dynamic_range_overflow_raises_like_torch():
    q, quantize = torch_and_numpy(*QUANTIZER_CASES["uniform-dynamic"])
    x = np.array([-3.4e38, 3.4e38], np.float32)
    with pytest.raises(CalibrationError, match="too wide"):
        quantize(x)
    with pytest.raises(CalibrationError, match="too wide"):
        q(torch.from_numpy(x))


# ---------------------------------------------------------------- whole models with quantized activations

#: the presets' first and last layers hold 8-bit weights and static 8-bit affine inputs
PRESETS = ["bnn", "xnor", "w8a8", "w4a4", "log4", "pact-w4a4", "lsq-w4a4", "dorefa-w1a2"]


def calibrated_lenet5(preset: str, path, example: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    model = lowbit.quantize(get_model("lenet5"), preset)
    g = torch.Generator().manual_seed(1)
    lowbit.calibrate(model, [torch.rand(16, 1, 28, 28, generator=g) for _ in range(2)])
    lowbit.save(model, path, example_input=example)
    return lowbit.load(path).eval()


@pytest.mark.parametrize("preset", PRESETS)
def test_lenet5_presets_with_8bit_first_and_last_layers_match_torch(tmp_path, preset):
    """Same argmax on >= 99% of 64 images; every logit within 1% of the largest |logit| (the quantizers give
    torch's bits, but conv / matmul sums in another float32 order can move an activation across a rounding
    boundary, which moves the logits it feeds by about one quantization step times a weight)."""
    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    path = tmp_path / f"{preset}.lowbit"
    model = calibrated_lenet5(preset, path, x[:1])
    engine = Engine(path)
    assert engine.binary_layers == (["conv2", "ip1"] if preset == "bnn" else [])
    with torch.no_grad():
        expected = model(x).numpy()
    got = engine.run(x.numpy())
    assert got.shape == expected.shape and got.dtype == np.float32
    assert (got.argmax(axis=1) == expected.argmax(axis=1)).mean() >= 0.99
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-2 * np.abs(expected).max())


def test_output_quantizers_and_quant_act_nodes_match_torch(tmp_path):
    """Output quantizers on every layer (static symmetric uniform), static linear inputs and a QuantAct (PACT)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), QuantAct({"name": "pact", "bits": 3, "alpha": 2.0}),
                          nn.Linear(20, 6))
    config = {"weight": {"name": "uniform", "bits": 4, "symmetric": True, "per_channel": True},
              "input": {"name": "linear", "bits": 6, "dynamic": False},
              "output": {"name": "uniform", "bits": 6, "symmetric": True, "dynamic": False},
              "first": "same", "last": "same"}
    quantized = lowbit.quantize(model, config)
    x = torch.randn(32, 12, generator=torch.Generator().manual_seed(4))
    lowbit.calibrate(quantized, [x[:16], x[16:]])
    path = tmp_path / "mlp.lowbit"
    lowbit.save(quantized, path, example_input=x[:1])
    loaded = lowbit.load(path).eval()
    assert [n["op"] for n in read_file(path).document["graph"]["nodes"]].count("quant_act") == 1
    assert_engine_matches(Engine(path), loaded, x)
