"""DDP end to end: ``python -m brpg_lightning trainer=ddp_cpu`` (2 gloo processes on the CPU).

Every rank dumps its BRPG state (``tests/app/ddp_check.py: RankStateDump``); the banks after sampling, the
prototypes right after clustering and after the EMA updates, the weights and the validation mIoU must be
identical on both ranks, and right, which rank 0's state broadcast to rank 1 would not be: the banks hold both
ranks' samples in rank order (a one-process replay of the recorded pushes), the prototypes follow one-process
EMA updates on the summed statistics. Validation over 2 ranks equals one device's on a set 2 ranks cannot split
evenly. One run writes one run directory (the Hydra + DDP trap).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from brpg_lightning.brpg.memory_bank import MemoryBank
from brpg_lightning.brpg.prototype_update import ema_update
from tests.conftest import TINY

REPO_ROOT = Path(__file__).resolve().parents[2]
"""On the spawned processes' ``PYTHONPATH``: they import the test-only ``tests.app.ddp_check``."""


def _load(path: Path) -> dict:
    assert path.is_file(), path
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_equal(a, b, where: str) -> None:  # noqa: ANN001
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def _env() -> dict[str, str]:
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath}


def _replay_banks(r0: list, r1: list, like: dict) -> dict[str, dict[str, torch.Tensor]]:
    """One process pushing, step by step, rank 0's samples then rank 1's into banks shaped as ``like``'s."""
    banks = {}
    for name, state in like.items():
        c, v, d = state["feats"].shape
        banks[name] = MemoryBank(c, v, d, dtype=state["feats"].dtype)
    assert [p[0] for p in r0] == [p[0] for p in r1]  # the same pushes, in the same order, on both ranks
    for (name, f0, y0), (_, f1, y1) in zip(r0, r1, strict=True):
        banks[name].push(torch.cat([f0, f1]), torch.cat([y0, y1]))
    return {name: bank.state_dict() for name, bank in banks.items()}


