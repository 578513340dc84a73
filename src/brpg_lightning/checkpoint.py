"""What a checkpoint carries for inference, and the network ``predict`` and ``export`` run from it.

Every checkpoint written by a method (``methods.base.SegmentationModule.on_save_checkpoint``) holds an
``inference`` block next to Lightning's state::

    {"version": 1, "class_names": [...], "palette": [[r, g, b], ...], "normalization": {"mean", "std"},
     "model": {...the run's resolved model config...}, "eval_prefix": "teacher.module.",
     "align_corners": true, "ignore_index": 255, "eval_protocol": {"mode", "crop_size", "stride"},
     "protocol": {"val_mode", "val_crop_size", "crop_size"}, "package_version": "..."}

so that ``python -m brpg_lightning.predict`` and ``python -m brpg_lightning.export`` rebuild the evaluated
network (the teacher for mean teacher) and colour its output with no dataset on disk. ``align_corners`` is the
geometry the logits were upsampled with in training (``models.output.resize_to_input``); predict, export and
``evaluate`` rebuild the network with it, and a checkpoint written before it was stored reads as False, the
geometry it was trained with (:func:`stored_align_corners`). ``eval_protocol`` is the module's
``models.inference.EvalProtocol`` as a plain dict (with its stride); ``evaluate`` evaluates with it and ``predict``
takes its sliding window from it. A checkpoint written before it was stored derives it from the older keys
(:func:`stored_eval_protocol`); ``protocol`` stays for the readers of those versions.

When the evaluated network averages the logits of several networks (CPS with ``method.eval_on=mean``), the block
holds ``"eval_prefixes": ["student.", "net2."]`` and :func:`build_eval_network` rebuilds the average
(``models.ensemble.MeanLogits``); its ``eval_prefix`` then joins them (``"student.+net2."``), which matches no
weights, so a reader that knows only ``eval_prefix`` stops with an error instead of running one network.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brpg_lightning.constants import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from brpg_lightning.errors import BRPGInputError
from brpg_lightning.models.inference import EvalProtocol

INFERENCE_VERSION = 1
"""Version of the ``inference`` block; a reader refuses any other."""

INFERENCE_KEYS = ("version", "class_names", "palette", "normalization", "model", "eval_prefix")
"""Keys an ``inference`` block must hold."""

CITYSCAPES_PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)
"""Official Cityscapes colours of the 19 train ids (cityscapesScripts ``labels.py``), road ... bicycle."""


def voc_palette(num_classes: int) -> list[list[int]]:
    """PASCAL VOC's colour map (the devkit's bit-interleaving rule), extended to any ``num_classes <= 256``.

    Class ``i``'s bits ``(b2 b1 b0)`` go, three at a time, into the high bits of ``(B, G, R)``; it is the
    palette of VOC's ``SegmentationClass`` PNGs for the 21 classes and a deterministic palette for others.

    >>> voc_palette(21)[1], voc_palette(21)[15], voc_palette(21)[20]
    ([128, 0, 0], [192, 128, 128], [0, 64, 128])
    """
    if not 1 <= num_classes <= 256:
        raise BRPGInputError(f"num_classes={num_classes}; a palette holds 1 to 256 classes")
    palette = []
    for i in range(num_classes):
        c, rgb = i, [0, 0, 0]
        for j in range(8):
            for k in range(3):
                rgb[k] |= ((c >> k) & 1) << (7 - j)
            c >>= 3
        palette.append(rgb)
    return palette


def dataset_palette(dataset_cfg: Mapping[str, Any], num_classes: int) -> list[list[int]]:
    """``dataset.palette`` when the run config has one, Cityscapes' colours for its 19 classes, else VOC's rule."""
    given = dataset_cfg.get("palette")
    if given is not None:
        palette = [[int(v) for v in colour] for colour in given]
        if len(palette) != num_classes or any(len(c) != 3 or not all(0 <= v <= 255 for v in c) for c in palette):
            raise BRPGInputError(
                f"dataset.palette has {len(palette)} entries; expected {num_classes} [r, g, b] triples in 0..255"
            )
        return palette
    if str(dataset_cfg.get("name", "")).lower() == "cityscapes" and num_classes == len(CITYSCAPES_PALETTE):
        return [list(c) for c in CITYSCAPES_PALETTE]
    return voc_palette(num_classes)


LEGACY_ALIGN_CORNERS = False
"""The geometry of checkpoints that do not name one: every run before the ``align_corners`` key existed."""


def stored_align_corners(ckpt: Mapping[str, Any]) -> bool:
    """The geometry a checkpoint's network was trained with: the ``inference`` block's ``align_corners``, else
    the stored run config's ``model.align_corners``, else :data:`LEGACY_ALIGN_CORNERS`."""
    meta = ckpt.get("inference") or {}
    if meta.get("align_corners") is not None:
        return bool(meta["align_corners"])
    model = (ckpt.get("hyper_parameters") or {}).get("run_config", {}).get("model") or {}
    if model.get("align_corners") is not None:
        return bool(model["align_corners"])
    return LEGACY_ALIGN_CORNERS


