"""save / load / load_state_dict: bit-exact round trips, file-size bounds, a golden file, bad files.

Regenerate the golden file after a deliberate format change with
``python tests/test_serialize.py`` (it rewrites tests/data/golden_mlp.lowbit).
"""

import json
import math
import pickle
import tempfile
import warnings
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lowbit
from lowbit.config import uniform_act
from lowbit.errors import ConfigError, FormatError, ShapeMismatchError
from lowbit.format.container import pack_safetensors, parse_safetensors, read_file
from lowbit.models import get_model
from lowbit.nn import QuantConv2d
from lowbit.quantizers import get, names
from lowbit.serialize import GraphModel, format_inspect, inspect_file, load, load_state_dict, save

GOLDEN = Path(__file__).parent / "data" / "golden_mlp.lowbit"
PRESETS = ["w8a8", "w4a4", "w2a2", "bnn", "xnor", "log4", "kmeans4", "ternary", "linear4", "lsq-w4a4",
           "pact-w4a4", "dorefa-w1a2", "abc-3-3"]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def batch(n=4, size=16, seed=0):
    return torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


def converted(preset, size=16, seed=0):
    """A calibrated LeNet-5 in eval mode and its float original (untouched)."""
    torch.manual_seed(seed)
    float_model = get_model("lenet5", input_size=size)
    model = lowbit.quantize(float_model, preset)
    x = batch(size=size, seed=seed)
    model.train()
    model(x)  # initialises learned steps (LSQ) and codebooks (k-means)
    lowbit.calibrate(model, [x])
    return model.eval(), float_model


def outputs(model, x):
    with torch.no_grad():
        return model(x)


def edit_document(path: Path, edit) -> None:
    arrays, metadata, _ = parse_safetensors(path.read_bytes())
    document = json.loads(metadata["lowbit"])
    edit(document)
    path.write_bytes(pack_safetensors(dict(arrays), {"lowbit": json.dumps(document)}))


# ---------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_round_trip_is_bit_exact(preset, tmp_path):
    model, float_model = converted(preset)
    x = batch(8, seed=1)
    expected = outputs(model, x)
    path = tmp_path / "m.lowbit"
    save(model, path, example_input=x[:1])
    from_graph, from_arch = load(path), load(path, model=float_model)
    assert isinstance(from_graph, GraphModel)
    assert same_bits(outputs(from_graph, x), expected)
    assert same_bits(outputs(from_arch, x), expected)
    assert from_graph.state_dict().keys() == model.state_dict().keys()
    for again in (from_graph, from_arch):  # a loaded model writes the same bytes again
        save(again, tmp_path / "again.lowbit", example_input=x[:1])
        assert (tmp_path / "again.lowbit").read_bytes() == path.read_bytes()


@pytest.mark.parametrize("preset", ["w8a8", "w2a2", "bnn", "log4", "kmeans4"])
def test_load_state_dict_fits_the_untouched_float_model(preset, tmp_path):
    model, float_model = converted(preset)
    save(model, tmp_path / "m.lowbit")
    state = load_state_dict(tmp_path / "m.lowbit")
    fresh = get_model("lenet5", input_size=16)
    fresh.load_state_dict(state, strict=True)
    assert all(t.dtype == torch.float32 for t in state.values())
    for name, layer in model.named_children():
        if hasattr(layer, "weight_quantizer") and layer.weight_quantizer is not None:
            with torch.no_grad():
                assert same_bits(state[f"{name}.weight"], layer.weight_quantizer(layer.weight))
    # the float code runs unchanged on the dequantized weights; only activation quantization differs
    assert torch.isfinite(outputs(fresh, batch())).all()


weights = st.one_of(st.floats(-1e3, 1e3, width=32, allow_subnormal=True), st.sampled_from([0.0, -0.0, 1e-45, 1.0]))


@pytest.mark.parametrize("name", names())
@settings(max_examples=4, deadline=None)
@given(st.lists(weights, min_size=36, max_size=36), st.booleans())
def test_every_registered_quantizer_round_trips(name, values, constant):
    w = torch.tensor(values, dtype=torch.float32).reshape(4, 1, 3, 3)
    if constant:
        w = torch.full_like(w, values[0])
    model = nn.Sequential(OrderedDict(conv=QuantConv2d(1, 4, 3, weight_quantizer=name), relu=nn.ReLU(),
                                      flat=nn.Flatten(), fc=nn.Linear(64, 2)))
    with torch.no_grad():
        model.conv.weight.copy_(w)
    x = batch(2, size=6)
    model.train()
    model(x)
    model.eval()
    expected = outputs(model, x)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.lowbit"
        save(model, path, example_input=x[:1], sparse=name in ("uniform", "kmeans"), entropy="huffman")
        assert same_bits(outputs(load(path), x), expected)
        with torch.no_grad():  # a quantizer without codes keeps the float weight as it is
            coded = type(model.conv.weight_quantizer).encode is not lowbit.quantizers.Quantizer.encode
            stored = model.conv.weight_quantizer(model.conv.weight) if coded else model.conv.weight
            assert torch.equal(load_state_dict(path)["conv.weight"], stored)  # dorefa_act's forward keeps -0.0