def _check_ema(e0: list[dict], e1: list[dict], final: torch.Tensor) -> None:
    """Every EMA update used the sum of both ranks' statistics, and one process applying those updates from the
    clustered prototypes arrives at the run's final prototypes."""
    assert e0 and len(e0) == len(e1)
    protos = e0[0]["before"]
    for step, (a, b) in enumerate(zip(e0, e1, strict=True)):
        sums, counts = a["local_sums"] + b["local_sums"], a["local_counts"] + b["local_counts"]
        for rec in (a, b):
            assert torch.equal(rec["before"], protos), step
            assert torch.equal(rec["sums"], sums) and torch.equal(rec["counts"], counts), step
        protos = ema_update(protos, sums, counts, a["alpha"])
        assert torch.equal(a["after"], protos) and torch.equal(b["after"], protos), step
    assert torch.equal(final, protos)
    # rank 1's statistics mattered: rank 0's alone would have moved the prototypes elsewhere
    assert any(int(b["local_counts"].sum()) > 0 for b in e1)
    assert any(not torch.equal(ema_update(a["before"], a["local_sums"], a["local_counts"], a["alpha"]), a["after"])
               for a in e0)


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.parametrize("method", ["mean_teacher", "unimatch", "unimatch_v2"])
def test_ddp_cpu_ranks_hold_identical_banks_and_prototypes(tmp_path: Path, method: str) -> None:
    """Mean teacher, and the UniMatch methods through the same seam: BRPG's banks hold both ranks' pushes, its
    prototypes follow the summed statistics; UniMatch V2's EMA teacher took one update per optimiser step on
    both ranks; UniMatch V1's feature-perturbation loss was trained and its epoch value aggregated over ranks."""
    env = _env()
    args = [
        *TINY, "trainer=ddp_cpu", f"dataset.root={tmp_path / 'data'}", f"method={method}",
        "+callbacks.rank_state._target_=tests.app.ddp_check.RankStateDump",
        "+callbacks.rank_state.dirpath=${paths.output_dir}/ranks",
    ]
    proc = subprocess.run([sys.executable, "-m", "brpg_lightning", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = list((tmp_path / "outputs" / "train").iterdir())
    assert len(runs) == 1, runs  # one run, one directory, whatever the number of processes
    run = runs[0]
    assert (run / "metrics.json").is_file() and (run / ".hydra" / "config.yaml").is_file()
    ranks = run / "ranks"

    for epoch in range(3):  # 0 pretrain, 1 sampling, 2 prototype
        r0, r1 = _load(ranks / f"rank0_epoch{epoch}.pt"), _load(ranks / f"rank1_epoch{epoch}.pt")
        assert r0["world_size"] == 2 and r0["batches"] == r1["batches"] == 3
        assert r0["val_mIoU"] is not None
        # an epoch = one pass over the unlabeled set, split over the ranks: 24 unlabeled / (2 ranks x B_u 2)
        # batches per rank, and as many labeled batches (TINY: 40 images, 16 labeled; split 16)
        assert r0["loader_batches"] == r1["loader_batches"] == {"labeled": 6, "unlabeled": 6}
        _assert_equal(r0, r1, f"epoch{epoch}")  # banks / prototypes / thresholds / synced val mIoU
    sampling = _load(ranks / "rank0_epoch1.pt")
    assert int(sampling["bank_high"]["count"].sum()) + int(sampling["bank_low"]["count"].sum()) > 0
    # the banks are the union of both ranks' samples, rank 0's first, step after step
    p0, p1 = _load(ranks / "rank0_pushes.pt")["pushes"], _load(ranks / "rank1_pushes.pt")["pushes"]
    assert sum(len(y) for _, _, y in p1) > 0 and not all(torch.equal(a[1], b[1]) for a, b in zip(p0, p1, strict=True))
    banks = {k: sampling[k] for k in ("bank_high", "bank_low")}
    _assert_equal(_replay_banks(p0, p1, banks), banks, "replayed banks")
    c0, c1 = _load(ranks / "rank0_clustered.pt"), _load(ranks / "rank1_clustered.pt")
    assert c0["proto_mask"].any()
    for key in ("prototypes", "proto_mask"):
        assert torch.equal(c0[key], c1[key]), key
    final = _load(ranks / "rank0_epoch2.pt")
    assert not torch.equal(final["prototypes"], c0["prototypes"])  # EMA updates moved them, identically
    _check_ema(_load(ranks / "rank0_ema.pt")["ema"], _load(ranks / "rank1_ema.pt")["ema"], final["prototypes"])
    # epoch aggregates over both ranks are logged beside rank 0's per-step values
    metrics_csv = (run / "csv" / "metrics.csv").read_text()
    keys = ["train/loss_epoch", "train/L_u_epoch", "brpg/L_pro_l_epoch", "brpg/sampled_high_epoch",
            "train/unsup_kept_epoch"]
    for key in keys + (["train/L_fp_epoch"] if method == "unimatch" else []):
        assert key in metrics_csv, key
    # parameters (student and EMA teacher); BN running statistics are rank-local on CPU (no SyncBatchNorm)
    w0, w1 = _load(ranks / "rank0_student.pt"), _load(ranks / "rank1_student.pt")
    params = [k for k in w0 if "running_" not in k and "num_batches_tracked" not in k]
    assert any(k.startswith("teacher.") for k in params) == (method != "unimatch")
    _assert_equal({k: w0[k] for k in params}, {k: w1[k] for k in params}, "weights")
    if method == "unimatch_v2":  # its teacher follows from the first step: 3 epochs x 3 optimiser steps
        assert int(w0["teacher.steps"]) == int(w1["teacher.steps"]) == 9
    elif method == "mean_teacher":  # copied after the warm-up epoch, then one update per step: 2 epochs x 3
        assert int(w0["teacher.steps"]) == 6


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.parametrize(("rank", "batch"), [(1, 1), (None, 0)], ids=["rank 1 only", "every rank"])
def test_ddp_bad_file_is_one_line_once(tmp_path: Path, rank: int | None, batch: int) -> None:
    """A bad file met during training by rank 1 alone (rank 0 then waits in the gradient all-reduce for a rank
    that is gone), or by every rank at once (a bad mask value each process reads): one ``error:`` line, once,
    exit status 2, no traceback (gloo's "connection closed" on the waiting rank included)."""
    args = [*TINY, "trainer=ddp_cpu", f"dataset.root={tmp_path / 'data'}",
            "+callbacks.bad._target_=tests.app.ddp_check.BadFileOnRank",
            f"+callbacks.bad.rank={'null' if rank is None else rank}", f"+callbacks.bad.batch={batch}"]
    proc = subprocess.run([sys.executable, "-m", "brpg_lightning", *args], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-4000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert lines == ["error: mask 'labeled/masks/x.png' has values [7]; expected class ids 0..6 or 255"], proc.stderr
    assert "Traceback" not in proc.stderr and "Connection closed" not in proc.stderr, proc.stderr[-4000:]
    (run,) = (tmp_path / "outputs" / "train").iterdir()
    assert (run / ".rank-error").read_text().splitlines() == ["2", lines[0]]


def _val_worker(rank: int, world: int, port: int, cfg, results: dict) -> None:  # noqa: ANN001
    """One rank: the datamodule's validation loader under a gloo group, a fixed prediction per image (the mask
    rolled by one pixel, so the IoU depends on which images are counted) into torchmetrics' IoU, synced."""
    from pytorch_lightning.trainer.connectors.data_connector import _get_distributed_sampler
    from pytorch_lightning.trainer.states import RunningStage
    from pytorch_lightning.utilities.data import _update_dataloader
    from torch.utils.data import DistributedSampler
    from torchmetrics.classification import MulticlassJaccardIndex

    from brpg_lightning.train import build_datamodule

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        datamodule = build_datamodule(cfg)
        datamodule.setup("validate")
        loader = datamodule.val_dataloader()
        if not isinstance(loader.sampler, DistributedSampler):  # what Lightning's validation loop does then
            sampler = _get_distributed_sampler(loader, shuffle=False, overfit_batches=0, mode=RunningStage.VALIDATING,
                                               num_replicas=world, rank=rank)
            loader = _update_dataloader(loader, sampler, mode=RunningStage.VALIDATING)
        miou = MulticlassJaccardIndex(len(datamodule.class_names), ignore_index=255, average="macro")
        for batch in loader:
            miou.update(_fixed_prediction(batch["mask"]), batch["mask"])
        results[rank] = {"indices": list(iter(loader.sampler)), "mIoU": float(miou.compute())}
    finally:
        torch.distributed.destroy_process_group()


def _fixed_prediction(masks: torch.Tensor) -> torch.Tensor:
    pred = torch.roll(masks, 1, dims=-1)
    return pred.masked_fill(pred == 255, 0)


@pytest.mark.ddp
def test_ddp_validation_counts_every_image_once(tmp_path: Path) -> None:
    """7 validation images on 2 ranks: 4 + 3, none twice, and the synced mIoU is one process's over the 7
    (Lightning's default sampler would pad rank 1 with a repeat of rank 0's first image). The worker does what
    Lightning's validation loop does: it keeps a loader's own ``DistributedSampler`` and injects its default
    one otherwise."""
    import torch.multiprocessing as mp
    from torchmetrics.classification import MulticlassJaccardIndex

    from brpg_lightning.train import build_datamodule
    from tests.brpg.test_distributed import _free_port
    from tests.conftest import compose_cfg

    cfg = compose_cfg(*TINY, f"dataset.root={tmp_path / 'data'}", "dataset.synthetic.val_size=7",
                      "dataset.batch_size_val=2", output_dir=tmp_path / "run")
    OmegaConf.resolve(cfg)  # the spawned processes have no Hydra context to resolve ${hydra:...} in
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup("validate")
    single = MulticlassJaccardIndex(len(datamodule.class_names), ignore_index=255, average="macro")
    for batch in datamodule.val_dataloader():  # no process group: every image once, in order
        single.update(_fixed_prediction(batch["mask"]), batch["mask"])
    results = mp.Manager().dict()
    mp.spawn(_val_worker, args=(2, _free_port(), cfg, results), nprocs=2, join=True)
    r0, r1 = results[0], results[1]
    assert sorted(r0["indices"] + r1["indices"]) == list(range(7)) and len(r0["indices"]) == 4
    assert r0["mIoU"] == r1["mIoU"] == pytest.approx(float(single.compute()), abs=1e-6)


@pytest.mark.slow
def test_bf16_mixed_trains_and_evaluates_on_cpu(tiny_cfg) -> None:  # noqa: ANN001
    """``trainer.precision=bf16-mixed`` on the CPU: the three stages run, losses stay finite, mIoU is valid."""
    from brpg_lightning.train import train

    summary, objects = train(tiny_cfg("trainer.precision=bf16-mixed"))
    trainer = objects["trainer"]
    assert trainer.precision == "bf16-mixed"
    assert 0.0 <= summary["final_mIoU"] <= 1.0
    for key in ("train/loss", "brpg/L_pro_l"):
        assert torch.isfinite(trainer.callback_metrics[key]), key
    metrics = trainer.validate(objects["module"], datamodule=objects["datamodule"], verbose=False)[0]
    assert abs(metrics["val/mIoU"] - summary["final_mIoU"]) < 1e-6
