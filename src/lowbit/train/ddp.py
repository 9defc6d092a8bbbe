"""Quantization-aware training under torch DistributedDataParallel.

DDP averages the gradients of every parameter, so weights and learned quantizer
parameters (LSQ steps, PACT clipping levels, ABC shifts and scales) take the same
optimizer steps on every rank. What DDP does not keep equal is state a forward
pass writes: range observers, lazily initialised steps, batch-norm running
statistics. :class:`StateSync` all-reduces that state after every optimizer
step (floats averaged, integers and flags by maximum), so every rank holds the
same model bit for bit, and :func:`prepare_quantizers` creates lazily
initialised quantizer state before the model is wrapped (DDP registers the
parameters it sees at construction).

With equal shards of each global batch (:class:`ShardedLoader`) and a loss that
is a mean over the batch, a step on N ranks equals a single-process step on the
global batch, up to float rounding, except for what a forward computes from the
local batch alone: batch-norm batch statistics (use ``nn.SyncBatchNorm`` on GPUs)
and the ranges range observers see (averaged across ranks after each step).

Processes: :func:`launch` spawns ``world_size`` workers on one machine (gloo on
CPU, nccl on GPUs) with a free TCP port and a timeout; under ``torchrun``,
:func:`init_from_env` joins the group torchrun describes in the environment.
"""

from __future__ import annotations

import inspect
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ..errors import ConfigError, TrainingError
from ..quantizers import Quantizer

#: seconds a process waits for the others to join or answer a collective
DEFAULT_TIMEOUT_S = 120.0


def unwrap(model: nn.Module) -> nn.Module:
    """The module itself when ``model`` is a (Distributed)DataParallel wrapper."""
    parallel = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    return model.module if isinstance(model, parallel) else model


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 outside a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0, the process that logs and writes checkpoints."""
    return rank() == 0


def all_reduce_sums(values: Sequence[float]) -> list[float]:
    """The sums of ``values`` over all ranks (the values themselves outside a process group)."""
    if not is_distributed():
        return list(values)
    total = torch.tensor(list(values), dtype=torch.float64)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.tolist()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_process(rank: int, world_size: int, port: int, backend: str | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Join the process group of ``world_size`` processes rendezvousing on 127.0.0.1:``port``."""
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not in 0..{world_size - 1}")
    dist.init_process_group(backend or default_backend(), init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=timeout_s))
    if torch.cuda.is_available():
        torch.cuda.set_device(rank % torch.cuda.device_count())


def init_from_env(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Join the group ``torchrun`` describes (WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT); False without one."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    dist.init_process_group(backend or default_backend(), init_method="env://", timeout=timedelta(seconds=timeout_s))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return True


def barrier() -> None:
    """Wait until every rank gets here (a no-op outside a process group).

    Workers call it after their last collective, before :func:`close`: a rank that tears down its
    connections while another still talks to it makes gloo raise "connection closed" in a background
    thread, which aborts that process. Only on success: a failed rank must leave at once, so its
    error reaches :func:`launch` instead of waiting out the barrier's timeout.
    """
    if is_distributed():
        dist.barrier()


def close() -> None:
    """Leave the process group (a no-op outside one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def launch(worker: Callable[..., None], world_size: int, args: tuple[Any, ...] = (),
           timeout_s: float = 600.0) -> None:
    """Run ``worker(rank, world_size, port, *args)`` in ``world_size`` spawned processes and wait.

    ``worker`` must be importable (a module-level function). A worker that fails raises
    TrainingError here with its traceback; processes still running after ``timeout_s`` are
    terminated and TrainingError is raised.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"the number of DDP processes must be an integer >= 1, got {world_size!r}")
    port = free_port()
    context = mp.start_processes(worker, args=(world_size, port, *args), nprocs=world_size, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TrainingError(f"{world_size} DDP processes did not finish within {timeout_s:.0f} s")
    except mp.ProcessRaisedException as exc:
        raise TrainingError(f"a DDP process failed:\n{exc}") from None
    except mp.ProcessExitedException as exc:
        raise TrainingError(f"a DDP process exited with code {exc.exit_code}{_signal_name(exc.exit_code)} "
                            "(its own error is on stderr above)") from None
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
                process.join(5)


def _signal_name(exit_code: int) -> str:
    """`` (SIGABRT)`` for exit code -6: the signal that ended a process, if one did."""
    try:
        return f" ({signal.Signals(-exit_code).name})" if exit_code < 0 else ""
    except ValueError:
        return ""


def wrap(model: nn.Module) -> nn.Module:
    """``model`` in DistributedDataParallel (buffers kept equal by :class:`StateSync`, not broadcast)."""
    if not is_distributed():
        return model
    device_ids = [torch.cuda.current_device()] if next(model.parameters()).is_cuda else None
    ddp_class = nn.parallel.DistributedDataParallel
    # no buffer broadcast before each forward (torch >= 2.13 names the option forward_sync_buffers)
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp_class).parameters \
        else "broadcast_buffers"
    return ddp_class(model, device_ids=device_ids, **{no_sync: False})


