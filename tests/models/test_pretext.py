"""The pretext-pretrained encoder: deterministic cache, no benchmark class information, the default route."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import torch
from hydra.utils import instantiate
from safetensors.torch import load_file
from tests.conftest import compose_cfg

import brpg_lightning.data.datasets.pretext as pretext_data
from brpg_lightning.data.datasets.pretext import PRETEXT_SHAPES, PRETEXT_TEXTURES, pretext_pool
from brpg_lightning.data.datasets.synthetic import SHAPES, TEXTURES, synthetic_class_names
from brpg_lightning.models.pretext import pretext_encoder_weights

TINY_PRETEXT = {"image_size": 32, "pool_size": 8, "steps": 2, "batch_size": 4}


def test_pretext_classes_are_disjoint_from_the_benchmark_by_construction() -> None:
    assert not set(PRETEXT_SHAPES) & set(SHAPES)
    assert not set(PRETEXT_TEXTURES) & set(TEXTURES)
    assert not set(PRETEXT_SHAPES + PRETEXT_TEXTURES) & set(synthetic_class_names(37))
    imported = set()
    for node in ast.walk(ast.parse(inspect.getsource(pretext_data))):  # draws with its own code only
        if isinstance(node, ast.ImportFrom):
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
    assert not any("brpg_lightning" in m for m in imported), imported


def test_pretext_pool_is_seeded() -> None:
    a, b, c = pretext_pool(0, 24, 3), pretext_pool(0, 24, 3), pretext_pool(1, 24, 3)
    assert all(torch.equal(torch.from_numpy(x), torch.from_numpy(y)) for x, y in zip(a, b, strict=True))
    assert not (a[0] == c[0]).all()


def test_pretext_cache_is_deterministic_and_reused(tmp_path) -> None:
    first = pretext_encoder_weights(str(tmp_path / "a"), **TINY_PRETEXT)
    second = pretext_encoder_weights(str(tmp_path / "b"), **TINY_PRETEXT)
    assert Path(first).read_bytes() == Path(second).read_bytes()  # same seed, same bytes
    other = pretext_encoder_weights(str(tmp_path / "c"), **TINY_PRETEXT, seed=1)
    assert Path(first).read_bytes() != Path(other).read_bytes()
    stamp = (tmp_path / "a" / first.rsplit("/", 1)[1]).stat().st_mtime_ns
    assert pretext_encoder_weights(str(tmp_path / "a"), **TINY_PRETEXT) == first  # cache hit: not rebuilt
    assert (tmp_path / "a" / first.rsplit("/", 1)[1]).stat().st_mtime_ns == stamp


def test_pretraining_leaves_the_run_rng_alone(tmp_path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    pretext_encoder_weights(str(tmp_path), **TINY_PRETEXT)
    assert torch.equal(torch.rand(3), expected)


def test_pretext_model_starts_from_the_pretext_encoder(tmp_path) -> None:
    assert compose_cfg().model.weights_path is None  # the default trains from scratch (opt-in until measured)
    for experiment in (None, "sup_only", "ceiling"):  # every Table 6 row starts from the same encoder
        extra = () if experiment is None else (f"experiment={experiment}",)
        cfg = compose_cfg("model=deeplabv3plus_small_pretext", *extra)
        assert cfg.model.weights_path._target_.endswith("pretext.pretext_encoder_weights")
        assert cfg.model.encoder_name == "tu-resnet10t"
    cfg = compose_cfg("model=deeplabv3plus_small_pretext", f"paths.cache_dir={tmp_path}",
                      *(f"model.weights_path.{k}={v}" for k, v in TINY_PRETEXT.items()))
    model = instantiate(cfg.model)
    saved = load_file(next((tmp_path / "pretext").glob("*.safetensors")))
    own = model.encoder.state_dict()
    assert saved.keys() == own.keys()
    assert all(torch.equal(saved[k], own[k]) for k in saved)
