"""Training loaders that resume inside an epoch exactly: the data a resumed run reads is a function of
``(seed, stream, epoch, position)`` alone, never of a random number generator's history.

* :class:`EpochSampler`: the epoch's order is a permutation drawn from a generator seeded by
  ``(seed, stream, epoch)`` (Lightning calls ``set_epoch``), fresh passes concatenated when the epoch holds more
  items than the set (the labeled set cycles). Under DDP Lightning replaces it by a ``DistributedSampler``, whose
  order is a function of ``(seed, epoch)`` too.
* :class:`SeededItems`: an item requested as ``(index, item_seed)`` is loaded and augmented with torch's,
  numpy's and Python's global generators seeded by ``item_seed`` and restored afterwards, in the main process
  or a worker alike; so an item's augmentation depends on neither the worker that loads it nor the items before
  it, and skipped items need not be decoded.
* :class:`ResumableLoader`: a ``DataLoader`` that hands ``(index, seed(seed, stream, epoch, position, index))`` keys to its
  dataset and implements Lightning's stateful-loader protocol (``state_dict``/``load_state_dict`` on the loader
  object: the fit loop saves it in every checkpoint and loads it before the interrupted epoch resumes). Its state
  is ``{"epoch", "batches"}``, the batches the training loop took in that epoch; resuming skips that many batches
  of indices (no item is loaded). Its ``generator`` is its own, so iterating it never draws from torch's global
  generator, whose state the checkpoint carries for the training step (CutMix, dropout, BRPG's sampling).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler


def mixed_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (``numpy.random.SeedSequence``: well mixed, and nearby keys give unrelated
    seeds).

    >>> mixed_seed(0, 1, 2) == mixed_seed(0, 1, 2) != mixed_seed(0, 1, 3)
    True
    """
    state = np.random.SeedSequence([int(k) % 2**63 for k in keys]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


class EpochSampler(RandomSampler):
    """``num_samples`` indices: random passes over ``range(base_len)`` concatenated and cut, drawn from a generator
    seeded by ``(seed, stream, epoch)``; every item is seen once per pass before any is seen again. A
    ``RandomSampler``, so that Lightning treats the loader as shuffled (and gives it a ``DistributedSampler`` under
    DDP).

    >>> s = EpochSampler(list(range(9)), seed=0, stream=0, base_len=3, num_samples=7)
    >>> idx = list(s)
    >>> len(idx), sorted(idx[:3]), sorted(idx[3:6]), idx == list(s)
    (7, [0, 1, 2], [0, 1, 2], True)
    >>> s.set_epoch(1); idx == list(s)
    False
    """

    def __init__(self, data_source: Sequence[Any] | Dataset, seed: int, stream: int, base_len: int | None = None,
                 num_samples: int | None = None) -> None:
        super().__init__(data_source, replacement=False, num_samples=num_samples)  # type: ignore[arg-type]
        self.seed, self.stream, self.epoch = int(seed), int(stream), 0
        self.base_len = len(data_source) if base_len is None else int(base_len)  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(mixed_seed(self.seed, self.stream, self.epoch))
        remaining = self.num_samples
        while remaining > 0:
            yield from torch.randperm(self.base_len, generator=generator).tolist()[:remaining]
            remaining -= self.base_len


class SeededItems(Dataset):
    """``dataset`` whose item ``(index, item_seed)`` is ``dataset[index]`` drawn with torch's (CPU), numpy's and
    Python's global generators seeded by ``item_seed``; their previous states are restored afterwards. A plain
    index is ``dataset[index]`` unchanged."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: Any) -> Any:
        if not isinstance(key, tuple):
            return self.dataset[key]
        index, seed = key
        numpy_state, python_state = np.random.get_state(), random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
            random.seed(seed)
            try:
                return self.dataset[index]
            finally:
                np.random.set_state(numpy_state)
                random.setstate(python_state)


class _SeededBatches:
    """The loader's index sampler: its batch sampler's batches from the resume position on, each index paired
    with its item seed. The epoch is read when iteration starts (after Lightning's ``set_epoch``)."""

    def __init__(self, loader: ResumableLoader, batches: Any) -> None:
        self.loader, self.batches = loader, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        loader = self.loader
        epoch = int(getattr(loader.sampler, "epoch", 0))
        skip = loader._start(epoch)
        position = 0  # the item's place in the epoch: a cycled labeled set repeats an index, never a position,
        for i, batch in enumerate(self.batches):  # so every repeat draws its own augmentation
            if i >= skip:
                yield [(int(index), mixed_seed(loader.seed, loader.stream, epoch, position + j, int(index)))
                       for j, index in enumerate(batch)]
            position += len(batch)


class _Counted:
    """The loader's iterator, counting the batches the training loop takes (workers may load ahead)."""

    def __init__(self, loader: ResumableLoader, iterator: Any) -> None:
        self.loader, self.iterator = loader, iterator

    def __iter__(self) -> _Counted:
        return self

    def __len__(self) -> int:
        return len(self.iterator)

    def __next__(self) -> Any:
        batch = next(self.iterator)
        self.loader._taken += 1
        return batch


class ResumableLoader(DataLoader):
    """A training ``DataLoader`` over :class:`SeededItems` that resumes inside an epoch (module docstring).

    Args:
        dataset: a :class:`SeededItems` (keys ``(index, item_seed)``).
        seed: the run's seed.
        stream: which loader (0 labeled, 1 unlabeled): its own orders and item seeds.
        **kwargs: ``DataLoader`` arguments; ``sampler`` should be an :class:`EpochSampler` (or any sampler with an
            ``epoch`` attribute, as Lightning's ``DistributedSampler``).
    """

    def __init__(self, dataset: Dataset, *, seed: int, stream: int, **kwargs: Any) -> None:
        kwargs.setdefault("generator", torch.Generator().manual_seed(mixed_seed(seed, stream)))
        super().__init__(dataset, **kwargs)
        self.seed, self.stream = int(seed), int(stream)
        self._epoch: int | None = None
        self._taken = 0
        self._resume: dict[str, int] | None = None

    @property
    def _index_sampler(self) -> Any:
        return _SeededBatches(self, super()._index_sampler)

    def __iter__(self) -> _Counted:  # type: ignore[override]
        return _Counted(self, super().__iter__())

    def _start(self, epoch: int) -> int:
        """Called when a pass over the index sampler starts: the batches to skip (the saved position when this is
        the interrupted epoch, once; else 0)."""
        resume, self._resume = self._resume, None
        skip = resume["batches"] if resume is not None and resume["epoch"] == epoch else 0
        self._epoch, self._taken = epoch, skip
        return skip

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batches"}``: the epoch being read and the batches taken from it (``epoch`` -1: not read
        yet)."""
        return {"epoch": -1 if self._epoch is None else self._epoch, "batches": self._taken}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Resume at ``state_dict``'s position: the next pass skips the batches taken, when it reads the same
        epoch. A finished epoch resumes at the start of the next one. The sampler's epoch is set here too: with
        workers, the first pass's indices are drawn when Lightning creates the iterator, before its ``set_epoch``."""
        epoch, taken = int(state_dict.get("epoch", -1)), int(state_dict.get("batches", 0))
        if epoch < 0:
            return
        if taken >= len(self):
            epoch, taken = epoch + 1, 0
        self._resume = {"epoch": epoch, "batches": taken}
        set_epoch = getattr(self.sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)


__all__ = ["EpochSampler", "ResumableLoader", "SeededItems", "mixed_seed"]
