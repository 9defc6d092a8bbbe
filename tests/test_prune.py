"""Magnitude pruning with masks: thresholds by hand, masks exact through training and checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.compress.prune import (
    MASK,
    Pruner,
    parse_layer_values,
    prunable_layers,
    quality_threshold,
    sparsity_schedule,
    sparsity_threshold,
)
from lowbit.errors import ConfigError, ShapeMismatchError
from lowbit.train import Trainer


def net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def batches(n: int = 4, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


# --- thresholds by hand -------------------------------------------------------------------------------------


def test_sparsity_threshold_by_hand():
    w = torch.tensor([0.5, -0.1, 0.3, -0.4, 0.2])
    # 40 % of 5 weights = 2 pruned: |w| sorted 0.1, 0.2, 0.3, ... -> threshold 0.2 prunes -0.1 and 0.2
    assert sparsity_threshold(w, 0.4) == pytest.approx(0.2)
    assert sparsity_threshold(w, 0.0) == -1.0


def test_quality_threshold_is_quality_times_std_of_survivors():
    w = torch.tensor([0.0, 0.0, 1.0, -1.0, 3.0, -3.0])
    # survivors 1, -1, 3, -3: mean 0, unbiased variance (1 + 1 + 9 + 9) / 3
    assert quality_threshold(w, 0.5) == pytest.approx(0.5 * (20 / 3) ** 0.5)


def test_prune_by_sparsity_keeps_largest_magnitudes():
    model = nn.Sequential(nn.Linear(4, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.5, -0.1, 0.3, -0.4]]))
    kept = Pruner(model).prune(sparsity=0.5)
    assert torch.equal(model[0].weight.detach(), torch.tensor([[0.5, 0.0, 0.0, -0.4]]))
    assert kept == {"0": 0.5}


def test_prune_by_quality_by_hand():
    model = nn.Sequential(nn.Linear(6, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -1.0, 3.0, -3.0, 0.1, -0.1]]))
    std = float(model[0].weight.detach().std())
    Pruner(model).prune(quality=1.05 / std)  # threshold 1.05 prunes |w| <= 1.05
    assert torch.equal(model[0].weight.detach(), torch.tensor([[0.0, 0.0, 3.0, -3.0, 0.0, 0.0]]))


def test_masks_only_shrink_and_prune_per_layer():
    model = net()
    pruner = Pruner(model)
    pruner.prune(sparsity={"0": 0.5})
    first = pruner.masks()["0"].clone()
    assert pruner.kept()["2"] == 1.0
    pruner.prune(sparsity={"0": 0.75, "2": 0.5})
    assert not (pruner.masks()["0"] & ~first).any()
    assert pruner.kept()["0"] == pytest.approx(0.25)
    assert pruner.kept()["2"] == pytest.approx(0.5)


def test_schedule_removes_the_same_fraction_each_round():
    steps = sparsity_schedule(0.96, 2)
    assert steps == pytest.approx([0.8, 0.96])  # keep 20 %, then 20 % of that


def test_parse_layer_values():
    assert parse_layer_values("0.9", "sparsity") == 0.9
    assert parse_layer_values("ip1=0.92, ip2=0.5", "sparsity") == {"ip1": 0.92, "ip2": 0.5}
    with pytest.raises(ConfigError, match="sparsity"):
        parse_layer_values("ip1=x", "sparsity")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sparsity": 1.5}, "sparsity of layer '0'"),
        ({"sparsity": {"nope": 0.5}}, "unknown layer"),
        ({"quality": -1.0}, "quality"),
        ({"sparsity": {"0": 0.5}, "quality": {"0": 1.0}}, "both"),
    ],
)
def test_bad_targets_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Pruner(net()).prune(**kwargs)


def test_unknown_layer_and_bad_rounds_are_config_errors():
    with pytest.raises(ConfigError, match="prunable"):
        Pruner(net(), layers=["1"])
    with pytest.raises(ConfigError, match="rounds"):
        sparsity_schedule(0.9, 0)


# --- masks through training ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "optimizer, options",
    [
        ("sgd", {"momentum": 0.9, "weight_decay": 0.1, "lr": 0.1}),
        ("sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1, "lr": 0.1}),
        ("adam", {"weight_decay": 0.1, "lr": 0.01}),
        ("adamw", {"weight_decay": 0.1, "lr": 0.01}),
    ],
)
def test_pruned_weights_stay_exactly_zero_through_training(optimizer, options):
    model = net()
    pruner = Pruner(model)
    masks: dict[str, torch.Tensor] = {}
    checks: list[bool] = []

    class PruneAfterFirstEpoch:
        """Prunes inside the fit, so the optimizer already holds momentum / Adam moments for every weight."""

        def on_epoch_start(self, trainer):
            if trainer.epoch == 1:
                pruner.prune(sparsity=0.7)
                masks.update({name: mask.clone() for name, mask in pruner.masks().items()})

        def on_step_end(self, trainer):
            if masks:
                checks.append(all(bool((layer.weight[~masks[name]] == 0).all())
                                  for name, layer in prunable_layers(model).items()))

    trainer = Trainer(model, batches(), epochs=4, optimizer=optimizer, schedule="none", progress=False,
                      callbacks=[pruner, PruneAfterFirstEpoch()], **options)
    trainer.fit()
    assert checks and all(checks)
    pruned_at = {name: layer.weight.detach().clone() for name, layer in prunable_layers(model).items()}
    for name, layer in prunable_layers(model).items():
        pruned = ~masks[name]
        assert torch.equal(layer.weight[pruned], torch.zeros(int(pruned.sum())))  # +0.0 exactly
        assert not torch.signbit(layer.weight[pruned]).any()
        for value in trainer.optimizer.state[layer.weight].values():
            if isinstance(value, torch.Tensor) and value.shape == layer.weight.shape:
                assert (value[pruned] == 0).all()
    # the survivors keep training
    Trainer(model, batches(), epochs=1, optimizer=optimizer, schedule="none", progress=False, callbacks=[pruner],
            **options).fit()
    assert any(not torch.equal(layer.weight, pruned_at[name]) for name, layer in prunable_layers(model).items())


def test_gradient_of_pruned_weights_is_zero():
    model = net()
    pruner = Pruner(model)
    pruner.prune(sparsity=0.5)
    x, y = batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    for name, layer in prunable_layers(model).items():
        mask = pruner.masks()[name]
        assert (layer.weight.grad[~mask] == 0).all()
        assert (layer.weight.grad[mask] != 0).any()


def test_masks_survive_a_checkpoint_and_resume(tmp_path):
    model = net()
    pruner = Pruner(model)
    pruner.prune(sparsity=0.6)
    masks = {name: mask.clone() for name, mask in pruner.masks().items()}
    assert f"0.{MASK}" in model.state_dict()
    Trainer(model, batches(), epochs=1, optimizer="sgd", lr=0.1, schedule="none", progress=False,
            callbacks=[pruner], out_dir=tmp_path).fit()

    resumed = net(seed=5)  # other weights, no masks yet
    resumed_pruner = Pruner(resumed)
    trainer = Trainer(resumed, batches(), epochs=2, optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=0.1,
                      schedule="none", progress=False, callbacks=[resumed_pruner], out_dir=tmp_path, resume=True)
    trainer.fit()
    for name, mask in resumed_pruner.masks().items():
        assert torch.equal(mask, masks[name])
        assert (prunable_layers(resumed)[name].weight[~mask] == 0).all()


def test_checkpoint_with_masks_does_not_load_into_a_model_without_them(tmp_path):
    model = net()
    pruner = Pruner(model)
    pruner.prune(sparsity=0.5)
    trainer = Trainer(model, batches(), epochs=1, schedule="none", progress=False, callbacks=[pruner])
    path = trainer.save_checkpoint(tmp_path / "c.safetensors")
    with pytest.raises(ShapeMismatchError, match=MASK):
        Trainer(net(), batches(), epochs=1, schedule="none", progress=False).load_checkpoint(path)


def test_remove_drops_hooks_and_buffers_but_keeps_zeros():
    model = net()
    pruner = Pruner(model)
    pruner.prune(sparsity=0.5)
    pruner.remove()
    assert not any(MASK in key for key in model.state_dict())
    assert float((model[0].weight == 0).float().mean()) == pytest.approx(0.5)
    x, y = batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    assert (model[0].weight.grad[model[0].weight == 0] != 0).any()  # no gradient hook any more
