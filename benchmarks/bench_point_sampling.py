"""Point sampling for L_pro at a 513 crop: ``sample_points`` vs upsample-the-whole-map-then-index.

The official implementation upsamples the decoder-resolution feature map to the crop (``(B, D, H,
W)``, 0.5 GiB at B=2, D=256, 513x513) and then indexes the 32x32 grid points (Eq. 17) and the 1000
random points (Eq. 18). ``sample_points`` reads the same values bilinearly with ``grid_sample`` at the
points only. Time (forward, forward+backward) is measured side by side; peak memory of each is the
peak-RSS growth of a fresh subprocess running it once (forward+backward), next to the analytic size
of its largest intermediate.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.common import fmt_bytes, fmt_times, ratio_line, time_interleaved
from brpg_lightning.brpg.sampling import grid_points, random_points, sample_points
from brpg_lightning.models.output import resize_to_input

STRIDE = 4


def setup(batch: int, dim: int, crop: int, grid: int, num_random: int, seed: int = 0):  # noqa: ANN201
    """Feature map ``(B, D, h, w)`` with grad, points ``(B, grid^2 + num_random, 2)`` and the crop size."""
    gen = torch.Generator().manual_seed(seed)
    h = math.ceil(crop / STRIDE)
    fmap = torch.randn(batch, dim, h, h, generator=gen).requires_grad_(True)
    coords_l = grid_points(batch, crop, crop, grid)
    coords_u, _ = random_points(torch.ones(batch, crop, crop, dtype=torch.bool), num_random, generator=gen)
    return fmap, torch.cat([coords_l, coords_u], dim=1), (crop, crop)


def ours(fmap: torch.Tensor, coords: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return sample_points(fmap, coords, STRIDE, align_corners=True, size=size)  # the official geometry


def official(fmap: torch.Tensor, coords: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    up = resize_to_input(fmap, size, STRIDE, align_corners=True)  # (B, D, H, W), as F.interpolate there
    b = torch.arange(fmap.shape[0]).view(-1, 1)
    return up[b, :, coords[..., 0], coords[..., 1]]  # (B, M, D)


CHILD = """
import json, torch
from benchmarks.bench_point_sampling import setup, ours, official
torch.set_num_threads({threads})
fmap, coords, size = setup(*{args})
fn = ours if "{which}" == "ours" else official
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
base = status("VmRSS")
fn(fmap, coords, size).square().sum().backward()
print(json.dumps({{"base": base, "peak": status("VmHWM")}}))
"""


def peak_growth(which: str, args: tuple) -> int:
    """Peak RSS growth (bytes) of a fresh interpreter running ``which`` forward+backward once
    (``VmHWM`` after resetting it through ``/proc/self/clear_refs``)."""
    code = CHILD.format(threads=torch.get_num_threads(), args=args, which=which)
    root = Path(__file__).resolve().parents[1]  # so that the child imports this package
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return max(0, r["peak"] - r["base"])


def run(quick: bool) -> list[str]:
    args = (2, 64, 257, 16, 250) if quick else (2, 256, 513, 32, 1000)
    batch, dim, crop, grid, num_random = args
    repeat = 5
    fmap, coords, size = setup(*args)
    torch.testing.assert_close(ours(fmap, coords, size), official(fmap, coords, size), rtol=1e-4, atol=1e-4)

    def fwd(fn):  # noqa: ANN001, ANN202
        def go() -> None:
            with torch.no_grad():
                fn(fmap, coords, size)

        return go

    def fwd_bwd(fn):  # noqa: ANN001, ANN202
        def go() -> None:
            fmap.grad = None
            fn(fmap, coords, size).square().sum().backward()

        return go

    timed = time_interleaved(
        {"ours_f": fwd(ours), "off_f": fwd(official), "ours_b": fwd_bwd(ours), "off_b": fwd_bwd(official)},
        repeat=repeat,
    )
    (t_ours_f, times_ours_f), (t_off_f, times_off_f) = timed["ours_f"], timed["off_f"]
    (t_ours_b, times_ours_b), (t_off_b, times_off_b) = timed["ours_b"], timed["off_b"]

    h = fmap.shape[-1]
    m = coords.shape[1]
    analytic_official = batch * dim * size[0] * size[1] * 4  # the interpolated (B, D, H, W) map
    analytic_ours = batch * m * dim * 4  # (B, D, M, 1) grid_sample output
    growth_ours = peak_growth("ours", args)
    growth_official = peak_growth("official", args)
    mem_ratio = analytic_official / analytic_ours
    rss_ratio = growth_official / max(growth_ours, 4096)  # at least a page
    return [
        f"map ({batch}, {dim}, {h}, {h}) float32 at stride {STRIDE} -> crop {crop}x{crop}; "
        f"{grid}x{grid} grid + {num_random} random points per image (M = {m})",
        f"forward          ours {t_ours_f * 1e3:8.2f} ms {fmt_times(times_ours_f)} | "
        f"upsample+index {t_off_f * 1e3:8.2f} ms {fmt_times(times_off_f)}",
        f"forward+backward ours {t_ours_b * 1e3:8.2f} ms {fmt_times(times_ours_b)} | "
        f"upsample+index {t_off_b * 1e3:8.2f} ms {fmt_times(times_off_b)}",
        f"largest intermediate (analytic): ours {fmt_bytes(analytic_ours)} (B*M*D floats) | "
        f"upsample+index {fmt_bytes(analytic_official)} (B*D*(s*h)^2 floats)",
        f"peak RSS growth, fresh process, fwd+bwd: ours {fmt_bytes(growth_ours)} | "
        f"upsample+index {fmt_bytes(growth_official)}",
        ratio_line("forward time upsample/ours", t_off_f / t_ours_f, "> 1", t_off_f > t_ours_f),
        ratio_line("fwd+bwd time upsample/ours", t_off_b / t_ours_b, "> 1", t_off_b > t_ours_b),
        ratio_line("largest intermediate upsample/ours", mem_ratio, ">> 1", mem_ratio > 10),
        ratio_line("peak RSS growth upsample/ours", rss_ratio, ">> 1", rss_ratio > 10),
    ]
