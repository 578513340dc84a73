"""Encoder pretraining on the pretext pool: the embedded benchmark's offline stand-in for ImageNet weights.

The paper starts every network from ImageNet-pretrained weights (Sec. 4.1.3). The embedded CPU benchmark
cannot download them, and a from-scratch encoder on 16 labeled images puts mean teacher in a regime the paper
never uses (a weak teacher copied from a few-epoch model). The stand-in: the encoder is pretrained ONCE on
:mod:`brpg_lightning.data.datasets.pretext` (shapes and textures disjoint from the benchmark's, drawn by their
own code: no information about the benchmark's classes or masks) by ``python -m
brpg_lightning.tools.pretrain_encoder``; the result is shipped in the repository (``weights/pretext/``, with a
card) and loaded by the default model through ``model.weights_path``, the route a user with downloaded ImageNet
weights takes (:mod:`brpg_lightning.models.weights`). ``make train`` pays no pretraining time.

The pretext task is dense: an smp model of the run's ``arch``/``encoder_name``/``encoder_depth`` (so the
encoder's state-dict keys are the run's) predicts, per pixel, the pretext shape id and the pretext texture id
(two 5-way cross-entropies on one 10-channel output). Only the encoder is kept; the decoder and heads are
thrown away, as ImageNet's classifier is.

Determinism: the pool is seeded, the initialisation, the batch order and the flips use ``seed`` inside
``torch.random.fork_rng`` (the caller's global RNG is left untouched), so the same arguments on the same
machine and thread count give the same bytes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F

from brpg_lightning.constants import IMAGENET_MEAN, IMAGENET_STD
from brpg_lightning.data.datasets.pretext import PRETEXT_SHAPES, PRETEXT_TEXTURES, pretext_pool

PRETEXT_VERSION = 3
"""Bumped whenever the pool or the pretraining changes; written on the card."""

_MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)  # the runs' input normalisation
_STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
N_SHAPE, N_TEXTURE = len(PRETEXT_SHAPES) + 1, len(PRETEXT_TEXTURES) + 1


@dataclass(frozen=True)
class PretextConfig:
    """Everything that decides the pretrained bytes (with the machine's thread count); written on the card."""

    arch: str = "deeplabv3plus"
    encoder_name: str = "tu-resnet10t"
    encoder_depth: int = 4
    decoder_channels: int = 64
    seed: int = 0
    image_size: int = 64
    pool_size: int = 8192
    heldout_size: int = 256
    steps: int = 2000
    batch_size: int = 32
    lr: float = 0.002
    weight_decay: float = 0.01

    def as_dict(self) -> dict:
        return {"pretext_version": PRETEXT_VERSION, **asdict(self)}


def _normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, S, S, 3)`` -> the runs' normalised float ``(N, 3, S, S)``."""
    return (images.permute(0, 3, 1, 2).float() / 255.0 - _MEAN) / _STD


def _build(cfg: PretextConfig) -> torch.nn.Module:
    return smp.create_model(cfg.arch, encoder_name=cfg.encoder_name, encoder_weights=None,
                            classes=N_SHAPE + N_TEXTURE, decoder_channels=cfg.decoder_channels,
                            encoder_depth=int(cfg.encoder_depth))


@torch.no_grad()
def pretext_accuracy(model: torch.nn.Module, images: torch.Tensor, shapes: torch.Tensor,
                     textures: torch.Tensor, batch_size: int = 64) -> dict[str, float]:
    """Pixel accuracy of the pretext heads on object pixels (chance 1/4 each) and of object vs background."""
    was_training = model.training
    model.eval()
    hits = {"shape_acc_fg": 0.0, "texture_acc_fg": 0.0, "object_acc": 0.0}
    n_fg = n_all = 0
    for i in range(0, images.shape[0], batch_size):
        out = model(_normalise(images[i:i + batch_size]))
        shape_pred, tex_pred = out[:, :N_SHAPE].argmax(1), out[:, N_SHAPE:].argmax(1)
        s, t = shapes[i:i + batch_size], textures[i:i + batch_size]
        fg = s > 0
        hits["shape_acc_fg"] += float((shape_pred == s)[fg].sum())
        hits["texture_acc_fg"] += float((tex_pred == t)[fg].sum())
        hits["object_acc"] += float(((shape_pred > 0) == fg).sum())
        n_fg += int(fg.sum())
        n_all += fg.numel()
    model.train(was_training)
    return {"shape_acc_fg": hits["shape_acc_fg"] / n_fg, "texture_acc_fg": hits["texture_acc_fg"] / n_fg,
            "object_acc": hits["object_acc"] / n_all}


def pretrain_encoder(cfg: PretextConfig, log_every: int = 0,
                     log=print) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Train the dense pretext task; return the encoder's state dict and its held-out pretext accuracy."""
    images, shapes, textures = (torch.from_numpy(a) for a in pretext_pool(cfg.seed, cfg.image_size, cfg.pool_size))
    held = [torch.from_numpy(a) for a in pretext_pool(cfg.seed, cfg.image_size, cfg.heldout_size, "heldout")]
    shapes, textures = shapes.long(), textures.long()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.seed))
        model = _build(cfg)
        gen = torch.Generator().manual_seed(int(cfg.seed))
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        warm, total = max(int(cfg.steps) // 10, 1), max(int(cfg.steps), 1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min((i + 1) / warm, 0.5 * (
            1 + math.cos(math.pi * max(i - warm, 0) / max(total - warm, 1)))))
        model.train()
        for step in range(int(cfg.steps)):
            idx = torch.randint(0, images.shape[0], (int(cfg.batch_size),), generator=gen)
            x, s, t = _normalise(images[idx]), shapes[idx], textures[idx]
            flip = torch.randint(0, 4, (1,), generator=gen).item()  # the pool's shapes are rotated; flips add more
            dims = [d for d, on in ((-1, flip & 1), (-2, flip & 2)) if on]
            if dims:
                x, s, t = x.flip(dims), s.flip(dims), t.flip(dims)  # (N, 3, S, S) and (N, S, S): same last two
            out = model(x)
            loss = F.cross_entropy(out[:, :N_SHAPE], s) + F.cross_entropy(out[:, N_SHAPE:], t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if log_every and (step + 1) % log_every == 0:
                log(f"pretext step {step + 1}/{cfg.steps}: loss {loss.item():.3f}")
        accuracy = pretext_accuracy(model, *held)
    return {k: v.detach().clone().contiguous() for k, v in model.encoder.state_dict().items()}, accuracy
