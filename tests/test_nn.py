"""QuantLinear / QuantConv2d / QuantAct: float equivalence, quantized forward against torch oracles."""

import inspect

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lowbit.errors import ConfigError
from lowbit.nn import QuantAct, QuantConv2d, QuantLinear, label_quantizers
from lowbit.quantizers import Quantizer
from lowbit.quantizers.ste import round_ste


class StepRound(Quantizer):
    """Test-only quantizer (not registered): round to multiples of ``step``, identity gradient."""

    bits = 4

    def __init__(self, step: float = 0.25) -> None:
        super().__init__()
        self.step = step
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def spec(self):
        return {"name": "step_round", "step": self.step}

    def forward(self, x):
        self.calls += 1
        return round_ste(x / self.step) * self.step


def step_round(x, step=0.25):
    return torch.round(x / step) * step


@pytest.mark.parametrize("quant, base", [(QuantLinear, nn.Linear), (QuantConv2d, nn.Conv2d)])
def test_keeps_torch_constructor_signature(quant, base):
    ours = inspect.signature(quant).parameters
    for name, param in inspect.signature(base).parameters.items():
        assert name in ours, name
        assert ours[name].default == param.default, name
        assert ours[name].kind == param.kind, name
    for slot in ("weight_quantizer", "input_quantizer", "output_quantizer"):
        assert ours[slot].kind is inspect.Parameter.KEYWORD_ONLY and ours[slot].default is None


def test_quant_act_signature():
    params = inspect.signature(QuantAct).parameters
    assert list(params) == ["quantizer"] and params["quantizer"].default is None


def test_constructor_builds_the_same_parameters_as_torch():
    torch.manual_seed(3)
    ref = nn.Conv2d(3, 4, (3, 2), stride=2, padding=1, dilation=1, groups=1, bias=False, padding_mode="reflect")
    torch.manual_seed(3)
    ours = QuantConv2d(3, 4, (3, 2), stride=2, padding=1, dilation=1, groups=1, bias=False, padding_mode="reflect")
    assert ours.state_dict().keys() == ref.state_dict().keys()
    assert torch.equal(ours.weight, ref.weight) and ours.bias is None
    torch.manual_seed(4)
    ref_lin = nn.Linear(5, 2, dtype=torch.float64)
    torch.manual_seed(4)
    ours_lin = QuantLinear(5, 2, dtype=torch.float64)
    assert torch.equal(ours_lin.weight, ref_lin.weight) and torch.equal(ours_lin.bias, ref_lin.bias)


CONVS = [
    dict(in_channels=3, out_channels=4, kernel_size=3),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 1), stride=2, padding=2, dilation=2, groups=2, bias=False),
    dict(in_channels=2, out_channels=2, kernel_size=3, padding="same", padding_mode="circular"),
    dict(in_channels=2, out_channels=3, kernel_size=2, padding=1, padding_mode="reflect"),
]


@pytest.mark.parametrize("kwargs", CONVS)
def test_conv_without_quantizers_is_the_float_layer_bitwise(kwargs):
    torch.manual_seed(0)
    ref = nn.Conv2d(**kwargs)
    ours = QuantConv2d.from_float(ref)
    x = torch.randn(2, kwargs["in_channels"], 7, 6, requires_grad=True)
    y_ref, y = ref(x), ours(x)
    assert torch.equal(y, y_ref)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    for key, value in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value)
    g_ref = torch.autograd.grad(y_ref.sum(), x)[0]
    assert torch.equal(torch.autograd.grad(y.sum(), x)[0], g_ref)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_without_quantizers_is_the_float_layer_bitwise(bias):
    torch.manual_seed(1)
    ref = nn.Linear(7, 5, bias=bias)
    ours = QuantLinear.from_float(ref)
    x = torch.randn(3, 2, 7)
    assert torch.equal(ours(x), ref(x))
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]


def test_linear_quantizers_apply_where_documented():
    torch.manual_seed(2)
    ref = nn.Linear(6, 4)
    layer = QuantLinear.from_float(
        ref, weight_quantizer=StepRound(0.25), input_quantizer=StepRound(0.5), output_quantizer=StepRound(1.0)
    )
    x = torch.randn(5, 6)
    expected = step_round(F.linear(step_round(x, 0.5), step_round(ref.weight, 0.25), ref.bias), 1.0)
    assert torch.equal(layer(x), expected)