@pytest.mark.parametrize("entropy", [None, "huffman", "ans"])
def test_pruned_kmeans_model_with_sparse_and_entropy_coding(entropy, tmp_path):
    torch.manual_seed(0)
    float_model = get_model("lenet5", input_size=16)
    with torch.no_grad():
        for layer in (float_model.conv2, float_model.ip1):
            layer.weight[torch.rand_like(layer.weight) < 0.9] = 0  # Deep Compression pruning
    config = {"weight": {"name": "kmeans", "bits": 4, "keep_zero": True}, "first": "same", "last": "same"}
    model = lowbit.quantize(float_model, config).eval()
    x = batch()
    expected = outputs(model, x)
    dense, sparse = tmp_path / "dense.lowbit", tmp_path / "sparse.lowbit"
    save(model, dense, example_input=x[:1])
    save(model, sparse, example_input=x[:1], sparse=True, entropy=entropy)
    assert same_bits(outputs(load(sparse), x), expected)
    rows = {r["name"]: r for r in inspect_file(sparse)["tensors"]}
    assert rows["ip1.weight"]["chain"] == "codebook+sparse5" + (f"+{entropy}" if entropy else "")
    assert rows["conv2.weight"]["chain"].startswith("codebook+sparse8")
    assert rows["ip1.weight"]["bits_per_weight"] < 4 * 0.5  # 10 % non-zeros: far under the dense 4 bits
    assert sparse.stat().st_size < dense.stat().st_size


# ---------------------------------------------------------------------------- sizes, determinism, golden


def test_eight_bit_file_is_a_quarter_of_the_float_file(tmp_path):
    model, float_model = converted("w8a8", size=28)
    save(float_model, tmp_path / "float.lowbit")
    save(model, tmp_path / "q.lowbit", example_input=batch(1, 28))
    float_size, size = (tmp_path / "float.lowbit").stat().st_size, (tmp_path / "q.lowbit").stat().st_size
    header = inspect_file(tmp_path / "q.lowbit")["header_bytes"]
    assert header < 16 * 1024
    assert size <= 0.255 * float_size + 8 + header


def test_binary_file_size_is_what_the_bits_say(tmp_path):
    config = {"weight": {"name": "binary"}, "input": {"name": "binary"}, "first": "float", "last": "float"}
    torch.manual_seed(0)
    model = lowbit.quantize(get_model("lenet5"), config).eval()
    path = tmp_path / "bnn.lowbit"
    save(model, path, example_input=batch(1, 28))
    first_last = sum(p.numel() for layer in (model.conv1, model.ip2) for p in layer.parameters())
    binary = [model.conv2, model.ip1]
    n_binary = sum(layer.weight.numel() for layer in binary)
    rows = [(layer.weight.shape[0], layer.weight[0].numel()) for layer in binary]
    row_padding = sum(r * (math.ceil(k / 64) * 64 - k) for r, k in rows) / 8  # sign rows fill 64-bit words
    biases_and_scales = 4 * sum(layer.bias.numel() + 1 for layer in binary)
    info = inspect_file(path)
    bound = 4 * first_last + n_binary / 8 + row_padding + biases_and_scales + 8 + info["header_bytes"]
    assert path.stat().st_size <= bound
    assert path.stat().st_size < 0.05 * 4 * (first_last + n_binary) + 8 + info["header_bytes"] + 4 * first_last


def test_same_model_same_bytes(tmp_path):
    model, _ = converted("kmeans4")
    save(model, tmp_path / "a.lowbit", example_input=batch(1), entropy="ans", sparse=True)
    save(model, tmp_path / "b.lowbit", example_input=batch(1), entropy="ans", sparse=True)
    assert (tmp_path / "a.lowbit").read_bytes() == (tmp_path / "b.lowbit").read_bytes()


def dyadic(*shape, seed):
    n = math.prod(shape)
    return ((torch.arange(n) * 37 + seed) % 101 - 50).float().div(64).reshape(shape)


