"""``python -m brpg_lightning.predict ckpt_path=FILE input=IMAGE_OR_FOLDER output=FOLDER``: masks for new images.

Runs the checkpoint's evaluated network (the teacher for mean teacher) on every image under ``input``
(recursively; ``.png .jpg .jpeg .bmp .tif .tiff .webp``, hidden files and folders left out) and writes, mirroring the input's sub-folders:

* ``<output>/masks/<name>.png``: class ids (8-bit grey), the format the dataset readers take as masks;
* ``<output>/color/<name>.png``: the same ids as a palette PNG coloured with the checkpoint's palette;
* ``<output>/overlay/<name>.png``: the image blended with the colours (``overlay_alpha``).

Every output keeps its input's size. Images of one size go through the network in batches of ``batch_size``;
an image with a side longer than the window goes window by window (``models.inference.sliding_window_logits``,
overlapping logits averaged). The window and its stride are the checkpoint's sliding-window protocol when it is
one (``eval_protocol``), else 1024 and 2/3 of it; ``window_size`` and ``window_stride`` replace them.
Everything comes from the checkpoint's ``inference`` block (:mod:`brpg_lightning.checkpoint`); no dataset is
read. Existing files in ``output`` are never replaced unless ``overwrite=true``; an ``output`` that cannot be
written is refused before any image is read. An unreadable file is skipped
with a warning naming it; the run then ends with exit status 2 listing the skipped files.
"""

from __future__ import annotations

import logging
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from torch import Tensor, nn

from brpg_lightning.checkpoint import load_for_inference, normalize
from brpg_lightning.cli import exit_on_bad_input
from brpg_lightning.config import check_mandatory, config_dir, register_resolvers
from brpg_lightning.data.datasets.common import IMAGE_SUFFIXES, files_in
from brpg_lightning.errors import BRPGInputError
from brpg_lightning.models.inference import EvalProtocol, sliding_window_logits
from brpg_lightning.run_dir import check_writable_folder

register_resolvers()
log = logging.getLogger(__name__)

OUTPUT_KINDS = ("masks", "color", "overlay")
DEFAULT_WINDOW = 1024
"""Window side when the checkpoint's protocol is not a sliding window: larger images go window by window."""


