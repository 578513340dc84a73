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

from brpg_lightning.config import check_mandatory
from brpg_lightning.errors import BRPGInputError, input_error_in
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
        method=method_option(cfg.method._target_), _convert_="all",
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

    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is not None and not Path(ckpt_path).is_file():
        raise BRPGInputError(f"ckpt_path={ckpt_path}: no such checkpoint file")
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    checkpoint_cb = trainer.checkpoint_callback  # the first ModelCheckpoint: best val/mIoU
    last_cb = trainer.checkpoint_callbacks[-1]
    best = getattr(checkpoint_cb, "best_model_score", None)
    summary = {
        "final_mIoU": metrics.get("val/mIoU", float("nan")),
        "best_mIoU": float(best) if best is not None else float("nan"),
        "warmup_best_mIoU": module.warmup_best,
        "best_checkpoint": getattr(checkpoint_cb, "best_model_path", ""),
        "last_checkpoint": getattr(last_cb, "best_model_path", ""),
        "metrics": metrics,
    }
    if cfg.get("test_after_fit"):
        trainer.test(module, datamodule=datamodule, ckpt_path="best")
    out = output_dir(cfg)
    if trainer.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    return summary, {"trainer": trainer, "module": module, "datamodule": datamodule, "cfg": cfg}


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
    keys, the warm-up ending before BRPG's sampling, and a run directory that holds no other run."""
    optim = cfg.method.get("optim") if cfg.get("method") is not None else None
    if optim is not None:
        check_optim(optim)
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
    the labeled-only warm-up's best (what the unlabeled data added) and the best epoch's.

    Example:
        >>> print(final_report({"final_mIoU": 0.5, "best_mIoU": 0.52, "warmup_best_mIoU": 0.4,
        ...                     "best_checkpoint": "b.ckpt", "metrics": {"val/IoU/bg": 0.9, "val/IoU/cat": 0.1}}))
        per-class IoU (last validation): bg 0.9000 | cat 0.1000
        final val/mIoU = 0.5000 (last epoch; labeled-only warm-up best 0.4000, so +0.1000 from the unlabeled data; best epoch 0.5200, checkpoint b.ckpt)
    """
    ious = {k[len("val/IoU/"):]: v for k, v in summary.get("metrics", {}).items() if k.startswith("val/IoU/")}
    lines = ["per-class IoU (last validation): " + " | ".join(f"{k} {v:.4f}" for k, v in ious.items())] if ious else []
    final, warmup = summary["final_mIoU"], summary.get("warmup_best_mIoU")
    versus = "" if warmup is None else (
        f"labeled-only warm-up best {warmup:.4f}, so {final - warmup:+.4f} from the unlabeled data; ")
    lines.append(f"final val/mIoU = {final:.4f} (last epoch; {versus}best epoch {summary['best_mIoU']:.4f}, "
                 f"checkpoint {summary['best_checkpoint']})")
    return "\n".join(lines)


__all__ = ["train", "run", "build_module", "build_datamodule", "build_callbacks", "check_run", "hydra"]
