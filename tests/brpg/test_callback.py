"""BRPGCallback wiring: stages, eta_t from T_S2, loss injection, state round trip, and DDP consistency."""

from __future__ import annotations

import io
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from brpg_lightning.brpg.callback import BRPGCallback
from brpg_lightning.errors import BRPGInputError
from brpg_lightning.methods.context import TrainStepContext
from brpg_lightning.models.output import SegmentorOutput
from tests.brpg.test_distributed import _free_port

C, D, H, W, S = 4, 8, 16, 16, 4  # classes, feature dim, crop, stride


class StubModule:
    """What the callback needs of a LightningModule: ``num_classes``, ``device``, ``log``."""

    num_classes = C
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.logged: dict[str, float] = {}

    def log(self, name: str, value, **kwargs) -> None:
        self.logged[name] = float(value)


def make_ctx(epoch: int, step: int, total: int, seed: int, grad: bool = False) -> TrainStepContext:
    """A step whose features cluster by class, with confident predictions (most pixels pass eta_s)."""
    g = torch.Generator().manual_seed(seed)
    h, w = H // S, W // S

    def out(b: int) -> tuple[SegmentorOutput, torch.Tensor]:
        labels = torch.randint(0, C, (b, h, w), generator=g)
        logits = 3.0 * torch.nn.functional.one_hot(labels, C).permute(0, 3, 1, 2).float()
        logits = logits + torch.rand(b, C, h, w, generator=g) * 4.0  # some pixels become low-confidence
        centres = torch.eye(C, D) * 5.0
        feats = centres[labels].permute(0, 3, 1, 2) + torch.randn(b, D, h, w, generator=g) * 0.3
        if grad:
            feats.requires_grad_(True)
        return SegmentorOutput(logits, feats, feats, S), labels

    lab_out, lab = out(2)
    labels_full = lab.repeat_interleave(S, 1).repeat_interleave(S, 2)
    t_out, t_lab = out(2)
    s_out, _ = out(2)
    return TrainStepContext(
        epoch=epoch, global_step=step, total_steps=total, labeled=lab_out, labels=labels_full,
        unlabeled_teacher=t_out, unlabeled_student=s_out,
        pseudo_labels=t_lab.repeat_interleave(S, 1).repeat_interleave(S, 2),
        pseudo_confidence=torch.rand(2, H, W, generator=g) * 0.3 + 0.7,
    )


def make_callback(**kwargs) -> BRPGCallback:
    args = dict(T_S1=1, T_S2=2, V=64, sample_num=20, grid=4, M_u=10, kmeans_iters=10, save_snapshot=False)
    args.update(kwargs)
    cb = BRPGCallback(**args)
    cb.setup(None, StubModule(), "fit")
    return cb


def test_stages_follow_T_S1_T_S2_and_loss_is_added_only_in_the_prototype_stage() -> None:
    cb, module = make_callback(), StubModule()
    assert [cb.stage(e) for e in range(4)] == ["pretrain", "sampling", "prototype", "prototype"]
    ctx = make_ctx(0, 0, 100, seed=0)
    cb.on_train_step_context(None, module, ctx)
    assert cb.bank_high is None and not ctx.losses  # pretraining: nothing
    for step in range(1, 4):
        ctx = make_ctx(1, step, 100, seed=step)
        cb.on_train_step_context(None, module, ctx)
        assert not ctx.losses
    fill_h, fill_l = cb.bank_high.fill(), cb.bank_low.fill()
    assert int(fill_h.sum()) > 0 and int(fill_l.sum()) > 0
    # per-step caps: (B_l + B_u) * sample_num high and B_l * sample_num low, 3 steps
    assert int(fill_h.sum()) <= 3 * (2 + 2) * 20 and int(fill_l.sum()) <= 3 * 2 * 20
    ctx = make_ctx(2, 10, 100, seed=9, grad=True)
    cb.on_train_step_context(None, module, ctx)
    assert cb.prototypes is not None and cb.start_step == 10 and cb.bank_high is None
    assert set(ctx.losses) == {"L_pro"} and torch.isfinite(ctx.losses["L_pro"])
    ctx.losses["L_pro"].backward()
    assert ctx.labeled.features.grad is not None and ctx.unlabeled_student.features.grad is not None
    # Eq. (19) counts from T_S2's first step, not from epoch 0 nor a hard-coded epoch
    assert module.logged["brpg/eta_t"] == pytest.approx(0.8)
    mid = make_ctx(3, 55, 100, seed=11)
    assert cb.current_eta_t(mid) == pytest.approx(0.8 + 0.15 * 45 / 90)


