"""PrototypeMemory: prototypes for classes absent at T_S2 (late classes), prototype_init, statistics."""

from __future__ import annotations

import io
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from brpg_lightning.brpg.clustering import kmeans, random_centers
from brpg_lightning.brpg.prototype_memory import PrototypeMemory
from brpg_lightning.brpg.prototype_update import assignment_stats, ema_update
from brpg_lightning.brpg.report import statistics
from brpg_lightning.brpg.sampling import gather_points, grid_points, sample_points
from brpg_lightning.errors import BRPGInputError
from brpg_lightning.methods.context import TrainStepContext
from brpg_lightning.models.output import SegmentorOutput
from tests.brpg.steps import C, D, H, S, W, make_ctx, make_memory
from tests.brpg.test_distributed import _free_port

LATE = 3  # the class that never reaches a bank
GRID = 3  # grid points at 0, 5, 10 of the 16 px crop (i * (15 // 3)): decoder cells 0, 1, 2 of each axis, once each
CENTRES = torch.eye(C, D) * 5.0


def _out(labels: torch.Tensor, g: torch.Generator, grad: bool = False) -> SegmentorOutput:
    b, h, w = labels.shape
    logits = 3.0 * torch.nn.functional.one_hot(labels, C).permute(0, 3, 1, 2).float()
    logits = logits + torch.rand(b, C, h, w, generator=g) * 4.0
    feats = CENTRES[labels].permute(0, 3, 1, 2) + torch.randn(b, D, h, w, generator=g) * 0.3
    if grad:
        feats.requires_grad_(True)
    return SegmentorOutput(logits, feats, feats, S, align_corners=True)


