"""Local encoder weights (``model.weights_path``): round trip, prefixes, mismatch report, bad files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from brpg_lightning.errors import BRPGInputError
from brpg_lightning.models.segmentor import Segmentor
from brpg_lightning.models.weights import load_encoder_weights

SMALL = dict(num_classes=3, arch="deeplabv3plus", encoder_name="tu-resnet10t", decoder_channels=32,
             decoder_atrous_rates=(2, 4, 6), head_channels=16)


def _encoders_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("fmt", ["pt", "safetensors", "prefixed"])
def test_segmentor_loads_local_weights(tmp_path, fmt):
    torch.manual_seed(0)
    source = Segmentor(**SMALL)
    state = {k: v.clone().contiguous() for k, v in source.encoder.state_dict().items()}
    if fmt == "safetensors":
        path = tmp_path / "enc.safetensors"
        save_file(state, str(path))
    elif fmt == "prefixed":  # a full-model checkpoint: {"state_dict": {"module.encoder.<key>": ...}}
        path = tmp_path / "full.pt"
        torch.save({"state_dict": {f"module.encoder.{k}": v for k, v in state.items()}}, path)
    else:
        path = tmp_path / "enc.pt"
        torch.save(state, path)
    torch.manual_seed(1)
    fresh = Segmentor(**SMALL)
    assert not _encoders_equal(fresh.encoder, source.encoder)
    torch.manual_seed(1)
    loaded = Segmentor(**SMALL, weights_path=str(path))
    assert _encoders_equal(loaded.encoder, source.encoder)
    n = len(state)
    assert loaded.weights_summary.endswith(f"{n}/{n} tensors, 0 missing, 0 unexpected")


def test_mismatch_summary_counts_missing_and_unexpected(tmp_path):
    enc = Segmentor(**SMALL).encoder
    state = dict(enc.state_dict())
    dropped = sorted(state)[0]
    del state[dropped]
    state["extra.weight"] = torch.zeros(2)
    path = tmp_path / "partial.pt"
    torch.save(state, path)
    summary = load_encoder_weights(enc, path)
    total = len(enc.state_dict())
    assert f"{total - 1}/{total} tensors, 1 missing (e.g. {dropped}), 1 unexpected (e.g. extra.weight)" in summary


def test_bad_weight_files(tmp_path):
    enc = Segmentor(**SMALL).encoder
    with pytest.raises(BRPGInputError, match="no such file"):
        load_encoder_weights(enc, tmp_path / "absent.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(BRPGInputError, match="cannot read weights"):
        load_encoder_weights(enc, junk)
    other = tmp_path / "other.pt"
    torch.save({"fc.weight": torch.zeros(3, 3)}, other)
    with pytest.raises(BRPGInputError, match="no key matches the encoder"):
        load_encoder_weights(enc, other)
    key, value = next(iter(enc.state_dict().items()))
    wrong = tmp_path / "wrong.pt"
    torch.save({key: torch.zeros(*value.shape, 2)}, wrong)
    with pytest.raises(BRPGInputError, match=f"{key} has shape"):
        load_encoder_weights(enc, wrong)
