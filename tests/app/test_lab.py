"""The diagnostics lab: hidden unlabeled masks only when asked and never in a normal run; the oracle, the
pseudo-label quality callback and the student's validation; no product module imports the lab."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from brpg_lightning.constants import IGNORE_INDEX
from brpg_lightning.data.datasets.folder import FolderDataset
from brpg_lightning.data.datasets.synthetic import ORACLE_MASK_DIR, generate_synthetic, render_synthetic_image
from brpg_lightning.errors import BRPGInputError
from brpg_lightning.lab.oracle import OracleMeanTeacher
from brpg_lightning.lab.quality import PseudoLabelQuality, quality_summary
from brpg_lightning.methods.context import TrainStepContext
from brpg_lightning.methods.cutmix import cutmix_box
from brpg_lightning.methods.ema import EMATeacher
from brpg_lightning.models.segmentor import Segmentor
from tests.app.test_mean_teacher import C, Epoch, H, W, batch
from tests.conftest import compose_cfg, optim_node


def test_unlabeled_folder_holds_no_masks_and_hidden_masks_are_true(tmp_path) -> None:
    small = dict(seed=3, split="16", num_classes=4, image_size=16, train_pool=20, val_size=1)
    root = generate_synthetic(tmp_path / "s", **small)
    assert not (root / ORACLE_MASK_DIR).exists()  # written only when a diagnostic asks
    generate_synthetic(tmp_path / "s", **small, oracle_masks=True)  # asked later: added to the existing set
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


def make_oracle(**kwargs) -> OracleMeanTeacher:
    torch.manual_seed(0)
    seg = Segmentor(C, encoder_name="resnet18", decoder_channels=16, feature_dim=8)
    return OracleMeanTeacher(seg, C, optim=optim_node(lr=0.01), sup_only_epochs=1, cutmix_p=0.0, **kwargs)


def test_hidden_masks_are_off_by_default_and_no_product_module_imports_the_lab() -> None:
    import pathlib

    cfg = compose_cfg()
    assert cfg.dataset.oracle_mask_dir is None
    assert cfg.method._target_ == "brpg_lightning.methods.mean_teacher.MeanTeacher"
    assert cfg.method.teacher_forward == "student_batch"  # the official teacher
    package = pathlib.Path(__file__).resolve().parents[2] / "src" / "brpg_lightning"
    product = [p for p in package.rglob("*.py") if "lab" not in p.relative_to(package).parts]
    assert product and not [p for p in product if "brpg_lightning.lab" in p.read_text()]
    diagnose = compose_cfg("experiment=diagnose/oracle")
    assert diagnose.method._target_ == "brpg_lightning.lab.oracle.OracleMeanTeacher"
    assert diagnose.dataset.oracle_mask_dir is not None
    assert {c._target_ for c in diagnose.callbacks.values() if c} >= {
        "brpg_lightning.lab.quality.PseudoLabelQuality", "brpg_lightning.lab.quality.StudentValidation"}


def test_oracle_without_hidden_masks_is_refused() -> None:
    module = make_oracle()
    Epoch(module, epoch=1)
    module.log = lambda *a, **k: None
    with pytest.raises(BRPGInputError, match="oracle_mask_dir"):
        module.method_step(batch())


def test_oracle_pseudo_labels_are_the_true_masks() -> None:
    module = make_oracle()
    Epoch(module, epoch=1)
    module.log = lambda *a, **k: None
    b = batch()
    true = torch.randint(0, C, (2, H, W), generator=torch.Generator().manual_seed(5))
    true[0, :4] = IGNORE_INDEX  # padding of the weak view
    b["unlabeled"]["mask"] = true
    b["unlabeled"]["valid"] = true != IGNORE_INDEX
    ctx = module.method_step(b)
    assert torch.equal(ctx.pseudo_labels, true)
    assert torch.equal(ctx.pseudo_confidence, (true != IGNORE_INDEX).float())
    assert torch.equal(ctx.unsup_keep, true != IGNORE_INDEX)  # every valid pixel kept


def test_quality_callback_mixes_the_true_masks_with_the_step_boxes() -> None:
    """The callback reads the step's pseudo-labels and keep-mask through the seam; the true masks of the batch
    are CutMix'd with the step's boxes before they are compared (brute force per pixel)."""
    g = torch.Generator().manual_seed(0)
    true = torch.randint(0, 3, (2, 6, 5), generator=g)
    true[0, 0] = IGNORE_INDEX
    boxes = torch.stack([cutmix_box(6, 5, g) for _ in range(2)])
    mixed = true.clone()
    for i in range(2):
        mixed[i][boxes[i]] = true[(i + 1) % 2][boxes[i]]
    pseudo = torch.randint(0, 3, (2, 6, 5), generator=g)
    pseudo[1, -1] = IGNORE_INDEX
    keep = (torch.rand(2, 6, 5, generator=g) > 0.4) & (pseudo != IGNORE_INDEX)

    class Module:
        num_classes, class_names, device, logged = 3, ["a", "b", "c"], torch.device("cpu"), {}

        def log(self, key, value, **kwargs):  # noqa: ANN001, ANN003, ANN201
            self.logged[key] = value

    module = Module()
    cb = PseudoLabelQuality()
    cb.setup(None, module, "fit")
    cb.on_train_batch_start(None, module, {"unlabeled": {"mask": true}}, 0)
    ctx = TrainStepContext(epoch=1, global_step=0, total_steps=1, labeled=None, labels=None, pseudo_labels=pseudo,
                           unsup_keep=keep, cutmix_boxes=boxes)
    cb.on_train_step_context(None, module, ctx)
    cb.on_train_epoch_end(None, module)
    t, p, k = (x.flatten().tolist() for x in (mixed, pseudo, keep))
    ok = [i for i in range(len(t)) if t[i] != IGNORE_INDEX and p[i] != IGNORE_INDEX]
    kept = [i for i in ok if k[i]]
    assert module.logged["pl/kept"] == pytest.approx(len(kept) / len(ok))
    assert module.logged["pl/acc_kept"] == pytest.approx(sum(t[i] == p[i] for i in kept) / len(kept))
    assert module.logged["pl/acc_all"] == pytest.approx(sum(t[i] == p[i] for i in ok) / len(ok))


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


def test_quality_summary_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    true = torch.randint(0, 3, (2, 5, 6), generator=g)
    true[0, 0] = IGNORE_INDEX
    pseudo = torch.randint(0, 3, (2, 5, 6), generator=g)
    keep = torch.rand(2, 5, 6, generator=g) > 0.4
    valid = torch.rand(2, 5, 6, generator=g) > 0.1
    t, p, k, v = (x.flatten().tolist() for x in (true, pseudo, keep, valid))
    ok = [i for i in range(len(t)) if v[i] and t[i] != IGNORE_INDEX]
    kept = [i for i in ok if k[i]]
    all_, kept_m = torch.zeros(3, 3, dtype=torch.long), torch.zeros(3, 3, dtype=torch.long)
    for i in ok:
        all_[t[i], p[i]] += 1
    for i in kept:
        kept_m[t[i], p[i]] += 1
    s = quality_summary(all_, kept_m, ["a", "b", "c"])
    assert s["kept"] == pytest.approx(len(kept) / len(ok))
    assert s["acc_kept"] == pytest.approx(sum(t[i] == p[i] for i in kept) / len(kept))
    assert s["acc_all"] == pytest.approx(sum(t[i] == p[i] for i in ok) / len(ok))
    for c, name in enumerate("abc"):
        of_c = [i for i in kept if t[i] == c]
        assert s[f"acc_kept_true/{name}"] == pytest.approx(sum(p[i] == c for i in of_c) / len(of_c))
        said_c = [i for i in kept if p[i] == c]
        assert s[f"acc_kept/{name}"] == pytest.approx(sum(t[i] == c for i in said_c) / len(said_c))
        assert s[f"kept/{name}"] == pytest.approx(len(of_c) / len([i for i in ok if t[i] == c]))
