"""The torchrun environment and the few collectives the trainer uses.

Processes are started by ``torchrun`` (or any launcher that sets the same variables): each reads
``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` and joins the default process group through
``init_method="env://"`` (``MASTER_ADDR`` / ``MASTER_PORT``). Without these variables the run is a
single process and no process group is created.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job: global ``rank``, ``local_rank`` on its node, ``world_size``."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_from_torchrun() -> DistEnv:
    """Read ``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE`` as torchrun sets them (a single process when unset)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise ValueError(f"RANK, LOCAL_RANK and WORLD_SIZE must be integers (as torchrun sets them): {e}") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    return DistEnv(rank=rank, local_rank=local, world_size=world)


def resolve_device(requested: str, env: DistEnv) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda"`` -> this process's GPU ``cuda:LOCAL_RANK``."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError as e:
        raise ValueError(f"--device {requested!r} is not a device (auto, cpu, cuda, cuda:N): {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {requested} asks for CUDA, but torch sees no CUDA device; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", env.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def init_process_group(env: DistEnv, device: torch.device) -> None:
    """Join the default process group (NCCL on CUDA, gloo on CPU); a no-op for a single process."""
    if env.distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://", rank=env.rank, world_size=env.world_size)


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def mean_over_ranks(values: dict[str, float], env: DistEnv, device: torch.device) -> dict[str, float]:
    """Average a dict of scalars over all processes (every process must call it with the same keys)."""
    if not env.distributed or not values:
        return values
    keys = list(values)  # the same insertion order on every process
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / env.world_size for k, v in zip(keys, t.tolist())}


def gather_to_main(obj, env: DistEnv) -> list | None:
    """Every process's ``obj`` (picklable) as a list on rank 0, ``None`` elsewhere."""
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size if env.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_gather(obj, env: DistEnv) -> list:
    """Every process's ``obj`` (picklable), in rank order, on every process."""
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out