@pytest.mark.parametrize("align_corners", [True, False])
def test_prototype_step_reads_points_with_the_geometry_of_the_output(align_corners: bool) -> None:
    """``L_pro^l`` and ``L_pro^u`` equal the official way: ``F.interpolate`` of the feature maps to the crop
    (with the outputs' ``align_corners``), then indexing at the grid points (0, 3, 6, 9 at 16 px, grid 4) and
    at the random points; the other geometry gives another loss."""
    import torch.nn.functional as F

    from brpg_lightning.brpg.prototype_loss import prototype_ce
    from brpg_lightning.brpg.sampling import gather_points, random_points
    from brpg_lightning.constants import IGNORE_INDEX

    cb, module = make_callback(), StubModule()
    for step in range(1, 4):
        cb.on_train_step_context(None, module, make_ctx(1, step, 100, seed=step))
    ctx = make_ctx(2, 10, 100, seed=9)
    for out in (ctx.labeled, ctx.unlabeled_teacher, ctx.unlabeled_student):
        out.align_corners = align_corners
    cb.cluster(None, module, 10)
    protos, pmask = cb.prototypes.clone(), cb.proto_mask.clone()
    torch.manual_seed(5)
    cb.on_train_step_context(None, module, ctx)

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
        return float(prototype_ce(f, y_l, protos, pmask, cb.tau, IGNORE_INDEX)[0])

    assert module.logged["brpg/L_pro_l"] == pytest.approx(loss_l(align_corners), rel=1e-5)
    assert abs(loss_l(not align_corners) - module.logged["brpg/L_pro_l"]) > 1e-4
    torch.manual_seed(5)  # the callback's random points (Eq. 18), drawn again
    cand = (ctx.pseudo_labels != IGNORE_INDEX) & (ctx.pseudo_confidence >= module.logged["brpg/eta_t"])
    coords, ok = random_points(cand, cb.M_u)
    y_u = gather_points(ctx.pseudo_labels, coords).masked_fill(~ok, IGNORE_INDEX).flatten()
    f_u = read(ctx.unlabeled_student.features, coords, align_corners)
    expected_u = float(prototype_ce(f_u, y_u, protos, pmask, cb.tau, IGNORE_INDEX)[0])
    assert module.logged["brpg/L_pro_u"] == pytest.approx(expected_u, rel=1e-5)


def test_prototypes_cluster_per_class_and_apo_adds_one() -> None:
    cb, module = make_callback(), StubModule()
    for step in range(4):
        cb.on_train_step_context(None, module, make_ctx(1, step, 100, seed=step))
    cb.cluster(None, module, 4)
    counts = cb.proto_mask.sum(1)
    # n0_h + n0_lw = 4 per class, and with C=4, alpha_t=5% the percentile rule picks exactly one class per bank
    assert int(counts.sum()) == C * 4 + 2
    # every prototype of class c lies near class c's feature centre (features were planted per class)
    centres = torch.eye(C, D) * 5.0
    for c in range(C):
        protos = cb.prototypes[c][cb.proto_mask[c]]
        assert (protos - centres[c]).norm(dim=1).max() < 1.5


def test_bad_values_raise_one_line_errors() -> None:
    with pytest.raises(BRPGInputError, match="feature_source"):
        BRPGCallback(feature_source="aspp")
    with pytest.raises(BRPGInputError, match="T_S1"):
        BRPGCallback(T_S1=2, T_S2=2)