def stored_eval_protocol(ckpt: Mapping[str, Any]) -> EvalProtocol:
    """The protocol a checkpoint's network was evaluated with: the ``inference`` block's ``eval_protocol``;
    else (written before it was stored) the run config's ``dataset.val_mode``/``val_crop_size``/``val_stride``,
    what ``evaluate`` read then, with the older block's ``protocol`` keys for a run config without them
    (a mode left unset is the whole image, as the datamodule's default)."""
    meta = ckpt.get("inference") or {}
    if meta.get("eval_protocol") is not None:
        return EvalProtocol.from_dict(meta["eval_protocol"])
    dataset = dict(((ckpt.get("hyper_parameters") or {}).get("run_config") or {}).get("dataset") or {})
    old = meta.get("protocol") or {}
    mode = dataset.get("val_mode", old.get("val_mode"))
    return EvalProtocol.from_dataset({
        "val_mode": mode if mode is not None else "whole",
        "val_crop_size": dataset.get("val_crop_size", old.get("val_crop_size")),
        "val_stride": dataset.get("val_stride"),
    })


def inference_metadata(
    run_config: Mapping[str, Any], class_names: Sequence[str], eval_prefix: str | Sequence[str],
    align_corners: bool | None = None, eval_protocol: EvalProtocol | None = None,
) -> dict[str, Any]:
    """The ``inference`` block for a run: see the module docstring.

    ``eval_prefix``: the ``state_dict`` prefix of the evaluated network, or a list of them when the evaluated
    network averages their logits (stored as ``eval_prefixes``).

    ``align_corners``: the evaluated network's geometry (``Segmentor.align_corners``); None takes the model
    config's ``align_corners`` (the segmentor's default, True, when the config has none). ``eval_protocol``:
    the module's protocol, stored as it is; None takes the dataset config's (``EvalProtocol.from_dataset``).
    """
    from brpg_lightning import __version__

    dataset = dict(run_config.get("dataset") or {})
    model = dict(run_config["model"])
    num_classes = int(model.get("num_classes", len(class_names)))
    prefixes = [eval_prefix] if isinstance(eval_prefix, str) else [str(p) for p in eval_prefix]
    members = {"eval_prefixes": prefixes} if len(prefixes) > 1 else {}
    return {
        "version": INFERENCE_VERSION,
        "package_version": __version__,
        "class_names": [str(c) for c in class_names],
        "palette": dataset_palette(dataset, num_classes),
        "normalization": {
            "mean": [float(v) for v in dataset.get("mean") or IMAGENET_MEAN],
            "std": [float(v) for v in dataset.get("std") or IMAGENET_STD],
            "scale": 255.0,
        },
        "model": model,
        "eval_prefix": "+".join(prefixes),
        **members,
        "align_corners": bool(model.get("align_corners", True) if align_corners is None else align_corners),
        "ignore_index": IGNORE_INDEX,
        "eval_protocol": (eval_protocol or EvalProtocol.from_dataset(dataset)).as_dict(),
        "protocol": {  # the older readers' keys (no stride): they pick their sliding window from it
            "val_mode": dataset.get("val_mode"),
            "val_crop_size": dataset.get("val_crop_size"),
            "crop_size": dataset.get("crop_size"),
        },
    }


