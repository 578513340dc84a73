"""The paper's networks: parameter counts and one training step (forward + backward + SGD) on the CPU.

Each ``conf/model/<name>.yaml`` is built as a run would build it (``encoder_weights=null``, 21 classes),
then timed on a batch of 2 crops of 321 (PASCAL's crop), in train mode with the loss over both heads.
``--quick``: 65-pixel crops. Run under the shared lock on a shared machine; one model at a time with
``python -m benchmarks.bench_models deeplabv3plus``.
"""

from __future__ import annotations

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from benchmarks.common import time_median
from brpg_lightning.config import config_dir

MODELS = ("deeplabv3plus", "deeplabv3plus_xception65", "segformer", "deeplabv3plus_small")


def build(name: str, num_classes: int = 21) -> torch.nn.Module:
    cfg = OmegaConf.load(config_dir() / "model" / f"{name}.yaml")
    cfg.num_classes, cfg.encoder_weights = num_classes, None
    return instantiate(cfg)


def _time(model: torch.nn.Module, x: torch.Tensor, repeat: int) -> tuple[float, float, list[float]]:
    """Eval forward (no grad, one run after a warm-up) and median train step (forward + backward + SGD), s."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = model(x)
        (out.logits.float().square().mean() + out.features.float().square().mean()).backward()
        opt.step()

    with torch.no_grad():
        model.eval()
        fwd, _ = time_median(lambda: model(x), repeat=1)  # one timed run after the warm-up
        model.train()
    med, times = time_median(step, repeat=repeat)
    return fwd, med, times


def run(quick: bool = False, models: tuple[str, ...] = MODELS) -> list[str]:
    size, batch = (65, 2) if quick else (321, 2)
    lines = [f"crop {size}, batch {batch}, threads {torch.get_num_threads()}; train-mode step = forward + backward + SGD"]
    for name in models:
        torch.manual_seed(0)
        model = build(name).train()
        params = sum(p.numel() for p in model.parameters())
        enc = sum(p.numel() for p in model.encoder.parameters())
        x = torch.randn(batch, 3, size, size)
        fwd, med, times = _time(model, x, repeat=1 if quick else 3)
        with torch.no_grad():
            out = model(x)
        lines.append(
            f"{name:26s} params {params / 1e6:6.1f} M (encoder {enc / 1e6:5.1f} M)  eval forward {fwd:6.2f} s  "
            f"train step {med:6.2f} s (runs {', '.join(f'{t:.2f}' for t in times)})  "
            f"logits {tuple(out.logits.shape)} features {tuple(out.features.shape)} stride {out.stride}"
        )
        del model
    return lines


if __name__ == "__main__":
    import sys

    print("\n".join(run(quick="--quick" in sys.argv, models=tuple(a for a in sys.argv[1:] if a != "--quick") or MODELS)))