@pytest.mark.parametrize("stage_steps", [2, 4])  # 2: saved while sampling (banks); 4: after clustering
def test_state_round_trip_with_weights_only(stage_steps: int) -> None:
    cb, module = make_callback(), StubModule()
    for step in range(3):
        cb.on_train_step_context(None, module, make_ctx(1, step, 100, seed=step))
    if stage_steps == 4:
        cb.on_train_step_context(None, module, make_ctx(2, 3, 100, seed=3))
    buf = io.BytesIO()
    torch.save(cb.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    restored = make_callback()
    restored.load_state_dict(state)
    for name in ("prototypes", "proto_mask", "thresholds"):
        a, b = getattr(cb, name), getattr(restored, name)
        assert (a is None and b is None) or torch.equal(a, b)
    if stage_steps == 2:
        for name in ("bank_high", "bank_low"):
            for key, value in getattr(cb, name).state_dict().items():
                assert torch.equal(value, getattr(restored, name).state_dict()[key])
        # the restored run continues identically: same prototypes from the same banks
        torch.manual_seed(0)  # the prototype step draws random unlabeled points
        cb.on_train_step_context(None, module, make_ctx(2, 3, 100, seed=3))
        torch.manual_seed(0)
        restored.on_train_step_context(None, module, make_ctx(2, 3, 100, seed=3))
        assert torch.equal(cb.prototypes, restored.prototypes)
    assert restored.start_step == cb.start_step


def _ddp_worker(rank: int, world: int, port: int, results: dict) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)  # ranks draw different random caps/points, as in real DDP
        cb, module = make_callback(), StubModule()
        for step in range(3):  # each rank sees its own data
            cb.on_train_step_context(None, module, make_ctx(1, step, 100, seed=10 * step + rank))
        out = {"bank_high": cb.bank_high.state_dict(), "bank_low": cb.bank_low.state_dict()}
        out["bank_high"] = {k: v.clone() for k, v in out["bank_high"].items()}
        out["bank_low"] = {k: v.clone() for k, v in out["bank_low"].items()}
        cb.on_train_step_context(None, module, make_ctx(2, 3, 100, seed=50 + rank))
        out["after_cluster_and_update"] = cb.prototypes.clone()
        for step in range(4, 6):
            cb.on_train_step_context(None, module, make_ctx(2, step, 100, seed=60 + 7 * step + rank))
        out["after_updates"] = cb.prototypes.clone()
        out["mask"] = cb.proto_mask.clone()
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
    cb = make_callback(class_thresholds=True, threshold_decay=0.5, sample_num=100, **extra)
    module = StubModule()
    labels = torch.zeros(1, H, W, dtype=torch.long)  # every input pixel is class 0
    # step 1 (labeled only, as in a supervised-only epoch): p(class 0) = 0.99 -> ema 0.5 * 0.8 + 0.5 * 0.99 = 0.895;
    # in use min(0.895, high) >= 0.84 or 0.8 (fixed) <= 0.99: the 16 decoder pixels go to the high bank
    out = _constant_out([0.99, 0.0033, 0.0033, 0.0034])
    ctx = TrainStepContext(epoch=1, global_step=0, total_steps=100, labeled=out, labels=labels)
    cb.on_train_step_context(None, module, ctx)
    assert cb.thresholds.tolist() == pytest.approx([0.895, 0.8, 0.8, 0.8], abs=1e-5)
    # step 2: p(class 0) = 0.85 -> ema 0.5 * 0.895 + 0.5 * 0.85 = 0.8725 (stored unclamped, fixed class too);
    # the teacher's unlabeled pixels (pred 0, conf 0.85) use the fixed eta_s 0.8 whatever class 0's threshold
    probs = [0.85, 0.05, 0.05, 0.05]
    ctx = TrainStepContext(
        epoch=1, global_step=1, total_steps=100, labeled=_constant_out(probs), labels=labels,
        unlabeled_teacher=_constant_out(probs, seed=1), unlabeled_student=_constant_out(probs, seed=2),
        pseudo_labels=labels.clone(), pseudo_confidence=torch.full((1, H, W), 0.85),
    )
    cb.on_train_step_context(None, module, ctx)
    assert cb.thresholds.tolist() == pytest.approx([0.8725, 0.8, 0.8, 0.8], abs=1e-5)
    assert cb.bank_high.fill().tolist() == [high, 0, 0, 0]
    assert cb.bank_low.fill().tolist() == [low, 0, 0, 0]
    stats = cb.statistics()
    assert stats["eta_s_ema"] == pytest.approx([0.8725, 0.8, 0.8, 0.8], abs=1e-5)
    in_use = {32: 0.8725, 48: 0.84 if "threshold_high" in extra else 0.8}[high]
    assert stats["eta_s"] == pytest.approx([in_use, 0.8, 0.8, 0.8], abs=1e-5)