def _torch_load(path: Path, mmap: bool = False) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def newest_readable_checkpoint(folder: str | Path, exclude: str | Path | None = None, tries: int = 20) -> Path | None:
    """The most recently modified ``*.ckpt`` in ``folder`` (not ``exclude``) that ``torch.load`` opens (memory-mapped:
    a truncated file fails on its missing zip directory without reading the tensors); None if there is none among
    the ``tries`` newest."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    skip = Path(exclude).resolve() if exclude is not None else None
    files = sorted((p for p in folder.glob("*.ckpt") if p.is_file() and p.resolve() != skip),
                   key=lambda p: p.stat().st_mtime, reverse=True)
    for candidate in files[:tries]:
        try:
            _torch_load(candidate, mmap=True)
        except Exception:  # noqa: BLE001 - any unreadable file is skipped
            continue
        return candidate
    return None


def last_good_checkpoint(trainer: Any) -> Path | None:
    """The newest readable checkpoint in the folders of ``trainer.checkpoint_callbacks`` (the run's ``checkpoints/``),
    None when there is none yet."""
    folders = {Path(c.dirpath) for c in getattr(trainer, "checkpoint_callbacks", []) if getattr(c, "dirpath", None)}
    found = [p for p in (newest_readable_checkpoint(f) for f in folders) if p is not None]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _good_one_beside(path: Path) -> str:
    good = newest_readable_checkpoint(path.parent, exclude=path)
    return f"; the newest readable checkpoint beside it: {good}" if good else "; no readable checkpoint beside it"


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """``torch.load(..., weights_only=True)`` with a one-line error for a missing, truncated or foreign file, naming
    the newest readable checkpoint beside it. ``mmap``: map the tensors instead of reading them (a cheap check
    before ``Trainer.fit`` reads the file itself)."""
    path = Path(path)
    if not path.is_file():
        raise BRPGInputError(f"ckpt_path={path}: no such checkpoint file{_good_one_beside(path)}")
    try:
        ckpt = _torch_load(path, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is bad input here
        raise BRPGInputError(
            f"ckpt_path={path}: not a readable PyTorch checkpoint, truncated or corrupt ({type(exc).__name__})"
            f"{_good_one_beside(path)}"
        ) from exc
    if not isinstance(ckpt, dict) or "run_config" not in ckpt.get("hyper_parameters", {}):
        raise BRPGInputError(f"ckpt_path={path}: not a brpg-lightning checkpoint (no hyper_parameters.run_config)")
    return ckpt


def stored_num_classes(ckpt: Mapping[str, Any]) -> int | None:
    """The class count of the checkpoint's model (its run config's ``model.num_classes``), None when not stated."""
    model = ((ckpt.get("hyper_parameters") or {}).get("run_config") or {}).get("model") or {}
    value = model.get("num_classes")
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def check_class_count(ckpt: Mapping[str, Any], num_classes: Any, path: str | Path, expected: str) -> None:
    """``dataset.num_classes`` against the checkpoint's model (train resumes from it, evaluate scores it): one line
    naming both counts and ``expected`` (what to do instead)."""
    stored = stored_num_classes(ckpt)
    if stored is not None and int(num_classes) != stored:
        raise BRPGInputError(
            f"dataset.num_classes={num_classes} but the checkpoint's model has {stored} classes (ckpt_path={path}); "
            f"{expected}"
        )


def check_weights_fit(expected: Mapping[str, Tensor], stored: Mapping[str, Tensor], path: str | Path,
                      what: str) -> None:
    """The checkpoint's weights ``stored`` load into a network whose ``state_dict()`` is ``expected``: the same names
    and shapes. One line counting and naming the first missing, unexpected and reshaped entries, instead of
    ``load_state_dict``'s many-line error after the data and the trainer were set up. Shapes only: memory-mapped
    tensors are not read."""
    missing = [k for k in expected if k not in stored]
    unexpected = [k for k in stored if k not in expected]
    reshaped = [f"{k} {tuple(stored[k].shape)} for {tuple(v.shape)}" for k, v in expected.items()
                if k in stored and tuple(stored[k].shape) != tuple(v.shape)]
    parts = [f"{len(items)} {kind} ({', '.join(items[:2])}{', ...' if len(items) > 2 else ''})"
             for kind, items in (("of another shape", reshaped), ("missing", missing), ("unexpected", unexpected))
             if items]
    if parts:
        raise BRPGInputError(f"ckpt_path={path}: its weights do not fit {what}: {'; '.join(parts)}")


def check_resumable(ckpt: Mapping[str, Any], module: nn.Module, run_config: Mapping[str, Any],
                    path: str | Path) -> None:
    """A checkpoint training can resume from: the run's method, its dataset's class count, and weights that fit the
    module built from the run's config (model and method). One line, before ``Trainer.fit`` reads the file."""
    stored = (ckpt.get("hyper_parameters") or {}).get("run_config") or {}
    ours, theirs = (str((c.get("method") or {}).get("_target_", "")) for c in (run_config, stored))
    if theirs and ours and theirs != ours:
        name = theirs.rsplit(".", 2)[-2] if "." in theirs else theirs
        raise BRPGInputError(
            f"ckpt_path={path}: a checkpoint of method={name}, not this run's method={ours.rsplit('.', 2)[-2]}; "
            f"resume it with method={name}, or start a new run without ckpt_path"
        )
    num_classes = (run_config.get("dataset") or {}).get("num_classes")
    if num_classes is not None:
        check_class_count(ckpt, num_classes, path, "resume it on its own dataset, or start a new run without ckpt_path")
    check_weights_fit(module.state_dict(), ckpt.get("state_dict") or {}, path,
                      "the model this run builds (model=, method= and their keys must be the checkpoint's)")


