"""Gradient accumulation in BRPG's memory: k micro-batches (``optimizer_step`` False, ..., True) against one batch
of all their images (True), on fixed features, so the two must agree wherever the docstring of
:mod:`brpg_lightning.brpg.prototype_memory` says they do."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from brpg_lightning.methods.context import TrainStepContext
from brpg_lightning.models.output import SegmentorOutput
from tests.brpg.steps import H, W, make_ctx, make_memory

K = 4


def _cat_out(outs: list[SegmentorOutput]) -> SegmentorOutput:
    return SegmentorOutput(torch.cat([o.logits for o in outs]), torch.cat([o.features for o in outs]),
                           torch.cat([o.decoder for o in outs]), outs[0].stride)


def micro_and_big(epoch: int, step: int = 0) -> tuple[list[TrainStepContext], TrainStepContext]:
    """``K`` micro-batch contexts (the last one steps the optimiser) and the one context of their union."""
    micro = [dataclasses.replace(make_ctx(epoch, step, 100, seed=s), optimizer_step=s == K - 1) for s in range(K)]
    cat = torch.cat
    big = TrainStepContext(
        epoch=epoch, global_step=step, total_steps=100,
        labeled=_cat_out([c.labeled for c in micro]), labels=cat([c.labels for c in micro]),
        unlabeled_teacher=_cat_out([c.unlabeled_teacher for c in micro]),
        unlabeled_student=_cat_out([c.unlabeled_student for c in micro]),
        pseudo_labels=cat([c.pseudo_labels for c in micro]), pseudo_confidence=cat([c.pseudo_confidence for c in micro]),
    )
    return micro, big


def bank_rows(bank, cls: int) -> list[list[float]]:
    """The filled rows of one class, sorted: the bank's content as a multiset (FIFO order aside)."""
    n = int(bank.fill()[cls])
    return sorted(bank.feats[cls, :n].float().tolist())


def test_micro_batches_push_what_the_big_batch_pushes() -> None:
    """No cap binds (sample_num 1000) and no bank wraps (V 4096): per class, the high and low banks hold the same
    features after the K micro-batches as after the one batch of 4 x the images."""
    kw = dict(V=4096, sample_num=1000, storage_dtype="float32")
    mem_micro, mem_big = make_memory(**kw), make_memory(**kw)
    micro, big = micro_and_big(epoch=1)
    for ctx in micro:
        mem_micro.sample(ctx)
    mem_big.sample(big)
    for name in ("bank_high", "bank_low"):
        a, b = getattr(mem_micro, name), getattr(mem_big, name)
        assert a.fill().tolist() == b.fill().tolist() and int(a.fill().sum()) > 0
        for cls in range(a.num_classes):
            assert bank_rows(a, cls) == bank_rows(b, cls)


def test_class_thresholds_take_one_ema_step_per_optimiser_step() -> None:
    """Table 8's EMA moves once, at the last micro-batch, with the statistics of all K: the same thresholds as the
    big batch's one step (and not K steps, which would move them about K times as far)."""
    decay = 0.5  # a large step, so one step and four differ clearly
    mem_micro, mem_big = (make_memory(class_thresholds=True, threshold_decay=decay) for _ in range(2))
    micro, big = micro_and_big(epoch=1)
    start = mem_micro.thresholds.clone()
    for ctx in micro[:-1]:
        mem_micro.sample(ctx)
        assert torch.equal(mem_micro.thresholds, start)  # no optimiser step yet
    mem_micro.sample(micro[-1])
    mem_big.sample(big)
    assert not torch.allclose(mem_big.thresholds, start)
    torch.testing.assert_close(mem_micro.thresholds, mem_big.thresholds)


def test_prototype_ema_once_per_optimiser_step_with_all_micro_batches() -> None:
    """Prototype stage: every micro-batch's L_pro reads the prototypes of the last optimiser step; the Eq. (22)
    EMA runs once, at the last micro-batch, on the summed statistics: the big batch's prototypes. Every grid
    point is labeled, so the mean of the micro-batches' L_pro^l (what Lightning's loss / k sums to) is the big
    batch's L_pro^l. M_u covers every pixel, so both take the same unlabeled points."""
    kw = dict(V=4096, sample_num=1000, storage_dtype="float32", M_u=H * W, prototype_ema=0.5)
    mem_micro, mem_big = make_memory(**kw), make_memory(**kw)
    _, big = micro_and_big(epoch=1)
    mem_big.sample(big)
    mem_big.cluster(global_step=10)
    mem_micro.load_state_dict(mem_big.state_dict())  # identical prototypes to start from
    start = mem_big.prototypes.clone()

    micro, big = micro_and_big(epoch=2, step=10)
    losses = []
    for ctx in micro:
        step = mem_micro.prototype_step(ctx)
        losses.append(float(step.scalars["L_pro_l"][0]))
        if not ctx.optimizer_step:
            assert torch.equal(mem_micro.prototypes, start)
    big_step = mem_big.prototype_step(big)
    assert not torch.allclose(mem_big.prototypes, start)
    torch.testing.assert_close(mem_micro.prototypes, mem_big.prototypes)
    assert sum(losses) / K == pytest.approx(float(big_step.scalars["L_pro_l"][0]), rel=1e-5)
