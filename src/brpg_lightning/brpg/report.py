"""What BRPG reports: its statistics as plain values, their scalars under logged keys, and the snapshot file.

Readers of a :class:`~brpg_lightning.brpg.prototype_memory.PrototypeMemory` with no Lightning import: the
callback logs :func:`epoch_scalars` at every epoch end and writes :func:`snapshot` at clustering when asked
(``save_snapshot``); dashboards and notebooks read the same values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from brpg_lightning.brpg.prototype_memory import Clustering, PrototypeMemory

STAGES = ("pretrain", "sampling", "prototype")
"""BRPG's stages in order (``brpg/stage`` logs the index): before ``T_S1``, ``[T_S1, T_S2)``, from ``T_S2``."""


def statistics(memory: PrototypeMemory, stage: str, epoch: int) -> dict[str, Any]:
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

    Example:
        >>> memory = PrototypeMemory(num_classes=2)
        >>> stats = statistics(memory, "pretrain", 0)
        >>> stats["bank_fill"], stats["prototypes_per_class"], stats["classes_without_prototypes"]
        (None, [0, 0], [0, 1])
    """
    c = int(memory.num_classes or 0)
    names = memory.bank_names
    live = memory.live_banks()
    fill = torch.stack([b.fill().cpu() for b in live]) if live else memory.last_fill
    stats: dict[str, Any] = {"epoch": int(epoch), "stage": stage}
    stats["bank_fill"] = None if fill is None else {n: fill[i].tolist() for i, n in enumerate(names)}
    disp, extra = memory.last_stats.get("dispersion"), memory.last_stats.get("apo_extra")
    stats["dispersion"] = None if disp is None else {n: disp[i].tolist() for i, n in enumerate(names)}
    stats["apo_extra"] = None if extra is None else {n: extra[i].tolist() for i, n in enumerate(names)}
    stats["apo_picks"] = None if extra is None else {
        n: [cls for cls, e in enumerate(extra[i].tolist()) if e > 0] for i, n in enumerate(names)
    }
    counts = memory.proto_mask.sum(1).tolist() if memory.proto_mask is not None else [0] * c
    stats["prototypes_per_class"] = counts
    stats["classes_without_prototypes"] = [cls for cls, n in enumerate(counts) if n == 0]
    stats["init_step"] = memory.init_step.tolist() if memory.init_step is not None else [-1] * c
    stats["eta_t"] = memory.last_eta_t
    use = memory.class_thresholds and memory.thresholds is not None
    stats["eta_s"] = memory.current_class_thresholds().tolist() if use else None
    stats["eta_s_ema"] = memory.thresholds.tolist() if use else None
    return stats


def epoch_scalars(stats: dict[str, Any], prefix: str = "brpg/") -> dict[str, float]:
    """The scalars of :func:`statistics` under their logged keys.

    ``<prefix>stage`` (0 pretrain, 1 sampling, 2 prototype), ``classes_without_prototypes``,
    ``prototypes_total``, ``prototypes/<class index>``; once banks exist ``bank_fill_<bank>/<class>``; after
    clustering ``dispersion_<bank>/<class>`` (classes with an empty bank left out) and
    ``apo_extra_<bank>/<class>``; in the prototype stage ``eta_t_epoch`` (Eq. 19 at the epoch's last step);
    with ``class_thresholds`` ``eta_s/<class>``. ``<bank>`` is ``high``/``low`` (CPG) or ``plain``.

    Example:
        >>> scalars = epoch_scalars(statistics(PrototypeMemory(num_classes=1), "sampling", 1))
        >>> scalars["brpg/stage"], scalars["brpg/classes_without_prototypes"], len(scalars)
        (1.0, 1.0, 4)
    """
    out: dict[str, float] = {
        f"{prefix}stage": float(STAGES.index(stats["stage"])),
        f"{prefix}classes_without_prototypes": float(len(stats["classes_without_prototypes"])),
        f"{prefix}prototypes_total": float(sum(stats["prototypes_per_class"])),
    }
    for cls, n in enumerate(stats["prototypes_per_class"]):
        out[f"{prefix}prototypes/{cls}"] = float(n)
    for key in ("bank_fill", "dispersion", "apo_extra"):
        for bank, values in (stats[key] or {}).items():
            for cls, v in enumerate(values):
                if v == v:  # NaN dispersion (empty bank) is left out
                    out[f"{prefix}{key}_{bank}/{cls}"] = float(v)
    if stats["stage"] == "prototype" and stats["eta_t"] is not None:
        out[f"{prefix}eta_t_epoch"] = float(stats["eta_t"])
    for cls, t in enumerate(stats["eta_s"] or []):
        out[f"{prefix}eta_s/{cls}"] = float(t)
    return out


def snapshot(memory: PrototypeMemory, clustering: Clustering, per_class: int, epoch: int) -> dict[str, Tensor]:
    """The notebooks' view of the banks at clustering: up to ``per_class`` features per class and bank.

    Rows (drawn without replacement, seeded with ``kmeans_seed``): ``features (N, D)`` float16,
    ``confidence (N,)`` float32 (NaN for features sampled before a resume without recorded confidences),
    ``labels (N,)`` and ``bank (N,)`` long (0 high, 1 low); then the prototypes, ``proto_mask``, ``proto_bank``,
    the ``dispersion`` and ``apo_extra`` of the clustering and its ``epoch``. Needs the confidence banks
    (``PrototypeMemory(keep_confidence=True)``).
    """
    if clustering.confidences is None:
        raise ValueError("the BRPG snapshot needs the confidence banks: PrototypeMemory(keep_confidence=True)")
    rows: dict[str, list[Tensor]] = {"features": [], "labels": [], "confidence": [], "bank": []}
    gen = torch.Generator().manual_seed(memory.kmeans_seed)
    for b, (bank, cbank) in enumerate(zip(clustering.banks, clustering.confidences, strict=True)):
        for cls in range(memory.num_classes):
            f, cf = bank.get(cls).cpu(), cbank.get(cls).cpu().view(-1)
            idx = torch.randperm(f.shape[0], generator=gen)[:per_class]
            rows["features"].append(f[idx].half())
            rows["confidence"].append(cf[idx].float())
            rows["labels"].append(torch.full((idx.numel(),), cls, dtype=torch.long))
            rows["bank"].append(torch.full((idx.numel(),), b, dtype=torch.long))
    snap = {k: torch.cat(v) for k, v in rows.items()}
    snap.update(
        prototypes=memory.prototypes.cpu(), proto_mask=memory.proto_mask.cpu(), proto_bank=memory.proto_bank.cpu(),
        dispersion=clustering.dispersion, apo_extra=clustering.apo_extra, epoch=torch.tensor(epoch),
    )
    return snap


def write_snapshot(path: str | Path, snap: dict[str, Tensor]) -> Path:
    """``torch.save`` the :func:`snapshot` at ``path`` (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(snap, path)
    return path
