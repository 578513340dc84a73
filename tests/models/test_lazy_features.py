"""Eval-mode feature head on first read: same tensor, skipped when nothing reads it (only logits needed)."""

from __future__ import annotations

import torch

from brpg_lightning.models.output import SegmentorOutput
from brpg_lightning.models.segmentor import Segmentor


def _segmentor() -> Segmentor:
    torch.manual_seed(0)
    return Segmentor(3, encoder_name="resnet18", decoder_channels=32, feature_dim=8)


def _count_head_calls(seg: Segmentor) -> list[int]:
    calls = [0]
    seg.feature_head.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_eval_features_are_computed_on_first_read_and_equal_the_eager_head() -> None:
    seg = _segmentor().eval()
    calls = _count_head_calls(seg)
    x = torch.randn(2, 3, 45, 38)
    with torch.no_grad():
        out = seg(x)
        assert calls[0] == 0 and not out.features_computed  # logits alone never run the head
        eager = seg.feature_head(seg.decoder(seg.encoder(torch.nn.functional.pad(x, (0, 10, 0, 3)))))
    calls[0] = 0
    feats = out.features  # read outside no_grad: the forward's grad mode is kept
    assert calls[0] == 1 and out.features_computed and not feats.requires_grad
    assert torch.equal(feats, eager[..., :12, :10])
    assert out.features is feats and calls[0] == 1  # computed once


def test_lazy_features_run_in_eval_mode_even_if_the_module_was_switched_to_train() -> None:
    seg = _segmentor().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = seg(x)
        ref = seg(x).features
    stats = seg.feature_head[1].running_mean.clone()
    seg.train()
    assert torch.equal(out.features, ref)  # no dropout, running BatchNorm statistics
    assert torch.equal(seg.feature_head[1].running_mean, stats) and seg.feature_head.training


def test_train_mode_runs_the_head_in_forward_and_split_of_lazy_output_computes_once() -> None:
    seg = _segmentor().train()
    calls = _count_head_calls(seg)
    out = seg(torch.randn(2, 3, 32, 32))
    assert calls[0] == 1 and out.features_computed and out.features.requires_grad
    seg.eval()
    calls[0] = 0
    x = torch.randn(3, 3, 32, 32)
    whole = seg(x)
    parts = seg(x).split([1, 2])
    assert calls[0] == 0
    torch.testing.assert_close(torch.cat([parts[0].features, parts[1].features]), whole.features)
    assert calls[0] == 2  # once for `whole`, once for both parts
    plain = SegmentorOutput(torch.zeros(2), torch.ones(2, 1), torch.zeros(2), 4)
    assert plain.features_computed and plain.split([1, 1])[1].features.shape == (1, 1)