def _state_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every buffer of ``model`` and the parameters of its quantizers (the rest DDP keeps equal)."""
    module = unwrap(model)
    quantizer_params = [p for q in module.modules() if isinstance(q, Quantizer) for p in q.parameters(recurse=False)]
    return [*quantizer_params, *module.buffers()]


@torch.no_grad()
def sync_state(model: nn.Module) -> None:
    """Make every buffer and quantizer parameter of ``model`` equal on all ranks.

    Floating tensors are averaged (equal values stay bit for bit equal: (a + a) / 2 = a),
    integer and boolean ones take the maximum (counters, "initialized" flags). Other
    parameters need nothing: DDP gives them equal gradients. A no-op outside a process group.
    """
    if not is_distributed():
        return
    size = dist.get_world_size()
    for tensor in _state_tensors(model):
        if tensor.numel() == 0:
            continue
        if tensor.is_floating_point():
            dist.all_reduce(tensor.data, op=dist.ReduceOp.SUM)
            tensor.data.div_(size)
        elif tensor.dtype == torch.bool:
            flags = tensor.data.to(torch.uint8)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            tensor.data.copy_(flags.bool())
        else:
            dist.all_reduce(tensor.data, op=dist.ReduceOp.MAX)


class StateSync:
    """Trainer callback: :func:`sync_state` after every optimizer step (and once at the start of fit)."""

    def on_fit_start(self, trainer: Any) -> None:
        sync_state(trainer.model)

    def on_step_end(self, trainer: Any) -> None:
        sync_state(trainer.model)


@torch.no_grad()
def prepare_quantizers(model: nn.Module, inputs: torch.Tensor) -> None:
    """Create lazily initialised quantizer state (LSQ steps, observed ranges) with one forward of ``inputs``.

    Under DDP pass every rank the same ``inputs`` (for example the first global batch): each
    layer's initial state depends on the quantized outputs of the layers before it, so only the
    same data gives every rank, and a single process, the same start. The forward runs in
    training mode without gradients; all state that is not a quantizer's (batch-norm running
    statistics) is restored afterwards, and the quantizer state is checked equal across ranks by
    averaging it (:func:`sync_state`).
    """
    model = unwrap(model)
    prefixes = tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, Quantizer))
    saved = {key: t.clone() for key, t in model.state_dict().items() if not key.startswith(prefixes)}
    modes = [(m, m.training) for m in model.modules()]
    model.train()
    try:
        model(inputs)
    finally:
        for module, training in modes:
            module.training = training
    state = model.state_dict()
    for name, value in saved.items():
        state[name].copy_(value)
    sync_state(model)


class ShardedLoader:
    """This rank's equal, contiguous share of every global batch of ``loader``.

    Every rank iterates the same global loader (same seed, hence the same batches); rank r
    takes rows [r B / N, (r + 1) B / N) of each batch of B. B must be divisible by N: build
    the loader with ``drop_last=True`` so that the last batch is full too.
    """

    def __init__(self, loader: Any, rank: int, world_size: int):
        self.loader, self.rank, self.world_size = loader, rank, world_size

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def generator(self) -> torch.Generator | None:
        return getattr(self.loader, "generator", None)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for inputs, labels in self.loader:
            if len(labels) % self.world_size:
                raise ConfigError(f"a global batch of {len(labels)} does not split evenly over "
                                  f"{self.world_size} DDP processes; use a divisible batch size and drop_last")
            share = len(labels) // self.world_size
            rows = slice(self.rank * share, (self.rank + 1) * share)
            yield inputs[rows], labels[rows]
