"""Long runs never lose work: atomic checkpoints, one-line refusal of a torn resume checkpoint, a non-finite loss
stops (or skips) at its step, a run never reports success it did not have, CPS ``eval_on=mean`` end to end.

The training runs use the TINY budget (3 batches an epoch) with BRPG off where it plays no part.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from brpg_lightning.checkpoint import load_checkpoint, load_for_inference
from brpg_lightning.errors import BRPGInputError, BRPGRunError
from brpg_lightning.plugins import AtomicCheckpointIO
from tests.conftest import TINY, compose_cfg

REPO_ROOT = Path(__file__).resolve().parents[2]
ENV = {  # the spawned runs import this module's test-only callbacks (tests.app.test_long_runs)
    **os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1",
    "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p),
}
FAST = (*TINY, "brpg=none")


def cli(tmp_path: Path, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    args = [*FAST, f"dataset.root={tmp_path / 'data'}", f"hydra.run.dir={run_dir}", *overrides]
    return subprocess.run([sys.executable, "-m", "brpg_lightning", *args], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=900)


# ---------------------------------------------------------------- test callbacks (instantiated by the config)
class NonFiniteAt(pl.Callback):
    """Adds the loss term ``term`` = ``value`` to the step whose ``global_step`` is ``step``."""

    def __init__(self, step: int, term: str = "L_bad", value: float = float("nan")) -> None:
        self.step, self.term, self.value = step, term, value
        self.before: dict[str, torch.Tensor] | None = None
        self.after: dict[str, torch.Tensor] | None = None

    def on_train_step_context(self, trainer, pl_module, ctx) -> None:  # noqa: ANN001
        if ctx.global_step == self.step:
            ctx.add_loss(self.term, ctx.losses["L_s"] * 0 + self.value)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step == self.step:
            self.before = {k: v.detach().clone() for k, v in pl_module.student.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if self.before is not None and self.after is None:
            self.after = {k: v.detach().clone() for k, v in pl_module.student.named_parameters()}


class StopIterationOnSave(pl.Callback):
    """What CPS ``eval_on=mean`` once did while saving a checkpoint: raise ``StopIteration``, which the training
    loop takes for the end of its data, so fit ends early and silently."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:  # noqa: ANN001
        raise StopIteration


class DeleteBestAtTrainEnd(pl.Callback):
    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        Path(trainer.checkpoint_callback.best_model_path).unlink()


# ---------------------------------------------------------------- atomic checkpoints
def test_trainer_config_adds_the_atomic_checkpoint_io(tmp_path: Path) -> None:
    from brpg_lightning.train import build

    for trainer in ("default", "cpu", "ddp_cpu"):
        cfg = compose_cfg(*TINY, f"trainer={trainer}", "trainer.accelerator=cpu", output_dir=tmp_path)
        built = build(cfg.trainer, callbacks=[], logger=False)
        assert isinstance(built.strategy.checkpoint_io, AtomicCheckpointIO), trainer


def test_checkpoint_is_written_beside_its_target_fsynced_then_renamed(tmp_path: Path, monkeypatch) -> None:
    """The temporary file lives in the target's folder (a rename there is atomic, whatever the filesystem of the
    system temporary folder), it is fsync-ed before the rename, and the folder after it."""
    system_tmp = tmp_path / "system_tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", f"{a} -> {b}")), real_replace(a, b))[1])
    folder = tmp_path / "checkpoints"
    target = folder / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": torch.tensor(1)}, target)
    io.save_checkpoint({"step": torch.tensor(2)}, target)

    assert torch.load(target, weights_only=True)["step"] == 2
    assert list(system_tmp.iterdir()) == [] and sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]
    tmp_file = next(path for kind, path in events if kind == "fsync" and path != str(folder))
    assert Path(tmp_file).parent == folder and Path(tmp_file).name.startswith(".last.ckpt.tmp-")
    assert events[:3] == [("fsync", tmp_file), ("replace", f"{tmp_file} -> {target}"), ("fsync", str(folder))]


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot serialise this")


def test_a_failed_write_keeps_the_old_checkpoint_and_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"w": torch.arange(1000)}, target)
    before = target.read_bytes()
    with pytest.raises(RuntimeError, match="cannot serialise"):  # fails after the tensors were written
        io.save_checkpoint({"w": torch.arange(10**6), "z": _Unpicklable()}, target)
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def _fake_checkpoint(path: Path) -> None:
    torch.save({"hyper_parameters": {"run_config": {}}, "state_dict": {"w": torch.zeros(1000)}}, path)