def ctx_with(epoch: int, step: int, seed: int, late_cells: int = 0, grad: bool = False) -> TrainStepContext:
    """Labels of classes 0..2 only (class LATE absent), except ``late_cells`` cells of the first labeled
    image set to LATE, taken row-major among the 3 x 3 decoder cells that hold a grid point (one each)."""
    g = torch.Generator().manual_seed(seed)
    h, w = H // S, W // S
    lab = torch.randint(0, LATE, (2, h, w), generator=g)
    cells = torch.arange(late_cells)
    lab[0, cells // GRID, cells % GRID] = LATE
    t_lab = torch.randint(0, LATE, (2, h, w), generator=g)
    up = lambda t: t.repeat_interleave(S, 1).repeat_interleave(S, 2)  # noqa: E731
    return TrainStepContext(
        epoch=epoch, global_step=step, total_steps=100, labeled=_out(lab, g, grad), labels=up(lab),
        unlabeled_teacher=_out(t_lab, g), unlabeled_student=_out(t_lab, g, grad),
        pseudo_labels=up(t_lab), pseudo_confidence=torch.rand(2, H, W, generator=g) * 0.3 + 0.7,
    )


def make_late_memory(**kwargs) -> PrototypeMemory:
    return make_memory(grid=GRID, **kwargs)


def first_prototype_step(memory: PrototypeMemory, ctx: TrainStepContext):  # noqa: ANN201 - a PrototypeStep
    """Clustering, then the step's L_pro and update: the first step of ``T_S2``."""
    memory.cluster(ctx.global_step)
    return memory.prototype_step(ctx)


def sampled_then_clustered(**kwargs) -> PrototypeMemory:
    memory = make_late_memory(**kwargs)
    for step in range(3):
        memory.sample(ctx_with(1, step, seed=step))
    first_prototype_step(memory, ctx_with(2, 3, seed=3))  # clusters, class LATE still absent
    return memory


def labeled_points(ctx: TrainStepContext) -> tuple[torch.Tensor, torch.Tensor]:
    coords = grid_points(ctx.labels.shape[0], H, W, GRID)
    assert sorted({y for y, _ in coords[0].tolist()}) == [0, 5, 10]
    f = sample_points(ctx.labeled.features.detach(), coords, S, align_corners=True, size=(H, W)).flatten(0, 1)
    return f, gather_points(ctx.labels, coords).flatten()


def test_late_class_gets_prototypes_from_its_first_labeled_points_then_follows_the_ema() -> None:
    memory = sampled_then_clustered()
    assert memory.missing == [LATE] and not bool(memory.proto_mask[LATE].any())
    assert statistics(memory, "prototype", 2)["classes_without_prototypes"] == [LATE]
    need = memory.n0_h + memory.n0_lw
    # fewer labeled points of the class than prototypes: still none
    assert memory.prototype_step(ctx_with(2, 4, seed=4, late_cells=need - 1)).late_classes == []
    assert memory.missing == [LATE] and int(memory.init_step[LATE]) == -1

    ctx = ctx_with(2, 5, seed=5, late_cells=need + 2, grad=True)
    before = memory.prototypes.clone()
    f, y = labeled_points(ctx)
    expected = kmeans(f[y == LATE].unsqueeze(0), torch.ones(1, need + 2, dtype=torch.bool),
                      torch.tensor([need]), iters=memory.kmeans_iters, seed=memory.kmeans_seed)
    step = memory.prototype_step(ctx)
    assert step.late_classes == [LATE]
    assert memory.missing == [] and int(memory.init_step[LATE]) == 5
    k_max = memory.prototypes.shape[1] // 2
    slots = [0, 1, k_max, k_max + 1]  # n0_h = 2 high slots, then n0_lw = 2 low slots
    assert memory.proto_mask[LATE].nonzero().flatten().tolist() == slots
    assert memory.proto_bank[LATE, slots].tolist() == [0, 0, 1, 1]
    # initialised in this step, then moved once by Eq. (22) with this step's features
    init = before.clone()
    init[LATE, slots] = expected.centers[0, :need]
    # (pseudo-labels never hold LATE, so only the labeled points move its prototypes)
    sums, counts = assignment_stats(f, y, init, memory.proto_mask)
    ref = ema_update(init, sums, counts, memory.prototype_ema)
    assert torch.allclose(memory.prototypes[LATE], ref[LATE], atol=1e-5)
    centre = memory.prototypes[LATE, slots].mean(0)
    assert int((centre - CENTRES).norm(dim=1).argmin()) == LATE  # in the late class's region
    # it joins L_pro in the same step: the loss depends on the late class's features
    step.loss.backward()
    late_rows = (ctx.labels[0, ::S, ::S] == LATE)
    assert ctx.labeled.features.grad[0][:, late_rows].abs().sum() > 0
    stats = statistics(memory, "prototype", 2)
    assert stats["classes_without_prototypes"] == [] and stats["prototypes_per_class"][LATE] == need
    assert stats["init_step"][LATE] == 5 and stats["init_step"][0] == 3


def test_late_initialisation_resumes_exactly_from_the_state_dict() -> None:
    memory = sampled_then_clustered()
    memory.prototype_step(ctx_with(2, 4, seed=4, late_cells=6))
    buf = io.BytesIO()
    torch.save(memory.state_dict(), buf)
    buf.seek(0)
    restored = make_late_memory()
    restored.load_state_dict(torch.load(buf, weights_only=True))
    assert restored.missing == [] and torch.equal(restored.init_step, memory.init_step)
    # str: NaN dispersions compare equal
    assert str(statistics(restored, "prototype", 2)) == str(statistics(memory, "prototype", 2))
    for run in (memory, restored):
        torch.manual_seed(0)
        run.prototype_step(ctx_with(2, 5, seed=5, late_cells=1))
    assert torch.equal(memory.prototypes, restored.prototypes)

    # saved before the class appeared: the restored run still knows it lacks prototypes
    memory2 = sampled_then_clustered()
    restored2 = make_late_memory()
    restored2.load_state_dict(memory2.state_dict())
    assert restored2.missing == [LATE]
    for run in (memory2, restored2):
        torch.manual_seed(0)
        run.prototype_step(ctx_with(2, 4, seed=4, late_cells=6))
    assert torch.equal(memory2.prototypes, restored2.prototypes) and restored2.missing == []


def test_clustering_with_empty_banks_recovers_through_late_initialisation() -> None:
    memory = make_late_memory()
    clustering = memory.cluster(0)  # no sampling step ran
    assert "empty banks" in clustering.warnings[0] and len(clustering.warnings) == 1 + C  # and one per class
    memory.prototype_step(ctx_with(2, 0, seed=0, late_cells=6))
    assert memory.prototypes.shape[-1] == D  # re-allocated in the feature space
    # classes 0..2 are on a 3x3 grid of 2 images: each has >= 4 points with this seed, LATE has 6
    counts = memory.proto_mask.sum(1)
    f, y = labeled_points(ctx_with(2, 0, seed=0, late_cells=6))
    have = torch.bincount(y, minlength=C) >= 4
    assert torch.equal(counts > 0, have) and torch.equal(counts[have], torch.full((int(have.sum()),), 4))


def test_random_prototype_init_picks_bank_features() -> None:
    memory = make_memory(prototype_init="random")
    for step in range(3):
        memory.sample(make_ctx_all(1, step))
    bank = {"high": memory.bank_high, "low": memory.bank_low}
    rows = {name: [b.get(c).float() for c in range(C)] for name, b in bank.items()}
    memory.cluster(3)
    k_max = memory.prototypes.shape[1] // 2
    for c in range(C):
        for slot in memory.proto_mask[c].nonzero().flatten().tolist():
            source = rows["high" if slot < k_max else "low"][c]
            assert (source - memory.prototypes[c, slot]).abs().amax(1).min() == 0  # an exact bank row
    km = make_memory()
    for step in range(3):
        km.sample(make_ctx_all(1, step))
    km.cluster(3)
    assert torch.equal(km.proto_mask.sum(1), memory.proto_mask.sum(1))  # same counts (APO alike)
    assert not torch.allclose(km.prototypes, memory.prototypes)
    with pytest.raises(BRPGInputError, match="prototype_init"):
        PrototypeMemory(prototype_init="kmeans++")


def make_ctx_all(epoch: int, step: int) -> TrainStepContext:
    return make_ctx(epoch, step, 100, seed=step)


def test_random_centers_against_a_brute_force_reference() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 20, 4, generator=g)
    valid = torch.ones(3, 20, dtype=torch.bool)
    valid[1, 5:] = False  # 5 valid points
    valid[2] = False
    res = random_centers(x, valid, torch.tensor([3, 7, 2]), seed=1)
    assert res.center_mask.sum(1).tolist() == [3, 5, 0] and res.deficient.tolist() == [False, True, True]
    for grp in range(2):
        chosen = res.centers[grp][res.center_mask[grp]]
        d = torch.cdist(chosen, x[grp][valid[grp]])
        assert (d.min(1).values == 0).all()  # each centre is one of the group's valid points
        assert torch.unique(chosen, dim=0).shape[0] == chosen.shape[0]  # distinct
        brute = torch.cdist(x[grp][valid[grp]].double(), chosen.double()).square().min(1)
        assert res.inertia[grp].item() == pytest.approx(brute.values.sum().item(), rel=1e-5)
        assert res.labels[grp][valid[grp]].tolist() == brute.indices.tolist()
    assert res.labels[2].eq(-1).all() and res.inertia[2] == 0
    again = random_centers(x, valid, torch.tensor([3, 7, 2]), seed=1)
    other = random_centers(x, valid, torch.tensor([3, 7, 2]), seed=2)
    assert torch.equal(again.centers, res.centers) and not torch.equal(other.centers, res.centers)


def _ddp_late(rank: int, world: int, port: int, results: dict) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)
        memory = make_late_memory()
        for step in range(3):
            memory.sample(ctx_with(1, step, seed=10 * step + rank))
        first_prototype_step(memory, ctx_with(2, 3, seed=40 + rank))
        # only rank 1 sees the late class, 3 points: alone too few (4 needed), with rank 0's 1 point enough
        memory.prototype_step(ctx_with(2, 4, seed=50 + rank, late_cells=1 + 2 * rank))
        results[rank] = {"protos": memory.prototypes.clone(), "mask": memory.proto_mask.clone(),
                         "init": memory.init_step.clone()}
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_two_rank_late_initialisation_uses_every_ranks_points_and_is_identical() -> None:
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_ddp_late, args=(2, _free_port(), results), nprocs=2, join=True)
    r0, r1 = results[0], results[1]
    assert int(r0["init"][LATE]) == 4 and int(r0["mask"][LATE].sum()) == 4
    for key in ("protos", "mask", "init"):
        assert torch.equal(r0[key], r1[key]), key
