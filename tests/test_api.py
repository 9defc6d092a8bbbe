"""lowbit.quantize / quantize_report / calibrate on nested (not only Sequential) models."""

import warnings

import pytest
import torch
from torch import nn
from torch.ao.quantization import MinMaxObserver
from torch.nn import functional as F

import lowbit
from lowbit.api import quantize, quantize_report
from lowbit.config import EIGHT_BIT, PRESETS, LayerRule, QuantConfig
from lowbit.errors import CalibrationError, ConfigError, UnsupportedLayerError
from lowbit.nn import QuantConv2d, QuantLinear, label_quantizers
from lowbit.quantizers import Quantizer, get


class Block(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)


class LeNetish(nn.Module):
    """Convertible layers in registration order: stem.conv, body.a.conv, head.1, head.3."""

    def __init__(self):
        super().__init__()
        self.stem = Block(1, 4)
        self.body = nn.ModuleDict({"a": Block(4, 8)})
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10))

    def forward(self, x):
        return self.head(self.body["a"](self.stem(x)))


LAYERS = ["stem.conv", "body.a.conv", "head.1", "head.3"]


def net(seed=0):
    torch.manual_seed(seed)
    return LeNetish()


def batches(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(2, 1, 8, 8, generator=g) for _ in range(n)]


def layer(model, name):
    return model.get_submodule(name)


def test_no_quantizers_gives_the_float_outputs_bitwise():
    float_model = net()
    model = quantize(float_model, QuantConfig(first="same", last="same"))
    assert [type(layer(model, n)) for n in LAYERS] == [QuantConv2d, QuantConv2d, QuantLinear, QuantLinear]
    assert [type(layer(float_model, n)) for n in LAYERS] == [nn.Conv2d, nn.Conv2d, nn.Linear, nn.Linear]
    assert list(model.state_dict()) == list(float_model.state_dict())
    x = batches(1)[0]
    for mode in ("train", "eval"):
        getattr(float_model, mode)()
        getattr(model, mode)()
        assert torch.equal(model(x), float_model(x))


def test_the_given_model_is_not_changed():
    model = net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantized = quantize(model.eval(), "w8a8")  # eval: batch norms folded into the quantized copy
    assert isinstance(quantized.stem.conv, QuantConv2d) and type(model.stem.conv) is nn.Conv2d
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_root_layer_and_shared_layers():
    root = quantize(nn.Linear(3, 2), {"weight": "binary", "first": "same", "last": "same"})
    (layer_,) = [m for m in root.modules() if isinstance(m, QuantLinear)]
    assert layer_.weight_quantizer.label == "linear.weight"  # the call's name: the root has no path of its own
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    converted = quantize(model, {"weight": "binary", "first": "same", "last": "same"})
    calls = [n.target for n in converted.graph.nodes if n.op == "call_module"]
    assert calls == ["0", "1", "0"] and isinstance(converted.get_submodule("0"), QuantLinear)
    x, one = torch.randn(4, 3), converted.get_submodule("0")
    assert torch.equal(converted(x), one(torch.relu(one(x))))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_each_preset_converts_calibrates_and_runs(name):
    model = quantize(net(), name)
    preset = PRESETS[name]

    def expected(specs: dict, path: str, slot: str):
        q = get(specs.get(slot))
        if slot == "input" and q is not None and q.spec().get("per_token") and path.endswith("conv"):
            return get({**q.spec(), "token_axis": 0})  # a conv's per-token input: one range per sample
        return q

    for mid in ("body.a.conv", "head.1"):
        for slot in ("weight", "input", "output"):
            q = getattr(layer(model, mid), f"{slot}_quantizer")
            assert q == expected(preset, mid, slot), (mid, slot)
            assert q is None or q.label == f"{mid}.{slot}"
    edges = EIGHT_BIT if preset.get("first", "8bit") == "8bit" else preset  # w7a8: first and last like the rest
    for edge in ("stem.conv", "head.3"):
        for slot in ("weight", "input", "output"):
            assert getattr(layer(model, edge), f"{slot}_quantizer") == expected(edges, edge, slot), (edge, slot)
    # AdaRound (the -ptq presets) needs 32 output positions per layer: 32 images for the linear head
    lowbit.calibrate(model, batches() if not preset.get("ptq") else [torch.rand(32, 1, 8, 8)])
    model.eval()
    with torch.no_grad():
        y = model(batches(1, seed=5)[0])
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    model.train()
    model(batches(1, seed=6)[0]).square().mean().backward()
    assert torch.isfinite(model.body.a.conv.weight.grad).all()


