"""``train(cfg)``: build the run from a composed config, fit, and report metrics.

Called by ``python -m brpg_lightning`` (the Hydra entry point in ``__main__``) and directly by tests.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from brpg_lightning.checkpoint import check_resumable, load_checkpoint
from brpg_lightning.config import check_mandatory
from brpg_lightning.errors import BRPGInputError, BRPGRunError, input_error_in
from brpg_lightning.methods.optimizers import check_optim
from brpg_lightning.models.inference import EvalProtocol
from brpg_lightning.run_dir import check_run_dir as check_directory

log = logging.getLogger(__name__)


def build(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that lets a :class:`BRPGInputError` through unwrapped (one-line errors)."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as exc:
        cause = input_error_in(exc)
        if cause is not None:
            raise cause from None
        raise


def method_networks(cfg: DictConfig) -> tuple[str, ...]:
    """The method's network names (``SegmentationModule.networks``; CPS has two)."""
    return tuple(getattr(get_class(cfg.method._target_), "networks", ("student",)))


def brpg_enabled(cfg: DictConfig) -> bool:
    """Whether the run trains with BRPG: the ``brpg`` group is an option (``cpg_apo``, ``cpg``, ``plain``), not null
    (``brpg=none``, ``~brpg``, an experiment's ``override /brpg: null``).

    Without BRPG, ``++brpg.<key>=...`` overrides still create a ``brpg`` node, without ``_target_``: a sweep passes
    the same overrides to rows with and without BRPG (``experiment=ablation/table6``), so such a node is ignored.
    """
    brpg = cfg.get("brpg")
    return brpg is not None and "_target_" in brpg


