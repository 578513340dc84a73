"""L_pro (Eq. 15-18) against a direct evaluation with explicit loops."""

from __future__ import annotations

import math

import pytest
import torch

from brpg_lightning.brpg.prototype_loss import class_similarity, prototype_ce
from brpg_lightning.constants import IGNORE_INDEX

TAU = 0.1


def _tiny() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """C=4, D=4: classes 0 and 2 have 2 prototypes, class 1 has 3 (an APO extra), class 3 none."""
    gen = torch.Generator().manual_seed(0)
    protos = torch.randn(4, 3, 4, generator=gen)
    mask = torch.tensor([[True, True, False], [True, True, True], [True, True, False], [False, False, False]])
    feats = torch.randn(6, 4, generator=gen)
    labels = torch.tensor([0, 1, 2, 1, IGNORE_INDEX, 3])  # the last two are not used
    return feats, labels, protos, mask


def _reference_loss(feats, labels, protos, mask, tau) -> tuple[float, int]:  # noqa: ANN001
    """Eq. (15)-(17) written out: loops over points, classes and prototypes."""
    c, k, _ = protos.shape
    classes = [t for t in range(c) if any(mask[t].tolist())]
    total, used = 0.0, 0
    for f, y in zip(feats, labels.tolist(), strict=True):
        if y == IGNORE_INDEX or y not in classes:
            continue
        s = {}
        for t in classes:  # Eq. (15)
            sims = [
                float(f @ protos[t, j] / (f.norm() * protos[t, j].norm())) for j in range(k) if mask[t, j]
            ]
            s[t] = max(sims)
        denominator = sum(math.exp(s[t] / tau) for t in classes)  # Eq. (16), classes with prototypes
        total += -math.log(math.exp(s[y] / tau) / denominator)
        used += 1
    return total / used, used  # Eq. (17): mean over the used points


def test_prototype_ce_equals_direct_evaluation() -> None:
    feats, labels, protos, mask = _tiny()
    loss, n_used = prototype_ce(feats, labels, protos, mask, tau=TAU)
    ref, ref_used = _reference_loss(feats, labels, protos, mask, TAU)
    assert n_used == ref_used == 4
    assert loss.item() == pytest.approx(ref, rel=1e-5)


def test_class_similarity_by_loops() -> None:
    feats, _, protos, mask = _tiny()
    sim = class_similarity(feats, protos, mask)
    assert sim.shape == (6, 4)
    assert torch.isneginf(sim[:, 3]).all()
    for i in range(6):
        for t in range(3):
            best = max(
                float(torch.nn.functional.cosine_similarity(feats[i], protos[t, j], dim=0))
                for j in range(3)
                if mask[t, j]
            )
            assert sim[i, t].item() == pytest.approx(best, abs=1e-6)


def test_gradient_reaches_features_only() -> None:
    feats, labels, protos, mask = _tiny()
    feats.requires_grad_(True)
    protos.requires_grad_(True)
    loss, _ = prototype_ce(feats, labels, protos, mask, tau=TAU)
    loss.backward()
    assert protos.grad is None
    assert torch.isfinite(feats.grad).all()
    assert feats.grad[:4].abs().sum() > 0 and (feats.grad[4:] == 0).all()  # unused points get none


def test_no_used_point_gives_a_finite_zero_in_the_graph() -> None:
    feats, _, protos, mask = _tiny()
    feats.requires_grad_(True)
    loss, n_used = prototype_ce(feats[:2], torch.tensor([3, IGNORE_INDEX]), protos, mask)
    assert n_used == 0 and loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert (feats.grad == 0).all()


def test_float32_under_autocast() -> None:
    feats, labels, protos, mask = _tiny()
    ref, _ = prototype_ce(feats, labels, protos, mask, tau=TAU)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = prototype_ce(feats.bfloat16(), labels, protos, mask, tau=TAU)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref.item(), rel=0.05)  # only the bf16 inputs differ


def test_shared_similarities_give_the_same_loss_and_gradient() -> None:
    from brpg_lightning.brpg.prototype_loss import prototype_similarities

    feats, labels, protos, mask = _tiny()
    feats = feats.clone().requires_grad_(True)
    loss, n = prototype_ce(feats, labels, protos, mask, tau=TAU)
    (g_ref,) = torch.autograd.grad(loss, feats)
    sim = prototype_similarities(feats, protos)
    # Eq. (15) by the definition: normalise both, then the dot product
    direct = torch.nn.functional.normalize(feats, dim=1) @ torch.nn.functional.normalize(protos, dim=2).view(12, 4).t()
    torch.testing.assert_close(sim.view(6, 12), direct, rtol=1e-6, atol=1e-6)
    shared, n_shared = prototype_ce(feats, labels, protos, mask, tau=TAU, sim=sim)
    (g_shared,) = torch.autograd.grad(shared, feats)
    assert n_shared == n and shared.item() == pytest.approx(loss.item(), rel=1e-6)
    torch.testing.assert_close(g_shared, g_ref, rtol=1e-5, atol=1e-7)
