"""Pretrain the embedded default's encoder on the pretext pool and write the shipped weights with their card.

::

    python -m brpg_lightning.tools.pretrain_encoder --out src/brpg_lightning/assets/pretext [--steps 2000] [--seed 0] [--threads 1]

writes ``<out>/<name>.safetensors`` (the encoder's state dict, floating tensors in 16-bit) and
``<out>/<name>.card.json`` (pretext task, pool generator version, every pretraining argument, thread count,
held-out pretext accuracy, seconds, sha256 of the weights file). ``<name>`` is
``<arch>-<encoder_name>-d<encoder_depth>``. The default model loads the file through ``model.weights_path``
(``conf/model/deeplabv3plus_small.yaml``); the card is what the test suite checks the file against. Same
arguments and thread count on the same machine: same bytes. Existing files are replaced only with
``--overwrite``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch

from brpg_lightning.cli import exit_on_bad_input
from brpg_lightning.data.datasets.pretext import PRETEXT_SHAPES, PRETEXT_TEXTURES
from brpg_lightning.errors import BRPGInputError
from brpg_lightning.models.pretext import PRETEXT_VERSION, PretextConfig, pretrain_encoder

TASK = ("dense pretext segmentation: per pixel, the pretext shape id (background + "
        f"{', '.join(PRETEXT_SHAPES)}) and the pretext texture id (background + {', '.join(PRETEXT_TEXTURES)}); "
        "two cross-entropies; the decoder and heads are discarded, the encoder kept")


def file_name(cfg: PretextConfig) -> str:
    return f"{cfg.arch}-{cfg.encoder_name}-d{cfg.encoder_depth}"


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def to_half(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating tensors in float16 (the shipped file stays small); integer buffers as they are."""
    return {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}


def write(cfg: PretextConfig, out: Path, threads: int, overwrite: bool = False, log=print) -> Path:
    """Pretrain, then write the weights and their card atomically; returns the card's path."""
    from safetensors.torch import save_file

    name = file_name(cfg)
    weights, card_path = out / f"{name}.safetensors", out / f"{name}.card.json"
    if not overwrite and (weights.exists() or card_path.exists()):
        raise BRPGInputError(f"{weights} exists; pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    previous = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        start = time.perf_counter()
        state, accuracy = pretrain_encoder(cfg, log_every=max(cfg.steps // 10, 1), log=log)
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(previous)
    tmp = weights.with_name(f".{weights.name}.tmp{os.getpid()}")
    save_file(to_half(state), str(tmp))
    os.replace(tmp, weights)
    card = {
        "file": weights.name,
        "sha256": sha256(weights),
        "dtype": "float16 (integer buffers as saved)",
        "tensors": len(state),
        "parameters": int(sum(v.numel() for v in state.values() if v.is_floating_point())),
        "pretext_task": TASK,
        "pool_generator": f"brpg_lightning.data.datasets.pretext (pretext version {PRETEXT_VERSION})",
        "config": cfg.as_dict(),
        "threads": int(threads),
        "heldout_pretext_accuracy": {k: round(v, 4) for k, v in accuracy.items()},
        "chance": {"shape_acc_fg": 1 / len(PRETEXT_SHAPES), "texture_acc_fg": 1 / len(PRETEXT_TEXTURES)},
        "seconds": round(seconds, 1),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
        "command": "python -m brpg_lightning.tools.pretrain_encoder " + " ".join(sys.argv[1:]),
    }
    card_path.write_text(json.dumps(card, indent=1) + "\n")
    log(f"wrote {weights} ({weights.stat().st_size / 1e6:.2f} MB) and {card_path}: held-out pretext accuracy "
        + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items()) + f"; {seconds:.0f} s")
    return card_path


@exit_on_bad_input
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m brpg_lightning.tools.pretrain_encoder",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (part of determinism)")
    parser.add_argument("--overwrite", action="store_true")
    for f in fields(PretextConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    args = vars(parser.parse_args(argv))
    out, threads, overwrite = args.pop("out"), args.pop("threads"), args.pop("overwrite")
    for key in ("steps", "batch_size", "pool_size", "heldout_size", "image_size", "threads"):
        if int(args.get(key, threads)) < 1:
            raise BRPGInputError(f"--{key.replace('_', '-')}={args.get(key, threads)}; expected an integer >= 1")
    write(PretextConfig(**args), out, threads, overwrite)


if __name__ == "__main__":
    main()
