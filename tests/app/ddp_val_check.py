"""Validation over 2 gloo ranks against one device, on a validation set that 2 ranks cannot split evenly.

Test-only script (``tests/app/test_ddp.py``): ``python tests/app/ddp_val_check.py <out dir> <data root>``, with
the repository root on ``PYTHONPATH``. Lightning's DDP launcher starts rank 1 by running this same command.
Both ranks build the same seeded module (one that never trained: its BatchNorm buffers are the same on both
ranks, which a ``ddp_cpu`` run's are not) and run ``trainer.validate``; rank 0 then evaluates the whole set on
its own with a metric that does not synchronise, and every rank writes the image indices it validated.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassJaccardIndex

from brpg_lightning.constants import IGNORE_INDEX
from brpg_lightning.data.datamodule import collate_val
from brpg_lightning.train import build, build_datamodule, build_module
from tests.conftest import TINY, compose_cfg

VAL_SIZE = 7
"""Odd: a padding sampler would give rank 1 one of rank 0's images again."""


def main(out: Path, root: str) -> None:
    cfg = compose_cfg(*TINY, "trainer=ddp_cpu", f"dataset.root={root}", f"dataset.synthetic.val_size={VAL_SIZE}",
                      "dataset.batch_size_val=2", "trainer.limit_val_batches=1.0", output_dir=out)
    pl.seed_everything(0)
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, class_names=datamodule.class_names)
    trainer = build(cfg.trainer, callbacks=[], logger=False, enable_checkpointing=False, enable_progress_bar=False)
    ddp = trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val/mIoU"]
    indices = list(iter(trainer.val_dataloaders.sampler))
    result = {"world_size": trainer.world_size, "indices": indices, "ddp_mIoU": float(ddp)}
    if trainer.is_global_zero:
        single = MulticlassJaccardIndex(module.num_classes, ignore_index=IGNORE_INDEX, average="macro",
                                        sync_on_compute=False)
        module.eval()
        with torch.no_grad():
            for batch in DataLoader(datamodule.val_set, batch_size=2, collate_fn=collate_val):
                masks = batch["mask"]
                single.update(module.predict_logits(batch["image"], tuple(masks.shape[-2:])).argmax(1), masks)
        result["single_mIoU"] = float(single.compute())
    (out / f"val_rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