def read_inference(ckpt: Mapping[str, Any], path: str | Path) -> dict[str, Any]:
    """The checkpoint's ``inference`` block, checked; one-line errors say what is missing or which version."""
    meta = ckpt.get("inference")
    if meta is None:
        raise BRPGInputError(
            f"ckpt_path={path}: no 'inference' metadata (class names, palette, normalisation, model config); "
            f"it was written before brpg-lightning stored it; retrain, or resume it for one step to re-save it"
        )
    missing = [k for k in INFERENCE_KEYS if k not in meta]
    if missing:
        raise BRPGInputError(f"ckpt_path={path}: 'inference' metadata lacks {', '.join(missing)}")
    if meta["version"] != INFERENCE_VERSION:
        raise BRPGInputError(
            f"ckpt_path={path}: inference metadata version {meta['version']!r} "
            f"(package {meta.get('package_version', '?')}); this brpg-lightning reads version {INFERENCE_VERSION}"
        )
    meta = dict(meta)
    try:
        meta["eval_protocol"] = stored_eval_protocol(ckpt).as_dict()  # filled in for older checkpoints
    except BRPGInputError as exc:
        raise BRPGInputError(f"ckpt_path={path}: stored evaluation protocol: {exc}") from None
    return meta


class ClassificationPath(nn.Module):
    """Encoder, decoder and classification head of a segmentor, logits at the input size: what is exported
    (a ``MeanLogits``: every member's, logits averaged at the decoder resolution as it does).

    ``forward(x)``: normalised images ``(B, 3, H, W)``, any ``H, W`` -> logits ``(B, C, H, W)``. Pads
    bottom/right to the segmentor's ``pad_multiple`` (always, with a possibly zero amount, so a traced or
    exported graph stays valid for every size), runs ``E``, the decoder and ``F`` (the feature head ``G`` is
    training-only) and upsamples with the segmentor's geometry as ``models.output.resize_to_input`` does:
    ``align_corners=True``, the map cropped to ``(ceil(H / stride), ceil(W / stride))`` then interpolated to
    ``(H, W)`` with ``align_corners=True``; False, by the stride then cropped. Equal to
    ``segmentor(x).logits_at((H, W))``.
    """

    def __init__(self, segmentor: nn.Module) -> None:
        super().__init__()
        from brpg_lightning.models.ensemble import MeanLogits

        members = list(segmentor.members) if isinstance(segmentor, MeanLogits) else [segmentor]
        first = members[0]
        self.encoder, self.decoder, self.classifier = first.encoder, first.decoder, first.classifier
        # further networks whose logits are averaged with the first's (MeanLogits: CPS eval_on=mean)
        self.others = nn.ModuleList(nn.Sequential(m.encoder, m.decoder, m.classifier) for m in members[1:])
        self.n_members = len(members)
        self.pad_multiple, self.stride = int(segmentor.pad_multiple), int(segmentor.stride)
        self.align_corners = bool(getattr(segmentor, "align_corners", LEGACY_ALIGN_CORNERS))

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2], x.shape[-1]
        m, s = self.pad_multiple, self.stride
        x = F.pad(x, (0, (m - width % m) % m, 0, (m - height % m) % m))
        logits = self.classifier(self.decoder(self.encoder(x)))
        if self.n_members > 1:  # at the decoder resolution, as MeanLogits (upsampling is linear)
            for branch in self.others:
                logits = logits + branch(x)
            logits = logits / self.n_members
        if self.align_corners:  # size arithmetic without negative floor division (traced and exported alike)
            logits = logits[..., : (height + s - 1) // s, : (width + s - 1) // s]
            return F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=True)
        logits = F.interpolate(logits, scale_factor=s, mode="bilinear", align_corners=False)
        return logits[..., :height, :width]


