"""BRPGCallback wiring: stages, loss injection, log keys (per network), checkpoint state, snapshot, accessor."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from brpg_lightning.brpg.callback import BRPGCallback, brpg_callbacks
from brpg_lightning.errors import BRPGInputError
from tests.brpg.steps import SMALL, C, make_ctx


class StubModule:
    """What the callback needs of a LightningModule: ``num_classes``, ``device``, ``log``."""

    num_classes = C
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.logged: dict[str, float] = {}

    def log(self, name: str, value, **kwargs) -> None:
        self.logged[name] = float(value)


def make_callback(**kwargs) -> BRPGCallback:
    cb = BRPGCallback(**{"T_S1": 1, "T_S2": 2, "save_snapshot": False, **SMALL, **kwargs})
    cb.setup(None, StubModule(), "fit")
    return cb


def test_stages_follow_T_S1_T_S2_and_loss_is_added_only_in_the_prototype_stage() -> None:
    cb, module = make_callback(), StubModule()
    memory = cb.memory
    assert [cb.stage(e) for e in range(4)] == ["pretrain", "sampling", "prototype", "prototype"]
    ctx = make_ctx(0, 0, 100, seed=0)
    cb.on_train_step_context(None, module, ctx)
    assert memory.bank_high is None and not ctx.losses and not module.logged  # pretraining: nothing
    for step in range(1, 4):
        ctx = make_ctx(1, step, 100, seed=step)
        cb.on_train_step_context(None, module, ctx)
        assert not ctx.losses
    assert int(memory.bank_high.fill().sum()) > 0 and int(memory.bank_low.fill().sum()) > 0
    assert set(module.logged) == {"brpg/sampled_high"}
    ctx = make_ctx(2, 10, 100, seed=9, grad=True)
    cb.on_train_step_context(None, module, ctx)
    assert memory.prototypes is not None and memory.start_step == 10 and memory.bank_high is None
    assert set(ctx.losses) == {"L_pro"} and torch.isfinite(ctx.losses["L_pro"])
    ctx.losses["L_pro"].backward()
    assert ctx.labeled.features.grad is not None and ctx.unlabeled_student.features.grad is not None
    assert {"brpg/L_pro_l", "brpg/L_pro_u", "brpg/eta_t", "brpg/u_pass_eta_t"} <= set(module.logged)
    # Eq. (19) counts from T_S2's first step, not from epoch 0 nor a hard-coded epoch
    assert module.logged["brpg/eta_t"] == pytest.approx(0.8)


def test_bad_values_raise_one_line_errors() -> None:
    with pytest.raises(BRPGInputError, match="feature_source"):
        BRPGCallback(feature_source="aspp")
    with pytest.raises(BRPGInputError, match="T_S1"):
        BRPGCallback(T_S1=2, T_S2=2)
    with pytest.raises(BRPGInputError, match="threshold_fixed_classes"):
        make_callback(threshold_fixed_classes=[C])
    with pytest.raises(BRPGInputError, match="max_epochs"):
        make_callback(eta_t_origin="official_epoch5").setup(SimpleNamespace(max_epochs=5), StubModule(), "fit")


def test_a_second_network_ignores_other_contexts_and_logs_under_its_name() -> None:
    cb, module = make_callback(network="net2"), StubModule()
    assert cb.state_key == "BRPGCallback{'network': 'net2'}" and make_callback().state_key == "BRPGCallback"
    cb.on_train_step_context(None, module, make_ctx(1, 0, 100, seed=0))  # a "student" context: not ours
    assert cb.memory.bank_high is None and not module.logged
    for step in range(3):
        ctx = make_ctx(1, step, 100, seed=step)
        ctx.network = "net2"
        cb.on_train_step_context(None, module, ctx)
    assert set(module.logged) == {"brpg/net2/sampled_high"}
    cb.on_train_epoch_end(SimpleNamespace(current_epoch=1), module)
    assert module.logged["brpg/net2/stage"] == 1 and not any(k.startswith("brpg/stage") for k in module.logged)
    assert set(cb.epoch_scalars()) <= set(module.logged) and all(k.startswith("brpg/net2/") for k in cb.epoch_scalars())


@pytest.mark.parametrize("stage_steps", [2, 4])  # 2: saved while sampling (banks); 4: after clustering
def test_checkpoint_state_round_trip_with_weights_only(stage_steps: int) -> None:
    cb, module = make_callback(), StubModule()
    for step in range(3):
        cb.on_train_step_context(None, module, make_ctx(1, step, 100, seed=step))
    if stage_steps == 4:
        cb.on_train_step_context(None, module, make_ctx(2, 3, 100, seed=3))
    buf = io.BytesIO()
    torch.save(cb.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state["version"] == 2 and state["epoch"] == (1 if stage_steps == 2 else 2)
    restored = make_callback()
    restored.load_state_dict(state)
    assert restored.epoch == cb.epoch and restored.memory.start_step == cb.memory.start_step
    for name in ("prototypes", "proto_mask", "thresholds"):
        a, b = getattr(cb.memory, name), getattr(restored.memory, name)
        assert (a is None and b is None) or torch.equal(a, b)
    if stage_steps == 2:
        for name in ("bank_high", "bank_low"):
            for key, value in getattr(cb.memory, name).state_dict().items():
                assert torch.equal(value, getattr(restored.memory, name).state_dict()[key])
        # the restored run continues identically: same prototypes from the same banks
        for run in (cb, restored):
            torch.manual_seed(0)  # the prototype step draws random unlabeled points
            run.on_train_step_context(None, module, make_ctx(2, 3, 100, seed=3))
        assert torch.equal(cb.memory.prototypes, restored.memory.prototypes)


def test_snapshot_and_confidence_banks_only_when_asked(tmp_path: Path) -> None:
    trainer = SimpleNamespace(is_global_zero=True, default_root_dir=str(tmp_path))
    module = StubModule()
    for save, network in ((False, "student"), (True, "student"), (True, "net1")):
        cb = make_callback(save_snapshot=save, snapshot_per_class=5, network=network)
        for step in range(3):
            ctx = make_ctx(1, step, 100, seed=step)
            ctx.network = network
            cb.on_train_step_context(trainer, module, ctx)
        assert (cb.memory.conf_high is not None) == save
        assert ("conf_high" in cb.state_dict()) == save  # neither kept nor saved without a snapshot
        fill = [b.fill() for b in cb.memory.live_banks()]
        ctx = make_ctx(2, 3, 100, seed=3)
        ctx.network = network
        cb.on_train_step_context(trainer, module, ctx)
    assert sorted(p.name for p in (tmp_path / "brpg").iterdir()) == ["snapshot.pt", "snapshot_net1.pt"]
    snap = torch.load(tmp_path / "brpg" / "snapshot_net1.pt", weights_only=True)
    per_group = torch.stack(fill).clamp_max(5)  # (banks, C): up to snapshot_per_class each
    assert snap["features"].shape[0] == int(per_group.sum()) and int(snap["epoch"]) == 2
    assert bool((snap["confidence"][snap["bank"] == 0] >= 0.8 - 1e-3).all())  # high bank: conf >= eta_s
    assert bool((snap["confidence"][snap["bank"] == 1] < 0.8 + 1e-3).all())
    assert torch.equal(snap["proto_mask"], cb.memory.proto_mask)


def test_statistics_and_epoch_logging_follow_the_state() -> None:
    cb, module = make_callback(), StubModule()
    memory = cb.memory
    cb.on_train_epoch_end(SimpleNamespace(current_epoch=0), module)
    assert module.logged["brpg/stage"] == 0 and module.logged["brpg/classes_without_prototypes"] == C
    for step in range(3):
        cb.on_train_step_context(None, module, make_ctx(1, step, 100, seed=step))
    cb.on_train_epoch_end(SimpleNamespace(current_epoch=1), module)
    fill_h = memory.bank_high.fill().tolist()
    assert module.logged["brpg/stage"] == 1
    assert [module.logged[f"brpg/bank_fill_high/{c}"] for c in range(C)] == fill_h
    assert cb.statistics()["bank_fill"]["low"] == memory.bank_low.fill().tolist()
    cb.on_train_step_context(None, module, make_ctx(2, 3, 100, seed=3))
    cb.on_train_step_context(None, module, make_ctx(2, 50, 100, seed=50))
    module.logged.clear()
    cb.on_train_epoch_end(SimpleNamespace(current_epoch=2), module)
    stats = cb.statistics()
    assert stats["stage"] == "prototype" and stats["bank_fill"]["high"] == fill_h  # fill at clustering
    counts = memory.proto_mask.sum(1).tolist()
    assert stats["prototypes_per_class"] == counts and module.logged["brpg/prototypes_total"] == sum(counts)
    assert module.logged["brpg/classes_without_prototypes"] == 0
    for bank in ("high", "low"):
        extra = stats["apo_extra"][bank]
        assert stats["apo_picks"][bank] == [c for c in range(C) if extra[c] > 0]
        assert [module.logged[f"brpg/apo_extra_{bank}/{c}"] for c in range(C)] == extra
        assert [module.logged[f"brpg/dispersion_{bank}/{c}"] for c in range(C)] == pytest.approx(
            stats["dispersion"][bank])
    # Eq. (19) at the last prototype step (step 50 of 100, started at 3)
    assert module.logged["brpg/eta_t_epoch"] == pytest.approx(0.8 + 0.15 * 47 / 97)
    assert stats["eta_t"] == pytest.approx(0.8 + 0.15 * 47 / 97)


def test_brpg_callbacks_lists_every_network() -> None:
    net1, net2 = make_callback(network="net1"), make_callback(network="net2")
    trainer = SimpleNamespace(callbacks=[object(), net1, net2])
    assert brpg_callbacks(trainer) == {"net1": net1, "net2": net2}
    assert brpg_callbacks(SimpleNamespace(callbacks=[object()])) == {}


def test_stage_messages_read_every_network_through_the_accessor(caplog: pytest.LogCaptureFixture) -> None:
    from brpg_lightning.callbacks.progress import StageMessages, current_stage

    module, cbs = StubModule(), [make_callback(network=n) for n in ("net1", "net2")]
    trainer = SimpleNamespace(callbacks=cbs, current_epoch=2)
    assert current_stage(trainer) == "prototype" and current_stage(SimpleNamespace(callbacks=[], current_epoch=2)) is None
    messages = StageMessages()
    for cb in cbs:
        for step in range(3):
            ctx = make_ctx(1, step, 100, seed=step)
            ctx.network = cb.network
            cb.on_train_step_context(None, module, ctx)
    cbs[0].memory.cluster(3)
    with caplog.at_level("INFO"):
        messages.on_train_batch_end(trainer, module)  # net2 not clustered yet: nothing to announce
        assert messages.announced is None
        cbs[1].memory.cluster(3)
        messages.on_train_batch_end(trainer, module)
    counts = [int(cb.memory.proto_mask.sum()) for cb in cbs]
    assert f"{sum(counts)} prototypes (net1 {counts[0]}, net2 {counts[1]})" in caplog.text
    assert messages.announced == "prototype"


def test_progress_bar_shows_the_keys_cps_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under CPS each network's BRPG logs ``brpg/<network>/eta_t`` and its losses ``train/<network>/L_s``: the bar
    reads the first network's, from the keys the callbacks really logged (no ``brpg/eta_t`` exists then)."""
    from pytorch_lightning.callbacks import TQDMProgressBar

    from brpg_lightning.callbacks.progress import BRPGProgressBar

    monkeypatch.setattr(TQDMProgressBar, "get_metrics", lambda self, trainer, module: {"v_num": 0})
    module, cbs = StubModule(), [make_callback(network=n) for n in ("net1", "net2")]
    for cb in cbs:
        for step in range(3):
            ctx = make_ctx(1, step, 100, seed=step)
            ctx.network = cb.network
            cb.on_train_step_context(None, module, ctx)
        ctx = make_ctx(2, 10, 100, seed=9)
        ctx.network = cb.network
        cb.on_train_step_context(None, module, ctx)
    assert "brpg/eta_t" not in module.logged and module.logged["brpg/net1/eta_t"] == pytest.approx(0.8)
    metrics = {k: torch.tensor(v) for k, v in module.logged.items()}
    metrics.update({"train/net1/L_s": torch.tensor(0.25), "train/net2/L_s": torch.tensor(0.5)})
    trainer = SimpleNamespace(callbacks=cbs, current_epoch=2, callback_metrics=metrics)
    cps = SimpleNamespace(networks=("net1", "net2"))
    items = BRPGProgressBar().get_metrics(trainer, cps)
    assert items["stage"] == "prototype" and items["eta_t"] == "0.8" and items["L_s"] == "0.25"
    assert "L_pro" not in items  # the module logs it (train/net1/L_pro), not the callback: absent here
    one = make_callback()  # one network: the plain keys
    trainer = SimpleNamespace(callbacks=[one], current_epoch=0,
                              callback_metrics={"brpg/eta_t": torch.tensor(0.7), "train/L_s": torch.tensor(0.1)})
    items = BRPGProgressBar().get_metrics(trainer, SimpleNamespace(networks=("student",)))
    assert items["eta_t"] == "0.7" and items["L_s"] == "0.1" and "v_num" not in items
