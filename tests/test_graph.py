"""Graph IR capture: ops, attributes, shapes, parameters, quantizer specs, and what cannot be captured."""

import json
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.config import uniform_act
from lowbit.errors import UnsupportedLayerError
from lowbit.export.graph import GRAPH_VERSION, capture
from lowbit.models import get_model
from lowbit.nn import QuantAct


def by_name(graph):
    return {node["name"]: node for node in graph["nodes"]}


def test_lenet5_ops_shapes_and_params():
    graph = capture(get_model("lenet5"), torch.zeros(2, 1, 28, 28))
    assert graph["version"] == GRAPH_VERSION
    assert graph["inputs"] == [{"name": "input_1", "shape": [-1, 1, 28, 28]}]
    assert [n["op"] for n in graph["nodes"]] == ["conv2d", "maxpool2d", "conv2d", "maxpool2d", "reshape", "linear",
                                                "relu", "linear"]
    nodes = by_name(graph)
    # valid 5x5 convolutions and 2x2 pools: 28 -> 24 -> 12 -> 8 -> 4
    assert [nodes[n]["shape"] for n in ("conv1", "pool1", "conv2", "pool2")] == [
        [-1, 20, 24, 24], [-1, 20, 12, 12], [-1, 50, 8, 8], [-1, 50, 4, 4]]
    assert nodes["flatten"]["attrs"] == {"shape": [-1, 800]}
    assert nodes["conv1"]["attrs"] == {"stride": [1, 1], "padding": [0, 0], "dilation": [1, 1], "groups": 1}
    assert nodes["pool1"]["attrs"] == {"kernel": [2, 2], "stride": [2, 2], "padding": [0, 0], "ceil_mode": False}
    assert nodes["ip1"]["params"] == {"weight": "ip1.weight", "bias": "ip1.bias"}
    assert nodes["ip1"]["module"] == "ip1" and nodes["ip1"]["inputs"] == ["flatten"]
    assert graph["outputs"] == ["ip2"]
    json.dumps(graph, allow_nan=False)


def test_quantized_layers_carry_specs_and_activation_state_not_weight_state():
    model = lowbit.quantize(get_model("lenet300", input_size=8), {"weight": {"name": "kmeans", "bits": 2},
                                                                  "input": uniform_act(4)})
    lowbit.calibrate(model, [torch.randn(4, 1, 8, 8)])
    nodes = by_name(capture(model, torch.zeros(1, 1, 8, 8)))
    assert nodes["ip2"]["quant"] == {"weight": model.ip2.weight_quantizer.spec(),
                                     "input": model.ip2.input_quantizer.spec()}
    params = nodes["ip2"]["params"]
    assert params["input_quantizer.stats.min_val"] == "ip2.input_quantizer.stats.min_val"
    assert not any(k.startswith("weight_quantizer.") for k in params)  # the weight codes carry k-means state
    assert set(params.values()) <= set(model.state_dict())


def test_functional_ops_batchnorm_and_quant_act():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1, stride=2, bias=False)
            self.bn = nn.BatchNorm2d(4, eps=1e-3)
            self.act = QuantAct({"name": "binary"})
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            y = self.drop(self.act(F.relu(self.bn(self.conv(x)))))
            z = torch.cat([y, y * y], dim=1)
            return F.adaptive_avg_pool2d(z, 1).view(z.size(0), -1)

    graph = capture(Net(), torch.zeros(2, 3, 8, 8))
    ops = [n["op"] for n in graph["nodes"]]
    assert ops == ["conv2d", "batchnorm", "relu", "quant_act", "mul", "concat", "adaptive_avgpool2d", "reshape"]
    nodes = {n["op"]: n for n in graph["nodes"]}
    assert nodes["batchnorm"]["attrs"] == {"eps": 1e-3}
    assert "num_batches_tracked" not in nodes["batchnorm"]["params"]
    assert nodes["conv2d"]["shape"] == [-1, 4, 4, 4] and "bias" not in nodes["conv2d"]["params"]
    assert nodes["quant_act"]["quant"] == {"output": {"name": "binary", "ste": "clipped"}}
    assert nodes["mul"]["inputs"] == [nodes["quant_act"]["name"]] * 2  # dropout vanished
    assert nodes["concat"]["attrs"] == {"axis": 1} and nodes["reshape"]["attrs"] == {"shape": [-1, 8]}


def test_capture_restores_each_module_mode():
    model = nn.Sequential(OrderedDict(fc=nn.Linear(3, 3), bn=nn.BatchNorm1d(3)))
    model.train()
    model.bn.eval()  # frozen statistics inside a training model
    before = model.bn.running_mean.clone()
    capture(model, torch.randn(4, 3))
    assert model.training and model.fc.training and not model.bn.training
    assert torch.equal(model.bn.running_mean, before)


def test_unsupported_layers_and_untraceable_models_are_named():
    with pytest.raises(UnsupportedLayerError, match="Conv3d"):
        capture(nn.Sequential(nn.Conv3d(1, 1, 3)), torch.zeros(1, 1, 5, 5, 5))

    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(UnsupportedLayerError, match="Branchy"):
        capture(Branchy(), torch.zeros(1, 2))
    with pytest.raises(UnsupportedLayerError, match="padding"):
        capture(nn.Sequential(nn.Conv2d(1, 1, 3, padding="same")), torch.zeros(1, 1, 5, 5))
