"""Encoder pretraining on the pretext pool: the embedded benchmark's offline stand-in for ImageNet weights.

The paper starts every network from ImageNet-pretrained weights (Sec. 4.1.3); the embedded CPU benchmark
cannot download them, and training a from-scratch encoder on 16 labeled images puts mean teacher in a regime
the paper never uses (a teacher copied from a one-epoch model). :func:`pretext_encoder_weights` pretrains
the encoder ONCE on :mod:`brpg_lightning.data.datasets.pretext` (shapes and textures disjoint from the
benchmark's, drawn by their own code: no information about the benchmark's classes or masks), caches it
under ``paths.cache_dir/pretext/`` and returns the file, which then goes through the same local-weights route
a user with downloaded ImageNet weights takes (``model.weights_path``, :mod:`brpg_lightning.models.weights`).

The pretext task is dense: an smp model of the same ``arch``/``encoder_name`` (so the encoder's state-dict
keys are those of the run's encoder) predicts, per pixel, the pretext shape id and the pretext texture id
(two 5-way cross-entropies on one 10-channel output). Only the encoder is kept; the decoder and heads are
thrown away, as ImageNet's classifier is.

Hydra wiring: ``conf/model/deeplabv3plus_small.yaml`` sets ``weights_path`` to a node whose ``_target_`` is
:func:`pretext_encoder_weights`; recursive instantiation calls it before building the segmentor and passes
the returned path. ``model.weights_path=null`` trains from scratch; ``model.weights_path=/my/file`` uses a
file instead.

Determinism: the pool is seeded (``pretext.py``), the initialisation and the batch order use ``seed`` inside
``torch.random.fork_rng`` (the run's global RNG is left untouched), so the same arguments on the same machine
and thread count give the same bytes. The file is written atomically, with a JSON marker of the arguments
beside it; a cached file whose marker matches is reused, anything else is rebuilt.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F

from brpg_lightning.constants import IMAGENET_MEAN, IMAGENET_STD
from brpg_lightning.data.datasets.pretext import PRETEXT_SHAPES, PRETEXT_TEXTURES, pretext_pool
from brpg_lightning.errors import BRPGInputError

log = logging.getLogger(__name__)

PRETEXT_VERSION = 1
"""Bumped whenever the pool or the pretraining changes; part of the file name and the marker."""

_MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)  # the runs' input normalisation
_STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _params(**kwargs: object) -> dict:
    return {"pretext_version": PRETEXT_VERSION, **{k: kwargs[k] for k in sorted(kwargs)}}


def pretrain_encoder(
    *,
    arch: str,
    encoder_name: str,
    seed: int,
    image_size: int,
    pool_size: int,
    steps: int,
    batch_size: int,
    lr: float,
    decoder_channels: int = 64,
    encoder_depth: int = 5,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Train the dense pretext task; return the encoder's state dict and final-step figures."""
    images, shapes, textures = pretext_pool(seed, image_size, pool_size)
    x_all = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 - _MEAN) / _STD
    shape_all = torch.from_numpy(shapes).long()
    tex_all = torch.from_numpy(textures).long()
    n_shape, n_tex = len(PRETEXT_SHAPES) + 1, len(PRETEXT_TEXTURES) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = smp.create_model(arch, encoder_name=encoder_name, encoder_weights=None,
                                 classes=n_shape + n_tex, decoder_channels=decoder_channels,
                                 encoder_depth=int(encoder_depth))
        gen = torch.Generator().manual_seed(int(seed))
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        warm, total = max(int(steps) // 10, 1), max(int(steps), 1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min((i + 1) / warm, 0.5 * (
            1 + math.cos(math.pi * max(i - warm, 0) / max(total - warm, 1)))))
        model.train()
        stats: dict[str, float] = {}
        for _ in range(int(steps)):
            idx = torch.randint(0, x_all.shape[0], (int(batch_size),), generator=gen)
            out = model(x_all[idx])
            loss_s = F.cross_entropy(out[:, :n_shape], shape_all[idx])
            loss_t = F.cross_entropy(out[:, n_shape:], tex_all[idx])
            opt.zero_grad(set_to_none=True)
            (loss_s + loss_t).backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                fg = shape_all[idx] > 0
                stats = {
                    "loss": float(loss_s + loss_t),
                    "shape_acc_fg": float((out[:, :n_shape].argmax(1) == shape_all[idx])[fg].float().mean()),
                    "texture_acc_fg": float((out[:, n_shape:].argmax(1) == tex_all[idx])[fg].float().mean()),
                }
    return {k: v.detach().clone().contiguous() for k, v in model.encoder.state_dict().items()}, stats


def pretext_encoder_weights(
    cache_dir: str,
    arch: str = "deeplabv3plus",
    encoder_name: str = "tu-resnet10t",
    encoder_depth: int = 5,
    seed: int = 0,
    image_size: int = 64,
    pool_size: int = 512,
    steps: int = 100,
    batch_size: int = 32,
    lr: float = 0.002,
) -> str:
    """Path of the cached pretext-pretrained encoder (safetensors), pretraining it first if not cached.

    Args:
        cache_dir: folder of the cached files (``${paths.cache_dir}/pretext``).
        arch, encoder_name, encoder_depth: the run's smp architecture and encoder (the keys must match its
            encoder; ``encoder_depth`` is smp's count of encoder stages).
        seed: fixes the pool, the initialisation and the batch order.
        image_size, pool_size: pretext pool (square images, count).
        steps, batch_size, lr: AdamW, 10 % linear warm-up then cosine decay.
    """
    from safetensors.torch import save_file

    for key, value in (("pool_size", pool_size), ("steps", steps), ("batch_size", batch_size),
                       ("image_size", image_size)):
        if int(value) < 1:
            raise BRPGInputError(f"model.weights_path.{key}={value}; expected an integer >= 1")
    params = _params(arch=arch, encoder_name=encoder_name, encoder_depth=int(encoder_depth), seed=int(seed),
                     image_size=int(image_size), pool_size=int(pool_size), steps=int(steps),
                     batch_size=int(batch_size), lr=float(lr))
    root = Path(cache_dir)
    stem = f"{arch}-{encoder_name}-d{int(encoder_depth)}-seed{int(seed)}-v{PRETEXT_VERSION}"
    path, marker = root / f"{stem}.safetensors", root / f"{stem}.json"
    try:
        cached = json.loads(marker.read_text()).get("params")
    except (OSError, ValueError, AttributeError):
        cached = None
    if cached == params and path.is_file():
        return str(path)

    root.mkdir(parents=True, exist_ok=True)
    log.info("pretext: pretraining %s once on the pretext pool (%d steps); cached in %s", encoder_name, steps, root)
    start = time.perf_counter()
    state, stats = pretrain_encoder(arch=arch, encoder_name=encoder_name, encoder_depth=int(encoder_depth),
                                    seed=int(seed),
                                    image_size=int(image_size), pool_size=int(pool_size), steps=int(steps),
                                    batch_size=int(batch_size), lr=float(lr))
    seconds = time.perf_counter() - start
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    save_file(state, str(tmp))
    os.replace(tmp, path)
    marker.write_text(json.dumps({"params": params, "final": stats, "seconds": round(seconds, 1)}, indent=1))
    log.info("pretext: done in %.1f s (final pretext loss %.3f, fg shape acc %.3f, fg texture acc %.3f)",
             seconds, stats.get("loss", float("nan")), stats.get("shape_acc_fg", float("nan")),
             stats.get("texture_acc_fg", float("nan")))
    return str(path)
