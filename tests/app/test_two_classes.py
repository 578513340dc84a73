"""Two-class data (background / foreground) through BRPG end to end: banks, APO with C = 2, clustering, L_pro.

U2PL's unreliable-pixel negatives break with two classes (U2PL issue #11); BRPG's banks, APO's percentile rule
and the prototype loss are checked here on a generated binary folder dataset.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
from PIL import Image

from brpg_lightning.brpg.callback import brpg_callbacks
from tests.conftest import compose_cfg

SIZE = 32


def binary_folder(root: Path, seed: int = 0) -> Path:
    """``<root>/{labeled,unlabeled,val}``: dark noise with one bright square (the foreground, mask 1), 4 labeled,
    8 unlabeled, 2 val images; a classes file names the two classes."""
    rng = np.random.default_rng(seed)

    def pair(sub: str, name: str, mask: bool = True) -> None:
        img = rng.integers(0, 80, (SIZE, SIZE, 3), dtype=np.uint8)
        m = np.zeros((SIZE, SIZE), np.uint8)
        y, x = rng.integers(4, SIZE // 2, 2)
        m[y:y + 12, x:x + 12] = 1
        img[m == 1] += 150
        (root / sub / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / sub / "images" / f"{name}.png")
        if mask:
            (root / sub / "masks").mkdir(parents=True, exist_ok=True)
            Image.fromarray(m).save(root / sub / "masks" / f"{name}.png")

    for i in range(4):
        pair("labeled", f"l{i}")
    for i in range(8):
        pair("unlabeled", f"u{i}", mask=False)
    for i in range(2):
        pair("val", f"v{i}")
    (root / "classes.txt").write_text("background\nforeground\n")
    return root


def test_binary_folder_runs_through_clustering_and_l_pro(tmp_path: Path) -> None:
    """Mean teacher + BRPG cpg_apo, 3 epochs (sup-only, sampling, prototypes) on the binary folder dataset."""
    from brpg_lightning.train import train

    root = binary_folder(tmp_path / "data")
    cfg = compose_cfg(
        "dataset=folder", f"dataset.root={root}", "dataset.num_classes=2", f"dataset.classes_file={root / 'classes.txt'}",
        f"dataset.crop_size={SIZE}", "dataset.batch_size_labeled=2", "dataset.batch_size_unlabeled=2",
        "dataset.batch_size_val=2", "dataset.num_workers=0", "dataset.persistent_workers=false",
        "trainer.max_epochs=3", "trainer.accelerator=cpu", "+trainer.limit_train_batches=3",
        "+trainer.limit_val_batches=1", "trainer.log_every_n_steps=1", "callbacks.progress_bar.refresh_rate=0",
        "model.weights_path=null", "sup_only_epochs=1", "T_S1=1", "T_S2=2", "++brpg.V=400", "++brpg.sample_num=50",
        "++brpg.M_u=20", "++brpg.grid=8", "++brpg.snapshot_per_class=10",
        output_dir=tmp_path / "run",
    )
    summary, objects = train(cfg)
    callback = brpg_callbacks(objects["trainer"])["student"]
    stats = callback.statistics()
    assert stats["stage"] == "prototype" and stats["classes_without_prototypes"] == []

    memory = callback.memory
    assert memory.prototypes.shape[0] == 2 and memory.proto_mask.any(1).tolist() == [True, True]
    assert bool(memory.prototypes[memory.proto_mask].isfinite().all())
    # APO with C = 2 (paper rule, alpha_t 0.05): gamma lies just above the lower score, so in each bank exactly
    # the class with the lower cosine dispersion gets n_add = 1 extra prototype (both banks hold both classes here)
    dispersion, extra = memory.last_stats["dispersion"], memory.last_stats["apo_extra"]
    assert memory.last_fill.min() > 0 and tuple(extra.shape) == (2, 2)
    for scores, picks in zip(dispersion.tolist(), extra.tolist(), strict=True):
        assert scores[0] != scores[1]
        assert picks == [int(s == min(scores)) for s in scores]
    per_class = memory.proto_mask.sum(1).tolist()
    assert per_class == [2 + 2 + int(extra[0, c] + extra[1, c]) for c in range(2)]  # n0_h + n0_lw + APO extra

    with (Path(tmp_path / "run") / "csv" / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    l_pro = [float(r["train/L_pro"]) for r in rows if r.get("train/L_pro")]
    assert len(l_pro) == 3 and all(math.isfinite(v) and v > 0 for v in l_pro)  # the 3 steps of epoch 2
    assert any(r.get("val/IoU/foreground") for r in rows) and any(r.get("val/IoU/background") for r in rows)
    assert 0.0 <= summary["final_mIoU"] <= 1.0
