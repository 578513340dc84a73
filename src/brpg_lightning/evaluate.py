"""``python -m brpg_lightning.evaluate ckpt_path=PATH [dataset=PRESET] [split=NAME] [dataset.<key>=VALUE ...]``.

The run's configuration travels inside the checkpoint (``hyper_parameters.run_config``), so the model,
method and dataset are rebuilt exactly and validated with the protocol stored in the checkpoint
(``checkpoint.stored_eval_protocol``: mode, crop and stride; ``trainer.validate``: the same ``validation_step``
as during training). ``dataset=PRESET`` (a ``conf/dataset`` option, with its own protocol) and ``dataset.*``
entries given on the command line override the stored dataset (another root; ``val_mode``, ``val_crop_size``,
``val_stride`` replace the stored protocol's fields); ``split=NAME`` the stored split. Evaluates the method's
``eval_model``: the teacher's classification head for mean teacher (paper Sec. 4.1.6).

Prints the mIoU and a per-class IoU table, and writes both next to the checkpoint as
``<checkpoint stem>.eval.json`` and ``<checkpoint stem>.eval.md`` (``output=<folder>`` puts them elsewhere,
``report=false`` skips them). The report folder is checked before the evaluation starts: a folder that cannot
be written is a one-line error then, not after the evaluation.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from brpg_lightning.checkpoint import (
    check_class_count,
    check_weights_fit,
    load_checkpoint,
    stored_align_corners,
    stored_eval_protocol,
)
from brpg_lightning.cli import exit_on_bad_input
from brpg_lightning.config import check_mandatory, config_dir, register_resolvers
from brpg_lightning.errors import BRPGInputError
from brpg_lightning.models.inference import EvalProtocol

register_resolvers()

__all__ = ["evaluate", "report", "write_report", "load_checkpoint", "run", "main"]


def eval_protocol_for(ckpt: dict[str, Any], overrides: dict[str, Any]) -> EvalProtocol:
    """The checkpoint's stored protocol with the command line's protocol keys in place of its fields; a preset
    (``dataset=PRESET``, whose entries carry ``_target_``) brings its own protocol whole."""
    if "_target_" in overrides:
        return EvalProtocol.from_dataset(overrides)
    stored = stored_eval_protocol(ckpt)
    return EvalProtocol(
        overrides.get("val_mode", stored.mode),
        overrides.get("val_crop_size", stored.crop_size),
        overrides.get("val_stride", stored.stride),
    )


def run_config_for(cfg: DictConfig, ckpt: dict[str, Any]) -> DictConfig:
    """The checkpoint's run config with the command line's ``split`` and ``dataset`` entries merged in,
    ``model.align_corners`` set to the geometry the network was trained with (False for a checkpoint written
    before the key existed: the segmentor's default would otherwise change it), and the dataset's protocol keys
    set to :func:`eval_protocol_for` (so the datamodule and the module read the checkpoint's protocol)."""
    run_cfg = OmegaConf.create(ckpt["hyper_parameters"]["run_config"])
    overrides = OmegaConf.to_container(cfg.dataset, resolve=True, throw_on_missing=False) if cfg.get("dataset") else {}
    stored = int(ckpt["hyper_parameters"]["run_config"]["model"]["num_classes"])
    if "_target_" in overrides and overrides.get("num_classes") == "???":
        # another dataset with the checkpoint's class count taken on trust would be scored under made-up names
        # (class_0..) with the classes it lacks counted as misses: the count is the user's to state
        raise BRPGInputError(
            f"dataset.num_classes is not set for the dataset evaluated (dataset={overrides.get('name')}, root "
            f"{overrides.get('root')}); the checkpoint's model has {stored} classes: pass dataset.num_classes={stored} "
            f"if its masks hold ids 0..{stored - 1} (a dataset with another class count cannot be evaluated with "
            f"this model)"
        )
    overrides = {k: v for k, v in overrides.items() if v != "???"}  # a preset's mandatory keys keep stored values
    if "_target_" not in overrides:  # no preset chosen: only the keys given on the command line
        overrides = {k: v for k, v in overrides.items() if v is not None}
    with open_dict(run_cfg):
        run_cfg.model.align_corners = stored_align_corners(ckpt)
        if cfg.get("split") is not None:
            run_cfg.split = cfg.split
            run_cfg.dataset.split = cfg.split
        if overrides:
            run_cfg.dataset = OmegaConf.merge(run_cfg.dataset, overrides)
        protocol = eval_protocol_for(ckpt, overrides)
        run_cfg.dataset.val_mode, run_cfg.dataset.val_crop_size = protocol.mode, protocol.crop_size
        run_cfg.dataset.val_stride = protocol.stride
    check_class_count(ckpt, run_cfg.dataset.num_classes, cfg.get("ckpt_path"),
                      f"expected a dataset of {stored} classes (a model scores only the classes it was trained on)")
    return run_cfg


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Rebuild the run from the checkpoint and validate it.

    Returns ``{"val/mIoU": ..., "val/IoU/<class>": ..., ...}`` as logged by ``validation_step``.
    """
    import pytorch_lightning as pl

    from brpg_lightning.train import build_datamodule, build_module

    ckpt = load_checkpoint(cfg.ckpt_path)
    run_cfg = run_config_for(cfg, ckpt)
    datamodule = build_datamodule(run_cfg)
    module = build_module(run_cfg, class_names=datamodule.class_names)
    check_weights_fit(module.state_dict(), ckpt["state_dict"], cfg.ckpt_path, "the model of its own run config")
    module.load_state_dict(ckpt["state_dict"])
    trainer = pl.Trainer(
        **OmegaConf.to_container(cfg.trainer), logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    datamodule.prepare_data()
    results = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    out: dict[str, Any] = {k: float(v) for k, v in results.items()}
    out["_dataset"] = {
        "name": str(run_cfg.dataset.get("name")), "root": str(run_cfg.dataset.get("root")),
        "split": str(run_cfg.get("split")), "val_mode": str(run_cfg.dataset.get("val_mode")),
        "val_images": len(datamodule.val_set) if datamodule.val_set is not None else None,
    }
    out["_class_names"] = list(datamodule.class_names)
    return out


def report(results: dict[str, Any], ckpt_path: str | Path) -> dict[str, Any]:
    """The report: checkpoint, dataset, ``mIoU`` and ``per_class`` ``[{"class", "IoU"}]`` in class order."""
    names = results["_class_names"]
    return {
        "checkpoint": str(Path(ckpt_path).resolve()),
        "evaluated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "dataset": results["_dataset"],
        "metric": "dataset-level IoU, ignore index 255 (torchmetrics MulticlassJaccardIndex)",
        "mIoU": results["val/mIoU"],
        "per_class": [{"class": n, "IoU": results.get(f"val/IoU/{n}", float("nan"))} for n in names],
    }


def markdown_table(rep: dict[str, Any]) -> str:
    """The report as markdown: a header line and a ``| class | IoU |`` table ending with the mIoU row."""
    ds = rep["dataset"]
    lines = [
        f"# Evaluation of `{Path(rep['checkpoint']).name}`",
        "",
        f"Dataset `{ds['name']}` (split {ds['split']}, {ds['val_images']} val images, protocol `{ds['val_mode']}`), "
        f"root `{ds['root']}`; {rep['metric']}.",
        "",
        "| class | IoU |",
        "|---|---|",
        *(f"| {row['class']} | {row['IoU']:.4f} |" for row in rep["per_class"]),
        f"| **mIoU** | **{rep['mIoU']:.4f}** |",
        "",
    ]
    return "\n".join(lines)


def write_report(rep: dict[str, Any], ckpt_path: str | Path, report_dir: str | Path | None = None) -> tuple[Path, Path]:
    """``<stem>.eval.json`` and ``<stem>.eval.md`` in ``report_dir`` (default: the checkpoint's folder)."""
    ckpt_path = Path(ckpt_path)
    folder = Path(report_dir) if report_dir else ckpt_path.parent
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / f"{ckpt_path.stem}.eval.json", folder / f"{ckpt_path.stem}.eval.md"
    json_path.write_text(json.dumps(rep, indent=2))
    md_path.write_text(markdown_table(rep))
    return json_path, md_path


def report_folder(cfg: DictConfig) -> Path | None:
    """Where the reports go: ``output`` (``report_dir``, its older name), else the checkpoint's folder; None with
    ``report=false``."""
    if not cfg.get("report", True):
        return None
    output, older = cfg.get("output"), cfg.get("report_dir")
    if output is not None and older is not None and Path(output) != Path(older):
        raise BRPGInputError(f"output={output} and report_dir={older} differ; report_dir is output's older name, pass one")
    chosen = output if output is not None else older
    return Path(chosen) if chosen is not None else Path(cfg.ckpt_path).parent


def check_report_folder(folder: Path) -> None:
    """Refuse a report folder that cannot be written, before the evaluation runs (a read-only checkpoint
    folder would otherwise fail after the whole evaluation, with the result unprinted):
    :func:`brpg_lightning.run_dir.check_writable_folder`, as ``predict`` and ``export`` check theirs."""
    from brpg_lightning.run_dir import check_writable_folder

    try:
        check_writable_folder(folder, "output")
    except BRPGInputError as exc:
        raise BRPGInputError(f"{exc} for the reports, or report=false") from None


def check_no_report(folder: Path, ckpt_path: str | Path, overwrite: bool) -> None:
    """An earlier report of this checkpoint is replaced only with ``overwrite=true``: the rule of ``predict``
    and ``export`` too (an evaluation on another dataset or protocol would otherwise erase the first one's)."""
    stem = Path(ckpt_path).stem
    existing = [p for p in (folder / f"{stem}.eval.json", folder / f"{stem}.eval.md") if p.exists()]
    if existing and not overwrite:
        raise BRPGInputError(
            f"{existing[0]}: a report of this checkpoint already exists; pass overwrite=true to replace it, or "
            f"output=<folder> for another"
        )


def run(cfg: DictConfig) -> float:
    check_mandatory(cfg, ("ckpt_path",))
    folder = report_folder(cfg)
    if folder is not None:
        check_report_folder(folder)
        check_no_report(folder, cfg.ckpt_path, bool(cfg.get("overwrite")))
    results = evaluate(cfg)
    rep = report(results, cfg.ckpt_path)
    width = max(len(row["class"]) for row in rep["per_class"])
    for row in rep["per_class"]:
        print(f"{row['class']:>{width}s}  {row['IoU']:.4f}")
    # the result first: a report that still fails to write (the folder changed meanwhile) loses nothing
    print(f"val/mIoU = {rep['mIoU']:.4f} ({cfg.ckpt_path})", flush=True)
    if folder is not None:
        try:
            json_path, md_path = write_report(rep, cfg.ckpt_path, folder)
        except OSError as exc:
            raise BRPGInputError(
                f"cannot write the reports into '{folder}' ({exc.strerror}); the result is printed above; pass "
                f"output=<folder> for the reports"
            ) from None
        print(f"report: {json_path} {md_path}")
    return rep["mIoU"]


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="evaluate")
def main(cfg: DictConfig) -> float:
    return exit_on_bad_input(run)(cfg)


if __name__ == "__main__":
    main()
