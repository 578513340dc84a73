"""Thin ``torch.distributed`` helpers for the banks and prototypes; no-ops without a process group.

Tensors only (no pickled objects), so they work with NCCL on GPUs and gloo on CPUs alike.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True when a process group is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_variable(t: Tensor) -> Tensor:
    """All ranks' rows, rank order: ``(n_r, ...)`` on each rank -> ``(sum_r n_r, ...)`` on every rank.

    The row counts may differ: sizes are all-gathered, each tensor is padded to the largest, gathered,
    then trimmed. Trailing dimensions and dtype must match across ranks.

    Example:
        >>> gather_variable(torch.arange(3)).tolist()  # one process: unchanged
        [0, 1, 2]
    """
    if not is_distributed():
        return t
    if t.dtype == torch.bool:  # not every backend gathers bool
        return gather_variable(t.to(torch.uint8)).bool()
    t = t.contiguous()
    n = torch.tensor([t.shape[0]], dtype=torch.long, device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    counts = [int(s) for s in sizes]
    longest = max(counts)
    padded = t.new_zeros((longest, *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])


def all_reduce_sum_(t: Tensor) -> Tensor:
    """Sum ``t`` over ranks in place and return it (unchanged without a process group)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_(t: Tensor, src: int = 0) -> Tensor:
    """Overwrite ``t`` in place with rank ``src``'s tensor and return it (unchanged without a group)."""
    if is_distributed():
        dist.broadcast(t, src=src)
    return t
