"""torch.distributed helpers for runs started with ``torchrun`` (which sets RANK, WORLD_SIZE, LOCAL_RANK).

Every helper degrades to a no-op in a plain single-process run, so training and evaluation code calls
them unconditionally.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "init_distributed",
    "is_distributed",
    "get_rank",
    "get_world_size",
    "is_main",
    "barrier",
    "cleanup",
    "all_reduce_mean",
    "all_gather_objects",
    "gather_with_local_grad",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job and which device it should use."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def is_distributed() -> bool:
    """True when a default process group exists (so collectives are required)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank, 0 without a process group."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes, 1 without a process group."""
    return dist.get_world_size() if is_distributed() else 1


def init_distributed() -> DistInfo:
    """Join the process group torchrun describes in the environment, or run alone without one.

    Backend: NCCL when CUDA is available, gloo otherwise (CPU runs and tests). Idempotent: a second call
    reuses the existing group.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if launched and dist.is_available() and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        # Rank 0 evaluates alone while the others wait in a barrier: allow for a long evaluation.
        kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(hours=2)}
        if use_cuda:
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
    return DistInfo(rank=get_rank(), world_size=get_world_size(), local_rank=local_rank, device=device)


def is_main() -> bool:
    """True on the process that logs, evaluates and writes checkpoints (rank 0)."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank; no-op when alone."""
    if is_distributed():
        dist.barrier()


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's value of a picklable object on every rank, for decisions all ranks must share."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_collective_device())
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's value of a picklable object, in rank order; `[obj]` when alone."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def cleanup() -> None:
    """Tear down the process group so the process exits cleanly; no-op when alone."""
    if is_distributed():
        dist.destroy_process_group()


def _collective_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo only needs CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(values: Sequence[float]) -> list[float]:
    """Means of Python scalars over ranks in one collective, for logged values that agree on all ranks."""
    if not is_distributed():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / dist.get_world_size()).tolist()


class _GatherWithLocalGrad(torch.autograd.Function):
    """All-gather along dim 0; backward keeps only this rank's slice, scaled by the world size."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        rank = dist.get_rank()
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        ctx.rank, ctx.world, ctx.batch = rank, world, x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        start = ctx.rank * ctx.batch
        return grad[start : start + ctx.batch] * ctx.world


def gather_with_local_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``[B, ...]`` tensors of all ranks (rank 0 first) into ``[W * B, ...]``.

    Only the local slice carries gradient, and its gradient is multiplied by the world size. Every rank
    computes the same global contrastive loss from the gathered batch and DDP then *averages* parameter
    gradients over ranks, so the factor W makes that average equal the gradient of the single-process
    loss on the concatenated batch. All ranks must pass the same shape. Identity when not distributed.
    """
    if not is_distributed() or dist.get_world_size() == 1:
        return x
    return _GatherWithLocalGrad.apply(x)
