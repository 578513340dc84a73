"""Semi-supervised diagnostics: the hidden unlabeled masks never reach a normal run; oracle, teacher-BN and PL quality."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from brpg_lightning.constants import IGNORE_INDEX
from brpg_lightning.data.datasets.folder import FolderDataset
from brpg_lightning.data.datasets.synthetic import ORACLE_MASK_DIR, generate_synthetic, render_synthetic_image
from brpg_lightning.errors import BRPGInputError
from brpg_lightning.methods.ema import EMATeacher
from brpg_lightning.methods.pseudo_label import PseudoLabelQuality
from tests.app.test_mean_teacher import C, Epoch, H, W, batch, make_module
from tests.conftest import compose_cfg


def test_unlabeled_folder_holds_no_masks_and_hidden_masks_are_true(tmp_path) -> None:
    root = generate_synthetic(tmp_path / "s", seed=3, split="16", num_classes=4, image_size=16, train_pool=20,
                              val_size=1)
    unlabeled = sorted(p.relative_to(root / "unlabeled") for p in (root / "unlabeled").rglob("*") if p.is_file())
    assert unlabeled == [p.relative_to(root / "unlabeled") for p in sorted((root / "unlabeled/images").glob("*"))]
    assert all(p.parts[0] == "images" for p in unlabeled) and len(unlabeled) == 4
    items = FolderDataset(root, "unlabeled", 4)  # the reader every normal run uses
    assert all("mask" not in items[i] for i in range(len(items)))
    hidden = FolderDataset(root, "unlabeled", 4, hidden_mask_dir=root / ORACLE_MASK_DIR)
    for i, name in enumerate(hidden.names):  # the hidden mask is the generator's true mask of that image
        index = int(name.split("_")[1])
        _, mask = render_synthetic_image(np.random.default_rng([3, 1, index]), 16, 4)
        assert np.array_equal(hidden[i]["mask"], mask)


def test_oracle_and_hidden_masks_are_off_by_default() -> None:
    cfg = compose_cfg()
    assert cfg.dataset.oracle_mask_dir is None
    assert cfg.method.pl_oracle is False and cfg.method.teacher_forward == "student_batch"  # the official teacher


def test_oracle_without_hidden_masks_is_refused() -> None:
    module = make_module(pl_oracle=True)
    Epoch(module, epoch=1)
    module.log = lambda *a, **k: None
    with pytest.raises(BRPGInputError, match="oracle_mask_dir"):
        module.compute_step(batch())


def test_oracle_pseudo_labels_are_the_true_masks() -> None:
    module = make_module(pl_oracle=True)
    Epoch(module, epoch=1)
    module.log = lambda *a, **k: None
    b = batch()
    true = torch.randint(0, C, (2, H, W), generator=torch.Generator().manual_seed(5))
    true[0, :4] = IGNORE_INDEX  # padding of the weak view
    b["unlabeled"]["mask"] = true
    b["unlabeled"]["valid"] = true != IGNORE_INDEX
    ctx = module.compute_step(b)
    assert torch.equal(ctx.pseudo_labels, true)
    assert torch.equal(ctx.pseudo_confidence, (true != IGNORE_INDEX).float())
    q = module.pl_quality.summary(["a", "b", "c"])  # the quality logger sees perfect labels, all kept
    assert q["kept"] == 1.0 and q["acc_kept"] == 1.0


def test_ema_without_buffers_matches_hand_lerp() -> None:
    student = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    teacher = EMATeacher(student, decay=0.5, ramp=False, buffers=False)
    with torch.no_grad():
        student[0].weight.add_(1.0)
        student[1].running_mean.add_(3.0)
    w_t, w_s = teacher.module[0].weight.clone(), student[0].weight.clone()
    teacher.update(student)
    assert torch.allclose(teacher.module[0].weight, 0.5 * w_t + 0.5 * w_s)
    assert torch.equal(teacher.module[1].running_mean, torch.zeros(2))


def test_pseudo_label_quality_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    true = torch.randint(0, 3, (2, 5, 6), generator=g)
    true[0, 0] = IGNORE_INDEX
    pseudo = torch.randint(0, 3, (2, 5, 6), generator=g)
    keep = torch.rand(2, 5, 6, generator=g) > 0.4
    valid = torch.rand(2, 5, 6, generator=g) > 0.1
    q = PseudoLabelQuality(3)
    q.update(pseudo[:1], keep[:1], valid[:1], true[:1])
    q.update(pseudo[1:], keep[1:], valid[1:], true[1:])
    s = q.summary(["a", "b", "c"])
    t, p, k, v = (x.flatten().tolist() for x in (true, pseudo, keep, valid))
    ok = [i for i in range(len(t)) if v[i] and t[i] != IGNORE_INDEX]
    kept = [i for i in ok if k[i]]
    assert s["kept"] == pytest.approx(len(kept) / len(ok))
    assert s["acc_kept"] == pytest.approx(sum(t[i] == p[i] for i in kept) / len(kept))
    assert s["acc_all"] == pytest.approx(sum(t[i] == p[i] for i in ok) / len(ok))
    for c, name in enumerate("abc"):
        of_c = [i for i in kept if t[i] == c]
        assert s[f"acc_kept_true/{name}"] == pytest.approx(sum(p[i] == c for i in of_c) / len(of_c))
        said_c = [i for i in kept if p[i] == c]
        assert s[f"acc_kept/{name}"] == pytest.approx(sum(t[i] == c for i in said_c) / len(said_c))
        assert s[f"kept/{name}"] == pytest.approx(len(of_c) / len([i for i in ok if t[i] == c]))
