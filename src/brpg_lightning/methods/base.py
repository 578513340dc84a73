"""What every method shares: optimiser groups, poly schedule, evaluation, logging, the step seam.

A method subclass implements only :meth:`SegmentationModule.compute_step` (its forward passes and
losses) and, if it has a teacher, :attr:`SegmentationModule.eval_model`.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics.classification import MulticlassJaccardIndex

from brpg_lightning.constants import IGNORE_INDEX
from brpg_lightning.errors import BRPGInputError, NonFiniteLossError
from brpg_lightning.methods.context import StepContextHook, TrainStepContext
from brpg_lightning.methods.losses import SupervisedLoss
from brpg_lightning.methods.optimizers import check_optim, factory_lr, optimizer_factory
from brpg_lightning.methods.schedules import poly_lr_factor
from brpg_lightning.models.inference import EvalProtocol, sliding_window_logits
from brpg_lightning.models.output import SegmentorOutput, as_probabilities

LR_SCALINGS = ("none", "linear")
NONFINITE_LOSS = ("stop", "skip")


def scaled_lr(lr: float, rule: str, per_device_batch: int, world_size: int, reference_batch: int,
              accumulate: int = 1) -> float:
    """The base learning rate under ``optim.lr_scaling``: ``none`` keeps it; ``linear`` multiplies it by
    ``total batch / reference_batch`` with total batch = per-device labeled batch x processes (devices x nodes)
    x ``accumulate`` (``trainer.accumulate_grad_batches``: one optimiser step sees that many batches).

    >>> scaled_lr(0.001, "linear", per_device_batch=8, world_size=1, reference_batch=16)
    0.0005
    >>> scaled_lr(0.001, "none", 8, 1, 16)
    0.001
    >>> scaled_lr(0.001, "linear", per_device_batch=2, world_size=1, reference_batch=16, accumulate=4)
    0.0005
    """
    if rule not in LR_SCALINGS:
        raise BRPGInputError(f"optim.lr_scaling={rule!r}; expected one of {', '.join(LR_SCALINGS)}")
    if rule == "none":
        return lr
    if int(reference_batch) < 1:
        raise BRPGInputError(f"optim.reference_batch={reference_batch}; expected an integer >= 1")
    return lr * per_device_batch * world_size * int(accumulate) / int(reference_batch)


class SegmentationModule(pl.LightningModule):
    """Base LightningModule of all methods (SupOnly, mean teacher, later FixMatch/CPS).

    Args:
        segmentor: the student network (``Segmentor``: ``forward(x) -> SegmentorOutput``, ``param_groups()``).
        num_classes: number of classes ``C``.
        optim: ``conf/train.yaml``'s ``optim`` node (paper Sec. 4.1.4): ``optimizer`` (a ``_partial_`` torch.optim
            factory or its config; its ``lr`` is the backbone's), ``head_lr_mult`` (decoder and heads),
            ``poly_power``, ``lr_scaling``, ``reference_batch``; read by :meth:`configure_optimizers`.
        sup_loss: keyword arguments of :class:`~brpg_lightning.methods.losses.SupervisedLoss` (Eq. 2 / OHEM).
        class_names: names for per-class IoU logging (default ``class_<i>``).
        sup_only_epochs: labeled-only warm-up epochs before the method's own step (:meth:`warmup_step`);
            None: the method's ``default_sup_only_epochs``.
        run_config: the resolved run configuration, stored in checkpoints so ``evaluate`` can rebuild the run.
        eval_protocol: how validation and test evaluate (:class:`~brpg_lightning.models.inference.EvalProtocol`,
            or its :meth:`~brpg_lightning.models.inference.EvalProtocol.as_dict`); None: the whole image.
            ``train.build_module`` fills it from the dataset config; it is stored in the checkpoint.
        nonfinite_loss: a NaN or inf in the step's loss: ``stop`` the run with one line naming the term, epoch,
            step and last good checkpoint, or ``skip`` the step (no backward pass, no optimiser step; the forward
            pass's side effects, e.g. BRPG's bank sampling and the EMA teacher update, still happen).
    """

    uses_unlabeled: bool = True
    """Whether the datamodule must load unlabeled images for this method."""
    default_sup_only_epochs: int = 0
    """Labeled-only warm-up epochs when the config leaves ``sup_only_epochs`` null (mean teacher: U2PL's 1)."""
    strong_views: int = 1
    """Strong colour views per unlabeled item the datamodule draws (UniMatch: 2, ``image_strong2``)."""
    networks: tuple[str, ...] = ("student",)
    """Names of the trained networks; ``train.build_module`` builds one segmentor per name (the first is
    ``segmentor``, the others ``segmentor2``, ...) and ``train.build_callbacks`` one BRPG callback per name."""

    def __init__(
        self,
        segmentor: nn.Module,
        num_classes: int,
        optim: dict[str, Any],
        sup_loss: dict[str, Any] | None = None,
        class_names: list[str] | None = None,
        run_config: dict[str, Any] | None = None,
        sup_only_epochs: int | None = None,
        eval_protocol: EvalProtocol | dict[str, Any] | None = None,
        nonfinite_loss: str = "stop",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["segmentor", "segmentor2", "eval_protocol"])
        if eval_protocol is None:
            eval_protocol = EvalProtocol()
        elif not isinstance(eval_protocol, EvalProtocol):
            eval_protocol = EvalProtocol.from_dict(eval_protocol)
        self.eval_protocol: EvalProtocol = eval_protocol
        # the plain dict, not the dataclass: checkpoints are read with torch.load(weights_only=True)
        self.hparams["eval_protocol"] = eval_protocol.as_dict()
        self.student = segmentor
        self.num_classes = num_classes
        self.optim_cfg = dict(optim)
        self.sup_loss = SupervisedLoss(**(sup_loss or {}), ignore_index=IGNORE_INDEX)
        self.class_names = list(class_names) if class_names else [f"class_{i}" for i in range(num_classes)]
        self.val_miou = MulticlassJaccardIndex(num_classes, ignore_index=IGNORE_INDEX, average="macro")
        self.val_iou = MulticlassJaccardIndex(num_classes, ignore_index=IGNORE_INDEX, average="none")
        self._total_steps: int | None = None
        warmup = self.default_sup_only_epochs if sup_only_epochs is None else sup_only_epochs
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise BRPGInputError(f"sup_only_epochs={sup_only_epochs!r}; expected an integer >= 0 (or null)")
        self.sup_only_epochs = warmup
        if nonfinite_loss not in NONFINITE_LOSS:
            raise BRPGInputError(f"nonfinite_loss={nonfinite_loss!r}; expected one of {', '.join(NONFINITE_LOSS)}")
        self.nonfinite_loss = nonfinite_loss
        self.nonfinite_skipped = 0

    # ------------------------------------------------------------------ method interface
    @property
    def eval_model(self) -> nn.Module:
        """The network that is evaluated and exported (the student here; the teacher for mean teacher)."""
        return self.student

    def eval_networks(self) -> list[nn.Module]:
        """The submodules :attr:`eval_model` runs, whose classification logits it averages when there are
        several (CPS with ``eval_on=mean``). The checkpoint's ``inference`` block names them
        (``eval_prefix``, ``eval_prefixes``) so that ``predict`` and ``export`` rebuild the same network."""
        return [self.eval_model]

    def compute_step(self, batch: dict[str, Any]) -> TrainStepContext | list[TrainStepContext]:
        """Forward passes and the method's own losses for one step after the warm-up; a filled context (one
        per network)."""
        raise NotImplementedError

    def warmup_step(self, batch: dict[str, Any]) -> TrainStepContext | list[TrainStepContext]:
        """The labeled-only step (Eq. 2) of the first ``sup_only_epochs`` epochs, and of batches without images
        of the unlabeled set: every trained network on the labeled images."""
        x_l, y_l = batch["labeled"]["image"], batch["labeled"]["mask"]
        contexts = []
        for name, net in zip(self.networks, self.trained_networks(), strict=True):
            ctx = self.new_context(net(x_l), y_l, name)
            ctx.add_loss("L_s", self.supervised_loss(ctx.labeled, y_l))
            contexts.append(ctx)
        return contexts[0] if len(contexts) == 1 else contexts

    def method_step(self, batch: dict[str, Any]) -> TrainStepContext | list[TrainStepContext]:
        """:meth:`warmup_step` during the warm-up (or without unlabeled images), else :meth:`compute_step`."""
        if self.current_epoch < self.sup_only_epochs or "unlabeled" not in batch:
            return self.warmup_step(batch)
        return self.compute_step(batch)

    def forward(self, x: Tensor) -> SegmentorOutput:
        return self.eval_model(x)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        result = self.method_step(batch)
        contexts = result if isinstance(result, list) else [result]
        for ctx in contexts:
            self.publish_step_context(ctx)
        loss = torch.stack([ctx.total_loss() for ctx in contexts]).sum()
        if not self.check_finite(loss, contexts):
            return None  # Lightning skips the backward pass and the optimiser step
        bsz = contexts[0].labels.shape[0]
        for ctx in contexts:
            prefix = "" if len(contexts) == 1 else f"{ctx.network}/"
            for name, value in ctx.losses.items():
                self.log_train(f"train/{prefix}{name}", value.detach(), bsz)
        self.log_train("train/loss", loss.detach(), bsz, prog_bar=True)
        return loss

    def log_train(self, key: str, value: Tensor | float, batch_size: int, reduce: str = "mean",
                  prog_bar: bool = False) -> None:
        """Log a training scalar twice: ``key`` at every step (this rank's value: what the loggers get is rank
        0's, synchronising every step would cost a collective per key per step) and ``key + "_epoch"``, the
        epoch's aggregate over every step of every rank (``sync_dist``, one collective per key at the epoch
        end): the ``batch_size``-weighted mean for ``reduce="mean"``, the total for ``"sum"`` (counts)."""
        self.log(key, value, batch_size=batch_size, prog_bar=prog_bar)
        self.log(f"{key}_epoch", value, batch_size=batch_size, on_step=False, on_epoch=True, sync_dist=True,
                 reduce_fx=reduce)

    def check_finite(self, loss: Tensor, contexts: list[TrainStepContext]) -> bool:
        """Whether the step's summed ``loss`` is finite; one host sync per step (under DDP the flag is summed
        over ranks first, so every rank decides alike). When it is not, the terms are read to name the
        culprit, then ``nonfinite_loss=stop`` raises :class:`~brpg_lightning.errors.NonFiniteLossError` (the
        checkpoints written so far stay as they are) and ``skip`` warns and returns False (the step is skipped).
        """
        bad = (~torch.isfinite(loss.detach())).to(torch.float32)
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            bad = trainer.strategy.reduce(bad, reduce_op="sum")
        if not bool(bad):
            return True
        terms = [
            f"{name if len(contexts) == 1 else f'{ctx.network}/{name}'} = {value.detach().float().item()}"
            for ctx in contexts for name, value in ctx.losses.items() if not bool(torch.isfinite(value.detach()).all())
        ]
        what = ", ".join(terms) if terms else "a loss term on another process"
        where = f"epoch {self.current_epoch}, step {self.global_step}"
        if self.nonfinite_loss == "skip":
            self.nonfinite_skipped += 1
            rank_zero_warn(f"non-finite loss: {what} at {where}; step skipped (nonfinite_loss=skip, "
                           f"{self.nonfinite_skipped} skipped so far)")
            return False
        from brpg_lightning.checkpoint import last_good_checkpoint

        good = last_good_checkpoint(trainer) if trainer is not None else None
        raise NonFiniteLossError(
            f"non-finite loss: {what} at {where}; training stopped, last good checkpoint: "
            f"{good or 'none written yet'} (nonfinite_loss=skip skips such steps instead)"
        )

    def publish_step_context(self, ctx: TrainStepContext) -> None:
        """Hand ``ctx`` to every callback implementing ``on_train_step_context`` (e.g. BRPG), in order.

        This is the one documented way for step-level plug-ins to read the step's tensors and add loss
        terms before the backward pass (see :mod:`brpg_lightning.methods.context`).
        """
        trainer = self._trainer
        if trainer is None:
            return
        for callback in trainer.callbacks:
            if isinstance(callback, StepContextHook):
                callback.on_train_step_context(trainer, self, ctx)

    def supervised_loss(self, out: SegmentorOutput, labels: Tensor) -> Tensor:
        """Eq. (2) (or OHEM) with logits upsampled from decoder to label resolution (the output's geometry)."""
        logits = out.logits_at(tuple(labels.shape[-2:]))
        return self.sup_loss(logits, labels)

    def new_context(self, out_l: SegmentorOutput, labels: Tensor, network: str = "student") -> TrainStepContext:
        """A context with the labeled branch and run counters filled in."""
        return TrainStepContext(
            epoch=self.current_epoch,
            global_step=self.global_step,
            total_steps=self.total_steps,
            labeled=out_l,
            labels=labels,
            network=network,
            optimizer_step=self.optimizer_steps_now(),
        )

    def optimizer_steps_now(self) -> bool:
        """Whether Lightning's optimiser steps after the current training batch: False on the micro-batches of a
        gradient accumulation (``trainer.accumulate_grad_batches = k``) before its last, True otherwise (and
        outside a fit). Lightning's own decision (its epoch loop's ``_should_accumulate``: every ``k``-th batch
        of an epoch, and the epoch's last batch), the same from ``training_step`` to ``on_train_batch_end``.

        BRPG's prototype EMA and class thresholds read it (``TrainStepContext.optimizer_step``); the EMA teacher
        needs no flag (:meth:`after_optimizer_step` runs only when the optimiser steps). Lightning
        itself steps the poly schedule per optimiser step, counts ``global_step`` in optimiser steps, sizes
        ``total_steps`` (``estimated_stepping_batches``) accordingly, and divides the returned loss by ``k``.
        """
        trainer = self._trainer
        loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
        if loop is None or not getattr(trainer, "training", False):
            return True
        return not loop._should_accumulate()

    @staticmethod
    def hard_pseudo_labels(out: SegmentorOutput, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Eq. (3) on a detached forward at the label size of ``valid`` ``(B, H, W)``: ``(probs, conf, pseudo)``.

        ``probs (B, C, H, W)`` float32 softmax of the upsampled logits, ``conf (B, H, W)`` its maximum
        (0 where not ``valid``), ``pseudo (B, H, W)`` its argmax (``IGNORE_INDEX`` where not ``valid``).
        """
        probs = as_probabilities(out.upsample(out.logits.detach(), tuple(valid.shape[-2:])))
        return (probs, *SegmentationModule.pseudo_labels(probs, valid))

    @staticmethod
    def pseudo_labels(probs: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """Eq. (3) on probabilities ``(B, C, H, W)``: ``(conf, pseudo)``, 0 and ``IGNORE_INDEX`` where not ``valid``."""
        conf, pseudo = probs.max(dim=1)
        return conf.masked_fill(~valid, 0.0), pseudo.masked_fill(~valid, IGNORE_INDEX)

    @property
    def total_steps(self) -> int:
        """Optimiser steps of the whole run (poly schedule and Eq. 19 denominators)."""
        if self._total_steps is None:
            trainer = self._trainer
            if trainer is None:
                return 1
            self._total_steps = max(int(trainer.estimated_stepping_batches), 1)
        return self._total_steps

    def trained_networks(self) -> list[nn.Module]:
        """The networks the optimiser updates (the student; CPS: both networks)."""
        return [self.student]

    def configure_optimizers(self) -> dict[str, Any]:
        """``optim.optimizer`` (SGD, AdamW, ...) over one backbone group at its lr and one head group at
        ``head_lr_mult`` x lr per network, the lr under ``optim.lr_scaling``; poly decay per step."""
        cfg = self.optim_cfg
        check_optim(cfg)
        factory = optimizer_factory(cfg["optimizer"])
        lr = base_lr = factory_lr(factory)
        if cfg["lr_scaling"] != "none":
            trainer = self._trainer
            batch = int(getattr(getattr(trainer, "datamodule", None), "batch_size_labeled", 0) or 0)
            world = int(getattr(trainer, "world_size", 1) or 1)
            accum = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
            lr = scaled_lr(base_lr, str(cfg["lr_scaling"]), batch, world, int(cfg["reference_batch"]), accum)
            if trainer is None or trainer.is_global_zero:
                times = f" x {accum} accumulated" if accum > 1 else ""
                print(f"optim.lr_scaling={cfg['lr_scaling']}: backbone lr {base_lr} -> {lr:.6g} "
                      f"(total labeled batch {batch} x {world}{times} / reference {cfg['reference_batch']})",
                      flush=True)
        params = []
        for i, net in enumerate(self.trained_networks()):
            groups, prefix = net.param_groups(), "" if i == 0 else f"{self.networks[i]}/"
            params += [
                {"params": groups["backbone"], "lr": lr, "name": f"{prefix}backbone"},
                {"params": groups["head"], "lr": lr * float(cfg["head_lr_mult"]), "name": f"{prefix}head"},
            ]
        opt = factory(params, lr=lr)  # every group has its lr; the default follows the scaled one
        total, power = self.total_steps, float(cfg["poly_power"])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: poly_lr_factor(step, total, power))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Lightning's optimiser step, then :meth:`after_optimizer_step`. Inside the step rather than in
        ``on_train_batch_end``: Lightning runs the callbacks' ``on_train_batch_end`` (a step-interval checkpoint)
        before the module's, so a checkpoint written at the end of a step would miss that step's teacher update.
        Under gradient accumulation Lightning calls it once per optimiser step, after the last micro-batch."""
        super().optimizer_step(*args, **kwargs)
        self.after_optimizer_step()

    def after_optimizer_step(self) -> None:
        """What follows every optimiser step (mean teacher, UniMatch V2: the teacher's EMA update); nothing here."""

    # ------------------------------------------------------------------ evaluation
    def on_validation_start(self) -> None:
        self._announce_eval_protocol()

    def on_test_start(self) -> None:
        self._announce_eval_protocol()

    def _announce_eval_protocol(self) -> None:
        """Print :attr:`eval_protocol` (once per protocol and stage); refuse a datamodule that prepared its val
        data for another protocol (a centre crop evaluated as whole images would score silently wrong)."""
        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        theirs = getattr(datamodule, "eval_protocol", None)
        if isinstance(theirs, EvalProtocol) and theirs != self.eval_protocol:
            raise BRPGInputError(
                f"the datamodule prepares its val data for '{theirs.describe()}' but the module evaluates "
                f"'{self.eval_protocol.describe()}'; build both from the same dataset config (train.build_module)"
            )
        line = self.eval_protocol.describe()
        key = (str(getattr(getattr(trainer, "state", None), "fn", "")), line)
        if key != getattr(self, "_printed_protocol", None):
            self._printed_protocol = key
            if trainer is None or trainer.is_global_zero:
                print(f"evaluation protocol ({getattr(datamodule, 'name', 'data')}): {line}", flush=True)

    def predict_logits(self, images: Tensor, size: tuple[int, int]) -> Tensor:
        """Classification-head logits of :attr:`eval_model` at ``size``: one pass over the (whole or
        centre-cropped) image, or the sliding-window average when :attr:`eval_protocol` says ``sliding``."""
        protocol = self.eval_protocol
        if protocol.mode == "sliding":

            def window_logits(window: Tensor) -> Tensor:
                return self.eval_model(window).logits_at(tuple(window.shape[-2:]))

            crop = int(protocol.crop_size)  # type: ignore[arg-type]
            return sliding_window_logits(window_logits, images, crop, protocol.window_stride)
        return self.eval_model(images).logits_at(size)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        masks = batch["mask"]
        preds = self.predict_logits(batch["image"], tuple(masks.shape[-2:])).argmax(1)
        self.val_miou.update(preds, masks)
        self.val_iou.update(preds, masks)

    def on_validation_epoch_end(self) -> None:
        miou = self.val_miou.compute()
        trainer = self._trainer
        if (trainer is not None and not trainer.sanity_checking and self.current_epoch < self.sup_only_epochs
                and self.uses_unlabeled):  # the labeled-only model the unlabeled data is measured against
            self.warmup_best = max(float(miou), self.warmup_best if self.warmup_best is not None else -1.0)
        self.log("val/mIoU", miou, prog_bar=True, sync_dist=False)
        for name, iou in zip(self.class_names, self.val_iou.compute(), strict=True):
            self.log(f"val/IoU/{name}", iou)
        self.val_miou.reset()
        self.val_iou.reset()

    test_step = validation_step

    # ------------------------------------------------------------------ checkpoints
    warmup_best: float | None = None
    """Best val mIoU of the labeled-only warm-up (``sup_only_epochs``), None before one ran or without a warm-up:
    what the run's final mIoU is compared with at the end (saved in checkpoints as ``warmup_best_mIoU``)."""

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.warmup_best = checkpoint.get("warmup_best_mIoU")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Add the ``inference`` block (class names, palette, normalisation, model config, which weights are
        evaluated) so ``predict`` and ``export`` need no dataset; see :mod:`brpg_lightning.checkpoint`."""
        checkpoint["warmup_best_mIoU"] = self.warmup_best
        run_config = self.hparams.get("run_config")
        if not run_config or "model" not in run_config:
            return
        from brpg_lightning.checkpoint import inference_metadata

        names = {id(m): name for name, m in self.named_modules()}
        networks = self.eval_networks()
        strays = [type(m).__name__ for m in networks if id(m) not in names]
        if strays:  # a RuntimeError, never StopIteration: the training loop reads that as the end of its data
            raise RuntimeError(
                f"{type(self).__name__}.eval_networks() returns {', '.join(strays)}, not a submodule: the "
                f"checkpoint could not name the evaluated weights"
            )
        prefixes = [f"{names[id(m)]}." if names[id(m)] else "" for m in networks]
        geometry = getattr(self.student, "align_corners", None)  # the built network's, not the config's default
        checkpoint["inference"] = inference_metadata(
            run_config, self.class_names, prefixes[0] if len(prefixes) == 1 else prefixes, align_corners=geometry,
            eval_protocol=self.eval_protocol,
        )

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end()