def build_eval_network(ckpt: Mapping[str, Any], meta: Mapping[str, Any], path: str | Path) -> nn.Module:
    """The evaluated segmentor (eval mode, CPU) from the checkpoint's model config and weights; no download.
    With ``eval_prefixes`` (several networks, logits averaged): a ``models.ensemble.MeanLogits`` of them."""
    from hydra.utils import instantiate

    from brpg_lightning.models.ensemble import MeanLogits

    model_cfg = dict(meta["model"])
    model_cfg.update(encoder_weights=None)  # weights come from the checkpoint, never from a hub
    model_cfg["align_corners"] = stored_align_corners({**ckpt, "inference": meta})
    if "weights_path" in model_cfg:
        model_cfg["weights_path"] = None
    members = []
    for prefix in [str(p) for p in meta.get("eval_prefixes") or [meta["eval_prefix"]]]:
        segmentor = instantiate(model_cfg, _convert_="all")
        state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
        if not state:
            raise BRPGInputError(f"ckpt_path={path}: no weights under '{prefix}' in state_dict")
        check_weights_fit(segmentor.state_dict(), state, path, f"the stored model config (weights under '{prefix}')")
        segmentor.load_state_dict(state)
        members.append(segmentor)
    return (members[0] if len(members) == 1 else MeanLogits(*members)).eval()


def load_for_inference(path: str | Path) -> tuple[ClassificationPath, dict[str, Any]]:
    """``(ClassificationPath in eval mode, inference metadata)`` from a checkpoint file."""
    ckpt = load_checkpoint(path)
    meta = read_inference(ckpt, path)
    return ClassificationPath(build_eval_network(ckpt, meta, path)).eval(), meta


def normalize(images: Tensor, meta: Mapping[str, Any]) -> Tensor:
    """uint8-range ``(B, 3, H, W)`` -> the training normalisation stored in ``meta``."""
    norm = meta["normalization"]
    mean = torch.tensor(norm["mean"], dtype=torch.float32).view(1, -1, 1, 1) * float(norm.get("scale", 255.0))
    std = torch.tensor(norm["std"], dtype=torch.float32).view(1, -1, 1, 1) * float(norm.get("scale", 255.0))
    return (images.float() - mean) / std
