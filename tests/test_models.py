"""Reference models: parameter counts from the papers, shapes, block layouts, registry errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.errors import ConfigError
from lowbit.models import BasicBlock, get_model, model_names

ALL = ["bnn-mlp", "lenet300", "lenet5", "reactnet", "resnet-small", "small-cnn", "vgg-small"]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def linear(i: int, o: int) -> int:
    return i * o + o


def conv(i: int, o: int, k: int, bias: bool = True) -> int:
    return i * o * k * k + (o if bias else 0)


def bn(c: int) -> int:
    return 2 * c


def test_registry_names():
    assert model_names() == ALL


def test_lenet300_parameter_count_as_in_deep_compression():
    assert n_params(get_model("lenet300")) == 266_610
    assert n_params(get_model("lenet300")) == linear(784, 300) + linear(300, 100) + linear(100, 10)
    assert n_params(get_model("lenet300", input_size=8)) == linear(64, 300) + linear(300, 100) + linear(100, 10)


def test_lenet5_parameter_count_and_caffe_layers():
    model = get_model("lenet5")
    assert n_params(model) == 431_080
    assert n_params(model) == conv(1, 20, 5) + conv(20, 50, 5) + linear(50 * 4 * 4, 500) + linear(500, 10)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters() if name.endswith("weight")}
    assert shapes == {"conv1.weight": (20, 1, 5, 5), "conv2.weight": (50, 20, 5, 5),
                      "ip1.weight": (500, 800), "ip2.weight": (10, 500)}
    # Caffe's LeNet has one ReLU, between ip1 and ip2
    assert [type(m) for m in model if isinstance(m, nn.ReLU)] == [nn.ReLU]


def test_bnn_mlp_structure_and_count():
    model = get_model("bnn-mlp", width=64)
    w = 64
    expected = linear(784, w) + bn(w) + 2 * (linear(w, w) + bn(w)) + linear(w, 10) + bn(10)
    assert n_params(model) == expected
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["Flatten", "Dropout"] + ["Linear", "BatchNorm1d", "Hardtanh", "Dropout"] * 3 + ["Linear", "BatchNorm1d"]
    assert model.drop0.p == 0.2 and model.drop1.p == 0.5 and model.bn4.eps == 1e-4
    assert get_model("bnn-mlp").fc1.out_features == 1024
    plain = get_model("bnn-mlp", width=32, depth=2, input_dropout=0.0, hidden_dropout=0.0)
    assert [type(m).__name__ for m in plain] == ["Flatten"] + ["Linear", "BatchNorm1d", "Hardtanh"] * 2 + ["Linear", "BatchNorm1d"]


def test_vgg_small_count():
    expected = (conv(1, 32, 3, False) + bn(32) + conv(32, 32, 3, False) + bn(32) + conv(32, 64, 3, False) + bn(64)
                + conv(64, 64, 3, False) + bn(64) + conv(64, 128, 3, False) + bn(128))
    assert n_params(get_model("vgg-small")) == expected + linear(128 * 3 * 3, 256) + linear(256, 10)
    assert n_params(get_model("vgg-small", input_size=8)) == expected + linear(128, 256) + linear(256, 10)
    assert 100_000 < n_params(get_model("vgg-small")) < 1_000_000


def test_resnet_small_count():
    def block(i, o):
        short = 0 if i == o else conv(i, o, 1, False) + bn(o)
        return conv(i, o, 3, False) + bn(o) + conv(o, o, 3, False) + bn(o) + short

    expected = (conv(1, 16, 3, False) + bn(16) + 2 * block(16, 16) + block(16, 32) + block(32, 32)
                + block(32, 64) + block(64, 64) + linear(64, 10))
    assert n_params(get_model("resnet-small")) == expected
    assert n_params(get_model("resnet-small", block="bireal")) == expected


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("size", [28, 8])
def test_output_shapes(name, size):
    if name in ("lenet5", "small-cnn") and size == 8:
        with pytest.raises(ConfigError, match="input_size >= 16"):
            get_model(name, input_size=size)
        return
    model = get_model(name, input_size=size).eval()
    assert model(torch.randn(3, 1, size, size)).shape == (3, 10)
    wide = get_model(name, in_channels=3, num_classes=7, input_size=size).eval()
    assert wide(torch.randn(2, 3, size, size)).shape == (2, 7)


@pytest.mark.parametrize("name", ALL)
def test_training_step_gives_finite_gradients(name):
    model = get_model(name, input_size=28).train()
    loss = nn.functional.cross_entropy(model(torch.randn(4, 1, 28, 28)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", ALL)
def test_plain_float_layers_and_traceable(name):
    model = get_model(name).eval()
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert layers and all(type(m) in (nn.Linear, nn.Conv2d) for m in layers)
    assert not any(type(m).__module__.startswith("lowbit.quantizers") for m in model.modules())
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(torch.fx.symbolic_trace(model)(x), model(x))


@pytest.mark.parametrize("name", ALL)
def test_init_is_deterministic_under_manual_seed(name):
    torch.manual_seed(0)
    a = get_model(name).state_dict()
    torch.manual_seed(0)
    b = get_model(name).state_dict()
    torch.manual_seed(1)
    c = get_model(name).state_dict()
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def identity_bn_block(block: str, channels: int = 3) -> BasicBlock:
    """A block whose convs are zero and whose BNs (eval, fresh statistics) are the identity."""
    unit = BasicBlock(channels, channels, 1, block, "relu").eval()
    for c in (unit.conv1, unit.conv2):
        nn.init.zeros_(c.weight)
    return unit


def test_block_layouts_follow_their_formulas():
    x = torch.randn(2, 3, 5, 5)
    # basic: out = relu(bn2(conv2(...)) + x) = relu(x) when the convs are zero
    assert torch.equal(identity_bn_block("basic")(x), torch.relu(x))
    # bireal: y = bn1(conv1(act(x))) + x = x; out = bn2(conv2(act(y))) + y = x
    assert torch.equal(identity_bn_block("bireal")(x), x)
    # with the identity conv2 the bireal block adds act(y) once more
    unit = identity_bn_block("bireal")
    with torch.no_grad():
        unit.conv2.weight[:, :, 1, 1] = torch.eye(3)
    torch.testing.assert_close(unit(x), x + torch.relu(x), rtol=1e-5, atol=1e-5)


def test_block_layouts_share_state_dict_keys():
    basic = get_model("resnet-small", block="basic").state_dict()
    bireal = get_model("resnet-small", block="bireal", activation="hardtanh").state_dict()
    assert basic.keys() == bireal.keys()
    downsample = get_model("resnet-small").layer2[0].shortcut
    assert [type(m) for m in downsample] == [nn.AvgPool2d, nn.Conv2d, nn.BatchNorm2d]
    assert isinstance(get_model("resnet-small").layer1[0].shortcut, nn.Identity)


def test_odd_sizes_keep_shortcut_and_conv_shapes_equal():
    for block in ("basic", "bireal"):
        model = get_model("resnet-small", input_size=7, block=block).eval()
        assert model(torch.randn(1, 1, 7, 7)).shape == (1, 10)


def test_unknown_name_and_bad_arguments():
    with pytest.raises(ConfigError, match="known models: bnn-mlp, lenet300, lenet5, reactnet, resnet-small, small-cnn, vgg-small"):
        get_model("alexnet")
    with pytest.raises(ConfigError, match="bad arguments for model 'lenet300'.*valid: in_channels"):
        get_model("lenet300", width=10)
    bad = [("bnn-mlp", {"width": 0}, "width"), ("bnn-mlp", {"hidden_dropout": 1.0}, "hidden_dropout"),
           ("lenet300", {"num_classes": 0}, "num_classes"), ("resnet-small", {"block": "x"}, "basic, bireal"),
           ("resnet-small", {"activation": "gelu"}, "relu, hardtanh"),
           ("resnet-small", {"widths": (8, 16), "blocks": (1,)}, "one entry per stage"),
           ("vgg-small", {"input_size": 8, "layers": (8, "M", "M", "M", "M")}, "below 1x1"),
           ("vgg-small", {"layers": (8, "X")}, "layers entry"), ("lenet5", {"in_channels": True}, "in_channels")]
    for name, kwargs, message in bad:
        with pytest.raises(ConfigError, match=message):
            get_model(name, **kwargs)
