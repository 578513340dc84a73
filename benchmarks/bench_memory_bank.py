"""Memory banks at paper scale (C=21, V=30000, D=256): bytes per feature, resident memory, push time.

Each step pushes ``(B_l + B_u) * sample_num`` features (the cap of Eq. 8) with random labels into a
preallocated :class:`MemoryBank`; resident memory must not grow after the first allocation. For
reference, the push is also timed against a per-class loop over the same preallocated storage (the
official implementation loops over classes), to justify the vectorised scatter.
"""

from __future__ import annotations

import torch

from benchmarks.common import fmt_bytes, fmt_times, ratio_line, rss_bytes, time_interleaved
from brpg_lightning.brpg.memory_bank import MemoryBank


def push_per_class_loop(bank: MemoryBank, feats: torch.Tensor, labels: torch.Tensor) -> None:
    """Same result as ``bank.push``, one Python iteration per class present (the reference)."""
    cap = bank.capacity
    for c in labels.unique().tolist():
        f = feats[labels == c][-cap:].to(bank.feats.dtype)
        n = f.shape[0]
        p = int(bank.ptr[c])
        first = min(n, cap - p)
        bank.feats[c, p : p + first] = f[:first]
        bank.feats[c, : n - first] = f[first:]
        bank.ptr[c] = (p + n) % cap
        bank.count[c] = min(int(bank.count[c]) + n, cap)


def run(quick: bool) -> list[str]:
    classes, capacity, dim = (21, 3000, 256) if quick else (21, 30000, 256)
    b_l = b_u = 16
    sample_num = 500 if quick else 5000
    steps = 20 if quick else 200
    per_step = (b_l + b_u) * sample_num
    gen = torch.Generator().manual_seed(0)
    pool = torch.randn(per_step, dim, generator=gen).half()  # what the callback pushes (storage dtype)
    labels = [torch.randint(0, classes, (per_step,), generator=gen) for _ in range(8)]

    lines = []
    for dtype in (torch.float16, torch.float32):
        probe = MemoryBank(classes, 2, dim, dtype=dtype)
        lines.append(
            f"{str(dtype).removeprefix('torch.'):8s}: {probe.nbytes_per_feature} B per feature, one bank "
            f"{fmt_bytes(classes * capacity * probe.nbytes_per_feature)} (C x V x D)"
        )

    before = rss_bytes()
    bank = MemoryBank(classes, capacity, dim, dtype=torch.float16)
    storage = bank.feats.data_ptr()
    bank.push(pool, labels[0])
    after_first = rss_bytes()
    for step in range(1, steps):
        bank.push(pool, labels[step % len(labels)])
    after_all = rss_bytes()
    growth = after_all - after_first
    same_storage = bank.feats.data_ptr() == storage
    lines += [
        f"{steps} pushes of (B_l + B_u) * sample_num = ({b_l} + {b_u}) * {sample_num} = {per_step} features "
        f"into C={classes}, V={capacity}, D={dim}, float16 (fill {int(bank.fill().sum())} / {classes * capacity})",
        f"RSS: before {fmt_bytes(before)}, after first push {fmt_bytes(after_first)} "
        f"(+{fmt_bytes(after_first - before)}), after {steps} pushes {fmt_bytes(after_all)}; "
        f"storage reallocated: {not same_storage}",
    ]

    loop_bank = MemoryBank(classes, capacity, dim, dtype=torch.float16)
    timed = time_interleaved(
        {
            "vec": lambda: bank.push(pool, labels[1]),
            "loop": lambda: push_per_class_loop(loop_bank, pool, labels[1]),
        },
        repeat=5,
    )
    (t_vec, times_vec), (t_loop, times_loop) = timed["vec"], timed["loop"]
    check_a, check_b = MemoryBank(classes, 50, 4), MemoryBank(classes, 50, 4)
    small = torch.randn(300, 4, generator=gen)
    small_labels = torch.randint(0, classes, (300,), generator=gen)
    check_a.push(small, small_labels)
    push_per_class_loop(check_b, small, small_labels)
    assert all(torch.equal(check_a.get(c), check_b.get(c)) for c in range(classes)), (
        "loop reference disagrees"
    )
    lines += [
        f"push time: vectorised {t_vec * 1e3:.1f} ms {fmt_times(times_vec)} | per-class loop "
        f"{t_loop * 1e3:.1f} ms {fmt_times(times_loop)}",
        ratio_line("RSS growth after first push (MiB)", growth / 2**20, "~ 0 (< 16)", growth < 16 * 2**20),
        ratio_line("push time loop/vectorised", t_loop / t_vec, ">= 1", t_loop >= t_vec),
    ]
    return lines
