"""Multi-process training helpers: process-group setup/teardown under ``torchrun``, rank-0 gating,
object broadcast, and the per-rank shard of an epoch's sample order.

Detection.  ``torchrun`` (``python -m torch.distributed.run``) sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in every worker's environment.  When
``WORLD_SIZE`` is set and > 1, :func:`setup` initialises the default process group with
``init_method="env://"``; otherwise training stays single-process and nothing here touches
``torch.distributed`` (so the single-process path is exactly what it was before).

Backend.  NCCL when CUDA is available (each rank then uses ``cuda:LOCAL_RANK``), gloo on CPUs.
``MIND_DIST_BACKEND=gloo|nccl`` forces one.

Sharding (:func:`shard`).  Every rank computes the same (seed, epoch) permutation of the
training samples; it is padded by wrapping around to a multiple of ``world_size`` (like
``DistributedSampler(drop_last=False)``) and rank ``r`` takes positions ``r, r + W, r + 2W, ...``.
All shards have the same length, so every rank runs the same number of optimizer steps
(DDP's all-reduce would hang if one rank ran an extra step).  With W = 1 the shard is the
permutation itself.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Any, Optional

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """Where this process stands: rank, world size, local rank, backend and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None      # None = single process (no process group)
    device: str = "cpu"

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistInfo()


def env_world_size() -> int:
    """WORLD_SIZE from the environment (1 when unset or not under torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def setup(timeout_s: float = 1800.0) -> DistInfo:
    """Initialise the default process group from torchrun's env vars; SINGLE when not under torchrun.

    Idempotent: if a process group is already initialised, it is described, not re-created.
    """
    world = env_world_size()
    if world <= 1:
        return SINGLE
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = os.environ.get("MIND_DIST_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"MIND_DIST_BACKEND must be 'gloo' or 'nccl', got {backend!r}")
    device = "cpu"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, backend=backend, device=device)


def teardown(info: DistInfo) -> None:
    """Destroy the process group that :func:`setup` created (no-op for a single process)."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op for a single process)."""
    if info.enabled:
        if info.backend == "nccl":
            dist.barrier(device_ids=[info.local_rank])
        else:
            dist.barrier()


def broadcast_object(obj: Any, info: DistInfo, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (picklable objects; returns ``obj`` for a single process)."""
    if not info.enabled:
        return obj
    box = [obj if info.rank == src else None]
    dist.broadcast_object_list(box, src=src, device=info.device if info.backend == "nccl" else None)
    return box[0]


def all_gather_object(obj: Any, info: DistInfo) -> list:
    """Every rank's ``obj``, in rank order ([obj] for a single process)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def shard(order: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """This rank's slice of an epoch order (see the module docstring); ``order`` itself when W = 1."""
    W = info.world_size
    if W <= 1:
        return order
    n = order.shape[0]
    total = -(-n // W) * W
    if total > n:                          # wrap around so every rank gets ceil(n / W) samples
        reps = -(-total // max(n, 1))
        order = order.repeat(reps)[:total]
    return order[info.rank::W]


def per_rank_batch(global_batch: int, info: DistInfo) -> int:
    """Per-rank batch = global batch // world size (at least 1).

    Keeping the *global* batch fixed means ``--batch-size`` means the same optimisation
    (one AdamW step per ``batch_size`` samples, gradients averaged over them by DDP) whatever
    the number of processes, so hyper-parameters tuned on one process carry over.
    """
    return max(1, global_batch // info.world_size)


def params_checksum(module: torch.nn.Module) -> float:
    """A float64 sum over all parameters (and their squares): equal on every rank iff replicas agree
    (up to the vanishing chance of a collision)."""
    with torch.no_grad():
        return float(sum(p.detach().double().sum() + p.detach().double().pow(2).sum()
                         for p in module.parameters()))