class RegisteredBackwards(nn.Module):
    """Registration order (head, mid, stem) is the reverse of the call order."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 2)
        self.mid = nn.Linear(4, 4)
        self.stem = nn.Linear(3, 4)

    def forward(self, x):
        return self.head(self.mid(self.stem(x)))


def test_first_and_last_follow_registration_order():
    model = quantize(RegisteredBackwards(), "bnn")
    assert model.head.weight_quantizer == get(EIGHT_BIT["weight"])
    assert model.stem.weight_quantizer == get(EIGHT_BIT["weight"])
    assert model.mid.weight_quantizer == get("binary")


def test_first_last_float_and_same():
    report = quantize_report(net(), QuantConfig(weight="binary", first="float", last="same"))
    assert type(report.model.stem.conv) is nn.Conv2d
    assert report.kept_float == ["stem.conv"]
    assert report.converted == LAYERS[1:]
    assert layer(report.model, "head.3").weight_quantizer == get("binary")
    assert report.unsupported == []


def test_rules_by_name_and_type():
    cfg = QuantConfig(
        weight="binary",
        first="same",
        last="same",
        rules=[
            LayerRule(pattern="head.*", weight="ternary", input="binary"),
            LayerRule(layer_type="Conv2d", skip=True),
        ],
    )
    model = quantize(net(), cfg)
    assert type(model.stem.conv) is nn.Conv2d and type(model.body.a.conv) is nn.Conv2d
    for name in ("head.1", "head.3"):
        assert layer(model, name).weight_quantizer == get("ternary")
        assert layer(model, name).input_quantizer == get("binary")


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.rnn = nn.RNN(4, 4, batch_first=True)  # an Elman RNN: no quantized form
        self.pair = nn.Bilinear(4, 4, 4)
        self.norm = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 2)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, tokens):
        x = self.embed(tokens)
        y, _ = self.rnn(x)
        return self.fc(self.norm(self.pair(x, y)) * self.scale)


UNSUPPORTED = [("rnn", "RNN runs in float"), ("pair", "Bilinear runs in float"),
               ("scale", "parameter read in float by mul")]


def test_unsupported_layers_are_warned_and_reported():
    with pytest.warns(UserWarning, match=r"cannot quantize: rnn \(RNN runs in float\), pair"):
        report = quantize_report(Mixed(), "w8a8", example_input=torch.zeros(1, 3, dtype=torch.long))
    assert report.unsupported == UNSUPPORTED
    assert isinstance(report.model.fc, QuantLinear) and report.converted == ["embed", "fc"]
    params = sum(p.numel() for p in Mixed().parameters()) - 8  # the layer norm's are not weights of the graph
    assert report.weight_fraction == pytest.approx((40 + 8) / (params + 8)) and report.mac_fraction == 1.0
    with pytest.warns(UserWarning, match="RNN") as record:
        quantize(Mixed(), "w8a8")
    assert record[0].filename == __file__  # the warning points at the caller


def test_strict_raises_and_leaves_the_model_as_it_was():
    model = Mixed()
    with pytest.raises(UnsupportedLayerError, match="rnn \\(RNN runs in float\\)"):
        quantize(model, "w8a8", strict=True)
    assert type(model.fc) is nn.Linear


def test_quantizing_again_keeps_the_existing_quant_layers():
    once = quantize(net(), "bnn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        twice = quantize(once, "w4a4")
    assert twice.body.a.conv.weight_quantizer == get("binary")


def test_bad_config_is_config_error():
    with pytest.raises(ConfigError, match="unknown preset"):
        quantize(net(), "w9a9")
    with pytest.raises(ConfigError, match="valid keys"):
        quantize(net(), {"wieght": "binary"})


class Recorder(Quantizer):
    """Test-only static quantizer (unregistered): identity that records the state it ran in."""

    bits = 8
    dynamic = False

    def __init__(self):
        super().__init__()
        self.calibrating = False
        self.observer = "minmax"
        self.calls = []

    def spec(self):
        return {"name": "recorder"}

    @property
    def observed(self):
        return any(calibrating for calibrating, _, _ in self.calls)

    def forward(self, x):
        self.calls.append((self.calibrating, torch.is_grad_enabled(), self.training))
        return x


def recorded_model():
    model = nn.Sequential(
        QuantLinear(3, 3, input_quantizer=Recorder()), nn.ReLU(), QuantLinear(3, 2, input_quantizer=Recorder())
    )
    label_quantizers(model)
    return model


def test_calibrate_sets_flags_runs_eval_no_grad_and_restores():
    model = recorded_model()
    data = [torch.randn(4, 3), (torch.randn(4, 3), torch.zeros(4))]
    assert lowbit.calibrate(model, data) is model
    for q in (model[0].input_quantizer, model[2].input_quantizer):
        assert q.calls == [(True, False, False)] * 2
        assert q.calibrating is False
    assert model.training and model[0].training and model[0].input_quantizer.training


def test_calibrate_rejects_empty_batches():
    for empty in ([], iter(())):
        with pytest.raises(CalibrationError, match="no batches"):
            lowbit.calibrate(recorded_model(), empty)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_calibrate_names_the_non_finite_batch(bad):
    model = recorded_model()
    poisoned = torch.randn(4, 3)
    poisoned[2, 1] = bad
    with pytest.raises(CalibrationError, match="calibration batch 2 holds 1 NaN/Inf"):
        lowbit.calibrate(model, [torch.randn(4, 3), torch.randn(4, 3), poisoned])
    assert model.training and model[0].input_quantizer.calibrating is False


def test_calibrate_rejects_a_batch_that_is_not_a_tensor():
    with pytest.raises(CalibrationError, match="batch 0 is a str"):
        lowbit.calibrate(recorded_model(), ["abc"])


def test_calibrate_names_a_quantizer_that_saw_nothing():
    class SkipsSpare(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = QuantLinear(3, 2, input_quantizer=Recorder())
            self.spare = QuantLinear(3, 2, input_quantizer=Recorder())

        def forward(self, x):
            return self.used(x)

    model = SkipsSpare()
    label_quantizers(model)
    with pytest.raises(CalibrationError, match="'spare.input'"):
        lowbit.calibrate(model, [torch.randn(2, 3)])


def test_calibrate_observer_override():
    model = recorded_model()
    lowbit.calibrate(model, [torch.randn(2, 3)], observer="mse")
    assert model[0].input_quantizer.observer == "mse"
    with pytest.raises(ConfigError, match="minmax"):
        lowbit.calibrate(model, [torch.randn(2, 3)], observer="max")


def test_calibrate_real_uniform_against_torch_minmax_observer():
    model = quantize(net(), "w8a8")
    x = batches(1, seed=9)[0]
    model.eval()
    with pytest.raises(CalibrationError, match="stem.conv.input"):
        model(x)
    data = [b * 4 - 1 for b in batches(3)]
    lowbit.calibrate(model, data)
    q = model.stem.conv.input_quantizer
    oracle = MinMaxObserver(dtype=torch.quint8, quant_min=0, quant_max=255)
    for b in data:
        oracle(b)
    scale, zero_point = oracle.calculate_qparams()
    ours_scale, ours_zero = q.qparams(x)
    assert torch.equal(ours_scale.reshape(1), scale) and torch.equal(ours_zero.reshape(1), zero_point.long())
    assert model.body.a.conv.weight_quantizer.observer == "minmax"
    lowbit.calibrate(model, data, observer="percentile")
    assert q.observer == "percentile" and model.body.a.conv.weight_quantizer.observer == "minmax"  # dynamic: kept


def test_calibrate_real_uniform_names_an_unreached_layer():
    class Unreached(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.unused = (
                QuantLinear(3, 3, weight_quantizer="binary", input_quantizer={"name": "uniform", "dynamic": False})
                for _ in range(4))

        def forward(self, x):
            return self.c(self.b(self.a(x)))

    model = Unreached()  # built from lowbit's layers: quantize would leave the unused one out of its graph
    label_quantizers(model)
    with pytest.raises(CalibrationError, match="'unused.input'"):
        lowbit.calibrate(model, [torch.randn(2, 3)])


@pytest.mark.parametrize("batch, match", [
    (torch.zeros(4, 1, 28, 28, dtype=torch.int64), "batch 0 holds int64 values; the model takes float32 inputs"),
    (torch.zeros(4, 1, 28, 28, dtype=torch.bool), "batch 0 holds bool values"),
    (torch.zeros(4, 1, 28, 28, dtype=torch.float64), r"batch 0 holds float64 values.*\.to\(torch\.float32\)"),
    ([1.0, 2.0], "batch 0 is a list"),
])
def test_calibrate_rejects_inputs_that_are_not_float_tensors(batch, match):
    from lowbit.models import get_model

    model = quantize(get_model("lenet5"), "w8a8")
    with pytest.raises(CalibrationError, match=match):
        lowbit.calibrate(model, [batch])
    assert model.training and all(not q.calibrating for q in model.modules() if hasattr(q, "calibrating"))


@pytest.mark.parametrize("model_name, shape, match", [
    ("lenet5", (4, 3, 28, 28), r"batch 0 of shape \[4, 3, 28, 28\] does not fit layer 'conv1' \(QuantConv2d of 1 "
                               r"input channel\(s\)\): .*expected input\[4, 3, 28, 28\] to have 1 channels"),
    ("lenet5", (4, 1, 20, 20), r"batch 0 of shape \[4, 1, 20, 20\] does not fit layer 'ip1' \(QuantLinear of 800 "
                               r"input features\)"),
    ("lenet300", (4, 3, 28, 28), r"does not fit layer 'ip1' \(QuantLinear of 784 input features\)"),
])
def test_calibrate_names_the_layer_a_wrong_shape_fails_in(model_name, shape, match):
    from lowbit.errors import ShapeMismatchError
    from lowbit.models import get_model

    model = quantize(get_model(model_name), "w8a8")
    with pytest.raises(ShapeMismatchError, match=match):
        lowbit.calibrate(model, [torch.randn(*shape)])
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # the locating hooks are gone
    lowbit.calibrate(model, [torch.randn(4, 1, 28, 28)])  # the right shape still calibrates


def test_calibrate_records_the_input_shape_for_save(tmp_path):
    import lowbit
    from lowbit.models import get_model

    model = lowbit.quantize(get_model("lenet300"), "w8a8")
    lowbit.calibrate(model, [torch.randn(5, 1, 28, 28)])
    assert model.lowbit_input_shape == (1, 1, 28, 28)
    lowbit.save(model, tmp_path / "m.lowbit")  # no example input: the recorded shape captures the graph
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(lowbit.load(tmp_path / "m.lowbit")(x), model.eval()(x))


def test_a_rule_that_matches_no_layer_is_named_in_a_warning():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    typo = QuantConfig(rules=[LayerRule(pattern="O.*", weight={"name": "uniform", "bits": 4}),
                              LayerRule(layer_type="Conv2d", skip=True)])
    with pytest.warns(UserWarning, match=r"rule\(s\) \['O\.\*', 'Conv2d'\] match no linear/conv layer.*layers: 0, 2"):
        report = quantize_report(model, typo)
    assert report.unmatched_rules == ["O.*", "Conv2d"]
    fitting = QuantConfig(rules=[LayerRule(pattern="0", weight={"name": "uniform", "bits": 4})])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantized = quantize(model, fitting)
        assert quantize_report(quantized, fitting).unmatched_rules == []  # re-quantizing: the rules named those