def list_images(path: str | Path, exclude: Path | None = None) -> list[Path]:
    """The image files at ``path`` (one file, or a folder searched recursively, ``exclude`` left out), sorted."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise BRPGInputError(f"input={path}: no such file or folder")
    skip = exclude.resolve() if exclude is not None else None
    files = [p for p in files_in(path, recursive=True) if not (skip and p.resolve().is_relative_to(skip))]
    if not files:
        raise BRPGInputError(f"input={path}: no images found (looked for {' '.join(IMAGE_SUFFIXES)})")
    return files


def output_paths(image: Path, input_root: Path, output: Path) -> dict[str, Path]:
    """``{"masks": ..., "color": ..., "overlay": ...}`` for one input, mirroring its place under ``input_root``."""
    rel = image.relative_to(input_root) if input_root.is_dir() else Path(image.name)
    return {kind: output / kind / rel.with_suffix(".png") for kind in OUTPUT_KINDS}


def check_collisions(plans: Mapping[Path, Mapping[str, Path]], input_root: Path, output: Path) -> None:
    """Refuse inputs whose outputs would land on the same files (``a.jpg`` and ``a.png`` both give
    ``masks/a.png``): the later image would silently replace the earlier one's outputs.

    Outputs keep the image's stem (``a.png`` for ``a.jpg``) because that is how a mask is matched to its image
    (the folder dataset reader, which refuses two images of one stem in a folder, as well); a renamed output
    (``a.jpg.png``) would no longer match. So the collision is an error listing the images to rename.
    """
    by_target: dict[Path, list[Path]] = defaultdict(list)
    for image, paths in plans.items():
        by_target[paths["masks"]].append(image)
    groups = [sorted(group) for group in by_target.values() if len(group) > 1]
    if not groups:
        return
    base = input_root if input_root.is_dir() else input_root.parent
    shown = "; ".join(
        f"{', '.join(repr(str(p.relative_to(base))) for p in group)} -> "
        f"'{plans[group[0]]['masks'].relative_to(output / 'masks')}'"
        for group in groups[:3]
    ) + ("; ..." if len(groups) > 3 else "")
    raise BRPGInputError(
        f"input={input_root}: {sum(len(g) for g in groups)} images share a name without suffix, so their outputs "
        f"would overwrite each other ({shown}); outputs are named <stem>.png to match their image, rename one of each"
    )


def window_plan(
    meta: Mapping[str, Any], window_size: int | None, window_stride: int | None = None
) -> tuple[int, int | None]:
    """``(window side, stride)``: ``window_size``, else the checkpoint's sliding-window crop, else 1024; the stride
    ``window_stride``, else the checkpoint's stored stride when the window is its sliding window, else None
    (2/3 of the window)."""
    for key, value in (("window_size", window_size), ("window_stride", window_stride)):
        if value is not None and int(value) < 1:
            raise BRPGInputError(f"{key}={value}; expected an integer >= 1 or null")
    protocol = EvalProtocol.from_dict(meta.get("eval_protocol") or {})
    sliding = protocol.mode == "sliding"
    if window_size is not None:
        window = int(window_size)
    else:
        window = int(protocol.crop_size) if sliding else DEFAULT_WINDOW  # type: ignore[arg-type]
    if window_stride is not None:
        return window, int(window_stride)
    # the stored stride belongs to the stored window only: another window side takes 2/3 of itself
    return window, protocol.stride if sliding and window == protocol.crop_size else None


@torch.no_grad()
def predict_logits(
    net: nn.Module, meta: Mapping[str, Any], images: np.ndarray | Tensor, window: int = DEFAULT_WINDOW,
    stride: int | None = None,
) -> Tensor:
    """Logits ``(B, C, H, W)`` for uint8 RGB images ``(B, H, W, 3)`` of one size (sliding window past ``window``)."""
    x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2)
    x = normalize(x, meta).to(next(net.parameters()).device)
    if max(x.shape[-2:]) > window:
        return sliding_window_logits(net, x, window, stride)
    return net(x).float()


def colorize(mask: np.ndarray, palette: Sequence[Sequence[int]]) -> Image.Image:
    """Class ids ``(H, W)`` -> a palette (mode ``P``) PNG image whose colours are ``palette``."""
    img = Image.fromarray(mask.astype(np.uint8), mode="P")
    flat = [int(v) for colour in palette for v in colour]
    img.putpalette(flat + [0] * (768 - len(flat)))
    return img


def overlay(image: np.ndarray, mask: np.ndarray, palette: Sequence[Sequence[int]], alpha: float) -> np.ndarray:
    """``(1 - alpha) * image + alpha * palette[mask]``, uint8 ``(H, W, 3)``."""
    colours = np.asarray(palette, dtype=np.float32)[mask]
    return np.clip((1.0 - alpha) * image.astype(np.float32) + alpha * colours + 0.5, 0, 255).astype(np.uint8)


def _probe(path: Path) -> tuple[int, int] | str:
    """``(height, width)`` of a readable image, else the reason it cannot be read."""
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            return im.height, im.width
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds for broken files
        return f"{type(exc).__name__}: {exc}"


def _read_rgb(path: Path) -> np.ndarray | str:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"


def predict(cfg: DictConfig) -> dict[str, Any]:
    """Run prediction as configured (``conf/predict.yaml``); returns ``{"written": [...], "skipped": {...}}``."""
    from tqdm.auto import tqdm

    input_root, output = Path(cfg.input), Path(cfg.output)
    images = list_images(input_root, exclude=output)  # an output folder inside the input is not read
    plans = {p: output_paths(p, input_root, output) for p in images}
    check_collisions(plans, input_root, output)
    check_writable_folder(output, "output")  # a folder that cannot hold the masks fails now, not after the work
    if not cfg.overwrite:
        clash = [str(q.relative_to(output)) for paths in plans.values() for q in paths.values() if q.exists()]
        if clash:
            raise BRPGInputError(
                f"output={output}: {len(clash)} file(s) already exist ({', '.join(clash[:3])}"
                f"{', ...' if len(clash) > 3 else ''}); pass overwrite=true to replace them, or another output"
            )
    batch_size = int(cfg.batch_size)
    alpha = float(cfg.overlay_alpha)
    if batch_size < 1 or not 0.0 <= alpha <= 1.0:
        raise BRPGInputError(f"batch_size={batch_size}, overlay_alpha={alpha}; expected >= 1 and within [0, 1]")
    net, meta = load_for_inference(cfg.ckpt_path)  # after the checks of the input and output: they read no weights
    device = str(cfg.device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    net = net.to(device)
    window, stride = window_plan(meta, cfg.window_size, cfg.window_stride)
    palette = meta["palette"]

    skipped: dict[str, str] = {}
    by_size: dict[tuple[int, int], list[Path]] = defaultdict(list)
    for path in images:
        size = _probe(path)
        if isinstance(size, str):
            skipped[str(path)] = size
        else:
            by_size[size].append(path)
    for path, why in skipped.items():
        print(f"warning: skipped unreadable file {path} ({why})", file=sys.stderr)

    written: list[str] = []
    bar = tqdm(total=sum(len(v) for v in by_size.values()), desc="predict", unit="img", disable=not cfg.progress)
    for _, paths in sorted(by_size.items()):
        for start in range(0, len(paths), batch_size):
            chunk, arrays = [], []
            for path in paths[start : start + batch_size]:
                arr = _read_rgb(path)
                if isinstance(arr, str):
                    skipped[str(path)] = arr
                    print(f"warning: skipped unreadable file {path} ({arr})", file=sys.stderr)
                    bar.update(1)
                    continue
                chunk.append(path)
                arrays.append(arr)
            if not chunk:
                continue
            labels = predict_logits(net, meta, np.stack(arrays), window, stride).argmax(1).cpu().numpy()
            for path, image, mask in zip(chunk, arrays, labels.astype(np.uint8), strict=True):
                dest = plans[path]
                for q in dest.values():
                    q.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask, mode="L").save(dest["masks"])
                colorize(mask, palette).save(dest["color"])
                Image.fromarray(overlay(image, mask, palette, alpha)).save(dest["overlay"])
                written.append(str(path))
            bar.update(len(chunk))
    bar.close()
    log.info("predicted %d image(s) into %s", len(written), output)
    return {"written": written, "skipped": skipped, "output": str(output)}


def run(cfg: DictConfig) -> int:
    from brpg_lightning.validate import check_device

    check_mandatory(cfg, ("ckpt_path", "input", "output"))
    check_device("device", cfg.get("device"))
    result = predict(cfg)
    print(f"predicted {len(result['written'])} image(s) into {result['output']}", flush=True)
    if result["skipped"]:
        names = ", ".join(result["skipped"])
        raise BRPGInputError(f"skipped {len(result['skipped'])} unreadable file(s): {names}")
    return len(result["written"])


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="predict")
def main(cfg: DictConfig) -> int:
    return exit_on_bad_input(run)(cfg)


if __name__ == "__main__":
    main()
