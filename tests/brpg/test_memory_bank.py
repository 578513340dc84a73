"""MemoryBank (Eq. 8-9 FIFO queues) against a naive per-class Python list."""

from __future__ import annotations

import pytest
import torch

from brpg_lightning.brpg.memory_bank import MemoryBank
from brpg_lightning.constants import IGNORE_INDEX


def _reference_bank(
    num_classes: int, capacity: int, pushes: list[tuple[torch.Tensor, torch.Tensor]]
) -> list[list]:
    """Per-class lists: append every feature in order, then keep the last ``capacity``."""
    queues: list[list] = [[] for _ in range(num_classes)]
    for feats, labels in pushes:
        for f, y in zip(feats.tolist(), labels.tolist(), strict=True):
            if 0 <= y < num_classes:
                queues[y].append(f)
                del queues[y][:-capacity]
    return queues


def _ids(start: int, n: int, dim: int) -> torch.Tensor:
    """Features that name themselves: row i is ``[start + i] * dim`` (exact in float16 below 2048)."""
    return torch.arange(start, start + n, dtype=torch.float32).unsqueeze(1).expand(n, dim).clone()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_pushes_match_reference(dtype: torch.dtype, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    c, v, d = 4, 7, 3
    bank = MemoryBank(c, v, d, dtype=dtype)
    storage = bank.feats.data_ptr()
    pushes, next_id = [], 0
    for _ in range(25):
        n = int(torch.randint(0, 30, (1,), generator=gen))  # up to ~4x V in one push
        labels = torch.randint(0, c + 1, (n,), generator=gen)
        labels[labels == c] = IGNORE_INDEX  # skipped
        feats = _ids(next_id, n, d)
        next_id += n
        pushes.append((feats, labels))
        bank.push(feats, labels)
        ref = _reference_bank(c, v, pushes)
        assert bank.fill().tolist() == [len(q) for q in ref]
        for cls in range(c):
            got = bank.get(cls)
            assert got.dtype == torch.float32
            assert got.tolist() == ref[cls], f"class {cls} after {len(pushes)} pushes"
        feats_all, valid = bank.padded()
        assert valid.sum(1).tolist() == [len(q) for q in ref]
        for cls in range(c):  # the valid slots hold exactly the queue's features (any order)
            assert sorted(feats_all[cls][valid[cls]][:, 0].tolist()) == sorted(f[0] for f in ref[cls])
    assert bank.feats.data_ptr() == storage  # preallocated once, never reallocated


def test_wrap_around_and_oversized_push_by_hand() -> None:
    bank = MemoryBank(2, 3, 1, dtype=torch.float32)
    bank.push(_ids(0, 2, 1), torch.tensor([0, 0]))  # class 0: [0, 1]
    bank.push(_ids(2, 2, 1), torch.tensor([0, 1]))  # class 0: [0, 1, 2], class 1: [3]
    bank.push(_ids(4, 2, 1), torch.tensor([0, 0]))  # wraps: class 0: [2, 4, 5]
    assert bank.get(0).flatten().tolist() == [2.0, 4.0, 5.0]
    assert bank.ptr.tolist() == [2, 1] and bank.count.tolist() == [3, 1]
    bank.push(_ids(10, 5, 1), torch.tensor([1, 1, 1, 1, 1]))  # 5 > V: keep the last 3
    assert bank.get(1).flatten().tolist() == [12.0, 13.0, 14.0]
    assert bank.get(0).flatten().tolist() == [2.0, 4.0, 5.0]  # untouched


def test_interleaved_classes_keep_their_own_order() -> None:
    bank = MemoryBank(3, 4, 2, dtype=torch.float32)
    labels = torch.tensor([2, 0, 2, 1, 0, 2, 2, 2])
    bank.push(_ids(0, 8, 2), labels)
    assert bank.get(0)[:, 0].tolist() == [1.0, 4.0]
    assert bank.get(1)[:, 0].tolist() == [3.0]
    assert bank.get(2)[:, 0].tolist() == [2.0, 5.0, 6.0, 7.0]  # 0 dropped: 5 items > V = 4


def test_buffers_state_dict_reset_and_sizes() -> None:
    bank = MemoryBank(2, 5, 4, dtype=torch.float16)
    assert bank.nbytes_per_feature == 4 * 2
    assert MemoryBank(2, 5, 4, dtype=torch.float32).nbytes_per_feature == 4 * 4
    assert set(bank.state_dict()) == {"feats", "ptr", "count"}
    bank.push(torch.randn(6, 4), torch.tensor([0, 1, 1, 0, 0, 1]))
    clone = MemoryBank(2, 5, 4, dtype=torch.float16)
    clone.load_state_dict(bank.state_dict())
    for cls in range(2):
        assert torch.equal(clone.get(cls), bank.get(cls))
    bank.reset()
    assert bank.fill().tolist() == [0, 0] and bank.get(0).shape == (0, 4)
    assert not bank.padded()[1].any()


def test_bad_shapes_raise() -> None:
    bank = MemoryBank(2, 5, 4)
    with pytest.raises(ValueError, match="push expects"):
        bank.push(torch.randn(3, 5), torch.zeros(3, dtype=torch.long))