def golden_float() -> nn.Module:
    """A float-exact model: every value the file stores is computed without rounding or by one rounded op.

    fc1's rows reach 127/64, so its 8-bit narrow grid is 1/64 and holds its dyadic weights exactly; the batch
    norm has zero mean, unit weight and zero bias, so its output is one product x * invstd (the same bits with or
    without a fused multiply-add). Sums of dyadic products are exact, so no summation order changes a bit.
    """
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(6, 5), bn=nn.BatchNorm1d(5), relu=nn.ReLU(),
                                      fc2=nn.Linear(5, 8), fc3=nn.Linear(8, 3)))
    with torch.no_grad():
        for i, layer in enumerate((model.fc1, model.fc2, model.fc3)):
            layer.weight.copy_(dyadic(*layer.weight.shape, seed=i))
            layer.bias.copy_(dyadic(layer.out_features, seed=10 + i))
        model.fc1.weight[:, 0] = 127 / 64
        model.bn.running_var.copy_(dyadic(5, seed=21).abs() + 0.5)
    return model


def golden_input() -> torch.Tensor:
    """Dyadic inputs spanning [-128/64, 127/64]: the asymmetric 8-bit input grid is exactly 1/64."""
    x = dyadic(4, 6, seed=3)
    x[0, :2] = torch.tensor([-128 / 64, 127 / 64])
    return x


def golden_model() -> tuple[nn.Module, torch.Tensor]:
    """:func:`golden_float` quantized (k-means, 8-bit and XNOR weights) and calibrated."""
    model = golden_float()
    config = {"weight": {"name": "kmeans", "bits": 2}, "input": uniform_act(8),
              "last": {"weight": {"name": "xnor"}, "input": None}}
    quantized = lowbit.quantize(model, config)
    x = golden_input()
    lowbit.calibrate(quantized, [x])
    return quantized.eval(), x


def save_golden(path: Path) -> None:
    model, x = golden_model()
    save(model, path, example_input=x[:1], entropy="huffman", sparse={"fc2.weight": 3})


def test_a_file_written_before_quantize_recorded_its_config_loads_alike():
    """golden_mlp_v1.lowbit: the golden model as written before files recorded config and fold_bn."""
    x = dyadic(4, 6, seed=3)
    older = GOLDEN.with_name("golden_mlp_v1.lowbit")
    assert "fold_bn" not in read_file(older).document["model"]
    from_graph, from_arch = load(older), load(older, model=golden_float())  # its own specs, not today's presets
    assert same_bits(outputs(from_graph, x), outputs(from_arch, x))
    assert from_graph.get_submodule("fc1").weight_quantizer.spec()["narrow"] is False


def test_golden_file_is_reproduced_exactly(tmp_path):
    save_golden(tmp_path / "golden.lowbit")
    assert GOLDEN.stat().st_size < 10 * 1024  # a few KB: most of it is the JSON document
    assert (tmp_path / "golden.lowbit").read_bytes() == GOLDEN.read_bytes()
    model, x = golden_model()
    assert same_bits(outputs(load(GOLDEN), x), outputs(model, x))
    # the file is the same on every platform only while the golden model stays float-exact
    fc1 = model.get_submodule("fc1")
    assert torch.equal(fc1.weight_quantizer(fc1.weight), fc1.weight) and torch.equal(fc1.input_quantizer(x), x)


# ---------------------------------------------------------------------------- graph, example input, freezing


def test_input_shape_attribute_gives_the_graph(tmp_path):
    model, _ = converted("w4a4")
    del model.lowbit_input_shape  # recorded by calibrate; without it no graph can be captured
    save(model, tmp_path / "none.lowbit")
    assert not inspect_file(tmp_path / "none.lowbit")["has_graph"]
    with pytest.raises(ConfigError, match="model=float_arch"):
        load(tmp_path / "none.lowbit")
    model.lowbit_input_shape = (4, 1, 16, 16)
    save(model, tmp_path / "shape.lowbit")
    info = inspect_file(tmp_path / "shape.lowbit")
    assert info["has_graph"]
    assert same_bits(outputs(load(tmp_path / "shape.lowbit"), batch()), outputs(model, batch()))


def test_untraceable_model_saves_without_graph_and_warns(tmp_path):
    model = nn.Sequential(nn.Conv3d(1, 2, 3), nn.Flatten())
    model.lowbit_input_shape = (1, 1, 4, 4, 4)
    with pytest.warns(UserWarning, match="no graph"):
        save(model, tmp_path / "m.lowbit")
    assert not inspect_file(tmp_path / "m.lowbit")["has_graph"]
    with pytest.raises(lowbit.errors.UnsupportedLayerError):
        save(model, tmp_path / "m.lowbit", example_input=torch.zeros(1, 1, 4, 4, 4))


