"""The upsampling geometry travels with the checkpoint: predict, export and evaluate read it, and a checkpoint
written before it was stored loads with ``align_corners=False`` (the geometry it was trained with)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from brpg_lightning.checkpoint import inference_metadata, load_for_inference, stored_align_corners
from brpg_lightning.evaluate import run_config_for
from brpg_lightning.models.segmentor import Segmentor
from tests.conftest import compose_cfg

SIZE = (50, 77)  # not a multiple of the encoder's 16: padding and the ceil crop inside


def strip_geometry(ckpt: dict) -> dict:
    """The checkpoint as written before the geometry was stored: no ``align_corners`` anywhere."""
    ckpt["inference"].pop("align_corners")
    ckpt["inference"]["model"].pop("align_corners")
    ckpt["hyper_parameters"]["run_config"]["model"].pop("align_corners")
    return ckpt


def small_checkpoint(tmp_path: Path, align_corners: bool, old: bool = False) -> tuple[Path, Segmentor]:
    """A checkpoint of the default CPU model (random weights) in the layout a method writes; ``old``: without
    the geometry keys."""
    cfg = compose_cfg(f"model.align_corners={str(align_corners).lower()}")
    model = OmegaConf.to_container(cfg.model, resolve=True)
    run_config = {"model": model, "dataset": {"name": "synthetic", "num_classes": model["num_classes"]}}
    torch.manual_seed(0)
    segmentor = instantiate(model, _convert_="all").eval()
    names = [f"c{i}" for i in range(model["num_classes"])]
    ckpt = {
        "state_dict": {f"student.{k}": v for k, v in segmentor.state_dict().items()},
        "hyper_parameters": {"run_config": run_config},
        "inference": inference_metadata(run_config, names, "student.", align_corners=segmentor.align_corners),
    }
    if old:
        ckpt = strip_geometry(ckpt)
    path = tmp_path / f"{'old' if old else align_corners}.ckpt"
    torch.save(ckpt, path)
    return path, segmentor


def interpolated(logits: torch.Tensor, align_corners: bool) -> torch.Tensor:
    if align_corners:
        return F.interpolate(logits, size=SIZE, mode="bilinear", align_corners=True)
    return F.interpolate(logits, scale_factor=4, mode="bilinear", align_corners=False)[..., : SIZE[0], : SIZE[1]]


@pytest.mark.parametrize("align_corners", [True, False])
def test_inference_path_reads_the_stored_geometry(tmp_path: Path, align_corners: bool) -> None:
    path, segmentor = small_checkpoint(tmp_path, align_corners)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["inference"]["align_corners"] is align_corners and stored_align_corners(ckpt) is align_corners
    net, _ = load_for_inference(path)
    assert net.align_corners is align_corners
    x = torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, logits = net(x), segmentor(x).logits
    torch.testing.assert_close(got, interpolated(logits, align_corners), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, interpolated(logits, not align_corners), atol=1e-3)
    cfg = OmegaConf.create({"dataset": None, "split": None})
    assert run_config_for(cfg, ckpt).model.align_corners is align_corners  # what evaluate builds


def test_checkpoint_without_the_key_loads_with_align_corners_false(tmp_path: Path) -> None:
    path, segmentor = small_checkpoint(tmp_path, False, old=True)
    ckpt = torch.load(path, weights_only=True)
    assert "align_corners" not in ckpt["inference"] and "align_corners" not in ckpt["inference"]["model"]
    assert stored_align_corners(ckpt) is False
    net, _ = load_for_inference(path)
    assert net.align_corners is False  # not the segmentor's default (True)
    x = torch.randn(1, 3, *SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(net(x), interpolated(segmentor(x).logits, False), rtol=1e-5, atol=1e-5)
    run_cfg = run_config_for(OmegaConf.create({"dataset": None, "split": None}), ckpt)
    assert run_cfg.model.align_corners is False
    assert instantiate(run_cfg.model).align_corners is False  # evaluate's module gets the old geometry
    # only the run config names it (an inference block of another writer): that value
    ckpt["hyper_parameters"]["run_config"]["model"]["align_corners"] = True
    assert stored_align_corners(ckpt) is True


def test_traced_official_geometry_follows_other_input_sizes(tmp_path: Path) -> None:
    """Export traces at one size; the ceil crop and the resize to the input size must follow another."""
    path, _ = small_checkpoint(tmp_path, True)
    net, _ = load_for_inference(path)
    with torch.no_grad():
        traced = torch.jit.trace(net, (torch.zeros(1, 3, 64, 96),), check_trace=False)
        for size in [(50, 77), (33, 70)]:
            x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(3))
            out = traced(x)
            assert out.shape == (2, 7, *size)
            torch.testing.assert_close(out, net(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_tiny_run_stores_the_official_geometry_and_an_old_copy_predicts_by_stride(tiny_run, tmp_path: Path) -> None:
    from tests.app.test_predict import reference_module

    ckpt = torch.load(tiny_run["last"], map_location="cpu", weights_only=True)
    assert ckpt["inference"]["align_corners"] is True and ckpt["inference"]["model"]["align_corners"] is True
    old = tmp_path / "old.ckpt"
    torch.save(strip_geometry(ckpt), old)
    net, _ = load_for_inference(old)
    module = reference_module(tiny_run["last"])  # the validation path, rebuilt from the run config
    x = torch.randn(1, 3, *SIZE, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        official = module.predict_logits(x, SIZE)
        for m in module.modules():
            if isinstance(m, Segmentor):
                m.align_corners = False
        by_stride = module.predict_logits(x, SIZE)
        got = net(x)
    torch.testing.assert_close(got, by_stride, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, official, atol=1e-3)