def test_fixed_classes_must_be_classes() -> None:
    with pytest.raises(BRPGInputError, match="threshold_fixed_classes"):
        make_callback(threshold_fixed_classes=[C])


@pytest.mark.parametrize(("apo_count", "picked_per_bank"), [("paper", 2), ("official", 1)])
def test_apo_count_option_in_clustering(apo_count: str, picked_per_bank: int) -> None:
    # C = 4, alpha_t = 0.35: paper gamma at position 0.35 * 3 = 1.05 -> 2 classes below it;
    # official max(1, round(0.35 * 4 = 1.4)) = 1 class, the most scattered (lowest cosine score)
    cb, module = make_callback(alpha_t=0.35, apo_count=apo_count), StubModule()
    for step in range(4):
        cb.on_train_step_context(None, module, make_ctx(1, step, 100, seed=step))
    cb.cluster(None, module, 4)
    extra = cb.last_stats["apo_extra"]  # (banks, C)
    assert extra.sum(1).tolist() == [picked_per_bank, picked_per_bank]
    assert int(cb.proto_mask.sum()) == C * 4 + 2 * picked_per_bank
    order = cb.last_stats["dispersion"].argsort(dim=1)
    for b in range(2):
        assert set(torch.nonzero(extra[b]).flatten().tolist()) == set(order[b, :picked_per_bank].tolist())


def test_M_u_pooled_draws_batch_times_M_u_points(monkeypatch: pytest.MonkeyPatch) -> None:
    import brpg_lightning.brpg.callback as callback_module

    seen: list[list[int]] = []

    def spy(fn):  # noqa: ANN001, ANN202
        def wrapped(cand, num, *args, **kwargs):  # noqa: ANN001, ANN202
            coords, valid = fn(cand, num, *args, **kwargs)
            seen.append(valid.sum(1).tolist())
            return coords, valid
        return wrapped

    monkeypatch.setattr(callback_module, "pooled_random_points", spy(callback_module.pooled_random_points))
    monkeypatch.setattr(callback_module, "random_points", spy(callback_module.random_points))
    results = {}
    for pooled in (False, True):
        cb, module = make_callback(M_u=10, M_u_pooled=pooled), StubModule()
        for step in range(4):
            cb.on_train_step_context(None, module, make_ctx(1, step, 100, seed=step))
        ctx = make_ctx(2, 10, 100, seed=9)
        ctx.pseudo_confidence[1] = 0.0  # only image 0 has candidates (all its 256 pixels pass eta_t = 0.8)
        ctx.pseudo_confidence[0] = 1.0
        seen.clear()
        cb.on_train_step_context(None, module, ctx)
        results[pooled] = seen[-1]
    assert results[False] == [10, 0]  # paper: M_u per image
    assert results[True] == [20, 0]  # official: B_u * M_u = 20 from the pooled candidates, all in image 0


def test_eta_t_origin_official_epoch5() -> None:
    from types import SimpleNamespace

    cb, module = make_callback(eta_t_origin="official_epoch5"), StubModule()
    cb.setup(SimpleNamespace(max_epochs=10), module, "fit")
    for step in range(1, 4):
        cb.on_train_step_context(None, module, make_ctx(1, step, 100, seed=step))
    # 100 steps over 10 epochs: 10 per epoch; first prototype step 20 (epoch 2):
    # 0.8 + 0.15 * (20 - 50) / (100 - 50) = 0.71, below eta_0 (not clamped, as the official code)
    cb.on_train_step_context(None, module, make_ctx(2, 20, 100, seed=9))
    assert module.logged["brpg/eta_t"] == pytest.approx(0.71)
    assert cb.current_eta_t(make_ctx(7, 75, 100, seed=11)) == pytest.approx(0.8 + 0.15 * 25 / 50)
    with pytest.raises(BRPGInputError, match="max_epochs"):
        make_callback(eta_t_origin="official_epoch5").setup(SimpleNamespace(max_epochs=5), module, "fit")
    with pytest.raises(BRPGInputError, match="eta_t_origin"):
        BRPGCallback(eta_t_origin="epoch5")
