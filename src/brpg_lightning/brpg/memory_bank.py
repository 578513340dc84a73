"""Per-class FIFO feature banks ``Memory_h`` / ``Memory_lw`` (paper Sec. 3.4.1, Eq. 8-9).

One preallocated ring buffer per class, all classes in a single ``(C, V, D)`` tensor; a push writes
every class at once (sort by class, rank within class, one scatter), never reallocates, concatenates
or loops over classes in Python.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class MemoryBank(nn.Module):
    """``C`` first-in-first-out queues of capacity ``V`` for ``D``-dim features (operator ``Q`` of Eq. 8-9).

    Buffers (moved by ``.to(device)``, saved by ``state_dict``):

    - ``feats (C, V, D)``, storage ``dtype`` (float16 by default: ``D * 2`` bytes per feature);
    - ``ptr (C,)`` long, the next slot written for each class;
    - ``count (C,)`` long, filled slots per class (``<= V``). While ``count < V`` the filled slots are
      ``0 .. count-1``; once full the oldest feature sits at ``ptr``.

    Example:
        >>> bank = MemoryBank(num_classes=2, capacity=3, dim=1, dtype=torch.float32)
        >>> bank.push(torch.arange(5.0).view(5, 1), torch.tensor([0, 1, 0, 0, 0]))
        >>> bank.get(0).flatten().tolist(), bank.get(1).flatten().tolist(), bank.fill().tolist()
        ([2.0, 3.0, 4.0], [1.0], [3, 1])
    """

    feats: Tensor
    ptr: Tensor
    count: Tensor

    def __init__(
        self,
        num_classes: int,
        capacity: int = 30000,
        dim: int = 256,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1 or capacity < 1 or dim < 1:
            raise ValueError(
                f"MemoryBank needs num_classes, capacity, dim >= 1; got {num_classes}, {capacity}, {dim}"
            )
        self.num_classes, self.capacity, self.dim = int(num_classes), int(capacity), int(dim)
        self.register_buffer("feats", torch.zeros(num_classes, capacity, dim, dtype=dtype, device=device))
        self.register_buffer("ptr", torch.zeros(num_classes, dtype=torch.long, device=device))
        self.register_buffer("count", torch.zeros(num_classes, dtype=torch.long, device=device))

    @property
    def nbytes_per_feature(self) -> int:
        """Bytes one stored feature takes: ``D * element_size(dtype)``."""
        return self.dim * self.feats.element_size()

    def fill(self) -> Tensor:
        """Stored features per class, ``(C,)`` long (``V_{alpha,c}`` of Eq. 11)."""
        return self.count.clone()

    def reset(self) -> None:
        """Empty every queue (storage is zeroed, not reallocated)."""
        self.feats.zero_()
        self.ptr.zero_()
        self.count.zero_()

    @torch.no_grad()
    def push(self, feats: Tensor, labels: Tensor) -> None:
        """Append ``feats (N, D)`` to the queues of ``labels (N,)`` long, oldest dropped first.

        Order within a class is the order given; when one push brings more than ``V`` features of a
        class, only its last ``V`` are kept (as appending them one by one would). Labels outside
        ``[0, C)`` (e.g. ``IGNORE_INDEX``) are skipped. Features are cast to the storage dtype.
        """
        if feats.ndim != 2 or feats.shape[1] != self.dim or labels.shape != feats.shape[:1]:
            raise ValueError(
                f"push expects feats (N, {self.dim}) and labels (N,); got {tuple(feats.shape)}, {tuple(labels.shape)}"
            )
        if feats.shape[0] == 0:
            return
        device = self.feats.device
        labels = labels.to(device=device, dtype=torch.long)
        keep = (labels >= 0) & (labels < self.num_classes)
        if not bool(keep.all()):
            feats, labels = feats[keep.to(feats.device)], labels[keep]
        n = labels.shape[0]
        if n == 0:
            return
        cap = self.capacity
        # Rank of each feature within its class, in push order: stable sort by class, then position
        # in the sorted run (sorted positions are scattered back to push order).
        labels_sorted, order = torch.sort(labels, stable=True)
        per_class = torch.bincount(labels, minlength=self.num_classes)  # (C,)
        start = torch.cumsum(per_class, 0) - per_class  # first sorted position of each class
        rank = torch.empty_like(labels)
        rank[order] = torch.arange(n, device=device) - start[labels_sorted]
        skip = (per_class - cap).clamp_min(0)[labels]  # more than V for a class: drop its first n_c - V
        row = labels * cap + (self.ptr[labels] + rank - skip) % cap  # destination in (C * V, D)
        storage = self.feats.view(-1, self.dim)
        values = feats.to(device=device, dtype=self.feats.dtype)
        if bool((skip > 0).any()):
            kept = rank >= skip
            storage.index_copy_(0, row[kept], values[kept])
        else:  # the usual case: every feature lands, no gather
            storage.index_copy_(0, row, values)
        written = per_class.clamp_max(cap)
        self.ptr.copy_((self.ptr + written) % cap)
        self.count.copy_((self.count + per_class).clamp_max(cap))

    def get(self, c: int) -> Tensor:
        """Features of class ``c`` oldest first, ``(count_c, D)`` float32."""
        n = int(self.count[c])
        idx = (self.ptr[c] - n + torch.arange(n, device=self.feats.device)) % self.capacity
        return self.feats[c, idx].float()

    def padded(self) -> tuple[Tensor, Tensor]:
        """All queues for batched clustering: ``feats (C, V, D)`` (the storage, not a copy) and
        ``valid (C, V)`` bool (True on filled slots; slot order is ring order, not FIFO order)."""
        valid = torch.arange(self.capacity, device=self.feats.device).unsqueeze(0) < self.count.unsqueeze(1)
        return self.feats, valid

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, capacity={self.capacity}, dim={self.dim}, dtype={self.feats.dtype}"
