"""Exact resume inside an epoch, on the CPU: from a step-interval checkpoint and from ``preempted.ckpt``.

The training loaders (``data.resumable``) save their position in every checkpoint; their orders and each item's
augmentation are functions of ``(seed, loader, epoch, index)``; the RNG state saved with the checkpoint then
serves the training step alone (CutMix, dropout, BRPG's sampling). A run resumed inside an epoch must therefore
equal the uninterrupted run bit for bit (``torch.equal``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch.utils.data import Dataset

from brpg_lightning.brpg.callback import brpg_callbacks
from brpg_lightning.data.resumable import EpochSampler, ResumableLoader, SeededItems
from tests.conftest import TINY, compose_cfg

# TINY's 3 epochs of 3 steps: 0 warm-up, 1 sampling (steps 4-6), 2 prototype stage (clustering at step 7).
# Step checkpoints at steps 4 (sampling, 1 batch into epoch 1) and 8 (prototype stage, 2 batches into epoch 2).
MID = (
    *TINY,
    "trainer.deterministic=true",
    "callbacks.step_checkpoint.every_n_train_steps=4",
    "callbacks.step_checkpoint.filename='step{step:04d}'",
    "callbacks.step_checkpoint.save_top_k=-1",
    "+callbacks.step_checkpoint.auto_insert_metric_name=false",
)


class SigtermAt(pl.Callback):
    """Raises Lightning's SIGTERM flag at the end of the step that makes ``global_step`` reach ``step`` (what the
    signal handler does): the run writes ``preempted.ckpt`` at the batch boundary and stops."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step == self.step:
            trainer._signal_connector.received_sigterm = True


def _run(out: Path, data: Path, *extra: str, stop_at: int | None = None) -> tuple[Any, Any]:
    from brpg_lightning.train import build_callbacks, train

    cfg = compose_cfg(*MID, f"dataset.root={data}", *extra, output_dir=out)
    if stop_at is None:
        _, objects = train(cfg)
        return objects["module"], brpg_callbacks(objects["trainer"])["student"].memory
    import brpg_lightning.train as train_module

    def with_sigterm(cfg):  # noqa: ANN001, ANN202
        return [*build_callbacks(cfg), SigtermAt(stop_at)]

    mp = pytest.MonkeyPatch()
    mp.setattr(train_module, "build_callbacks", with_sigterm)
    try:
        with pytest.raises(SIGTERMException):
            train(cfg)
    finally:
        mp.undo()
    return None, None


def _assert_equal(a: Any, b: Any, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        nan = a.isnan() if a.is_floating_point() else torch.zeros_like(a, dtype=torch.bool)
        assert torch.equal(nan, b.isnan() if b.is_floating_point() else nan), where  # NaN marks empty slots
        assert torch.equal(a[~nan], b[~nan]), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, set(a) ^ set(b))
        for key in a:
            _assert_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def _training_state(ckpt: dict[str, Any]) -> dict[str, Any]:
    """What decides the rest of the run: weights (student, teacher with its step count), optimiser, schedule,
    every callback's state (BRPG banks/prototypes/thresholds, RNG states), the loaders' positions."""
    loops = ckpt["loops"]["fit_loop"]
    callbacks = {k: v for k, v in ckpt["callbacks"].items() if "ModelCheckpoint" not in k}
    return {"state_dict": ckpt["state_dict"], "optimizer_states": ckpt["optimizer_states"],
            "lr_schedulers": ckpt["lr_schedulers"], "callbacks": callbacks,
            "loaders": loops["state_dict"].get("combined_loader"), "global_step": ckpt["global_step"],
            "epoch": ckpt["epoch"]}


