"""BRPG's state across steps and the operations on it (paper Sec. 3.4-3.5, Algorithm 1 lines 8-24).

:class:`PrototypeMemory` holds what outlives a training step: the per-class banks (Eq. 8-9), the class
thresholds (Table 8), the prototypes with their mask, bank and initialisation step, and the Eq. (19) origin. It
is a small stateful object over the pure functions of ``brpg/``, in the manner of timm's ``ModelEmaV3`` and a
torchmetrics metric: it has no Lightning import, it never logs (each operation returns what there is to log
or say), and ``state_dict`` / ``load_state_dict`` hold plain tensors and numbers. The Lightning callback
(:mod:`brpg_lightning.brpg.callback`) only decides *when* each operation runs.

Not an ``nn.Module``: its tensors appear and disappear by stage (banks until ``T_S2``, prototypes after), live in
the checkpoint's callback section rather than the model's, and must not follow ``module.to()``; each operation
moves what it reads to the device of the step.

Late classes (no class left without prototypes): a class with no bank features at ``T_S2`` gets no prototype
at clustering. At the first later step whose labeled grid points (Eq. 17; gathered from every rank, in rank
order) hold at least ``n0_h + n0_lw`` points of that class (ground truth), the class gets its prototypes from
those student features: ``prototype_init`` (K-Means with the same seed and iterations, or random points) into
``n0_h + n0_lw`` centres, the first ``n0_h`` in the high bank's slots and the next ``n0_lw`` in the low bank's
(``plain``: all in its one bank; no APO extra, which is decided once at ``T_S2``). They join ``L_pro`` in that
same step and then follow the usual Eq. (22) EMA. The input is identical on every rank and the clustering
seeded, so every rank initialises alike; the prototypes, their mask and the step of each class's
initialisation are in ``state_dict``.

DDP (through :mod:`brpg_lightning.brpg.distributed`, no-ops without a process group): bank inserts are
gathered from all ranks, clustering is seeded identically and its result broadcast from rank 0, prototype
statistics and class-threshold sums are all-reduced, so banks and prototypes are identical on every rank.

Gradient accumulation (``trainer.accumulate_grad_batches = k``; ``TrainStepContext.optimizer_step`` is False on
the micro-batches before the last of each optimiser step). Chosen so that one optimiser step over ``k``
micro-batches of ``B`` does what one step over a batch of ``k B`` does, as far as the micro-batches allow:

- bank pushes: every micro-batch pushes its own features at once, with its own per-step caps, so the step
  pushes the features of all ``k B`` images (the caps add up to the big batch's; the student is the same for
  every micro-batch of a step). Not identical: the FIFO order of one step's features (only matters once a bank
  wraps) and, where a cap binds, how the capped subset is drawn (per micro-batch instead of over the union).
- class thresholds (Table 8): the per-class confidence sums and counts of the ``k`` micro-batches are added and
  the EMA takes one step with them at the last micro-batch, which splits with the new thresholds, as the big
  batch does; the earlier micro-batches split with the thresholds of the previous optimiser step.
- prototypes (Eq. 22): ``L_pro`` of every micro-batch reads the prototypes of the previous optimiser step (the
  big batch's loss does too), the assignment sums and counts of the ``k`` micro-batches are added and the EMA
  takes one step at the last: the same update as the big batch's (same features assumed).
- Eq. (19)'s ``eta_t`` counts ``global_step``, which Lightning counts in optimiser steps.
- Late classes are initialised from one micro-batch's labeled points (it needs ``n0_h + n0_lw`` points of the
  class in that micro-batch).

The statistics pending within an optimiser step are not in ``state_dict``: a checkpoint written between
micro-batches (Lightning resumes at the next batch, its own accumulated gradients are lost too) drops them.
What is never equivalent: BatchNorm statistics (each micro-batch normalises over its own ``B`` images) and any
per-batch random draw (CutMix coin and boxes, point sampling).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from brpg_lightning.brpg import distributed as dist
from brpg_lightning.brpg.apo import APO_COUNTS, INDICATORS, apo_extra, apo_extra_official, dispersion
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

BANK_KINDS = ("confidence", "plain")
PROTOTYPE_INITS = ("kmeans", "random")
ETA_T_ORIGINS = ("t_s2", "official_epoch5")
OFFICIAL_ETA_T_EPOCH = 5  # the official code's hard-coded origin of Eq. (19)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
STATE_VERSION = 2  # 1: no late classes (no init_step); 2: init_step; confidence banks only with a snapshot
BANK_ATTRS = ("bank_high", "bank_low")
CONFIDENCE_ATTRS = ("conf_high", "conf_low")

Scalars = dict[str, tuple[Tensor | float, int]]
"""What an operation reports: name (the caller adds its ``brpg/`` prefix) -> (value, batch size of the value
for Lightning's epoch means)."""


def _pixels(fmap: Tensor) -> Tensor:
    """``(B, D, h, w) -> (B*h*w, D)`` in the order of ``mask.flatten()`` for ``(B, h, w)`` masks."""
    return fmap.permute(0, 2, 3, 1).reshape(-1, fmap.shape[1])


@dataclass
class Clustering:
    """What :meth:`PrototypeMemory.cluster` did (the memory has dropped its banks; these are the last refs).

    Attributes:
        dispersion: ``(banks, C)`` Eq. (11)/(13) scores, NaN for an empty bank. apo_extra: ``(banks, C)`` long.
        fill: ``(banks, C)`` long, bank features per class. inertia: ``(banks * C,)`` K-Means inertia.
        counts: ``(C,)`` prototypes per class. seconds: wall time. picked: ``{bank: [classes with APO extra]}``.
        banks, confidences: the feature banks and (with ``keep_confidence``) their confidence banks, in the
            order of the prototype slots, for the snapshot; ``confidences`` is None without them.
        warnings: one line per problem (empty banks, classes short of features) for the caller to emit.
    """

    dispersion: Tensor
    apo_extra: Tensor
    fill: Tensor
    inertia: Tensor
    counts: Tensor
    seconds: float
    picked: dict[str, list[int]]
    banks: list[MemoryBank]
    confidences: list[MemoryBank] | None
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: features clustered, prototypes per class, time and APO picks."""
        return (
            f"clustered {int(self.fill.sum())} bank features into {int(self.counts.sum())} prototypes "
            f"(per class {self.counts.tolist()}) in {self.seconds:.2f} s; APO extra prototypes for classes "
            f"{self.picked}"
        )


@dataclass
class PrototypeStep:
    """What :meth:`PrototypeMemory.prototype_step` returns.

    Attributes:
        loss: ``lambda_pro * (L_pro^l + L_pro^u)`` (Eq. 21), with grad to the features.
        scalars: ``L_pro_l``, and with an unlabeled branch ``L_pro_u``, ``eta_t`` (Eq. 19) and
            ``u_pass_eta_t`` (share of valid pseudo-labeled pixels passing ``eta_t``).
        late_classes: classes that got their first prototypes in this step.
    """

    loss: Tensor
    scalars: Scalars
    late_classes: list[int]


class PrototypeMemory:
    """Banks, class thresholds and prototypes of BRPG with sampling, clustering and the prototype step.

    Args:
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
        keep_confidence: also keep each bank feature's confidence (two more banks, gathered and saved too);
            only the snapshot reads them.
        num_classes: known at construction or given later to :meth:`setup`.

    Example:
        >>> memory = PrototypeMemory(V=8, sample_num=4)
        >>> memory.setup(num_classes=3)
        >>> memory.bank_names, tuple(memory.thresholds.shape), memory.prototypes is None
        (['high', 'low'], (3,), True)
    """

    def __init__(
        self,
        *,
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
        keep_confidence: bool = False,
        num_classes: int | None = None,
    ) -> None:
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
        self.keep_confidence = bool(keep_confidence)

        self.num_classes: int | None = None
        self.bank_high: MemoryBank | None = None  # also the single bank of the "plain" variant
        self.bank_low: MemoryBank | None = None
        self.conf_high: MemoryBank | None = None  # confidences alongside (keep_confidence only)
        self.conf_low: MemoryBank | None = None
        self.thresholds: Tensor | None = None  # (C,) the stored, unclamped class-threshold EMA
        self.prototypes: Tensor | None = None  # (C, K, D) float32
        self.proto_mask: Tensor | None = None  # (C, K) bool
        self.proto_bank: Tensor | None = None  # (C, K) long: 0 high, 1 low
        self.start_step: int | None = None  # global step at the first prototype step
        self.init_step: Tensor | None = None  # (C,) long: global step of each class's first prototypes, -1 none
        self.missing: list[int] = []  # classes without prototypes in the prototype stage (host copy)
        self.last_stats: dict[str, Any] = {}  # the last clustering: dispersion, apo_extra, fill, inertia, seconds
        self.last_eta_t: float | None = None
        self.last_fill: Tensor | None = None  # (banks, C) bank fill at clustering
        # sums and counts of the micro-batches of the current optimiser step (gradient accumulation), by use
        self._pending: dict[str, tuple[Tensor, Tensor]] = {}
        if num_classes is not None:
            self.setup(num_classes)

    def setup(self, num_classes: int, max_epochs: int | None = None) -> None:
        """Bind the run's class count (and ``max_epochs``, which ``eta_t_origin=official_epoch5`` needs)."""
        self.num_classes = int(num_classes)
        if self.thresholds is None:
            self.thresholds = torch.full((self.num_classes,), self.eta_s)
        bad = [c for c in self.threshold_fixed_classes if not 0 <= c < self.num_classes]
        if bad:
            raise BRPGInputError(f"brpg.threshold_fixed_classes={bad}: not classes of 0..{self.num_classes - 1}")
        if max_epochs is not None and max_epochs > 0:
            self.max_epochs = int(max_epochs)
        if self.eta_t_origin == "official_epoch5" and self.max_epochs is not None and (
            self.max_epochs <= OFFICIAL_ETA_T_EPOCH
        ):
            raise BRPGInputError(
                f"brpg.eta_t_origin=official_epoch5 needs trainer.max_epochs > {OFFICIAL_ETA_T_EPOCH} "
                f"(got {self.max_epochs})"
            )

    @property
    def bank_names(self) -> list[str]:
        """``["high", "low"]`` (CPG) or ``["plain"]``: the banks, in the order of the prototype slots."""
        return ["high", "low"] if self.banks == "confidence" else ["plain"]

    def live_banks(self) -> list[MemoryBank]:
        """The feature banks while sampling (in the order of :attr:`bank_names`), empty otherwise."""
        return [b for b in (self.bank_high, self.bank_low) if b is not None]

    # ------------------------------------------------------------------ sampling (Eq. 8-9)
    def _ensure_banks(self, dim: int, device: torch.device) -> None:
        if self.bank_high is not None:
            if self.bank_high.feats.device != device:
                for name in BANK_ATTRS + CONFIDENCE_ATTRS:
                    bank = getattr(self, name)
                    if bank is not None:
                        setattr(self, name, bank.to(device))
            return
        c = self.num_classes
        self.bank_high = MemoryBank(c, self.V, dim, dtype=self.storage_dtype, device=device)
        if self.banks == "confidence":
            self.bank_low = MemoryBank(c, self.V, dim, dtype=self.storage_dtype, device=device)
        if self.keep_confidence:
            self.conf_high = MemoryBank(c, self.V, 1, dtype=torch.float16, device=device)
            if self.banks == "confidence":
                self.conf_low = MemoryBank(c, self.V, 1, dtype=torch.float16, device=device)

    def current_class_thresholds(self) -> Tensor:
        """The per-class ``eta_s`` of the labeled features (``class_thresholds``): the stored EMA clamped to
        ``[threshold_low, threshold_high]``, ``eta_s`` for ``threshold_fixed_classes``."""
        return thresholds_in_use(
            self.thresholds, self.threshold_low, self.threshold_high, self.threshold_fixed_classes, self.eta_s
        )

    @torch.no_grad()
    def sample(self, ctx: TrainStepContext) -> Scalars:
        """Select, cap, gather across ranks and push features into the banks (Eq. 8-9).

        Labeled (student features, ground truth at the decoder resolution): correct and ``conf >= eta_s`` ->
        high, correct and below -> low (``plain``: every correct pixel into its one bank). Unlabeled (teacher
        features, weak view): ``conf >= eta_s`` -> high, with the teacher's prediction as label. At most
        ``(B_l + B_u) * sample_num`` high and ``B_l * sample_num`` low features per rank and step, drawn
        uniformly. Returns ``sampled_high``: this rank's high features of the step.
        """
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
            self.thresholds = self.thresholds.to(device)
            stats = self._step_stats("thresholds", sums, counts, ctx.optimizer_step)
            if stats is not None:  # once per optimiser step, with the statistics of all its micro-batches
                self.thresholds = update_class_thresholds(self.thresholds, *stats, self.threshold_decay)
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
            self._push(self.bank_low, self.conf_low, *self._cap(feats_l[m], lab_l[m], conf_l[m], b_l * self.sample_num))
        return {"sampled_high": (float(high[0].shape[0]), 1)}

    def _step_stats(self, key: str, sums: Tensor, counts: Tensor, optimizer_step: bool
                    ) -> tuple[Tensor, Tensor] | None:
        """Additive statistics of one optimiser step: this micro-batch's ``sums`` and ``counts`` plus those kept
        under ``key`` since the last optimiser step. Returns the totals when ``optimizer_step`` (and forgets
        them), else keeps them and returns None. Kept statistics of another shape (prototypes re-created by a
        late initialisation) are dropped."""
        pending = self._pending.pop(key, None)
        if pending is not None and pending[0].shape == sums.shape and pending[1].shape == counts.shape:
            sums, counts = sums + pending[0].to(sums), counts + pending[1].to(counts)
        if optimizer_step:
            return sums, counts
        self._pending[key] = (sums, counts)
        return None

    def _cap(self, feats: Tensor, labels: Tensor, conf: Tensor, cap: int) -> tuple[Tensor, Tensor, Tensor]:
        idx = random_subset(feats.shape[0], cap, device=feats.device)
        return feats[idx].to(self.storage_dtype), labels[idx], conf[idx]

    @staticmethod
    def _push(bank: MemoryBank, conf_bank: MemoryBank | None, feats: Tensor, labels: Tensor, conf: Tensor) -> None:
        feats, labels = dist.gather_variable(feats), dist.gather_variable(labels)
        bank.push(feats, labels)
        if conf_bank is not None:  # every rank keeps (or skips) them alike: the gather stays collective
            conf_bank.push(dist.gather_variable(conf).view(-1, 1), labels)

    # ------------------------------------------------------------------ clustering (Eq. 10-14)
    def _centers(self, x: Tensor, valid: Tensor, k: Tensor) -> KMeansResult:
        """``prototype_init``: K-Means (Eq. 10) or random features (Fig. 7) of each group."""
        if self.prototype_init == "random":
            return random_centers(x, valid, k, seed=self.kmeans_seed)
        return kmeans(
            x, valid, k, iters=self.kmeans_iters, seed=self.kmeans_seed,
            points_per_centroid=self.kmeans_points_per_centroid,
        )

    @torch.no_grad()
    def cluster(self, global_step: int, device: torch.device | str = "cpu") -> Clustering:
        """CPG (+ APO): prototypes from the banks (first step of epoch ``T_S2``), then the banks are dropped.

        APO's dispersion (Eq. 11/13) and extra counts (Eq. 12/14) per bank, K-Means (Eq. 10) of each
        (bank, class) group into ``n0 + extra`` centres, rank 0's result broadcast. Prototype slots: the high
        bank's ``K_max`` first, then the low bank's. ``device`` holds the prototype bookkeeping (and the banks
        when none were ever filled: every class then waits for its late initialisation).
        """
        start = time.perf_counter()
        c = self.num_classes
        device = torch.device(device)
        warnings: list[str] = []
        if self.bank_high is None:
            warnings.append(
                "BRPG: clustering with empty banks (no sampling step ran); every class gets its prototypes "
                "from labeled points later (late classes)"
            )
            self._ensure_banks(1, device)
        banks = self.live_banks()
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
                warnings.append(
                    f"BRPG: class {cls} has no bank features; it gets prototypes from the first step whose "
                    f"labeled points hold >= {self.n0_h + self.n0_lw} of its pixels (masked in L_pro until then)"
                )
            elif bool(((fill[:, cls] < k.view(nb, c)[:, cls]) & (fill[:, cls] > 0)).any()) or bool(
                (fill[:, cls] == 0).any()
            ):
                warnings.append(
                    f"BRPG: class {cls} has fewer bank features than prototypes (fill {fill[:, cls].tolist()}); "
                    f"it keeps {int(counts[cls])} prototype(s) from the available features"
                )
        picks = extra.view(nb, c)
        picked = {name: [cls for cls in range(c) if picks[b, cls] > 0] for b, name in enumerate(self.bank_names)}
        elapsed = time.perf_counter() - start
        self.last_stats = {
            "dispersion": scores.cpu(), "apo_extra": picks.cpu(), "fill": fill.cpu(),
            "inertia": result.inertia.cpu(), "seconds": elapsed,
        }
        confidences = [b for b in (self.conf_high, self.conf_low) if b is not None] if self.keep_confidence else None
        self.bank_high = self.bank_low = self.conf_high = self.conf_low = None  # free bank memory
        return Clustering(
            dispersion=scores.cpu(), apo_extra=picks.cpu(), fill=fill.cpu(), inertia=result.inertia.cpu(),
            counts=counts.cpu(), seconds=elapsed, picked=picked, banks=banks, confidences=confidences,
            warnings=warnings,
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
        return ready

    # ------------------------------------------------------------------ prototype stage (Eq. 15-22)
    def current_eta_t(self, global_step: int, total_steps: int) -> float:
        """Eq. (19): iterations counted from the first prototype step to the end of training
        (``eta_t_origin=t_s2``), or from the official code's fixed epoch 5 (``official_epoch5``; steps per
        epoch = ``total_steps / max_epochs``). Kept as ``last_eta_t``."""
        if self.eta_t_origin == "official_epoch5":
            if self.max_epochs is None:
                raise BRPGInputError("brpg.eta_t_origin=official_epoch5 needs the trainer's max_epochs")
            per_epoch = total_steps / self.max_epochs
            self.last_eta_t = eta_t_from_epoch(
                global_step, per_epoch, self.max_epochs, OFFICIAL_ETA_T_EPOCH, self.eta_0, self.eta_e
            )
            return self.last_eta_t
        start = self.start_step if self.start_step is not None else global_step
        self.last_eta_t = eta_t_schedule(global_step - start, total_steps - start, self.eta_0, self.eta_e)
        return self.last_eta_t

    def prototype_step(self, ctx: TrainStepContext) -> PrototypeStep:
        """``lambda_pro * (L_pro^l + L_pro^u)`` of the step (Eq. 15-21), then the prototypes' Eq. (22) update.

        Labeled points: the ``grid x grid`` grid of Eq. (17) on the student's labeled features, with ground
        truth (late classes are initialised from them first). Unlabeled points: ``M_u`` random points per
        image (Eq. 18; pooled over the batch with ``M_u_pooled``) among the pseudo-labeled pixels whose
        teacher confidence passes ``eta_t`` (Eq. 19), on the student's strong-view features.
        """
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
        late = self.init_late_classes(f_l, y_l, ctx.global_step) if self.missing else []
        protos, pmask = self.prototypes, self.proto_mask
        # similarities computed once per branch, shared by L_pro and the Eq. (22) assignment
        sim_l = prototype_similarities(f_l, protos)
        loss_l, _ = prototype_ce(f_l, y_l, protos, pmask, self.tau, IGNORE_INDEX, sim=sim_l)
        branches = [(f_l, y_l, sim_l)]
        loss = loss_l
        scalars: Scalars = {"L_pro_l": (loss_l.detach(), b_l)}

        if ctx.has_unlabeled and ctx.pseudo_labels is not None:
            eta = self.current_eta_t(ctx.global_step, ctx.total_steps)
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
            scalars.update(L_pro_u=(loss_u.detach(), b_l), eta_t=(eta, 1), u_pass_eta_t=(share, 1))

        with torch.no_grad():
            sums, counts = None, None
            for f, y, sim in branches:
                s, n = assignment_stats(f.detach(), y, protos, pmask, IGNORE_INDEX, sim=sim)
                sums, counts = (s, n) if sums is None else (sums + s, counts + n)
            dist.all_reduce_sum_(sums)
            dist.all_reduce_sum_(counts)
            stats = self._step_stats("prototypes", sums, counts, ctx.optimizer_step)
            if stats is not None:  # once per optimiser step (gradient accumulation: all micro-batches' statistics)
                self.prototypes = ema_update(protos, *stats, self.prototype_ema)  # a new tensor: loss keeps protos
        return PrototypeStep(self.lambda_pro * loss, scalars, late)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and numbers only (``torch.load(weights_only=True)`` works).

        While sampling, the banks are saved: ``2 * C * V * (D * bytes(storage_dtype) + 2)`` bytes for CPG, e.g.
        about 650 MB for PASCAL (C=21, V=30000, D=256, float16), plus ``2 * C * V * 18`` bytes of confidence
        banks with ``keep_confidence``. After clustering only the prototypes.
        """
        state: dict[str, Any] = {"version": STATE_VERSION, "thresholds": self.thresholds, "start_step": self.start_step}
        state["last_eta_t"] = self.last_eta_t
        for name in ("last_fill", "init_step", "prototypes", "proto_mask", "proto_bank"):
            t = getattr(self, name)
            state[name] = None if t is None else t.cpu()
        for key in ("dispersion", "apo_extra"):
            state[f"stats_{key}"] = self.last_stats.get(key)
        for name in BANK_ATTRS + (CONFIDENCE_ATTRS if self.keep_confidence else ()):
            bank = getattr(self, name)
            state[name] = None if bank is None else {k: v.cpu() for k, v in bank.state_dict().items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (versions 1 and 2). Confidence banks are read with ``keep_confidence``
        only; when the state has none, they restart beside the restored banks with NaN confidences (the
        features sampled before the resume have no recorded confidence)."""
        self.thresholds = state_dict.get("thresholds")
        self.start_step = state_dict.get("start_step")
        for name in ("prototypes", "proto_mask", "proto_bank"):
            setattr(self, name, state_dict.get(name))
        self.last_eta_t = state_dict.get("last_eta_t")
        self.last_fill = state_dict.get("last_fill")
        self.init_step = state_dict.get("init_step")
        if self.init_step is None and self.proto_mask is not None:  # version 1: no late classes
            self.init_step = torch.where(self.proto_mask.any(1).cpu(), int(self.start_step or 0), -1).long()
        self.last_stats = {k: state_dict[f"stats_{k}"] for k in ("dispersion", "apo_extra")
                           if state_dict.get(f"stats_{k}") is not None}
        self.missing = [] if self.proto_mask is None else [
            cls for cls, h in enumerate(self.proto_mask.any(1).tolist()) if not h
        ]
        for name in BANK_ATTRS + CONFIDENCE_ATTRS:
            bank_state = state_dict.get(name) if name in BANK_ATTRS or self.keep_confidence else None
            setattr(self, name, None if bank_state is None else _bank_from_state(bank_state))
        if self.keep_confidence:
            for bank_name, conf_name in zip(BANK_ATTRS, CONFIDENCE_ATTRS, strict=True):
                bank = getattr(self, bank_name)
                if bank is not None and getattr(self, conf_name) is None:
                    conf = MemoryBank(bank.num_classes, bank.capacity, 1, dtype=torch.float16)
                    conf.feats.fill_(float("nan"))
                    conf.ptr.copy_(bank.ptr)
                    conf.count.copy_(bank.count)
                    setattr(self, conf_name, conf)


def _bank_from_state(bank_state: dict[str, Tensor]) -> MemoryBank:
    c, v, d = bank_state["feats"].shape
    bank = MemoryBank(c, v, d, dtype=bank_state["feats"].dtype)
    bank.load_state_dict(bank_state)
    return bank
