"""``python -m brpg_lightning.export ckpt_path=FILE format=onnx|torchscript [output=FILE]``: ship the network.

Exports the evaluated network's classification path (:class:`~brpg_lightning.checkpoint.ClassificationPath`:
encoder, decoder, classification head, upsampling to the input size; the training-only feature head is left
out) with dynamic batch, height and width:

* input ``image``: float32 ``(B, 3, H, W)``, RGB scaled to ``[0, 1]`` then normalised with the checkpoint's
  mean/std (stored with the model); output ``logits``: float32 ``(B, C, H, W)``; ``argmax(1)`` gives class ids.
* metadata: class names, palette, normalisation and the checkpoint's evaluation protocol (``eval_protocol``:
  mode, crop, stride; a sliding window is run by the caller, as ``predict`` does).
* ``onnx``: ``torch.onnx.export`` (the ``torch.export``-based exporter by default; ``dynamo=false`` selects the
  older TorchScript-based one); class names, palette and normalisation go into the model's ``metadata_props``
  as JSON under ``brpg_inference``.
* ``torchscript``: ``torch.jit.trace`` (the tracer records the size arithmetic, so other sizes work); the same
  JSON is the extra file ``inference.json`` (``torch.jit.load(path, _extra_files={"inference.json": ""})``).

Both formats also get ``<output>.json`` with that metadata. With ``verify=true`` (default) the exported model is
run on two input sizes (``verify_sizes``; ONNX Runtime for ONNX) and compared with PyTorch: the maximum absolute
logit difference is printed per size, and a difference above ``tolerance`` is an error.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from brpg_lightning.checkpoint import load_for_inference
from brpg_lightning.cli import exit_on_bad_input
from brpg_lightning.config import check_mandatory, config_dir, register_resolvers
from brpg_lightning.errors import BRPGInputError
from brpg_lightning.models.inference import EvalProtocol
from brpg_lightning.run_dir import check_writable_folder

register_resolvers()
log = logging.getLogger(__name__)

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
METADATA_KEY = "brpg_inference"


def public_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    """What a user of the exported file needs: classes, palette, normalisation, the evaluation protocol the
    reported mIoU used (the file itself runs one forward pass: a sliding window is the caller's), tensor names
    and layout."""
    return {
        "class_names": meta["class_names"],
        "palette": meta["palette"],
        "normalization": meta["normalization"],
        "ignore_index": meta.get("ignore_index"),
        "eval_protocol": EvalProtocol.from_dict(meta.get("eval_protocol") or {}).as_dict(),
        "input": {"name": "image", "shape": ["B", 3, "H", "W"], "dtype": "float32",
                  "preprocess": "RGB / scale, then (x - mean) / std"},
        "output": {"name": "logits", "shape": ["B", "C", "H", "W"], "dtype": "float32"},
    }


def export_onnx(net: nn.Module, path: Path, sample: torch.Tensor, meta: dict[str, Any], opset: int,
                dynamo: bool) -> None:
    """ONNX with dynamic ``B, H, W`` and the metadata in ``metadata_props``."""
    import onnx

    if dynamo:
        dim = torch.export.Dim.DYNAMIC
        torch.onnx.export(
            net, (sample,), str(path), input_names=["image"], output_names=["logits"], opset_version=opset,
            dynamo=True, dynamic_shapes={"x": {0: dim, 2: dim, 3: dim}}, external_data=False, verbose=False,
        )
    else:
        axes = {0: "batch", 2: "height", 3: "width"}
        torch.onnx.export(
            net, (sample,), str(path), input_names=["image"], output_names=["logits"], opset_version=opset,
            dynamo=False, dynamic_axes={"image": axes, "logits": axes},
        )
    model = onnx.load(str(path))
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(public_metadata(meta))
    onnx.save(model, str(path))


def export_torchscript(net: nn.Module, path: Path, sample: torch.Tensor, meta: dict[str, Any]) -> None:
    """A traced TorchScript module with the metadata as the extra file ``inference.json``."""
    with torch.no_grad():
        traced = torch.jit.trace(net, (sample,), check_trace=False)
    torch.jit.save(traced, str(path), _extra_files={"inference.json": json.dumps(public_metadata(meta))})


def run_exported(path: Path, fmt: str, x: torch.Tensor) -> np.ndarray:
    """Logits of the exported file on ``x`` (ONNX Runtime for ONNX, ``torch.jit.load`` for TorchScript)."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(["logits"], {"image": x.numpy()})[0]
    module = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return module(x).numpy()


def parity(net: nn.Module, path: Path, fmt: str, sizes: Sequence[Sequence[int]], seed: int = 0) -> list[dict[str, Any]]:
    """Max absolute logit difference exported vs PyTorch on one random normalised batch per ``(B, H, W)``."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for b, h, w in sizes:
        x = torch.randn(int(b), 3, int(h), int(w), generator=gen)
        with torch.no_grad():
            ref = net(x).numpy()
        out = run_exported(path, fmt, x)
        if out.shape != ref.shape:
            raise RuntimeError(f"exported {fmt} returned {out.shape} for input {tuple(x.shape)}; expected {ref.shape}")
        rows.append({"size": [int(b), int(h), int(w)], "max_abs_diff": float(np.abs(out - ref).max())})
    return rows


def export(cfg: DictConfig) -> dict[str, Any]:
    """Export as configured (``conf/export.yaml``); returns ``{"output", "format", "parity": [...]}``."""
    fmt = str(cfg.format)
    if fmt not in FORMATS:
        raise BRPGInputError(f"format={fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            raise BRPGInputError(
                f"format=onnx needs the 'export' extra ({exc.name} is missing): pip install -e '.[export]'"
            ) from exc
    ckpt_path = Path(cfg.ckpt_path)
    output = Path(cfg.output) if cfg.get("output") else ckpt_path.with_suffix(FORMATS[fmt])
    if output.is_dir():
        raise BRPGInputError(f"output={output}: is a folder; expected the file to write, e.g. output={output / 'model'}"
                             f"{FORMATS[fmt]}")
    if output.exists() and not cfg.overwrite:
        raise BRPGInputError(f"output={output}: already exists; pass overwrite=true to replace it")
    check_writable_folder(output.parent, "output", output)  # before the checkpoint is read and the network traced
    net, meta = load_for_inference(ckpt_path)
    output.parent.mkdir(parents=True, exist_ok=True)
    h, w = (int(v) for v in cfg.sample_size)
    sample = torch.zeros(2, 3, h, w)  # batch 2: with a batch-1 example torch.export can type a broadcast (x + pos_embed) as batch 1
    if fmt == "onnx":
        export_onnx(net, output, sample, meta, int(cfg.opset), bool(cfg.dynamo))
    else:
        export_torchscript(net, output, sample, meta)
    output.with_name(output.name + ".json").write_text(json.dumps(public_metadata(meta), indent=2))
    result: dict[str, Any] = {"output": str(output), "format": fmt, "parity": []}
    if cfg.verify:
        result["parity"] = parity(net, output, fmt, OmegaConf.to_container(cfg.verify_sizes))
        worst = max(r["max_abs_diff"] for r in result["parity"])
        if worst > float(cfg.tolerance):
            raise BRPGInputError(
                f"exported {fmt} differs from PyTorch by {worst:.3g} > tolerance={cfg.tolerance} ({output})"
            )
    return result


def run(cfg: DictConfig) -> str:
    check_mandatory(cfg, ("ckpt_path",))
    result = export(cfg)
    for row in result["parity"]:
        b, h, w = row["size"]
        print(f"parity {result['format']} {b}x3x{h}x{w}: max |exported - pytorch| = {row['max_abs_diff']:.3g}")
    print(f"exported {result['format']} to {result['output']}", flush=True)
    return result["output"]


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="export")
def main(cfg: DictConfig) -> str:
    return exit_on_bad_input(run)(cfg)


if __name__ == "__main__":
    main()