def test_training_unfreezes_the_stored_weights(tmp_path):
    model, _ = converted("w2a2")
    save(model, tmp_path / "m.lowbit", example_input=batch(1))
    loaded = load(tmp_path / "m.lowbit")
    quantizer = loaded.conv2.weight_quantizer
    assert quantizer.lowbit_stored is not None
    with torch.no_grad():  # frozen: the stored 2-bit weight passes through, though min/max would re-scale it
        assert torch.equal(quantizer(loaded.conv2.weight), loaded.conv2.weight)
    loaded.train()
    loaded(batch())
    loaded.eval()
    assert quantizer.lowbit_stored is None
    with torch.no_grad():
        fresh = get(quantizer.spec()).eval()
        assert torch.equal(quantizer(loaded.conv2.weight), fresh(loaded.conv2.weight))


# ---------------------------------------------------------------------------- safety and bad files


def test_loading_never_unpickles(tmp_path, monkeypatch):
    model, float_model = converted("kmeans4")
    save(model, tmp_path / "m.lowbit", example_input=batch(1))

    def forbidden(*args, **kwargs):
        raise AssertionError("loading must not unpickle")

    for module, attr in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(module, attr, forbidden)
    load(tmp_path / "m.lowbit")
    load(tmp_path / "m.lowbit", model=float_model)
    load_state_dict(tmp_path / "m.lowbit")
    for source in ("serialize.py", "format/container.py"):
        text = (Path(lowbit.__file__).parent / source).read_text()
        assert "import pickle" not in text and "torch.load(" not in text


def test_architecture_mismatch_names_each_tensor(tmp_path):
    model, _ = converted("w8a8")
    save(model, tmp_path / "m.lowbit")
    with pytest.raises(ShapeMismatchError) as err:
        load(tmp_path / "m.lowbit", model=get_model("lenet5", input_size=16, num_classes=7))
    assert "ip2.weight" in str(err.value) and "ip2.bias" in str(err.value)
    with pytest.raises(ShapeMismatchError, match="conv1.*conv2"):  # layers LeNet-300 lacks
        load(tmp_path / "m.lowbit", model=get_model("lenet300", input_size=16))


@pytest.mark.parametrize(
    "edit, code",
    [
        (lambda d: d["model"]["layers"]["conv2"]["weight"].update(name="nope"), "unknown-quantizer"),
        (lambda d: d["model"]["layers"]["conv2"]["weight"].update(bits=99), "bad-spec"),
        (lambda d: d["model"]["layers"]["conv2"].update(type="QuantRNN"), "bad-document"),
        (lambda d: d["graph"]["nodes"][0].update(op="softmax"), "bad-graph"),
        (lambda d: d["graph"]["nodes"][1].update(inputs=["later"]), "bad-graph"),
        (lambda d: d["graph"]["nodes"][0]["quant"].update(output={"name": "binary", "ste": "clipped"}), "bad-graph"),
        (lambda d: d["graph"].update(outputs=["nowhere"]), "bad-graph"),
    ],
)
def test_bad_documents_are_format_errors(edit, code, tmp_path):
    model, _ = converted("w4a4")
    path = tmp_path / "m.lowbit"
    save(model, path, example_input=batch(1))
    edit_document(path, edit)
    with pytest.raises(FormatError) as err:
        load(path)
    assert err.value.code == code, str(err.value)


def test_inspect_reports_each_tensor_and_totals(tmp_path):
    model, _ = converted("w4a4")
    save(model, tmp_path / "m.lowbit", example_input=batch(1))
    info = inspect_file(tmp_path / "m.lowbit")
    rows = {r["name"]: r for r in info["tensors"]}
    assert rows["conv2.weight"]["codec"] == "affine" and rows["conv2.bias"]["codec"] == "float32"
    n = 50 * 20 * 25
    # 4-bit codes, a float32 scale per channel, and the symmetric zero point (0 everywhere) stored once
    assert rows["conv2.weight"]["bytes"] == n * 4 // 8 + 50 * 4 + 8
    assert info["float32_bytes"] == sum(r["float32_bytes"] for r in info["tensors"])
    assert "conv2.weight" in format_inspect(info)


if __name__ == "__main__":
    with warnings.catch_warnings():
        save_golden(GOLDEN)
    print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size} bytes)")