def build_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """Trainer callbacks from ``cfg.callbacks`` plus one BRPG callback per network when BRPG is on."""
    callbacks = [build(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    if cfg.get("brpg") is not None and not brpg_enabled(cfg):
        log.warning("BRPG is off; ignoring %s", ", ".join(f"brpg.{key}" for key in cfg.brpg))
    if brpg_enabled(cfg):
        brpg = cfg.brpg
        names = method_networks(cfg)
        for name in names:
            extra = {} if len(names) == 1 else {"network": name}
            callbacks.append(build(brpg, _convert_="all", **extra))
    return callbacks


def build_loggers(cfg: DictConfig) -> list[Any]:
    return [build(c) for c in (cfg.get("logger") or {}).values() if c is not None]


def build_module(cfg: DictConfig, class_names: list[str] | None = None) -> pl.LightningModule:
    """The method's LightningModule around a freshly built segmentor, evaluating with the dataset config's
    protocol (the one the datamodule's val transform prepares the data for)."""
    segmentor = build(cfg.model)
    # further networks (CPS): the same config built again, so each random draw differs
    extra = {f"segmentor{i + 1}": build(cfg.model) for i in range(1, len(method_networks(cfg)))}
    run_config = OmegaConf.to_container(cfg, resolve=True)
    protocol = EvalProtocol.from_dataset(run_config.get("dataset") or {})
    return build(
        cfg.method, segmentor=segmentor, class_names=class_names, run_config=run_config,
        eval_protocol=protocol.as_dict(), _convert_="all", _recursive_=False, **extra,
    )


def build_datamodule(cfg: DictConfig) -> pl.LightningDataModule:
    from brpg_lightning.data.datamodule import method_option

    method_cls = get_class(cfg.method._target_)
    return build(
        cfg.dataset, use_unlabeled=getattr(method_cls, "uses_unlabeled", True),
        method=method_option(cfg.method._target_), strong_views=getattr(method_cls, "strong_views", 1),
        seed=int(cfg.get("seed") or 0), _convert_="all",
    )


def output_dir(cfg: DictConfig) -> Path:
    try:
        return Path(cfg.paths.output_dir)
    except Exception:  # noqa: BLE001 - outside a Hydra run (direct calls in tests)
        return Path(cfg.trainer.default_root_dir)


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Fit the configured method; returns ``(metrics, objects)``.

    Writes into the run directory: ``checkpoints/`` (best ``val/mIoU`` and ``last.ckpt``), ``csv/metrics.csv``
    (CSV logger), and ``metrics.json`` with the final and best mIoU.
    """
    check_run(cfg)
    threads = cfg.get("num_threads")
    if threads is not None:
        torch.set_num_threads(threads)
    pl.seed_everything(int(cfg.seed), workers=True)
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, class_names=datamodule.class_names)
    callbacks = build_callbacks(cfg)
    trainer: pl.Trainer = build(cfg.trainer, callbacks=callbacks, logger=build_loggers(cfg) or False)

    if trainer.is_global_zero:  # a writer killed mid-write left its temporary file beside the intact checkpoint
        for path in remove_stale_temporaries_of(trainer):
            log.info("removed %s, the temporary file of a checkpoint write that was interrupted", path)
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is not None:  # a missing, truncated or foreign file: one line naming a good one beside it
        # another method, class count or model: one line now, not load_state_dict's error inside fit
        check_resumable(load_checkpoint(ckpt_path, mmap=True), module, OmegaConf.to_container(cfg, resolve=True),
                        ckpt_path)
        from brpg_lightning.callbacks.resume import CsvLogPosition

        for callback in (c for c in callbacks if isinstance(c, CsvLogPosition)):
            callback.capture(trainer.loggers)  # before fit, whose logger set-up deletes the CSV file
    watch_ranks(trainer, output_dir(cfg))
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)

    summary = fit_summary(trainer, module)
    failure = run_failure(trainer, summary)
    if failure is not None:  # no metrics.json: the run did not finish (sweep and benchmark tools skip finished runs)
        raise BRPGRunError(failure)
    if cfg.get("test_after_fit") and summary["best_checkpoint"]:
        trainer.test(module, datamodule=datamodule, ckpt_path="best")
    out = output_dir(cfg)
    if trainer.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    return summary, {"trainer": trainer, "module": module, "datamodule": datamodule, "cfg": cfg}


def watch_ranks(trainer: pl.Trainer, out: Path) -> None:
    """In a multi-process fit, every rank's failure goes through ``<run dir>/.rank-error`` (``cli.RANK_ERROR_FILE``):
    one line, once, whichever rank meets the bad file. Rank 0 removes a record left by an earlier run in the
    directory before its other ranks start."""
    from brpg_lightning import cli
    from brpg_lightning.run_dir import is_first_launch

    cli.RANK_ERROR_FILE = None
    if trainer.world_size <= 1:
        return
    cli.RANK_ERROR_FILE = out / ".rank-error"
    if trainer.global_rank == 0 and is_first_launch():
        out.mkdir(parents=True, exist_ok=True)
        cli.RANK_ERROR_FILE.unlink(missing_ok=True)


def remove_stale_temporaries_of(trainer: pl.Trainer) -> list[Path]:
    """``plugins.remove_stale_temporaries`` in every folder the trainer's callbacks write checkpoints to."""
    from brpg_lightning.plugins import remove_stale_temporaries

    folders = {str(d) for c in trainer.callbacks for d in (
        getattr(c, "dirpath", None), *(getattr(getattr(c, key, None), "parent", None) for key in ("path", "target"))
    ) if d}
    return [p for folder in sorted(folders) for p in remove_stale_temporaries(folder)]


def stop_reason(trainer: pl.Trainer) -> str | None:
    """Why ``fit`` ended, when it ended as asked: ``max_steps``/``max_epochs`` reached, early stopping, the
    ``max_time`` limit. None otherwise (an exception the loop swallowed, a callback setting ``should_stop``)."""
    from pytorch_lightning.callbacks import EarlyStopping, Timer
    from pytorch_lightning.callbacks.early_stopping import EarlyStoppingReason

    steps, epochs = trainer.max_steps, trainer.max_epochs
    if steps is not None and steps != -1 and trainer.global_step >= steps:
        return f"max_steps={steps} reached"
    if epochs is not None and epochs != -1 and trainer.current_epoch >= epochs:
        return f"max_epochs={epochs} reached"
    for callback in trainer.callbacks:
        if isinstance(callback, EarlyStopping) and callback.stopping_reason != EarlyStoppingReason.NOT_STOPPED:
            return f"early stopping at epoch {callback.stopped_epoch}: {callback.stopping_reason_message}"
        remaining = callback.time_remaining() if isinstance(callback, Timer) else None
        if remaining is not None and remaining <= 0.0:
            return "max_time reached"
    return None


def fit_summary(trainer: pl.Trainer, module: pl.LightningModule) -> dict[str, Any]:
    """What ``fit`` did: final and best mIoU (NaN when no validation ran), why it stopped, and the checkpoints
    it reports (the best ``val/mIoU`` one, and the last state: the end-of-fit checkpoint when one was written,
    else the last ``ModelCheckpoint``'s file); a checkpoint that does not exist on disk is reported as None."""
    from brpg_lightning.callbacks.resume import FinalCheckpoint

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    checkpoint_cb = trainer.checkpoint_callback  # the first ModelCheckpoint: best val/mIoU
    best = getattr(checkpoint_cb, "best_model_score", None)
    final = next((c.path for c in trainer.callbacks if isinstance(c, FinalCheckpoint) and c.path), None)
    # the last checkpoint callback that wrote a file (last.ckpt; a step-interval one that is off wrote nothing)
    written = [path for c in trainer.checkpoint_callbacks if (path := getattr(c, "best_model_path", "") or "")]
    last = final or (written[-1] if written else "")
    reported = {"best_checkpoint": getattr(checkpoint_cb, "best_model_path", "") or "", "last_checkpoint": str(last)}
    return {
        "final_mIoU": metrics.get("val/mIoU", float("nan")),
        "best_mIoU": float(best) if best is not None else float("nan"),
        "warmup_best_mIoU": module.warmup_best,
        "validated": "val/mIoU" in metrics,
        "stopped": stop_reason(trainer),
        "epoch": int(trainer.current_epoch),
        "global_step": int(trainer.global_step),
        **{key: path if path and Path(path).is_file() else None for key, path in reported.items()},
        "missing_checkpoints": [path for path in reported.values() if path and not Path(path).is_file()],
        "metrics": metrics,
    }


def run_failure(trainer: pl.Trainer, summary: dict[str, Any]) -> str | None:
    """One line when the run did not do what was asked, else None: it stopped before ``max_epochs``/``max_steps``
    with no stated reason, a checkpoint it reports is not on disk, or checkpointing is configured and nothing was
    written (checked on rank 0, which wrote them)."""
    from brpg_lightning.callbacks.resume import FinalCheckpoint

    where = f"{summary['epoch']} epochs, {summary['global_step']} steps"
    if summary["stopped"] is None:
        limits = f"max_epochs={trainer.max_epochs}" + (
            f", max_steps={trainer.max_steps}" if trainer.max_steps not in (None, -1) else "")
        return (f"training stopped after {where}, before {limits}, with no stated reason (early stopping, time limit "
                f"or pre-emption); see the run's log for the cause; last checkpoint: "
                f"{summary['last_checkpoint'] or 'none written'}")
    if trainer.is_global_zero and summary["missing_checkpoints"]:
        return (f"training ended ({summary['stopped']} after {where}) but the checkpoint it reports does not exist: "
                f"{', '.join(summary['missing_checkpoints'])}")
    writers = trainer.checkpoint_callbacks or [c for c in trainer.callbacks if isinstance(c, FinalCheckpoint)]
    if trainer.is_global_zero and writers and summary["last_checkpoint"] is None and summary["global_step"] > 0:
        return f"training ended ({summary['stopped']} after {where}) but wrote no checkpoint"
    return None


def check_config(cfg: DictConfig) -> None:
    """Cross-key checks Hydra cannot express (one-line errors); first, every mandatory key (``???``) is set."""
    check_mandatory(cfg)
    for key in ("dataset", "model", "method", "trainer"):
        if cfg.get(key) is None:
            raise BRPGInputError(f"config group '{key}' is empty; choose one, e.g. {key}=<option>")


def check_warmup_before_sampling(cfg: DictConfig) -> None:
    """``brpg.T_S1 >= sup_only_epochs``: the method's labeled-only warm-up ends before BRPG samples features.

    ``sup_only_epochs`` is the value the method receives (``method.sup_only_epochs``, the top-level key), null
    meaning the method class's ``default_sup_only_epochs``.
    """
    if not brpg_enabled(cfg):
        return
    method_cls = get_class(cfg.method._target_)
    default = int(getattr(method_cls, "default_sup_only_epochs", 0))
    given = cfg.method.get("sup_only_epochs")
    warmup = default if given is None else given
    t_s1 = cfg.brpg.get("T_S1")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (warmup, t_s1)):
        return  # the module and the callback name a malformed value themselves
    if t_s1 < warmup:
        shown = f"{warmup}" if given is not None else f"null (= {method_cls.__name__}'s {default})"
        raise BRPGInputError(
            f"brpg.T_S1={t_s1} < sup_only_epochs={shown}: BRPG would sample during the method's labeled-only "
            f"warm-up; set T_S1 >= {warmup} or sup_only_epochs <= {t_s1}"
        )


def check_run_dir(cfg: DictConfig) -> None:
    """The run directory holds no other run (``run_dir.check_run_dir``: resuming in place with ``ckpt_path`` and
    ``overwrite=true`` are allowed; only rank 0 judges)."""
    check_directory(output_dir(cfg), cfg.get("ckpt_path"), bool(cfg.get("overwrite")))


def check_run(cfg: DictConfig) -> None:
    """Start-up checks of ``train`` (one-line errors before any data or network is built): moved ``optim``
    keys, every value in its range (:mod:`brpg_lightning.validate`), the warm-up ending before BRPG's sampling, and a run directory that holds no other run."""
    from brpg_lightning.validate import check_train_values

    optim = cfg.method.get("optim") if cfg.get("method") is not None else None
    if optim is not None:
        check_optim(optim)
    check_train_values(cfg, brpg_enabled(cfg))
    check_warmup_before_sampling(cfg)
    threads = cfg.get("num_threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise BRPGInputError(f"num_threads={threads!r}; expected an integer >= 1 (torch intra-op threads) or null")
    check_run_dir(cfg)


def run(cfg: DictConfig) -> float:
    """Hydra task: check, train, print the final mIoU as the last line. Returns it (sweepers optimise it)."""
    check_config(cfg)
    summary, _ = train(cfg)
    log.info("run directory: %s", output_dir(cfg))
    print(final_report(summary), flush=True)
    return summary["final_mIoU"]


def final_report(summary: dict[str, Any]) -> str:
    """The end of a run: the per-class IoU of the last validation, then the final mIoU as the last line, beside
    the labeled-only warm-up's best (what the unlabeled data added) and the best epoch's. A run that ended before
    any validation says so, with why it ended and the checkpoint it wrote.

    Example:
        >>> print(final_report({"final_mIoU": 0.5, "best_mIoU": 0.52, "warmup_best_mIoU": 0.4,
        ...                     "best_checkpoint": "b.ckpt", "metrics": {"val/IoU/bg": 0.9, "val/IoU/cat": 0.1}}))
        per-class IoU (last validation): bg 0.9000 | cat 0.1000
        final val/mIoU = 0.5000 (last epoch; labeled-only warm-up best 0.4000, so +0.1000 from the unlabeled data; best epoch 0.5200, checkpoint b.ckpt)
        >>> print(final_report({"final_mIoU": float("nan"), "validated": False, "stopped": "max_steps=2 reached",
        ...                     "epoch": 0, "global_step": 2, "last_checkpoint": "last.ckpt", "metrics": {}}))
        no validation ran (max_steps=2 reached after 2 steps); checkpoint last.ckpt
    """
    if not summary.get("validated", True):
        return (f"no validation ran ({summary.get('stopped') or 'stopped'} after {summary.get('global_step')} steps); "
                f"checkpoint {summary.get('last_checkpoint')}")
    ious = {k[len("val/IoU/"):]: v for k, v in summary.get("metrics", {}).items() if k.startswith("val/IoU/")}
    lines = ["per-class IoU (last validation): " + " | ".join(f"{k} {v:.4f}" for k, v in ious.items())] if ious else []
    final, warmup = summary["final_mIoU"], summary.get("warmup_best_mIoU")
    versus = "" if warmup is None else (
        f"labeled-only warm-up best {warmup:.4f}, so {final - warmup:+.4f} from the unlabeled data; ")
    lines.append(f"final val/mIoU = {final:.4f} (last epoch; {versus}best epoch {summary['best_mIoU']:.4f}, "
                 f"checkpoint {summary['best_checkpoint']})")
    return "\n".join(lines)


__all__ = ["train", "run", "build_module", "build_datamodule", "build_callbacks", "check_run", "hydra"]
