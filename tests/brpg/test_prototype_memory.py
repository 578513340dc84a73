"""PrototypeMemory without Lightning: sampling caps, clustering + APO, the prototype step, options, state, DDP."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from brpg_lightning.brpg.prototype_memory import PrototypeMemory
from brpg_lightning.errors import BRPGInputError
from brpg_lightning.methods.context import TrainStepContext
from brpg_lightning.models.output import SegmentorOutput
from tests.brpg.steps import C, D, H, S, W, make_ctx, make_memory
from tests.brpg.test_distributed import _free_port


def sampled(memory: PrototypeMemory, steps: int = 3) -> PrototypeMemory:
    for step in range(steps):
        memory.sample(make_ctx(1, step, 100, seed=step))
    return memory


def test_memory_and_report_import_without_lightning() -> None:
    code = ("import sys; import brpg_lightning.brpg.prototype_memory, brpg_lightning.brpg.report; "
            "sys.exit(any(m.split('.')[0] in ('pytorch_lightning', 'lightning') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], env=os.environ.copy()).returncode == 0


def test_sampling_fills_banks_and_clustering_drops_them() -> None:
    memory = sampled(make_memory())
    fill_h, fill_l = memory.bank_high.fill(), memory.bank_low.fill()
    assert int(fill_h.sum()) > 0 and int(fill_l.sum()) > 0
    # per-step caps: (B_l + B_u) * sample_num high and B_l * sample_num low, 3 steps
    assert int(fill_h.sum()) <= 3 * (2 + 2) * 20 and int(fill_l.sum()) <= 3 * 2 * 20
    assert memory.conf_high is None and memory.conf_low is None  # no snapshot asked: no confidences kept
    clustering = memory.cluster(10)
    assert memory.prototypes is not None and memory.start_step == 10 and memory.live_banks() == []
    assert clustering.fill.tolist() == [fill_h.tolist(), fill_l.tolist()] and clustering.confidences is None


def _crowded_ctx(b: int = 2, size: int = 32, seed: int = 0) -> TrainStepContext:
    """Every labeled pixel is predicted correctly, the left half of each map confidently (conf ~ 1), the right
    half not (conf ~ 0.36 < eta_s); every unlabeled pixel confidently. Features are distinct rows
    (``D`` random values), so a pushed feature names its source pixel."""
    g = torch.Generator().manual_seed(seed)
    h = w = size // S

    def out(labels: torch.Tensor, confident: torch.Tensor) -> SegmentorOutput:
        scale = torch.where(confident, 10.0, 0.5).unsqueeze(1)
        logits = scale * torch.nn.functional.one_hot(labels, C).permute(0, 3, 1, 2).float()
        return SegmentorOutput(logits, torch.randn(b, D, h, w, generator=g), None, S)

    lab, t_lab = torch.randint(0, C, (b, h, w), generator=g), torch.randint(0, C, (b, h, w), generator=g)
    left = (torch.arange(w) < w // 2).expand(b, h, w)
    return TrainStepContext(
        epoch=1, global_step=0, total_steps=100, labeled=out(lab, left),
        labels=lab.repeat_interleave(S, 1).repeat_interleave(S, 2),
        unlabeled_teacher=out(t_lab, torch.ones(b, h, w, dtype=torch.bool)),
    )


@pytest.mark.parametrize("sample_num", [5, 1000])
def test_per_step_caps_push_exactly_the_cap_or_every_candidate(sample_num: int) -> None:
    """High candidates: 2 x 32 labeled + 2 x 64 unlabeled = 192 > (B_l + B_u) * 5 = 20; low: 2 x 32 = 64 >
    B_l * 5 = 10. The caps bind at ``sample_num=5`` (exactly the cap is pushed, distinct candidates) and not at
    1000 (every candidate is pushed)."""
    memory = make_memory(sample_num=sample_num, V=256, storage_dtype="float32")
    ctx = _crowded_ctx()
    scalars = memory.sample(ctx)
    cand_high, cand_low = 2 * 32 + 2 * 64, 2 * 32
    want_high, want_low = min(cand_high, 4 * sample_num), min(cand_low, 2 * sample_num)
    assert int(memory.bank_high.fill().sum()) == want_high and scalars["sampled_high"] == (float(want_high), 1)
    assert int(memory.bank_low.fill().sum()) == want_low

    def rows(fmap: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return fmap.permute(0, 2, 3, 1)[keep]

    left = (torch.arange(8) < 4).expand(2, 8, 8)
    sources = {
        "high": torch.cat([rows(ctx.labeled.features, left), rows(ctx.unlabeled_teacher.features, left | ~left)]),
        "low": rows(ctx.labeled.features, ~left),
    }
    for name, bank in (("high", memory.bank_high), ("low", memory.bank_low)):
        pushed = torch.cat([bank.get(c) for c in range(C)])
        match = (pushed[:, None] == sources[name][None]).all(2)  # (pushed, candidates)
        assert bool((match.sum(1) == 1).all())  # each pushed feature is one candidate of its bank
        assert bool((match.sum(0) <= 1).all())  # no candidate twice (drawn without replacement)


def test_prototypes_cluster_per_class_and_apo_adds_one() -> None:
    memory = sampled(make_memory(), steps=4)
    clustering = memory.cluster(4)
    counts = memory.proto_mask.sum(1)
    # n0_h + n0_lw = 4 per class, and with C=4, alpha_t=5% the percentile rule picks exactly one class per bank
    assert int(counts.sum()) == C * 4 + 2 and torch.equal(clustering.counts, counts)
    assert "prototypes" in clustering.summary() and clustering.warnings == []
    # every prototype of class c lies near class c's feature centre (features were planted per class)
    centres = torch.eye(C, D) * 5.0
    for c in range(C):
        protos = memory.prototypes[c][memory.proto_mask[c]]
        assert (protos - centres[c]).norm(dim=1).max() < 1.5


def test_prototype_step_returns_the_loss_and_counts_eta_t_from_the_first_prototype_step() -> None:
    memory = sampled(make_memory())
    memory.cluster(10)
    before = memory.prototypes.clone()
    ctx = make_ctx(2, 10, 100, seed=9, grad=True)
    step = memory.prototype_step(ctx)
    assert torch.isfinite(step.loss) and step.late_classes == [] and not ctx.losses  # the caller adds the loss
    assert set(step.scalars) == {"L_pro_l", "L_pro_u", "eta_t", "u_pass_eta_t"}
    assert step.scalars["eta_t"] == (pytest.approx(0.8), 1) and step.scalars["L_pro_l"][1] == 2
    step.loss.backward()
    assert ctx.labeled.features.grad is not None and ctx.unlabeled_student.features.grad is not None
    assert not torch.equal(before, memory.prototypes)  # Eq. (22) moved them
    # Eq. (19) counts from T_S2's first step, not from epoch 0 nor a hard-coded epoch
    assert memory.current_eta_t(55, 100) == pytest.approx(0.8 + 0.15 * 45 / 90)
    # lambda_pro weighs the returned loss (Eq. 21)

    def loss_with(lambda_pro: float) -> float:
        torch.manual_seed(0)
        run = sampled(make_memory(lambda_pro=lambda_pro))
        run.cluster(10)
        return float(run.prototype_step(make_ctx(2, 10, 100, seed=9)).loss)

    assert loss_with(0.5) == pytest.approx(0.5 * loss_with(1.0), rel=1e-5)


@pytest.mark.parametrize("align_corners", [True, False])
def test_prototype_step_reads_points_with_the_geometry_of_the_output(align_corners: bool) -> None:
    """``L_pro^l`` and ``L_pro^u`` equal the official way: ``F.interpolate`` of the feature maps to the crop
    (with the outputs' ``align_corners``), then indexing at the grid points (0, 3, 6, 9 at 16 px, grid 4) and
    at the random points; the other geometry gives another loss."""
    import torch.nn.functional as F

    from brpg_lightning.brpg.prototype_loss import prototype_ce
    from brpg_lightning.brpg.sampling import gather_points, random_points
    from brpg_lightning.constants import IGNORE_INDEX

    memory = sampled(make_memory(), steps=4)
    ctx = make_ctx(2, 10, 100, seed=9)
    for out in (ctx.labeled, ctx.unlabeled_teacher, ctx.unlabeled_student):
        out.align_corners = align_corners
    memory.cluster(10)
    protos, pmask = memory.prototypes.clone(), memory.proto_mask.clone()
    torch.manual_seed(5)
    logged = {k: float(v) for k, (v, _) in memory.prototype_step(ctx).scalars.items()}

    def up(fmap: torch.Tensor, corners: bool) -> torch.Tensor:
        if corners:
            return F.interpolate(fmap, size=(H, W), mode="bilinear", align_corners=True)
        return F.interpolate(fmap, scale_factor=S, mode="bilinear", align_corners=False)

    def read(fmap: torch.Tensor, coords: torch.Tensor, corners: bool) -> torch.Tensor:
        big = up(fmap, corners).permute(0, 2, 3, 1)  # (B, H, W, D)
        return torch.stack([big[b, coords[b, :, 0], coords[b, :, 1]] for b in range(fmap.shape[0])]).flatten(0, 1)

    positions = torch.tensor([0, 3, 6, 9])
    grid = torch.stack(torch.meshgrid(positions, positions, indexing="ij"), -1).view(1, 16, 2).expand(2, -1, -1)
    y_l = gather_points(ctx.labels, grid).flatten()

    def loss_l(corners: bool) -> float:
        f = read(ctx.labeled.features, grid, corners)
        return float(prototype_ce(f, y_l, protos, pmask, memory.tau, IGNORE_INDEX)[0])

    assert logged["L_pro_l"] == pytest.approx(loss_l(align_corners), rel=1e-5)
    assert abs(loss_l(not align_corners) - logged["L_pro_l"]) > 1e-4
    torch.manual_seed(5)  # the memory's random points (Eq. 18), drawn again
    cand = (ctx.pseudo_labels != IGNORE_INDEX) & (ctx.pseudo_confidence >= logged["eta_t"])
    coords, ok = random_points(cand, memory.M_u)
    y_u = gather_points(ctx.pseudo_labels, coords).masked_fill(~ok, IGNORE_INDEX).flatten()
    f_u = read(ctx.unlabeled_student.features, coords, align_corners)
    expected_u = float(prototype_ce(f_u, y_u, protos, pmask, memory.tau, IGNORE_INDEX)[0])
    assert logged["L_pro_u"] == pytest.approx(expected_u, rel=1e-5)


def test_bad_values_raise_one_line_errors() -> None:
    with pytest.raises(BRPGInputError, match="feature_source"):
        PrototypeMemory(feature_source="aspp")
    with pytest.raises(BRPGInputError, match="indicator"):
        PrototypeMemory(indicator="l1")
    with pytest.raises(BRPGInputError, match="threshold_fixed_classes"):
        make_memory(threshold_fixed_classes=[C])


def _round_trip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("clustered", [False, True])  # saved while sampling (banks) or after clustering
def test_state_round_trip_with_weights_only(clustered: bool) -> None:
    memory = sampled(make_memory())
    if clustered:
        memory.cluster(3)
        memory.prototype_step(make_ctx(2, 3, 100, seed=3))
    state = _round_trip(memory.state_dict())
    assert state["version"] == 2 and "conf_high" not in state  # confidences only with keep_confidence
    restored = make_memory()
    restored.load_state_dict(state)
    for name in ("prototypes", "proto_mask", "thresholds"):
        a, b = getattr(memory, name), getattr(restored, name)
        assert (a is None and b is None) or torch.equal(a, b)
    assert restored.start_step == memory.start_step
    if not clustered:
        for name in ("bank_high", "bank_low"):
            for key, value in getattr(memory, name).state_dict().items():
                assert torch.equal(value, getattr(restored, name).state_dict()[key])
        # the restored run continues identically: same prototypes from the same banks
        for run in (memory, restored):
            run.cluster(3)
            torch.manual_seed(0)  # the prototype step draws random unlabeled points
            run.prototype_step(make_ctx(2, 3, 100, seed=3))
        assert torch.equal(memory.prototypes, restored.prototypes)


def test_confidence_banks_follow_keep_confidence_through_the_state() -> None:
    keep = sampled(make_memory(keep_confidence=True))
    assert torch.equal(keep.conf_high.count, keep.bank_high.count) and torch.equal(keep.conf_low.ptr, keep.bank_low.ptr)
    conf = keep.conf_high.get(0).flatten()
    assert conf.numel() > 0 and bool((conf >= keep.eta_s - 1e-3).all())  # high bank: conf >= eta_s (float16)
    state = _round_trip(keep.state_dict())
    assert state["conf_high"] is not None and state["conf_low"] is not None
    plain = make_memory()
    plain.load_state_dict(state)  # a state with confidences loads without them
    assert plain.conf_high is None and torch.equal(plain.bank_high.feats, keep.bank_high.feats)
    restored = make_memory(keep_confidence=True)
    restored.load_state_dict(state)
    assert torch.equal(restored.conf_high.feats, keep.conf_high.feats)
    # a state without confidences: they restart aligned with the banks, NaN for the features already there
    late = make_memory(keep_confidence=True)
    late.load_state_dict(_round_trip(sampled(make_memory()).state_dict()))
    before = torch.cat([late.conf_low.get(c) for c in range(C)])
    assert torch.equal(late.conf_high.count, late.bank_high.count) and before.numel() > 0 and bool(before.isnan().all())
    late.sample(make_ctx(1, 7, 100, seed=7))
    assert torch.equal(late.conf_high.count, late.bank_high.count)
    assert len(late.cluster(8).confidences) == 2


def _ddp_worker(rank: int, world: int, port: int, results: dict) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)  # ranks draw different random caps/points, as in real DDP
        memory = make_memory()
        for step in range(3):  # each rank sees its own data
            memory.sample(make_ctx(1, step, 100, seed=10 * step + rank))
        out = {name: {k: v.clone() for k, v in getattr(memory, name).state_dict().items()}
               for name in ("bank_high", "bank_low")}
        memory.cluster(3)
        memory.prototype_step(make_ctx(2, 3, 100, seed=50 + rank))
        out["after_cluster_and_update"] = memory.prototypes.clone()
        for step in range(4, 6):
            memory.prototype_step(make_ctx(2, step, 100, seed=60 + 7 * step + rank))
        out["after_updates"] = memory.prototypes.clone()
        out["mask"] = memory.proto_mask.clone()
        results[rank] = out
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_two_rank_gloo_banks_and_prototypes_identical() -> None:
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_ddp_worker, args=(2, _free_port(), results), nprocs=2, join=True)
    r0, r1 = results[0], results[1]
    for bank in ("bank_high", "bank_low"):
        for key in r0[bank]:
            assert torch.equal(r0[bank][key], r1[bank][key]), (bank, key)
    # both ranks' features arrived: the banks hold more than one rank has pixels in 3 steps (4 images of 4x4)
    assert int(r0["bank_high"]["count"].sum()) > 3 * 4 * (H // S) * (W // S)
    for key in ("after_cluster_and_update", "after_updates", "mask"):
        assert torch.equal(r0[key], r1[key]), key
    assert not torch.equal(r0["after_cluster_and_update"], r0["after_updates"])  # updates moved them


# ---------------------------------------------------------------- official behaviour as options


def _constant_out(probs: list[float], b: int = 1, seed: int = 0) -> SegmentorOutput:
    """Logits whose softmax is ``probs`` at every decoder pixel (any upsampling keeps it), random features."""
    logits = torch.tensor(probs).log().view(1, C, 1, 1).expand(b, C, H // S, W // S).contiguous()
    feats = torch.randn(b, D, H // S, W // S, generator=torch.Generator().manual_seed(seed))
    return SegmentorOutput(logits, feats, feats, S)


@pytest.mark.parametrize(
    ("extra", "high", "low"),
    [
        ({"threshold_high": 0.9}, 32, 16),  # class 0 in use 0.8725: labeled conf 0.85 -> low
        ({"threshold_high": 0.84}, 48, 0),  # clamped to 0.84 where used: -> high
        ({"threshold_fixed_classes": [0]}, 48, 0),  # fixed class: eta_s 0.8 -> high
    ],
)
def test_class_thresholds_follow_the_official_csp_rule(extra: dict, high: int, low: int) -> None:
    from brpg_lightning.brpg.report import statistics

    memory = make_memory(class_thresholds=True, threshold_decay=0.5, sample_num=100, **extra)
    labels = torch.zeros(1, H, W, dtype=torch.long)  # every input pixel is class 0
    # step 1 (labeled only, as in a supervised-only epoch): p(class 0) = 0.99 -> ema 0.5 * 0.8 + 0.5 * 0.99 = 0.895;
    # in use min(0.895, high) >= 0.84 or 0.8 (fixed) <= 0.99: the 16 decoder pixels go to the high bank
    out = _constant_out([0.99, 0.0033, 0.0033, 0.0034])
    memory.sample(TrainStepContext(epoch=1, global_step=0, total_steps=100, labeled=out, labels=labels))
    assert memory.thresholds.tolist() == pytest.approx([0.895, 0.8, 0.8, 0.8], abs=1e-5)
    # step 2: p(class 0) = 0.85 -> ema 0.5 * 0.895 + 0.5 * 0.85 = 0.8725 (stored unclamped, fixed class too);
    # the teacher's unlabeled pixels (pred 0, conf 0.85) use the fixed eta_s 0.8 whatever class 0's threshold
    probs = [0.85, 0.05, 0.05, 0.05]
    memory.sample(TrainStepContext(
        epoch=1, global_step=1, total_steps=100, labeled=_constant_out(probs), labels=labels,
        unlabeled_teacher=_constant_out(probs, seed=1), unlabeled_student=_constant_out(probs, seed=2),
        pseudo_labels=labels.clone(), pseudo_confidence=torch.full((1, H, W), 0.85),
    ))
    assert memory.thresholds.tolist() == pytest.approx([0.8725, 0.8, 0.8, 0.8], abs=1e-5)
    assert memory.bank_high.fill().tolist() == [high, 0, 0, 0]
    assert memory.bank_low.fill().tolist() == [low, 0, 0, 0]
    stats = statistics(memory, "sampling", 1)
    assert stats["eta_s_ema"] == pytest.approx([0.8725, 0.8, 0.8, 0.8], abs=1e-5)
    in_use = {32: 0.8725, 48: 0.84 if "threshold_high" in extra else 0.8}[high]
    assert stats["eta_s"] == pytest.approx([in_use, 0.8, 0.8, 0.8], abs=1e-5)


@pytest.mark.parametrize(("apo_count", "picked_per_bank"), [("paper", 2), ("official", 1)])
def test_apo_count_option_in_clustering(apo_count: str, picked_per_bank: int) -> None:
    # C = 4, alpha_t = 0.35: paper gamma at position 0.35 * 3 = 1.05 -> 2 classes below it;
    # official max(1, round(0.35 * 4 = 1.4)) = 1 class, the most scattered (lowest cosine score)
    memory = sampled(make_memory(alpha_t=0.35, apo_count=apo_count), steps=4)
    memory.cluster(4)
    extra = memory.last_stats["apo_extra"]  # (banks, C)
    assert extra.sum(1).tolist() == [picked_per_bank, picked_per_bank]
    assert int(memory.proto_mask.sum()) == C * 4 + 2 * picked_per_bank
    order = memory.last_stats["dispersion"].argsort(dim=1)
    for b in range(2):
        assert set(torch.nonzero(extra[b]).flatten().tolist()) == set(order[b, :picked_per_bank].tolist())


def test_M_u_pooled_draws_batch_times_M_u_points(monkeypatch: pytest.MonkeyPatch) -> None:
    import brpg_lightning.brpg.prototype_memory as memory_module

    seen: list[list[int]] = []

    def spy(fn):  # noqa: ANN001, ANN202
        def wrapped(cand, num, *args, **kwargs):  # noqa: ANN001, ANN202
            coords, valid = fn(cand, num, *args, **kwargs)
            seen.append(valid.sum(1).tolist())
            return coords, valid
        return wrapped

    monkeypatch.setattr(memory_module, "pooled_random_points", spy(memory_module.pooled_random_points))
    monkeypatch.setattr(memory_module, "random_points", spy(memory_module.random_points))
    results = {}
    for pooled in (False, True):
        memory = sampled(make_memory(M_u=10, M_u_pooled=pooled), steps=4)
        memory.cluster(10)
        ctx = make_ctx(2, 10, 100, seed=9)
        ctx.pseudo_confidence[1] = 0.0  # only image 0 has candidates (all its 256 pixels pass eta_t = 0.8)
        ctx.pseudo_confidence[0] = 1.0
        seen.clear()
        memory.prototype_step(ctx)
        results[pooled] = seen[-1]
    assert results[False] == [10, 0]  # paper: M_u per image
    assert results[True] == [20, 0]  # official: B_u * M_u = 20 from the pooled candidates, all in image 0


def test_eta_t_origin_official_epoch5() -> None:
    memory = make_memory(eta_t_origin="official_epoch5")
    memory.setup(C, max_epochs=10)
    sampled(memory)
    memory.cluster(20)
    # 100 steps over 10 epochs: 10 per epoch; first prototype step 20 (epoch 2):
    # 0.8 + 0.15 * (20 - 50) / (100 - 50) = 0.71, below eta_0 (not clamped, as the official code)
    assert memory.prototype_step(make_ctx(2, 20, 100, seed=9)).scalars["eta_t"][0] == pytest.approx(0.71)
    assert memory.current_eta_t(75, 100) == pytest.approx(0.8 + 0.15 * 25 / 50)
    with pytest.raises(BRPGInputError, match="max_epochs"):
        make_memory(eta_t_origin="official_epoch5").setup(C, max_epochs=5)
    with pytest.raises(BRPGInputError, match="eta_t_origin"):
        PrototypeMemory(eta_t_origin="epoch5")
