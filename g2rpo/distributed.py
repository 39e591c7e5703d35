"""Everything about processes and ranks: init/teardown, process groups and collectives.

This is the only module that reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK). The
engines that wrap the policy (FSDP2, DeepSpeed) live in `g2rpo.engine`.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the torchrun job (if any). ``device``: "cpu", "cuda", or None for cuda when available."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError(f"device cuda was asked for (engine.device=cuda or --device cuda), but torch {torch.__version__} "
                         f"sees no GPU here (torch.cuda.is_available() is False); use the CPU (engine.device=cpu, "
                         f"--device cpu) or a machine with a GPU")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", store=_rendezvous_store(rank, world_size),
                                rank=rank, world_size=world_size, device_id=dev if use_cuda else None)
    return DistInfo(rank, world_size, local_rank, dev)


def ensure_process_group(info: DistInfo) -> None:
    """FSDP2 and DeepSpeed need a process group even for one process: start a private one-rank group
    (an in-memory store, no port) when the process was not started by torchrun."""
    if dist.is_initialized():
        return
    if info.world_size != 1:
        raise RuntimeError(f"world size {info.world_size} but no process group: start the job with torchrun")
    cuda = info.device.type == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1,
                            device_id=info.device if cuda else None)


def io_group(minutes: float):
    """A gloo group whose collectives may wait ``minutes``: for the ones that wait on file I/O (checkpoint
    writes, hashing, verification), which can outlast the default group's time-out (NCCL: 10 minutes).
    None for one process. Collective: every rank calls it, in the same order."""
    if not is_distributed():
        return None
    return dist.new_group(backend="gloo", timeout=timedelta(minutes=minutes))


def _rendezvous_store(rank: int, world_size: int, timeout_minutes: int = 30):
    """The env:// store, with keys namespaced by torchrun's restart count.

    Under ``torchrun --max-restarts`` the agent's store outlives a failed attempt; without the
    prefix a restarted rank can read a dead peer's address from the previous attempt and fail to
    connect (seen with gloo).
    """
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500")),
                          world_size, is_master=not agent_store and rank == 0,
                          timeout=timedelta(minutes=timeout_minutes), multi_tenant=not agent_store)
    return dist.PrefixStore(f"g2rpo/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def process_rank() -> tuple[int, int]:
    """``(rank, world size)`` of this process: the process group's, else torchrun's environment, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier(group=None) -> None:
    if is_distributed():
        dist.barrier(group=group)


def all_reduce(tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
    """Reduce a tensor over ranks (returns a new tensor; identity for one process)."""
    out = tensor.detach().clone().float()
    if is_distributed():
        backend_device = out.device
        if dist.get_backend() == "nccl" and backend_device.type != "cuda":
            out = out.cuda()
        dist.all_reduce(out, op={"mean": dist.ReduceOp.SUM, "sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        if op == "mean":
            out /= dist.get_world_size()
        out = out.to(backend_device)
    return out


def broadcast_object(obj, group=None):
    """Rank 0's ``obj`` on every rank (identity for one process)."""
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0, group=group)
    return holder[0]


def all_gather_object(obj, group=None) -> list:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` for one process)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=group)
    return out


class RankFailure(RuntimeError):
    """Raised on the ranks where nothing failed when `agreed` saw an exception on another rank."""


def agreed(fn, group=None):
    """``fn()`` on every rank; an exception on any rank is raised on every rank, so that none is left
    waiting in a later collective. The rank that failed re-raises its own exception; the others raise
    `RankFailure` with its message. ``fn`` must not itself run collectives that could be left unmatched."""
    try:
        result, problem = fn(), None
    except Exception as exc:  # noqa: BLE001 -- every kind must reach the other ranks
        result, problem, failure = None, f"{type(exc).__name__}: {exc}", exc
    problems = all_gather_object(problem, group)
    if problem is not None:
        raise failure
    for rank, message in enumerate(problems):
        if message is not None:
            raise RankFailure(f"rank {rank} failed: {message}")
    return result


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is True on any rank."""
    return bool(all_reduce(torch.tensor(float(flag)), "max").item() > 0)


def print0(*args, **kwargs) -> None:
    if not is_distributed() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def teardown(exit_code: int = 0, sync: bool = True) -> None:
    """End a CLI process cleanly. gloo can crash at interpreter exit, so leave with ``os._exit``.

    ``sync=False`` (after an error) leaves without waiting for the other ranks, which may be elsewhere."""
    if sync and dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.barrier()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