@pytest.mark.slow
def test_resume_inside_an_epoch_is_bit_identical(tmp_path: Path) -> None:
    data = tmp_path / "data"
    module, memory = _run(tmp_path / "straight", data)
    ckpts = {int(p.stem[4:]): p for p in (tmp_path / "straight" / "checkpoints").glob("step*.ckpt")}
    assert sorted(ckpts) == [4, 8]
    step4 = torch.load(ckpts[4], map_location="cpu", weights_only=True)
    assert step4["epoch"] == 1 and step4["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 1, "batches": 1}, {"epoch": 1, "batches": 1}]  # one batch into the sampling epoch
    (brpg4,) = [v for k, v in step4["callbacks"].items() if "BRPGCallback" in k]
    assert brpg4["bank_high"] is not None and brpg4["prototypes"] is None  # inside sampling: banks, no prototypes

    # resume from the step-4 checkpoint (inside sampling), stopped by SIGTERM after step 8 (inside the prototype
    # stage, 2 batches into epoch 2): preempted.ckpt holds what the straight run's step-8 checkpoint holds
    _run(tmp_path / "resumed", data, f"ckpt_path={ckpts[4]}", stop_at=8)
    preempted = tmp_path / "resumed" / "checkpoints" / "preempted.ckpt"
    p8 = torch.load(preempted, map_location="cpu", weights_only=True)
    s8 = torch.load(ckpts[8], map_location="cpu", weights_only=True)
    assert p8["global_step"] == 8 and p8["epoch"] == 2
    (brpg8,) = [v for k, v in s8["callbacks"].items() if "BRPGCallback" in k]
    assert brpg8["prototypes"] is not None  # clustered at step 7, in the resumed run
    _assert_equal(_training_state(p8), _training_state(s8), "step 8")

    # resume from preempted.ckpt to the end: the final weights, teacher, banks and prototypes are the straight run's
    module2, memory2 = _run(tmp_path / "final", data, f"ckpt_path={preempted}")
    _assert_equal(module2.state_dict(), module.state_dict(), "module")
    assert int(module.teacher.steps) > 0
    _assert_equal(memory2.state_dict(), memory.state_dict(), "memory")
    assert memory.prototypes is not None


# ---------------------------------------------------------------- the loader alone
class Recorded(Dataset):
    """Items are ``(index, a torch random draw)``; records which indices were loaded."""

    def __init__(self, n: int) -> None:
        self.n, self.loaded = n, []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[int, float]:
        self.loaded.append(index)
        return index, float(torch.rand(()))


def _loader(data: Recorded, epoch: int, workers: int = 0) -> ResumableLoader:
    items = SeededItems(data)
    sampler = EpochSampler(items, seed=3, stream=1)
    sampler.set_epoch(epoch)
    return ResumableLoader(items, seed=3, stream=1, sampler=sampler, batch_size=2, drop_last=True,
                           num_workers=workers)


@pytest.mark.parametrize("workers", [0, 1])
def test_loader_resumes_at_its_position_without_loading_skipped_items(workers: int) -> None:
    full = [(i.tolist(), r.tolist()) for i, r in _loader(Recorded(10), epoch=2, workers=workers)]
    assert len(full) == 5 and sorted(i for b, _ in full for i in b) == list(range(10))

    first = _loader(Recorded(10), epoch=2, workers=workers)
    it = iter(first)
    taken = [next(it) for _ in range(2)]
    state = first.state_dict()
    assert state == {"epoch": 2, "batches": 2}
    assert [(i.tolist(), r.tolist()) for i, r in taken] == full[:2]

    data = Recorded(10)
    resumed = _loader(data, epoch=0, workers=workers)  # a fresh process: the epoch comes from the state
    torch.manual_seed(123)  # the global generator plays no part in the data
    resumed.load_state_dict(state)
    rest = [(i.tolist(), r.tolist()) for i, r in resumed]
    assert rest == full[2:]
    if workers == 0:
        assert sorted(data.loaded) == sorted(i for b, _ in full[2:] for i in b)  # skipped items never loaded
    assert resumed.state_dict() == {"epoch": 2, "batches": 5}
    # a finished epoch resumes at the next epoch's start; another epoch reads another order
    nxt = _loader(Recorded(10), epoch=0)
    nxt.load_state_dict(resumed.state_dict())
    assert nxt.sampler.epoch == 3 and len(list(nxt)) == 5
    assert [i.tolist() for i, _ in nxt] != [b for b, _ in full]


def test_iterating_the_loader_leaves_the_global_generator_alone() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    list(_loader(Recorded(6), epoch=0))
    assert torch.equal(torch.rand(3), expected)


def test_a_cycled_labeled_set_draws_a_new_augmentation_at_every_repeat() -> None:
    """The labeled set cycles within an epoch (16 images, 48 batches): each repeat of an image is augmented anew
    (seeded by its position in the epoch), as a random stream would; the same index seeded alike every time gave
    each labeled image one augmentation per epoch and cost the default about 0.04 mIoU on seed 0."""
    items = SeededItems(Recorded(3))
    sampler = EpochSampler(items, seed=3, stream=1, base_len=3, num_samples=12)
    loader = ResumableLoader(items, seed=3, stream=1, sampler=sampler, batch_size=2, drop_last=True)
    draws: dict[int, list[float]] = {}
    for index, value in loader:
        for i, v in zip(index.tolist(), value.tolist(), strict=True):
            draws.setdefault(i, []).append(v)
    assert sorted(draws) == [0, 1, 2] and all(len(v) == 4 for v in draws.values())
    assert all(len(set(v)) == 4 for v in draws.values()), draws
