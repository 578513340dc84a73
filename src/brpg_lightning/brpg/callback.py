"""BRPG as a Lightning Callback: sampling, clustering (CPG + APO), prototype loss and updates.

Algorithm 1 of the paper, lines 8-24, wired onto any method through the step seam
(:class:`~brpg_lightning.methods.context.TrainStepContext`): the callback never touches the method's
attributes; it reads the context and adds ``L_pro`` with ``ctx.add_loss``.

Stages by epoch ``e`` (0-based, an epoch = one pass over the unlabeled set):

- ``e < T_S1``: nothing (pretraining).
- ``T_S1 <= e < T_S2``: sampling into per-class FIFO banks (Eq. 8-9).
- first step of ``e >= T_S2``: APO counts (Eq. 11-14) and K-Means prototypes (Eq. 10).
- ``e >= T_S2``: ``L = L_s + lambda_u L_u + lambda_pro L_pro`` (Eq. 15-21) and prototype EMA (Eq. 22).

Late classes (no class left without prototypes): a class with no bank features at ``T_S2`` gets no
prototype at clustering. At the first later step whose labeled grid points (Eq. 17; gathered from
every rank, in rank order) hold at least ``n0_h + n0_lw`` points of that class (ground truth), the
class gets its prototypes from those student features: ``prototype_init`` (K-Means with the same seed
and iterations, or random points) into ``n0_h + n0_lw`` centres, the first ``n0_h`` in the high bank's
slots and the next ``n0_lw`` in the low bank's (``plain``: all in its one bank; no APO extra, which is
decided once at ``T_S2``). They join ``L_pro`` in that same step and then follow the usual Eq. (22)
EMA. The input is identical on every rank and the clustering seeded, so every rank initialises alike;
the prototypes, their mask and the step of each class's initialisation are in ``state_dict``.

DDP: bank inserts are gathered from all ranks (tensor all_gather), clustering is seeded identically and
its result broadcast from rank 0, prototype statistics are all-reduced before the update, so banks and
prototypes are identical on every rank. State (stage, banks while sampling, prototypes, class thresholds)
is saved through ``state_dict`` and loads with ``torch.load(weights_only=True)``.

Statistics: :meth:`BRPGCallback.statistics` returns the run's BRPG statistics (bank fill, dispersion,
APO picks, prototypes per class, classes without prototypes, eta_t); their scalars are logged at every
epoch end under ``brpg/...`` (keys in :meth:`BRPGCallback.epoch_scalars`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from brpg_lightning.brpg import distributed as dist
from brpg_lightning.brpg.apo import APO_COUNTS, apo_extra, apo_extra_official, dispersion
from brpg_lightning.brpg.clustering import KMeansResult, kmeans, random_centers
from brpg_lightning.brpg.memory_bank import MemoryBank
from brpg_lightning.brpg.pooled_sampling import pooled_random_points
from brpg_lightning.brpg.prototype_loss import prototype_ce, prototype_similarities
from brpg_lightning.brpg.prototype_update import assignment_stats, ema_update
from brpg_lightning.brpg.sampling import (
    bank_masks,
    downsample_labels,
    gather_points,
    grid_points,
    random_points,
    random_subset,
    sample_grid,
    sample_points,
)
from brpg_lightning.brpg.schedules import eta_t as eta_t_schedule
from brpg_lightning.brpg.schedules import eta_t_from_epoch
from brpg_lightning.brpg.thresholds import class_confidence_sums, thresholds_in_use, update_class_thresholds
from brpg_lightning.constants import IGNORE_INDEX
from brpg_lightning.errors import BRPGInputError
from brpg_lightning.methods.context import TrainStepContext
from brpg_lightning.models.output import FEATURE_SOURCES, as_probabilities

log = logging.getLogger(__name__)

BANK_KINDS = ("confidence", "plain")
INDICATORS = ("cosine", "l2")
PROTOTYPE_INITS = ("kmeans", "random")
ETA_T_ORIGINS = ("t_s2", "official_epoch5")
OFFICIAL_ETA_T_EPOCH = 5  # the official code's hard-coded origin of Eq. (19)
STAGES = ("pretrain", "sampling", "prototype")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _pixels(fmap: Tensor) -> Tensor:
    """``(B, D, h, w) -> (B*h*w, D)`` in the order of ``mask.flatten()`` for ``(B, h, w)`` masks."""
    return fmap.permute(0, 2, 3, 1).reshape(-1, fmap.shape[1])


class _NetworkLog:
    """``pl_module`` with ``log("brpg/x", ...)`` written as ``brpg/<network>/x`` (one BRPG per CPS network)."""

    def __init__(self, module: pl.LightningModule, network: str) -> None:
        self._module, self._network = module, network

    def log(self, name: str, *args: Any, **kwargs: Any) -> None:
        self._module.log(name.replace("brpg/", f"brpg/{self._network}/", 1), *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


class BRPGCallback(pl.Callback):
    """Boundary-Refined Prototype Generation (paper Sec. 3.4-3.5, Algorithm 1).

    Args:
        name: variant name for logs (``cpg_apo``, ``cpg``, ``plain``).
        T_S1, T_S2: sampling epochs ``[T_S1, T_S2)``; clustering at the first step of ``T_S2`` (Sec. 4.1.5).
        eta_s: confidence threshold splitting high / low features (Eq. 8-9; 0.8).
        class_thresholds: Table 8 option: per-class ``eta_s`` for the labeled features, starting at ``eta_s``,
            EMA (``threshold_decay``, each sampling step) toward the mean softmax probability of the class
            over its labeled pixels at the input resolution (``brpg.thresholds``); the EMA is stored
            unclamped and clamped to ``[threshold_low, threshold_high]`` where used; the classes in
            ``threshold_fixed_classes`` keep ``eta_s``. Unlabeled features keep the fixed ``eta_s``.
        sample_num: per-step caps ``(B_l + B_u) * sample_num`` (high) and ``B_l * sample_num`` (low) (5000).
        V: capacity of each per-class FIFO bank (30000).
        storage_dtype: bank storage, ``float16`` (default), ``bfloat16`` or ``float32``.
        banks: ``confidence`` (CPG: high and low banks) or ``plain`` (Table 6 row III: one bank of correctly
            predicted features, K-Means into ``n0_h + n0_lw`` prototypes).
        n0_h, n0_lw: prototypes per high / low bank (Eq. 10, 12; 2 and 2).
        apo: add prototypes to the most scattered classes (Eq. 11-14).
        alpha_t, n_add, indicator: APO class proportion (5 %), prototypes added (1), ``cosine`` | ``l2``.
        apo_count: which classes APO picks: ``paper`` (Eq. 12/14 percentile rule) or ``official``
            (the ``max(1, round(alpha_t * C))`` most scattered classes of each bank).
        kmeans_iters, kmeans_seed: K-Means budget and seed (identical on every rank).
        kmeans_points_per_centroid: faiss subsample per centre (``None``: every bank feature, Eq. 10 as
            written; faiss's own default is 256: much faster on full banks, slightly higher inertia).
        prototype_init: ``kmeans`` (CPG, Eq. 10) or ``random`` (paper Fig. 7 "random": each group's
            prototypes are distinct bank features drawn uniformly with ``kmeans_seed``, no clustering).
        tau: temperature (Eq. 16; 0.1). grid: labeled grid granularity (Eq. 17; 32 -> 32x32 points).
        M_u: unlabeled points per image (Eq. 18; 1000). eta_0, eta_e: Eq. (19) ramp (0.8 -> 0.95).
        M_u_pooled: official option: draw ``B_u * M_u`` points from the candidates of the whole batch
            instead of ``M_u`` per image (``brpg.pooled_sampling``).
        eta_t_origin: where Eq. (19) counts iterations from: ``t_s2`` (the first prototype step, the paper's
            "after the sampling stage") or ``official_epoch5`` (the official code's fixed epoch 5, unclamped:
            below ``eta_0`` before it).
        lambda_pro: weight of L_pro (Eq. 21; 1). prototype_ema: alpha of Eq. (22) (0.99).
        feature_source: ``features`` (feature head, default), ``logits`` (classification head) or
            ``decoder`` (decoder features, no feature head) (Table 9).
        save_snapshot: at ``T_S2`` write ``<run>/brpg/snapshot.pt`` (bank sample + prototypes) for notebooks.
        snapshot_per_class: features per class and bank in the snapshot.
        network: the method network this instance serves (``TrainStepContext.network``); other contexts are
            ignored. CPS gets one instance per network: own state key, ``brpg/<network>/`` log keys and
            ``snapshot_<network>.pt``.
    """

    def __init__(
        self,
        name: str = "cpg_apo",
        T_S1: int = 1,
        T_S2: int = 2,
        eta_s: float = 0.8,
        class_thresholds: bool = False,
        threshold_decay: float = 0.999,
        threshold_low: float = 0.7,
        threshold_high: float = 0.9,
        threshold_fixed_classes: list[int] | tuple[int, ...] = (),
        sample_num: int = 5000,
        V: int = 30000,
        storage_dtype: str = "float16",
        banks: str = "confidence",
        n0_h: int = 2,
        n0_lw: int = 2,
        apo: bool = True,
        alpha_t: float = 0.05,
        n_add: int = 1,
        indicator: str = "cosine",
        apo_count: str = "paper",
        kmeans_iters: int = 50,
        kmeans_seed: int = 0,
        kmeans_points_per_centroid: int | None = None,
        prototype_init: str = "kmeans",
        tau: float = 0.1,
        grid: int = 32,
        M_u: int = 1000,
        M_u_pooled: bool = False,
        eta_t_origin: str = "t_s2",
        eta_0: float = 0.8,
        eta_e: float = 0.95,
        lambda_pro: float = 1.0,
        prototype_ema: float = 0.99,
        feature_source: str = "features",
        save_snapshot: bool = True,
        snapshot_per_class: int = 500,
        network: str = "student",
    ) -> None:
        super().__init__()
        for key, value, choices in (
            ("banks", banks, BANK_KINDS),
            ("indicator", indicator, INDICATORS),
            ("storage_dtype", storage_dtype, tuple(DTYPES)),
            ("feature_source", feature_source, FEATURE_SOURCES),
            ("prototype_init", prototype_init, PROTOTYPE_INITS),
            ("apo_count", apo_count, APO_COUNTS),
            ("eta_t_origin", eta_t_origin, ETA_T_ORIGINS),
        ):
            if value not in choices:
                raise BRPGInputError(f"brpg.{key}={value!r}; expected one of {', '.join(choices)}")
        if not 0 <= T_S1 < T_S2:
            raise BRPGInputError(f"brpg.T_S1={T_S1}, brpg.T_S2={T_S2}; expected 0 <= T_S1 < T_S2")
        self.name, self.T_S1, self.T_S2 = name, int(T_S1), int(T_S2)
        self.eta_s, self.class_thresholds = float(eta_s), bool(class_thresholds)
        self.threshold_decay, self.threshold_low, self.threshold_high = threshold_decay, threshold_low, threshold_high
        self.threshold_fixed_classes = [int(c) for c in (threshold_fixed_classes or ())]
        self.sample_num, self.V, self.storage_dtype = int(sample_num), int(V), DTYPES[storage_dtype]
        self.banks, self.n0_h, self.n0_lw = banks, int(n0_h), int(n0_lw)
        self.apo, self.alpha_t, self.n_add, self.indicator = bool(apo), float(alpha_t), int(n_add), indicator
        self.apo_count = apo_count
        self.kmeans_iters, self.kmeans_seed = int(kmeans_iters), int(kmeans_seed)
        self.prototype_init = prototype_init
        self.kmeans_points_per_centroid = None if kmeans_points_per_centroid is None else int(kmeans_points_per_centroid)
        self.tau, self.grid, self.M_u = float(tau), int(grid), int(M_u)
        self.M_u_pooled, self.eta_t_origin = bool(M_u_pooled), eta_t_origin
        self.max_epochs: int | None = None  # the trainer's, for eta_t_origin=official_epoch5
        self.eta_0, self.eta_e, self.lambda_pro = float(eta_0), float(eta_e), float(lambda_pro)
        self.prototype_ema, self.feature_source = float(prototype_ema), feature_source
        self.save_snapshot, self.snapshot_per_class = bool(save_snapshot), int(snapshot_per_class)
        self.network = network

        self.num_classes: int | None = None
        self.bank_high: MemoryBank | None = None  # also the single bank of the "plain" variant
        self.bank_low: MemoryBank | None = None
        self.conf_high: MemoryBank | None = None  # confidences stored alongside (snapshot only)
        self.conf_low: MemoryBank | None = None
        self.thresholds: Tensor | None = None
        self.prototypes: Tensor | None = None  # (C, K, D) float32
        self.proto_mask: Tensor | None = None  # (C, K) bool
        self.proto_bank: Tensor | None = None  # (C, K) long: 0 high, 1 low
        self.start_step: int | None = None  # global step at the first prototype step
        self.init_step: Tensor | None = None  # (C,) long: global step of each class's first prototypes, -1 none
        self.missing: list[int] = []  # classes without prototypes in the prototype stage (host copy)
        self.last_stats: dict[str, Any] = {}
        self.epoch = 0  # current epoch as last seen (statistics)
        self.last_eta_t: float | None = None
        self.last_fill: Tensor | None = None  # (banks, C) bank fill at the last epoch end / clustering

    # ------------------------------------------------------------------ lifecycle
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.num_classes = int(pl_module.num_classes)
        if self.thresholds is None:
            self.thresholds = torch.full((self.num_classes,), self.eta_s)
        bad = [c for c in self.threshold_fixed_classes if not 0 <= c < self.num_classes]
        if bad:
            raise BRPGInputError(f"brpg.threshold_fixed_classes={bad}: not classes of 0..{self.num_classes - 1}")
        if trainer is not None and trainer.max_epochs is not None and trainer.max_epochs > 0:
            self.max_epochs = int(trainer.max_epochs)
        if self.eta_t_origin == "official_epoch5" and self.max_epochs is not None and (
            self.max_epochs <= OFFICIAL_ETA_T_EPOCH
        ):
            raise BRPGInputError(
                f"brpg.eta_t_origin=official_epoch5 needs trainer.max_epochs > {OFFICIAL_ETA_T_EPOCH} "
                f"(got {self.max_epochs})"
            )

    def stage(self, epoch: int) -> str:
        """``pretrain``, ``sampling`` or ``prototype`` for an epoch."""
        if epoch < self.T_S1:
            return "pretrain"
        return "sampling" if epoch < self.T_S2 else "prototype"

    @property
    def state_key(self) -> str:
        """Checkpoint key: the class name, plus the network when not the default (two CPS instances)."""
        return super().state_key if self.network == "student" else self._generate_state_key(network=self.network)

    @property
    def bank_names(self) -> list[str]:
        """``["high", "low"]`` (CPG) or ``["plain"]``: the banks, in the order of the prototype slots."""
        return ["high", "low"] if self.banks == "confidence" else ["plain"]

    def on_train_step_context(self, trainer: pl.Trainer, pl_module: pl.LightningModule, ctx: TrainStepContext) -> None:
        if ctx.network != self.network:
            return
        pl_module = _NetworkLog(pl_module, self.network) if self.network != "student" else pl_module
        self.epoch = int(ctx.epoch)
        stage = self.stage(ctx.epoch)
        if stage == "sampling":
            self.sample(ctx, pl_module)
        elif stage == "prototype":
            if self.prototypes is None:  # outside autocast: CPU bf16 autocast rejects float16 banks
                with torch.autocast(pl_module.device.type, enabled=False):
                    self.cluster(trainer, pl_module, ctx.global_step)
            self.prototype_step(ctx, pl_module)

    # ------------------------------------------------------------------ sampling (Eq. 8-9)
    def _ensure_banks(self, dim: int, device: torch.device) -> None:
        if self.bank_high is not None:
            if self.bank_high.feats.device != device:
                for name in ("bank_high", "bank_low", "conf_high", "conf_low"):
                    bank = getattr(self, name)
                    if bank is not None:
                        setattr(self, name, bank.to(device))
            return
        c = self.num_classes
        self.bank_high = MemoryBank(c, self.V, dim, dtype=self.storage_dtype, device=device)
        self.conf_high = MemoryBank(c, self.V, 1, dtype=torch.float16, device=device)
        if self.banks == "confidence":
            self.bank_low = MemoryBank(c, self.V, dim, dtype=self.storage_dtype, device=device)
            self.conf_low = MemoryBank(c, self.V, 1, dtype=torch.float16, device=device)

    @torch.no_grad()
    def sample(self, ctx: TrainStepContext, pl_module: pl.LightningModule) -> None:
        """Select, cap, gather across ranks and push features into the banks (Eq. 8-9)."""
        fmap_l = ctx.labeled.select(self.feature_source).detach()
        device = fmap_l.device
        self._ensure_banks(fmap_l.shape[1], device)
        probs_l = as_probabilities(ctx.labeled.logits.detach())
        labels_l = downsample_labels(ctx.labels, tuple(probs_l.shape[-2:]))
        eta_l: float | Tensor = self.eta_s
        if self.class_thresholds:
            # the class confidence is read on the upsampled logits (official: softmax of the input-size
            # prediction); sums over all ranks keep one threshold state on every rank
            sums, counts = class_confidence_sums(ctx.labeled.logits, ctx.labels, ctx.labeled.stride, self.num_classes,
                                                 align_corners=ctx.labeled.align_corners)
            dist.all_reduce_sum_(sums)
            dist.all_reduce_sum_(counts)
            self.thresholds = update_class_thresholds(self.thresholds.to(device), sums, counts, self.threshold_decay)
            eta_l = self.current_class_thresholds()
        high_l, low_l, _, conf_l = bank_masks(probs_l, labels_l, eta_l)
        feats_l, lab_l, conf_l = _pixels(fmap_l), labels_l.flatten(), conf_l.flatten()
        b_l, b_u = fmap_l.shape[0], 0

        if self.banks == "plain":  # every correctly predicted labeled pixel (Table 6 row III)
            high_l = high_l | low_l
        hi_f, hi_y, hi_c = [feats_l[high_l.flatten()]], [lab_l[high_l.flatten()]], [conf_l[high_l.flatten()]]
        if ctx.unlabeled_teacher is not None:
            fmap_u = ctx.unlabeled_teacher.select(self.feature_source).detach()
            probs_u = as_probabilities(ctx.unlabeled_teacher.logits.detach())
            high_u, _, pred_u, conf_u = bank_masks(probs_u, None, self.eta_s)  # fixed eta_s, as the official code
            m = high_u.flatten()
            hi_f.append(_pixels(fmap_u)[m])
            hi_y.append(pred_u.flatten()[m])
            hi_c.append(conf_u.flatten()[m])
            b_u = fmap_u.shape[0]
        high = self._cap(torch.cat(hi_f), torch.cat(hi_y), torch.cat(hi_c), (b_l + b_u) * self.sample_num)
        self._push(self.bank_high, self.conf_high, *high)
        if self.bank_low is not None:
            m = low_l.flatten()
            low = self._cap(feats_l[m], lab_l[m], conf_l[m], b_l * self.sample_num)
            self._push(self.bank_low, self.conf_low, *low)
        pl_module.log("brpg/sampled_high", float(high[0].shape[0]), batch_size=1)

    def _cap(self, feats: Tensor, labels: Tensor, conf: Tensor, cap: int) -> tuple[Tensor, Tensor, Tensor]:
        idx = random_subset(feats.shape[0], cap, device=feats.device)
        return feats[idx].to(self.storage_dtype), labels[idx], conf[idx]

    @staticmethod
    def _push(bank: MemoryBank, conf_bank: MemoryBank, feats: Tensor, labels: Tensor, conf: Tensor) -> None:
        feats, labels, conf = dist.gather_variable(feats), dist.gather_variable(labels), dist.gather_variable(conf)
        bank.push(feats, labels)
        conf_bank.push(conf.view(-1, 1), labels)

    # ------------------------------------------------------------------ clustering (Eq. 10-14)
    @torch.no_grad()
    def cluster(self, trainer: pl.Trainer, pl_module: pl.LightningModule, global_step: int) -> None:
        """CPG (+ APO): prototypes from the banks at the first step of epoch ``T_S2``."""
        start = time.perf_counter()
        c = self.num_classes
        device = pl_module.device
        if self.bank_high is None:
            rank_zero_warn(
                "BRPG: clustering with empty banks (no sampling step ran); every class gets its prototypes "
                "from labeled points later (late classes)"
            )
            d = 1
            self._ensure_banks(d, device)
        banks = [self.bank_high] + ([self.bank_low] if self.bank_low is not None else [])
        n0 = [self.n0_h, self.n0_lw] if self.bank_low is not None else [self.n0_h + self.n0_lw]
        feats, valids = zip(*(b.padded() for b in banks), strict=True)
        x, valid = torch.cat(feats), torch.cat(valids)  # (G = banks*C, V, D)
        k = torch.cat([torch.full((c,), n, dtype=torch.long, device=x.device) for n in n0])
        scores = torch.stack([dispersion(f, v, self.indicator) for f, v in zip(feats, valids, strict=True)])
        extra = torch.zeros_like(k)
        if self.apo:
            pick = apo_extra if self.apo_count == "paper" else apo_extra_official
            extra = torch.cat([pick(s, self.alpha_t, self.indicator, self.n_add) for s in scores]).to(k)
            k = k + extra
        result = self._centers(x, valid, k)
        centers = dist.broadcast_(result.centers.contiguous())
        cmask = dist.broadcast_(result.center_mask.contiguous())

        k_max = centers.shape[1]
        nb = len(banks)
        self.prototypes = centers.view(nb, c, k_max, -1).permute(1, 0, 2, 3).reshape(c, nb * k_max, -1).float()
        self.proto_mask = cmask.view(nb, c, k_max).permute(1, 0, 2).reshape(c, nb * k_max)
        self.proto_bank = torch.arange(nb, device=device).view(1, nb, 1).expand(c, nb, k_max).reshape(c, -1)
        self.start_step = int(global_step)
        has = self.proto_mask.any(1)
        self.init_step = torch.where(has, int(global_step), -1).long().cpu()
        self.missing = [cls for cls, h in enumerate(has.tolist()) if not h]

        fill = torch.stack([b.fill() for b in banks])  # (nb, C)
        self.last_fill = fill.cpu()
        counts = self.proto_mask.sum(1)
        for cls in range(c):
            if counts[cls] == 0:
                rank_zero_warn(
                    f"BRPG: class {cls} has no bank features; it gets prototypes from the first step whose "
                    f"labeled points hold >= {self.n0_h + self.n0_lw} of its pixels (masked in L_pro until then)"
                )
            elif bool(((fill[:, cls] < k.view(nb, c)[:, cls]) & (fill[:, cls] > 0)).any()) or bool(
                (fill[:, cls] == 0).any()
            ):
                rank_zero_warn(
                    f"BRPG: class {cls} has fewer bank features than prototypes (fill {fill[:, cls].tolist()}); "
                    f"it keeps {int(counts[cls])} prototype(s) from the available features"
                )
        picks = extra.view(nb, c)
        bank_names = self.bank_names
        picked = {bname: [cls for cls in range(c) if picks[b, cls] > 0] for b, bname in enumerate(bank_names)}
        elapsed = time.perf_counter() - start
        self.last_stats = {
            "dispersion": scores.cpu(), "apo_extra": picks.cpu(), "fill": fill.cpu(),
            "inertia": result.inertia.cpu(), "seconds": elapsed,
        }
        rank_zero_info(
            f"BRPG[{self.name}]: clustered {int(fill.sum())} bank features into {int(counts.sum())} prototypes "
            f"(per class {counts.tolist()}) in {elapsed:.2f} s; APO extra prototypes for classes {picked}"
        )
        if self.save_snapshot and trainer.is_global_zero:
            self._write_snapshot(trainer, banks)
        self.bank_high = self.bank_low = self.conf_high = self.conf_low = None  # free bank memory

    def _centers(self, x: Tensor, valid: Tensor, k: Tensor) -> KMeansResult:
        """``prototype_init``: K-Means (Eq. 10) or random features (Fig. 7) of each group."""
        if self.prototype_init == "random":
            return random_centers(x, valid, k, seed=self.kmeans_seed)
        return kmeans(
            x, valid, k, iters=self.kmeans_iters, seed=self.kmeans_seed,
            points_per_centroid=self.kmeans_points_per_centroid,
        )

    @torch.no_grad()
    def init_late_classes(self, feats: Tensor, labels: Tensor, global_step: int) -> list[int]:
        """Prototypes for classes without any, from this step's labeled points (module docstring rule).

        ``feats (N, D)`` and ``labels (N,)`` are this rank's labeled grid points (ground truth,
        ``IGNORE_INDEX`` allowed); they are gathered from every rank first, so all ranks decide and
        cluster alike. Returns the classes initialised now.
        """
        feats = dist.gather_variable(feats.detach().float().contiguous())
        labels = dist.gather_variable(labels.contiguous())
        need = self.n0_h + self.n0_lw
        c = self.num_classes
        keep = (labels >= 0) & (labels < c)
        present = torch.bincount(labels[keep], minlength=c).tolist()  # one host sync, only while classes lack
        ready = [cls for cls in self.missing if present[cls] >= need]
        if not ready:
            return []
        nb = len(self.bank_names)
        if self.prototypes.shape[-1] != feats.shape[1]:  # clustered from empty banks: no prototype exists yet
            k_max = max(self.prototypes.shape[1] // nb, self.n0_h, self.n0_lw, need if nb == 1 else 0)
            self.prototypes = feats.new_zeros(c, nb * k_max, feats.shape[1])
            self.proto_mask = torch.zeros(c, nb * k_max, dtype=torch.bool, device=feats.device)
            self.proto_bank = torch.arange(nb, device=feats.device).repeat_interleave(k_max).expand(c, -1).clone()
        k_max = self.prototypes.shape[1] // nb
        per_bank = [self.n0_h, self.n0_lw] if nb == 2 else [need]
        slots = [b * k_max + j for b, n in enumerate(per_bank) for j in range(n)]
        protos, pmask = self.prototypes.clone(), self.proto_mask.clone()
        for cls in ready:
            f = feats[labels == cls]
            res = self._centers(f.unsqueeze(0), torch.ones(1, f.shape[0], dtype=torch.bool, device=f.device),
                                torch.tensor([need], device=f.device))
            new = res.centers[0][res.center_mask[0]].to(protos)  # (m <= need, D); m < need only for duplicates
            idx = torch.tensor(slots[: new.shape[0]], device=protos.device)
            protos[cls, idx] = new
            pmask[cls, idx] = True
            self.init_step[cls] = int(global_step)
        self.prototypes, self.proto_mask = protos, pmask
        self.missing = [cls for cls in self.missing if cls not in ready]
        rank_zero_info(f"BRPG[{self.name}]: classes {ready} got their first prototypes at step {global_step}")
        return ready

    def _write_snapshot(self, trainer: pl.Trainer, banks: list[MemoryBank]) -> None:
        conf_banks = [self.conf_high] + ([self.conf_low] if self.conf_low is not None else [])
        rows: dict[str, list[Tensor]] = {"features": [], "labels": [], "confidence": [], "bank": []}
        gen = torch.Generator().manual_seed(self.kmeans_seed)
        for b, (bank, cbank) in enumerate(zip(banks, conf_banks, strict=True)):
            for cls in range(self.num_classes):
                f, cf = bank.get(cls).cpu(), cbank.get(cls).cpu().view(-1)
                idx = torch.randperm(f.shape[0], generator=gen)[: self.snapshot_per_class]
                rows["features"].append(f[idx].half())
                rows["confidence"].append(cf[idx].float())
                rows["labels"].append(torch.full((idx.numel(),), cls, dtype=torch.long))
                rows["bank"].append(torch.full((idx.numel(),), b, dtype=torch.long))
        snap = {k: torch.cat(v) for k, v in rows.items()}
        snap.update(
            prototypes=self.prototypes.cpu(), proto_mask=self.proto_mask.cpu(), proto_bank=self.proto_bank.cpu(),
            dispersion=self.last_stats["dispersion"], apo_extra=self.last_stats["apo_extra"],
            epoch=torch.tensor(self.T_S2),
        )
        suffix = "" if self.network == "student" else f"_{self.network}"
        path = Path(trainer.default_root_dir) / "brpg" / f"snapshot{suffix}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(snap, path)
        rank_zero_info(f"BRPG: snapshot written to {path}")

    # ------------------------------------------------------------------ prototype stage (Eq. 15-22)
    def current_eta_t(self, ctx: TrainStepContext) -> float:
        """Eq. (19): iterations counted from the first prototype step to the end of training
        (``eta_t_origin=t_s2``), or from the official code's fixed epoch 5 (``official_epoch5``; steps per
        epoch = ``total_steps / max_epochs``)."""
        if self.eta_t_origin == "official_epoch5":
            if self.max_epochs is None:
                raise BRPGInputError("brpg.eta_t_origin=official_epoch5 needs the trainer's max_epochs")
            per_epoch = ctx.total_steps / self.max_epochs
            self.last_eta_t = eta_t_from_epoch(
                ctx.global_step, per_epoch, self.max_epochs, OFFICIAL_ETA_T_EPOCH, self.eta_0, self.eta_e
            )
            return self.last_eta_t
        start = self.start_step if self.start_step is not None else ctx.global_step
        self.last_eta_t = eta_t_schedule(ctx.global_step - start, ctx.total_steps - start, self.eta_0, self.eta_e)
        return self.last_eta_t

    def current_class_thresholds(self) -> Tensor:
        """The per-class ``eta_s`` of the labeled features (``class_thresholds``): the stored EMA clamped to
        ``[threshold_low, threshold_high]``, ``eta_s`` for ``threshold_fixed_classes``."""
        return thresholds_in_use(
            self.thresholds, self.threshold_low, self.threshold_high, self.threshold_fixed_classes, self.eta_s
        )

    def prototype_step(self, ctx: TrainStepContext, pl_module: pl.LightningModule) -> None:
        """Add ``lambda_pro * (L_pro^l + L_pro^u)`` to the step and update the prototypes (Eq. 22)."""
        device = ctx.labels.device
        if self.prototypes.device != device:
            self.prototypes, self.proto_mask = self.prototypes.to(device), self.proto_mask.to(device)
        out_l = ctx.labeled
        b_l, (h, w) = ctx.labels.shape[0], ctx.labels.shape[-2:]
        # points read with the geometry the output carries (the same as its losses' upsampling)
        f_l = sample_grid(
            out_l.select(self.feature_source), h, w, self.grid, out_l.stride, align_corners=out_l.align_corners
        ).flatten(0, 1)
        y_l = gather_points(ctx.labels, grid_points(b_l, h, w, self.grid, device=device)).flatten()
        if self.missing:
            self.init_late_classes(f_l, y_l, ctx.global_step)
        protos, pmask = self.prototypes, self.proto_mask
        # similarities computed once per branch, shared by L_pro and the Eq. (22) assignment
        sim_l = prototype_similarities(f_l, protos)
        loss_l, _ = prototype_ce(f_l, y_l, protos, pmask, self.tau, IGNORE_INDEX, sim=sim_l)
        branches = [(f_l, y_l, sim_l)]
        loss = loss_l
        pl_module.log("brpg/L_pro_l", loss_l.detach(), batch_size=b_l)

        if ctx.has_unlabeled and ctx.pseudo_labels is not None:
            eta = self.current_eta_t(ctx)
            valid = ctx.pseudo_labels != IGNORE_INDEX
            cand = valid & (ctx.pseudo_confidence >= eta)
            out_u = ctx.unlabeled_student
            coords_u, ok = (pooled_random_points if self.M_u_pooled else random_points)(cand, self.M_u)
            f_u = sample_points(
                out_u.select(self.feature_source), coords_u, out_u.stride,
                align_corners=out_u.align_corners, size=(h, w),
            ).flatten(0, 1)
            # points short of M_u (few candidates) are ignored by label: no (N, D) row selection
            y_u = gather_points(ctx.pseudo_labels, coords_u).masked_fill(~ok, IGNORE_INDEX).flatten()
            sim_u = prototype_similarities(f_u, protos)
            loss_u, _ = prototype_ce(f_u, y_u, protos, pmask, self.tau, IGNORE_INDEX, sim=sim_u)
            loss = loss + loss_u
            branches.append((f_u, y_u, sim_u))
            share = cand.sum().float() / valid.sum().clamp_min(1).float()
            pl_module.log("brpg/L_pro_u", loss_u.detach(), batch_size=b_l)
            pl_module.log("brpg/eta_t", eta, batch_size=1)
            pl_module.log("brpg/u_pass_eta_t", share, batch_size=1)
        ctx.add_loss("L_pro", self.lambda_pro * loss)

        with torch.no_grad():
            sums, counts = None, None
            for f, y, sim in branches:
                s, n = assignment_stats(f.detach(), y, protos, pmask, IGNORE_INDEX, sim=sim)
                sums, counts = (s, n) if sums is None else (sums + s, counts + n)
            dist.all_reduce_sum_(sums)
            dist.all_reduce_sum_(counts)
            self.prototypes = ema_update(protos, sums, counts, self.prototype_ema)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epoch = int(trainer.current_epoch)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log :meth:`epoch_scalars` (every epoch, every stage)."""
        pl_module = _NetworkLog(pl_module, self.network) if self.network != "student" else pl_module
        self.epoch = int(trainer.current_epoch)
        for key, value in self.epoch_scalars().items():
            pl_module.log(key, value, batch_size=1)

    def statistics(self, epoch: int | None = None) -> dict[str, Any]:
        """BRPG statistics of the run as it stands (plain Python values, JSON-serialisable except NaN).

        Keys: ``epoch``, ``stage`` (``pretrain`` | ``sampling`` | ``prototype``); ``bank_fill``
        ``{bank: [per class]}`` (the live banks while sampling, their fill at clustering afterwards,
        None before sampling); ``dispersion`` ``{bank: [per class, NaN for an empty bank]}`` (Eq. 11/13)
        and ``apo_extra`` ``{bank: [extra prototypes per class]}`` and ``apo_picks`` ``{bank: [classes]}``
        (Eq. 12/14), None before clustering; ``prototypes_per_class`` ``[C]`` (0 before clustering);
        ``classes_without_prototypes`` (the classes, all of them before clustering); ``init_step``
        ``[C]`` (global step of each class's first prototypes, -1 none; later than the clustering step
        for late classes); ``eta_t`` (Eq. 19 at the last prototype step, None before); ``eta_s``
        (per-class thresholds in use with ``class_thresholds``: clamped, fixed classes at ``eta_s``; else
        None) and ``eta_s_ema`` (the stored, unclamped EMA; else None).
        """
        epoch = self.epoch if epoch is None else int(epoch)
        c = int(self.num_classes or 0)
        names = self.bank_names
        live = [b for b in (self.bank_high, self.bank_low) if b is not None]
        fill = torch.stack([b.fill().cpu() for b in live]) if live else self.last_fill
        stats: dict[str, Any] = {"epoch": epoch, "stage": self.stage(epoch)}
        stats["bank_fill"] = None if fill is None else {n: fill[i].tolist() for i, n in enumerate(names)}
        disp, extra = self.last_stats.get("dispersion"), self.last_stats.get("apo_extra")
        stats["dispersion"] = None if disp is None else {n: disp[i].tolist() for i, n in enumerate(names)}
        stats["apo_extra"] = None if extra is None else {n: extra[i].tolist() for i, n in enumerate(names)}
        stats["apo_picks"] = None if extra is None else {
            n: [cls for cls, e in enumerate(extra[i].tolist()) if e > 0] for i, n in enumerate(names)
        }
        if self.proto_mask is not None:
            counts = self.proto_mask.sum(1).tolist()
        else:
            counts = [0] * c
        stats["prototypes_per_class"] = counts
        stats["classes_without_prototypes"] = [cls for cls, n in enumerate(counts) if n == 0]
        stats["init_step"] = self.init_step.tolist() if self.init_step is not None else [-1] * c
        stats["eta_t"] = self.last_eta_t
        use = self.class_thresholds and self.thresholds is not None
        stats["eta_s"] = self.current_class_thresholds().tolist() if use else None
        stats["eta_s_ema"] = self.thresholds.tolist() if use else None
        return stats

    def epoch_scalars(self, epoch: int | None = None) -> dict[str, float]:
        """The scalars of :meth:`statistics` under their logged keys (logged at every epoch end).

        ``brpg/stage`` (0 pretrain, 1 sampling, 2 prototype), ``brpg/classes_without_prototypes``,
        ``brpg/prototypes_total``, ``brpg/prototypes/<class index>``; once banks exist
        ``brpg/bank_fill_<bank>/<class>``; after clustering ``brpg/dispersion_<bank>/<class>`` (classes
        with an empty bank left out) and ``brpg/apo_extra_<bank>/<class>``; in the prototype stage
        ``brpg/eta_t_epoch`` (Eq. 19 at the epoch's last step); with ``class_thresholds``
        ``brpg/eta_s/<class>``. ``<bank>`` is ``high``/``low`` (CPG) or ``plain``.
        """
        stats = self.statistics(epoch)
        out: dict[str, float] = {
            "brpg/stage": float(STAGES.index(stats["stage"])),
            "brpg/classes_without_prototypes": float(len(stats["classes_without_prototypes"])),
            "brpg/prototypes_total": float(sum(stats["prototypes_per_class"])),
        }
        for cls, n in enumerate(stats["prototypes_per_class"]):
            out[f"brpg/prototypes/{cls}"] = float(n)
        for key, name in (("bank_fill", "bank_fill"), ("dispersion", "dispersion"), ("apo_extra", "apo_extra")):
            for bank, values in (stats[key] or {}).items():
                for cls, v in enumerate(values):
                    if v == v:  # NaN dispersion (empty bank) is left out
                        out[f"brpg/{name}_{bank}/{cls}"] = float(v)
        if stats["stage"] == "prototype" and stats["eta_t"] is not None:
            out["brpg/eta_t_epoch"] = float(stats["eta_t"])
        for cls, t in enumerate(stats["eta_s"] or []):
            out[f"brpg/eta_s/{cls}"] = float(t)
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and numbers only (``torch.load(weights_only=True)`` works).

        While sampling, both banks are saved: ``2 * C * V * (D * bytes(storage_dtype) + 2)`` bytes, e.g.
        about 650 MB for PASCAL (C=21, V=30000, D=256, float16). After clustering only the prototypes.
        """
        state: dict[str, Any] = {"version": 2, "thresholds": self.thresholds, "start_step": self.start_step}
        state["last_eta_t"], state["epoch"] = self.last_eta_t, self.epoch
        for name in ("last_fill", "init_step"):
            t = getattr(self, name)
            state[name] = None if t is None else t.cpu()
        for key in ("dispersion", "apo_extra"):
            state[f"stats_{key}"] = self.last_stats.get(key)
        for name in ("prototypes", "proto_mask", "proto_bank"):
            t = getattr(self, name)
            state[name] = None if t is None else t.cpu()
        for name in ("bank_high", "bank_low", "conf_high", "conf_low"):
            bank = getattr(self, name)
            state[name] = None if bank is None else {k: v.cpu() for k, v in bank.state_dict().items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.thresholds = state_dict.get("thresholds")
        self.start_step = state_dict.get("start_step")
        for name in ("prototypes", "proto_mask", "proto_bank"):
            setattr(self, name, state_dict.get(name))
        self.last_eta_t = state_dict.get("last_eta_t")
        self.epoch = int(state_dict.get("epoch") or 0)
        self.last_fill = state_dict.get("last_fill")
        self.init_step = state_dict.get("init_step")
        if self.init_step is None and self.proto_mask is not None:  # version 1: no late classes
            self.init_step = torch.where(self.proto_mask.any(1).cpu(), int(self.start_step or 0), -1).long()
        self.last_stats = {k: state_dict[f"stats_{k}"] for k in ("dispersion", "apo_extra")
                           if state_dict.get(f"stats_{k}") is not None}
        self.missing = [] if self.proto_mask is None else [
            cls for cls, h in enumerate(self.proto_mask.any(1).tolist()) if not h
        ]
        for name in ("bank_high", "bank_low", "conf_high", "conf_low"):
            bank_state = state_dict.get(name)
            if bank_state is None:
                setattr(self, name, None)
                continue
            c, v, d = bank_state["feats"].shape
            bank = MemoryBank(c, v, d, dtype=bank_state["feats"].dtype)
            bank.load_state_dict(bank_state)
            setattr(self, name, bank)
