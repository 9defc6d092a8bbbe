"""Weight sharing of pruned layers and codebook fine-tuning.

k-means itself against scikit-learn's KMeans and the centroid gradient (sum of the member
gradients) are tested in tests/test_kmeans.py; here: the layer-level stage of Deep Compression.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.compress.prune import Pruner
from lowbit.compress.share import paper_bits, share_weights, shared_layers
from lowbit.errors import ConfigError
from lowbit.models import LeNet5, LeNet300
from lowbit.train import Trainer


def pruned_net(sparsity: float = 0.7, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    pruner = Pruner(model)
    pruner.prune(sparsity=sparsity)
    pruner.remove()
    return model


def batches(n: int = 4, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def test_paper_bits():
    assert paper_bits(LeNet5()) == {"conv1": 8, "conv2": 8, "ip1": 5, "ip2": 5}
    assert paper_bits(LeNet300()) == {"ip1": 6, "ip2": 6, "ip3": 6}


def test_zeros_stay_zero_and_take_code_zero():
    model = pruned_net()
    shared = share_weights(model, bits={"0": 3, "2": 2})
    for name, layer in shared_layers(shared).items():
        zero = model.get_submodule(name).weight == 0
        q = layer.weight_quantizer
        assert torch.equal(q.indices == 0, zero)
        values = q(layer.weight)
        assert (values[zero] == 0).all() and (values[~zero] != 0).all()
        assert q.codebook.numel() == 2**q.bits
        assert len(values[~zero].unique()) <= 2**q.bits - 1
    assert shared_layers(shared)["0"].weight_quantizer.bits == 3
    assert shared_layers(shared)["2"].weight_quantizer.bits == 2


def test_shared_value_is_the_nearest_centroid_and_original_is_untouched():
    model = pruned_net()
    before = model[0].weight.detach().clone()
    shared = share_weights(model, bits=4)
    assert torch.equal(model[0].weight, before)  # share_weights works on a copy
    q = shared_layers(shared)["0"].weight_quantizer
    centroids = q.shared_values()[1:].detach()
    alive = before[before != 0]
    nearest = (alive[:, None] - centroids[None, :]).abs().min(1).values
    chosen = (alive - q(shared.get_submodule("0").weight)[before != 0].detach()).abs()
    torch.testing.assert_close(chosen, nearest)


@pytest.mark.parametrize("init", ["linear", "density", "random"])
def test_inits_reach_the_quantizer(init):
    shared = share_weights(pruned_net(), bits=3, init=init, seed=7)
    spec = shared_layers(shared)["0"].weight_quantizer.spec()
    assert spec["init"] == init and spec["seed"] == 7 and spec["keep_zero"] is True


def test_layers_left_out_of_bits_stay_float():
    shared = share_weights(pruned_net(), bits={"2": 4})
    assert list(shared_layers(shared)) == ["2"]
    assert type(shared.get_submodule("0")) is nn.Linear


@pytest.mark.parametrize("optimizer, options", [("sgd", {"momentum": 0.9, "weight_decay": 0.1, "lr": 0.01}),
                                                ("adam", {"lr": 0.01})])
def test_finetuning_moves_centroids_only(optimizer, options):
    shared = share_weights(pruned_net(), bits=3)
    layers = shared_layers(shared)
    before = {name: (l.weight.detach().clone(), l.weight_quantizer.indices.clone(),
                     l.weight_quantizer.codebook.detach().clone()) for name, l in layers.items()}
    Trainer(shared, batches(), epochs=2, optimizer=optimizer, schedule="none", progress=False, **options).fit()
    for name, layer in layers.items():
        weight, indices, codebook = before[name]
        q = layer.weight_quantizer
        assert torch.equal(layer.weight, weight)  # latent weights frozen
        assert torch.equal(q.indices, indices)  # indices fixed
        assert not torch.equal(q.codebook[1:], codebook[1:])  # centroids trained
        assert (q(layer.weight)[indices == 0] == 0).all()  # pruned weights still exactly zero


def test_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="init"):
        share_weights(pruned_net(), init="kmeans++")
    with pytest.raises(ConfigError, match="unknown layer"):
        share_weights(pruned_net(), bits={"ip9": 4})
    with pytest.raises(ConfigError, match="bits"):
        share_weights(pruned_net(), bits=12)