def test_a_truncated_resume_checkpoint_is_one_line_naming_the_newest_good_one(tiny_cfg, tmp_path: Path) -> None:
    from brpg_lightning.train import train

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    older, good, torn = folder / "epoch000.ckpt", folder / "epoch001.ckpt", folder / "last.ckpt"
    for i, path in enumerate((older, good, torn)):
        _fake_checkpoint(path)
        os.utime(path, (1_000_000 + i, 1_000_000 + i))
    data = torn.read_bytes()
    torn.write_bytes(data[: len(data) // 2])  # a write cut short by a crash
    also_torn = folder / "epoch002.ckpt"
    also_torn.write_bytes(data[: len(data) // 3])  # newer than `good`, unreadable too: skipped
    os.utime(also_torn, (1_000_001.5, 1_000_001.5))

    with pytest.raises(BRPGInputError) as err:
        train(tiny_cfg(f"ckpt_path={torn}"))
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"ckpt_path={torn}: not a readable PyTorch checkpoint")
    assert line.endswith(f"the newest readable checkpoint beside it: {good}")
    with pytest.raises(BRPGInputError, match=f"beside it: {good}"):  # evaluate, predict, export: the same line
        load_checkpoint(torn)
    with pytest.raises(BRPGInputError, match="no such checkpoint file; the newest readable"):
        load_checkpoint(folder / "nope.ckpt")


# ---------------------------------------------------------------- a run never reports success it did not have
@pytest.mark.slow
def test_cps_eval_on_mean_through_checkpoint_evaluate_predict_export(tiny_cfg, tmp_path: Path) -> None:
    """CPS ``eval_on=mean`` trains to ``max_epochs``, writes its checkpoints, and evaluate / predict / export run
    the mean of both networks' logits, as validation did."""
    from brpg_lightning.evaluate import evaluate
    from brpg_lightning.export import export
    from brpg_lightning.predict import predict
    from brpg_lightning.train import train
    from tests.app.test_export import export_cfg
    from tests.app.test_predict import predict_cfg, reference_module

    summary, objects = train(tiny_cfg("method=cps", "method.eval_on=mean", "brpg=none", "trainer.max_epochs=2"))
    assert summary["stopped"] == "max_epochs=2 reached" and objects["trainer"].current_epoch == 2
    on_disk = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert Path(on_disk["best_checkpoint"]).is_file() and Path(on_disk["last_checkpoint"]).is_file()
    last = Path(summary["last_checkpoint"])
    ckpt = load_checkpoint(last)
    assert ckpt["epoch"] == 1 and ckpt["inference"]["eval_prefixes"] == ["student.", "net2."]

    module = reference_module(last)
    x = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mean = module.predict_logits(x, (64, 80))
        both = (module.student(x).logits + module.net2(x).logits) / 2
        net, _ = load_for_inference(last)
        assert net.n_members == 2 and torch.allclose(net(x), mean, atol=1e-5)
        assert torch.allclose(mean, module.student(x).upsample(both, (64, 80)), atol=1e-5)

    # evaluate: rebuilt from the run config (eval_on=mean) it reproduces the run's last validation
    results = evaluate(compose_cfg(f"ckpt_path={last}", config_name="evaluate"))
    assert results["val/mIoU"] == pytest.approx(summary["final_mIoU"], abs=1e-6)

    # predict: the masks are the argmax of the mean
    image = np.random.default_rng(0).integers(0, 256, (48, 60, 3), dtype=np.uint8)
    (tmp_path / "in").mkdir()
    Image.fromarray(image).save(tmp_path / "in" / "a.png")
    predict(predict_cfg(last, tmp_path / "in", tmp_path / "out"))
    mask = np.asarray(Image.open(tmp_path / "out" / "masks" / "a.png"))
    xs = (torch.as_tensor(image).permute(2, 0, 1)[None].float() / 255.0
          - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = module.predict_logits(xs, (48, 60))[0]
    top2 = logits.topk(2, dim=0).values
    decided = ((top2[0] - top2[1]) > 1e-4).numpy()
    np.testing.assert_array_equal(mask[decided], logits.argmax(0).numpy()[decided])
    assert decided.mean() > 0.95

    # export: the traced file computes the mean
    out = tmp_path / "model.pt"
    export(export_cfg(last, "torchscript", out))
    with torch.no_grad():
        assert torch.allclose(torch.jit.load(str(out))(x), mean, atol=1e-4)


@pytest.mark.slow
def test_an_unexplained_early_stop_exits_nonzero_with_one_line(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = cli(tmp_path, run_dir, "trainer.max_epochs=2",
               f"+callbacks.saboteur._target_={__name__}.StopIterationOnSave")
    assert proc.returncode == 3, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line == ("error: training stopped after 0 epochs, 3 steps, before max_epochs=2, with no stated reason "
                    "(early stopping, time limit or pre-emption); see the run's log for the cause; last checkpoint: "
                    "none written"), line
    assert not (run_dir / "metrics.json").exists()
    assert "final val/mIoU" not in proc.stdout


@pytest.mark.slow
def test_a_reported_checkpoint_that_does_not_exist_fails_the_run(tiny_cfg) -> None:
    from brpg_lightning.train import train

    cfg = tiny_cfg("brpg=none", "trainer.max_epochs=1", f"+callbacks.deleter._target_={__name__}.DeleteBestAtTrainEnd")
    with pytest.raises(BRPGRunError, match=r"training ended \(max_epochs=1 reached after 1 epochs, 3 steps\) but the "
                                           r"checkpoint it reports does not exist: .*best-epoch000"):
        train(cfg)
    assert not (Path(cfg.paths.output_dir) / "metrics.json").exists()


@pytest.mark.slow
def test_a_run_ended_before_any_validation_says_so_and_names_its_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = cli(tmp_path, run_dir, "++trainer.max_steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    assert proc.stdout.strip().splitlines()[-1] == f"no validation ran (max_steps=2 reached after 2 steps); checkpoint {last}"
    assert torch.load(last, weights_only=True)["global_step"] == 2
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["best_checkpoint"] is None and summary["last_checkpoint"] == str(last)
    assert summary["validated"] is False and math.isnan(summary["final_mIoU"])


@pytest.mark.slow
def test_the_end_of_fit_checkpoint_is_written_when_no_epoch_end_one_is(tiny_cfg) -> None:
    """Without the per-epoch ``last.ckpt`` (and no validation: no best), a mid-epoch end still leaves its state."""
    from brpg_lightning.train import train

    summary, _ = train(tiny_cfg("brpg=none", "callbacks.last_checkpoint=null", "++trainer.max_steps=2"))
    last = Path(summary["last_checkpoint"])
    assert last.name == "last.ckpt" and torch.load(last, weights_only=True)["global_step"] == 2


# ---------------------------------------------------------------- non-finite loss
@pytest.mark.slow
def test_a_nonfinite_loss_stops_at_its_step_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = cli(tmp_path, run_dir, "trainer.max_epochs=3", f"+callbacks.nan._target_={__name__}.NonFiniteAt",
               "+callbacks.nan.step=4")
    assert proc.returncode == 3, proc.stderr[-3000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    line = proc.stderr.strip().splitlines()[-1]
    assert line == (f"error: non-finite loss: L_bad = nan at epoch 1, step 4; training stopped, last good checkpoint: "
                    f"{last} (nonfinite_loss=skip skips such steps instead)")
    ckpt = torch.load(last, weights_only=True)  # epoch 0's, untouched by the failed step
    assert ckpt["global_step"] == 3 and all(torch.isfinite(v).all() for v in ckpt["state_dict"].values()
                                            if v.is_floating_point())
    assert not (run_dir / "metrics.json").exists()


@pytest.mark.slow
def test_nonfinite_loss_skip_skips_that_step_and_trains_on(tiny_cfg) -> None:
    from brpg_lightning.train import train

    cfg = tiny_cfg("brpg=none", "trainer.max_epochs=2", "nonfinite_loss=skip",
                   f"+callbacks.inf._target_={__name__}.NonFiniteAt", "+callbacks.inf.step=4",
                   "+callbacks.inf.value=inf")
    summary, objects = train(cfg)
    (inject,) = [c for c in objects["trainer"].callbacks if isinstance(c, NonFiniteAt)]
    module = objects["module"]
    assert module.nonfinite_skipped == 1 and summary["stopped"] == "max_epochs=2 reached"
    for key, value in inject.before.items():  # the skipped step left the weights as they were (not BN statistics)
        assert torch.equal(value, inject.after[key]), key
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert math.isfinite(summary["final_mIoU"])
