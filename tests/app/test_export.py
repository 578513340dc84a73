"""``python -m brpg_lightning.export``: ONNX Runtime / TorchScript outputs equal PyTorch's on two input sizes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from brpg_lightning.errors import BRPGInputError
from tests.app.test_predict import reference_module
from tests.conftest import compose_cfg

TOLERANCE = 1e-4
"""Max absolute difference of float32 logits (values of order 1-10) exported vs PyTorch."""
SIZES = [(1, 64, 96), (2, 77, 50)]  # neither a multiple of the encoder's 16 px: padding and crop inside


def export_cfg(ckpt: Path, fmt: str, out: Path, *overrides: str):
    return compose_cfg(f"ckpt_path={ckpt}", f"format={fmt}", f"output={out}", "verify=true", *overrides,
                       config_name="export")


def assert_verified(result: dict) -> None:
    """The export's own parity check (``verify=true``, what users run) ran on the configured sizes and passed."""
    sizes = [row["size"] for row in result["parity"]]
    assert len(sizes) == 2 and len({tuple(s) for s in sizes}) == 2, sizes
    assert all(0.0 <= row["max_abs_diff"] < TOLERANCE for row in result["parity"]), result["parity"]


def reference_logits(module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return module.predict_logits(x, tuple(x.shape[-2:])).numpy()


def inputs():
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(b, 3, h, w, generator=gen) for b, h, w in SIZES]


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [pytest.param(True, id="torch.export"), pytest.param(False, id="legacy")])
def test_onnx_runtime_matches_pytorch_on_two_sizes(tiny_run, tmp_path: Path, dynamo: bool) -> None:
    import onnx
    import onnxruntime as ort

    from brpg_lightning.export import export

    out = tmp_path / "model.onnx"
    result = export(export_cfg(tiny_run["last"], "onnx", out, f"dynamo={str(dynamo).lower()}"))
    assert_verified(result)
    module = reference_module(tiny_run["last"])
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for x in inputs():
        got = session.run(["logits"], {"image": x.numpy()})[0]
        ref = reference_logits(module, x)
        assert got.shape == ref.shape == (x.shape[0], 7, *x.shape[-2:])
        assert np.abs(got - ref).max() < TOLERANCE
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    meta = json.loads(props["brpg_inference"])
    assert meta["class_names"][0] == "background" and len(meta["palette"]) == 7
    assert meta["eval_protocol"] == {"mode": "whole", "crop_size": None, "stride": None}  # the synthetic preset's
    assert json.loads((tmp_path / "model.onnx.json").read_text()) == meta


@pytest.mark.slow
def test_torchscript_matches_pytorch_on_two_sizes(tiny_run, tmp_path: Path) -> None:
    from brpg_lightning.export import export

    out = tmp_path / "model.pt"
    result = export(export_cfg(tiny_run["last"], "torchscript", out))
    assert_verified(result)
    module = reference_module(tiny_run["last"])
    extra = {"inference.json": ""}
    loaded = torch.jit.load(str(out), map_location="cpu", _extra_files=extra)
    for x in inputs():
        with torch.no_grad():
            got = loaded(x).numpy()
        ref = reference_logits(module, x)
        assert got.shape == ref.shape and np.abs(got - ref).max() < TOLERANCE
    assert json.loads(extra["inference.json"])["normalization"]["mean"] == [0.485, 0.456, 0.406]


@pytest.mark.slow
def test_export_refuses_unknown_format_and_existing_output(tiny_run, tmp_path: Path) -> None:
    from brpg_lightning.export import export

    with pytest.raises(BRPGInputError, match="format='tflite'; expected one of onnx, torchscript"):
        export(export_cfg(tiny_run["last"], "tflite", tmp_path / "m"))
    (tmp_path / "m.pt").write_bytes(b"mine")
    with pytest.raises(BRPGInputError, match="already exists; pass overwrite=true"):
        export(export_cfg(tiny_run["last"], "torchscript", tmp_path / "m.pt"))
    assert (tmp_path / "m.pt").read_bytes() == b"mine"
