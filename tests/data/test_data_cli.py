"""The data errors through the entry point's task (``exit_on_bad_input(run)``, what ``python -m brpg_lightning``
calls after Hydra composed the config: one line on stderr, exit 2, before training), and one tiny training run
on a real layout (slow). In-process: a subprocess per case would cost ~20 s of imports on 2 shared cores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from brpg_lightning.cli import exit_on_bad_input
from brpg_lightning.train import run, train
from tests.conftest import compose_cfg
from tests.data.trees import cityscapes_tree, coco_tree, pascal_ids, pascal_tree


def cli_error(capsys: pytest.CaptureFixture[str], tmp_path: Path, *overrides: str) -> str:
    """Run the training task on ``overrides``; assert exit status 2 and return the one ``error:`` line."""
    cfg = compose_cfg(*overrides, "trainer.accelerator=cpu", "callbacks.progress_bar.refresh_rate=0",
                      output_dir=tmp_path / "run")
    with pytest.raises(SystemExit) as exit_info:
        exit_on_bad_input(run)(cfg)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    (line,) = [ln for ln in captured.err.splitlines() if ln.startswith("error:")]
    assert "Epoch 0" not in captured.err + captured.out
    return line


def test_cli_missing_cityscapes_root_prints_the_tree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = cli_error(capsys, tmp_path, "dataset=cityscapes", f"dataset.root={tmp_path / 'cs'}",
                     f"dataset.split_dir={tmp_path}", "model=deeplabv3plus_small")
    assert f"'{tmp_path / 'cs'}' does not exist" in line and "leftImg8bit/{train,val}/<city>" in line


def test_cli_wrong_num_classes_is_named_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = pascal_tree(tmp_path / "voc")
    lab, _, _ = pascal_ids()
    mask = np.zeros((12, 16), np.uint8)
    mask[3, 3] = 40  # a user's mask with more classes than dataset.num_classes
    Image.fromarray(mask).save(root / "SegmentationClassAug" / f"{lab[0]}.png")
    line = cli_error(capsys, tmp_path, "dataset=pascal", f"dataset.root={root}", f"dataset.split_dir={root / 'splits'}",
                     "split=92", "model=deeplabv3plus_small", "dataset.num_workers=0", "dataset.batch_size_labeled=2",
                     "dataset.batch_size_unlabeled=2")
    assert f"{lab[0]}.png' has values [40] outside [0, 21)" in line


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["cityscapes", "pascal", "coco"])
def test_real_layout_trees_train(tmp_path: Path, capsys: pytest.CaptureFixture[str], layout: str) -> None:
    """``dataset=<layout> dataset.root=... dataset.split_dir=... split=...`` trains one tiny epoch and validates
    with the preset's protocol (Cityscapes: sliding window; PASCAL/COCO: centre crop, shrunk to 32)."""
    if layout == "cityscapes":
        root, split = cityscapes_tree(tmp_path / "d", size=(64, 96))[0], "372"
        extra = ["dataset.val_crop_size=64", "dataset.label_format=labelIds", "optim.lr_scaling=linear"]
        protocol = "sliding window 64x64, stride 43"
    elif layout == "pascal":
        root, split = pascal_tree(tmp_path / "d")[0], "92"
        extra, protocol = ["dataset.val_crop_size=32"], "center crop 32x32"
    else:
        root, split = coco_tree(tmp_path / "d"), "1_128"
        extra, protocol = ["dataset.val_crop_size=32"], "center crop 32x32"
    cfg = compose_cfg(
        f"dataset={layout}", f"dataset.root={root}", f"dataset.split_dir={root / 'splits'}", f"split={split}",
        "model=deeplabv3plus_small", "dataset.crop_size=32", "dataset.batch_size_labeled=2",
        "dataset.batch_size_unlabeled=2", "dataset.num_workers=0", "trainer.max_epochs=1", "trainer.accelerator=cpu",
        "brpg=none", "callbacks.progress_bar.refresh_rate=0", *extra, output_dir=tmp_path / "run",
    )
    summary, objects = train(cfg)
    out = capsys.readouterr().out
    assert f"evaluation protocol ({layout}): {protocol}" in out
    if layout == "cityscapes":
        assert "optim.lr_scaling=linear: backbone lr 0.005 -> 0.00125" in out  # 2 x 1 device / reference 8
    assert objects["module"].eval_protocol.mode == cfg.dataset.val_mode
    assert 0.0 <= summary["final_mIoU"] <= 1.0 and 0.0 <= summary["best_mIoU"] <= 1.0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["final_mIoU"] == summary["final_mIoU"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["unimatch", "unimatch_v2"])
def test_unimatch_on_dpt_dinov2_with_brpg_trains_on_a_real_layout(tmp_path: Path, method: str) -> None:
    """Today's frameworks and backbone on a user's PASCAL tree: ``method=unimatch|unimatch_v2 model=dpt_dinov2_small``
    (a narrow tiny ViT, no weights) with BRPG through clustering into the prototype stage, then evaluated."""
    from brpg_lightning.brpg.callback import brpg_callbacks
    from brpg_lightning.evaluate import run as evaluate
    from tests.models.test_dpt import TINY_OVERRIDES

    root = pascal_tree(tmp_path / "d")[0]
    cfg = compose_cfg(
        "dataset=pascal", f"dataset.root={root}", f"dataset.split_dir={root / 'splits'}", "split=92",
        f"method={method}", *TINY_OVERRIDES, "dataset.crop_size=28", "dataset.val_crop_size=28",
        "dataset.batch_size_labeled=2", "dataset.batch_size_unlabeled=2", "dataset.num_workers=0",
        "trainer.max_epochs=3", "+trainer.limit_train_batches=2", "trainer.accelerator=cpu", "T_S1=1", "T_S2=2",
        "++brpg.grid=4", "++brpg.M_u=8", "++brpg.V=64", "++brpg.sample_num=8",
        "callbacks.progress_bar.refresh_rate=0", output_dir=tmp_path / "run",
    )
    summary, objects = train(cfg)
    assert next(iter(brpg_callbacks(objects["trainer"]).values())).memory.prototypes is not None
    assert np.isfinite(summary["metrics"]["train/L_pro"])
    miou = evaluate(compose_cfg(f"ckpt_path={summary['last_checkpoint']}", "trainer.accelerator=cpu",
                                f"report_dir={tmp_path / 'eval'}", config_name="evaluate"))
    assert miou == pytest.approx(summary["metrics"]["val/mIoU"], abs=1e-5)  # the stored protocol, same numbers
