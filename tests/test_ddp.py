"""Quantization-aware training under DDP: 2 gloo processes on CPU against one process on the global batch."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lowbit
from lowbit.data import make_loader
from lowbit.errors import ConfigError, TrainingError
from lowbit.train import Trainer, ddp

GLOBAL_BATCH, STEPS, FEATURES, CLASSES = 16, 4, 12, 3
#: learned steps for weights and activations: state DDP must keep equal and equal to one process
LSQ = {"weight": {"name": "lsq", "bits": 3}, "input": {"name": "lsq", "bits": 3, "role": "activation"},
       "first": "same", "last": "same"}
#: a range observer and batch norm: state each rank computes from its own share
OBSERVED = {"weight": {"name": "xnor"}, "input": {"name": "uniform", "bits": 4, "dynamic": False},
            "first": "same", "last": "same"}


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(GLOBAL_BATCH * STEPS, FEATURES, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 1).long()


def model(config: dict, batch_norm: bool) -> nn.Module:
    torch.manual_seed(0)
    hidden = [nn.Linear(FEATURES, 16), nn.BatchNorm1d(16) if batch_norm else nn.Identity(), nn.Tanh()]
    return lowbit.quantize(nn.Sequential(*hidden, nn.Linear(16, CLASSES)), config)


def train(config: dict, batch_norm: bool) -> dict[str, torch.Tensor]:
    """Train one epoch of STEPS global batches (this process's share under DDP); the final state."""
    x, y = data()
    net = model(config, batch_norm)
    ddp.prepare_quantizers(net, x[:GLOBAL_BATCH])  # the same first global batch on every rank
    loader = make_loader(x, y, GLOBAL_BATCH, shuffle=True, seed=3, drop_last=True)
    if ddp.is_distributed():
        loader = ddp.ShardedLoader(loader, ddp.rank(), ddp.world_size())
    callbacks = [ddp.StateSync()] if ddp.is_distributed() else []
    trainer = Trainer(ddp.wrap(net), loader, None, epochs=1, optimizer="sgd", lr=0.1, schedule="none",
                      callbacks=callbacks, progress=False)
    trainer.fit()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    ddp.init_process(rank, world_size, port, backend="gloo", timeout_s=60)
    try:
        save_file(train(LSQ, batch_norm=False), f"{out_dir}/lsq-{rank}.safetensors")
        save_file(train(OBSERVED, batch_norm=True), f"{out_dir}/observed-{rank}.safetensors")
        ddp.barrier()
    finally:
        ddp.close()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("ddp")
    ddp.launch(worker, 2, (str(out),), timeout_s=120)
    return str(out)


def test_two_gloo_processes_equal_one_process_on_the_global_batch(two_ranks):
    single = train(LSQ, batch_norm=False)
    ranks = [load_file(f"{two_ranks}/lsq-{r}.safetensors") for r in range(2)]
    assert ranks[0].keys() == single.keys()
    assert "0.input_quantizer.step" in single and bool(single["0.input_quantizer.initialized"])
    for key, value in single.items():
        assert torch.equal(ranks[0][key], ranks[1][key]), f"{key} differs between the ranks"
        torch.testing.assert_close(ranks[0][key], value, rtol=1e-5, atol=1e-6, msg=f"{key} differs from one process")
    initial = model(LSQ, batch_norm=False).state_dict()
    assert not torch.equal(single["0.weight"], initial["0.weight"])  # training did something


def test_observers_and_batch_norm_stay_identical_across_ranks(two_ranks):
    ranks = [load_file(f"{two_ranks}/observed-{r}.safetensors") for r in range(2)]
    observed = [key for key in ranks[0] if "stats" in key or "running" in key]
    assert any("min_val" in key for key in observed) and any("running_mean" in key for key in observed)
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), f"{key} differs between the ranks"


def test_sharded_loader_splits_each_global_batch():
    x = torch.arange(12.0).reshape(12, 1)
    loader = make_loader(x, torch.zeros(12, dtype=torch.long), 6)
    shares = [list(ddp.ShardedLoader(loader, r, 3)) for r in range(3)]
    assert [batch[0].reshape(-1).tolist() for batch in shares[1]] == [[2.0, 3.0], [8.0, 9.0]]
    assert len(ddp.ShardedLoader(loader, 0, 3)) == 2
    with pytest.raises(ConfigError, match="does not split evenly"):
        list(ddp.ShardedLoader(loader, 0, 4))


def test_outside_a_process_group():
    assert (ddp.rank(), ddp.world_size(), ddp.is_main(), ddp.is_distributed()) == (0, 1, True, False)
    assert ddp.all_reduce_sums([1.5, 2]) == [1.5, 2]
    net = nn.Linear(2, 2)
    assert ddp.wrap(net) is net
    with pytest.raises(ConfigError, match="integer >= 1"):
        ddp.launch(worker, 0)


def failing_worker(rank: int, world_size: int, port: int) -> None:
    raise ConfigError(f"rank {rank} fails on purpose")


def test_a_failing_worker_raises_training_error():
    with pytest.raises(TrainingError, match="fails on purpose"):
        ddp.launch(failing_worker, 2, timeout_s=60)


def aborting_worker(rank: int, world_size: int, port: int) -> None:
    os.abort()


def test_a_worker_killed_by_a_signal_is_named():
    with pytest.raises(TrainingError, match=r"exited with code -6 \(SIGABRT\)"):
        ddp.launch(aborting_worker, 1, timeout_s=60)