def test_conv_weight_and_input_quantizers_against_torch_conv():
    torch.manual_seed(3)
    ref = nn.Conv2d(2, 3, 3, padding=1, bias=True)
    layer = QuantConv2d.from_float(ref, weight_quantizer=StepRound(0.125), input_quantizer=StepRound(0.5))
    x = torch.randn(2, 2, 5, 5)
    expected = F.conv2d(step_round(x, 0.5), step_round(ref.weight, 0.125), ref.bias, padding=1)
    assert torch.equal(layer(x), expected)


def test_real_binary_quantizer_by_name_matches_sign_oracle():
    torch.manual_seed(4)
    ref = nn.Conv2d(3, 2, 3, bias=False)
    with torch.no_grad():
        ref.weight[0, 0, 0, 0] = 0.0  # sign(0) = +1
    layer = QuantConv2d.from_float(
        ref, weight_quantizer="binary", input_quantizer={"name": "binary", "ste": "identity"}
    )
    x = torch.randn(1, 3, 6, 6)
    x[0, 0, 0, 0] = 0.0
    plus_minus = lambda t: torch.where(t >= 0, 1.0, -1.0)  # noqa: E731
    assert torch.equal(layer(x), F.conv2d(plus_minus(x), plus_minus(ref.weight)))
    assert layer.weight_quantizer.spec() == {"name": "binary", "ste": "clipped"}


def test_gradient_reaches_the_float_weight_through_the_quantizer():
    layer = QuantLinear(3, 2, weight_quantizer=StepRound())
    x = torch.randn(4, 3)
    layer(x).sum().backward()
    # identity STE: dL/dW = sum over the batch of x, for each output row
    assert torch.allclose(layer.weight.grad, x.sum(0).expand(2, 3))


def test_from_float_copies_values_and_keeps_mode_device_dtype_requires_grad():
    ref = nn.Linear(3, 2, dtype=torch.float64).eval()
    ref.bias.requires_grad_(False)
    layer = QuantLinear.from_float(ref, weight_quantizer=StepRound())
    assert layer.weight.dtype == torch.float64 and not layer.training and not layer.weight_quantizer.training
    assert not layer.bias.requires_grad and layer.weight.requires_grad
    assert layer.weight.data_ptr() != ref.weight.data_ptr()
    with torch.no_grad():
        layer.weight.add_(1.0)
    assert not torch.equal(layer.weight, ref.weight)


def test_quantizer_state_lives_under_its_slot_in_state_dict():
    layer = QuantLinear(3, 2, input_quantizer=StepRound())
    assert list(layer.state_dict()) == ["weight", "bias", "input_quantizer.calls"]
    assert layer.weight_quantizer is None and layer.output_quantizer is None


def test_assigning_a_quantizer_later_registers_it():
    layer = QuantLinear(3, 2)
    layer.weight_quantizer = StepRound()
    assert "weight_quantizer.calls" in layer.state_dict()
    assert torch.equal(layer(torch.ones(1, 3)), F.linear(torch.ones(1, 3), step_round(layer.weight), layer.bias))


def test_unknown_quantizer_name_is_config_error():
    with pytest.raises(ConfigError, match="binary"):
        QuantLinear(3, 2, weight_quantizer="no_such_quantizer")


def test_quant_act():
    x = torch.randn(4, 3)
    assert torch.equal(QuantAct()(x), x)
    assert torch.equal(QuantAct(StepRound(0.5))(x), step_round(x, 0.5))
    assert QuantAct("binary").quantizer.name == "binary"


def test_label_quantizers_names_each_tensor():
    model = nn.Sequential(
        QuantConv2d(1, 2, 3, weight_quantizer=StepRound(), input_quantizer=StepRound()),
        nn.Sequential(QuantAct(StepRound()), QuantLinear(2, 2, output_quantizer=StepRound())),
    )
    label_quantizers(model)
    assert model[0].weight_quantizer.label == "0.weight"
    assert model[0].input_quantizer.label == "0.input"
    assert model[1][0].quantizer.label == "1.0"
    assert model[1][1].output_quantizer.label == "1.1.output"
    root = QuantLinear(2, 2, weight_quantizer=StepRound())
    label_quantizers(root)
    assert root.weight_quantizer.label == "weight"
