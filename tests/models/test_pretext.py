"""The pretext-pretrained encoder: a pool with nothing of the benchmark, a deterministic tool, shipped weights
that match their card and load into the default model."""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import load_file
from tests.conftest import compose_cfg

import brpg_lightning.data.datasets.pretext as pretext_data
from brpg_lightning.data.datasets.pretext import PRETEXT_SHAPES, PRETEXT_TEXTURES, pretext_pool
from brpg_lightning.data.datasets.synthetic import SHAPES, TEXTURES, synthetic_class_names
from brpg_lightning.errors import BRPGInputError
from brpg_lightning.models.pretext import PretextConfig
from brpg_lightning.tools import pretrain_encoder as tool

TINY_PRETEXT = PretextConfig(image_size=32, pool_size=8, heldout_size=4, steps=2, batch_size=4)


def test_pretext_pool_shares_no_class_shape_or_texture_with_the_benchmark() -> None:
    assert not set(PRETEXT_SHAPES) & set(SHAPES)
    assert not set(PRETEXT_TEXTURES) & set(TEXTURES)
    names = set(synthetic_class_names(37))  # every benchmark class name, at the largest class count
    assert not any(p in n or n in p for p in PRETEXT_SHAPES + PRETEXT_TEXTURES for n in names)
    imported = set()
    for node in ast.walk(ast.parse(inspect.getsource(pretext_data))):  # draws with its own code only
        if isinstance(node, ast.ImportFrom):
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
    assert not any("brpg_lightning" in m for m in imported), imported


def test_pretext_pool_is_seeded_and_the_heldout_images_are_others() -> None:
    a, b, c = pretext_pool(0, 24, 3), pretext_pool(0, 24, 3), pretext_pool(1, 24, 3)
    assert all(torch.equal(torch.from_numpy(x), torch.from_numpy(y)) for x, y in zip(a, b, strict=True))
    assert not (a[0] == c[0]).all()
    held = pretext_pool(0, 24, 3, "heldout")
    assert not any((held[0][i] == a[0][j]).all() for i in range(3) for j in range(3))


def test_pretraining_tool_is_deterministic_and_leaves_the_caller_rng_alone(tmp_path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    cards = [tool.write(TINY_PRETEXT, tmp_path / d, threads=1, log=lambda *_: None) for d in ("a", "b")]
    assert torch.equal(torch.rand(3), expected)
    files = [p.with_name(json.loads(p.read_text())["file"]) for p in cards]
    assert files[0].read_bytes() == files[1].read_bytes()  # same seed, same bytes
    card = json.loads(cards[0].read_text())
    assert card["sha256"] == hashlib.sha256(files[0].read_bytes()).hexdigest()
    other = tool.write(PretextConfig(**{**TINY_PRETEXT.__dict__, "seed": 1}), tmp_path / "c", threads=1,
                       log=lambda *_: None)
    assert other.with_name(card["file"]).read_bytes() != files[0].read_bytes()
    with pytest.raises(BRPGInputError, match="exists; pass --overwrite"):
        tool.write(TINY_PRETEXT, tmp_path / "a", threads=1, log=lambda *_: None)


def test_shipped_encoder_matches_its_card_and_loads_into_the_default_model() -> None:
    cfg = compose_cfg()
    path = Path(cfg.model.weights_path)
    card = json.loads(path.with_name(path.name.replace(".safetensors", ".card.json")).read_text())
    assert card["file"] == path.name
    assert hashlib.sha256(path.read_bytes()).hexdigest() == card["sha256"]
    assert path.stat().st_size <= 8 * 1024 * 1024
    # the card's network is the default model's encoder
    for key in ("arch", "encoder_name", "encoder_depth"):
        assert card["config"][key] == cfg.model[key], key
    # far above chance on held-out pretext images (4 shapes, 4 textures: chance 0.25 each)
    assert card["heldout_pretext_accuracy"]["shape_acc_fg"] > 2 * card["chance"]["shape_acc_fg"]
    assert card["heldout_pretext_accuracy"]["texture_acc_fg"] > 2 * card["chance"]["texture_acc_fg"]
    saved = load_file(str(path))
    model = instantiate(cfg.model)  # the route of a user's downloaded weights: model.weights_path
    own = model.encoder.state_dict()
    assert saved.keys() == own.keys()
    assert all(torch.equal(saved[k].to(own[k].dtype), own[k]) for k in saved)
    for experiment in ("sup_only", "ceiling"):  # every Table 6 row starts from the same encoder
        assert compose_cfg(f"experiment={experiment}").model.weights_path == str(path)


@pytest.mark.parametrize(("args", "fragment"), [(["--steps", "0"], "--steps=0; expected an integer >= 1"),
                                                (["--threads", "0"], "--threads=0; expected an integer >= 1")])
def test_pretraining_tool_bad_arguments_are_one_line(tmp_path, capsys, args: list[str], fragment: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--out", str(tmp_path), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    assert not any(tmp_path.iterdir())  # nothing written
