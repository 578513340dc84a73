"""EMA teacher: U2PL ramp, exact copy, hand-computed update, BN buffers, checkpoint round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from brpg_lightning.methods.ema import EMATeacher


def make_student() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, kernel_size=1), nn.BatchNorm2d(3))


def tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def train_forward(student: nn.Module, seed: int) -> None:
    """One train-mode forward: moves BN running stats and bumps num_batches_tracked."""
    student.train()
    with torch.no_grad():
        student(torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(seed)) * 3 + 1)


@pytest.mark.parametrize(
    ("step", "decay", "expected"),
    [
        (0, 0.99, 0.0),  # 1 - 1/1
        (1, 0.99, 0.5),  # 1 - 1/2
        (2, 0.99, 2 / 3),  # 1 - 1/3
        (99, 0.99, 0.99),  # 1 - 1/100 reaches the cap
        (1000, 0.99, 0.99),
        (99, 0.999, 0.99),  # ramp still below a larger cap
        (1000, 0.999, 0.999),  # 1 - 1/1001 > 0.999
    ],
)
def test_ramp_decay(step: int, decay: float, expected: float) -> None:
    assert EMATeacher(make_student(), decay=decay).get_decay(step) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("step", [0, 1, 2, 99, 1000])
def test_fixed_decay_without_ramp(step: int) -> None:
    assert EMATeacher(make_student(), decay=0.99, ramp=False).get_decay(step) == 0.99


def test_teacher_is_a_frozen_deep_copy() -> None:
    student = make_student()
    teacher = EMATeacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    for name, t in tensors(teacher.module).items():
        s = tensors(student)[name]
        assert torch.equal(t, s) and t.data_ptr() != s.data_ptr(), name
    x = torch.randn(2, 2, 3, 3)
    teacher.eval()
    assert torch.equal(teacher(x), teacher.module(x))


def test_copy_from_is_exact_and_resets_steps() -> None:
    student = make_student()
    teacher = EMATeacher(student)
    teacher.update(student)
    teacher.update(student)
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(-2.0).add_(0.3)
    train_forward(student, seed=1)
    teacher.copy_from(student)
    assert int(teacher.steps) == 0
    for name, t in tensors(teacher.module).items():
        assert torch.equal(t, tensors(student)[name]), name
    # first update after the copy: decay 0, so the teacher is the student again
    with torch.no_grad():
        student[0].weight.add_(1.0)
    assert teacher.update(student) == 0.0
    assert torch.equal(teacher.module[0].weight, student[0].weight)


def test_update_on_known_parameter_by_hand() -> None:
    student = make_student()
    teacher = EMATeacher(student, decay=0.9, ramp=False)
    with torch.no_grad():
        teacher.module[0].bias.copy_(torch.tensor([1.0, 2.0, -1.0]))
        student[0].bias.copy_(torch.tensor([3.0, 2.0, 9.0]))
    d = teacher.update(student)
    assert d == 0.9 and int(teacher.steps) == 1
    # 0.9 * 1 + 0.1 * 3 = 1.2; 0.9 * 2 + 0.1 * 2 = 2; 0.9 * -1 + 0.1 * 9 = 0
    assert torch.allclose(teacher.module[0].bias, torch.tensor([1.2, 2.0, 0.0]), atol=1e-6)
    # ramp: second update of a ramped teacher uses 1 - 1/2
    ramped = EMATeacher(student)
    ramped.update(student)
    with torch.no_grad():
        before = ramped.module[0].bias.clone()
        student[0].bias.add_(4.0)
    assert ramped.update(student) == 0.5
    assert torch.allclose(ramped.module[0].bias, 0.5 * before + 0.5 * student[0].bias)


def test_bn_running_stats_follow_ema_and_counter_is_copied() -> None:
    student = make_student()
    teacher = EMATeacher(student, decay=0.75, ramp=False)
    mean_t = teacher.module[1].running_mean.clone()
    var_t = teacher.module[1].running_var.clone()
    train_forward(student, seed=2)
    train_forward(student, seed=3)
    teacher.update(student)
    bn_s, bn_t = student[1], teacher.module[1]
    assert not torch.allclose(bn_s.running_mean, mean_t)  # the student's stats did move
    assert torch.allclose(bn_t.running_mean, 0.75 * mean_t + 0.25 * bn_s.running_mean, atol=1e-6)
    assert torch.allclose(bn_t.running_var, 0.75 * var_t + 0.25 * bn_s.running_var, atol=1e-6)
    assert bn_t.num_batches_tracked.dtype == torch.long
    assert int(bn_t.num_batches_tracked) == int(bn_s.num_batches_tracked) == 2


def test_state_dict_round_trip_keeps_steps() -> None:
    student = make_student()
    teacher = EMATeacher(student)
    for _ in range(3):
        with torch.no_grad():
            student[0].weight.add_(0.1)
        teacher.update(student)
    state = teacher.state_dict()
    assert "steps" in state and state["steps"].dtype == torch.long

    restored = EMATeacher(make_student())
    restored.load_state_dict(state)
    assert int(restored.steps) == 3
    assert restored.get_decay(int(restored.steps)) == pytest.approx(0.75)
    for name, t in tensors(restored.module).items():
        assert torch.equal(t, tensors(teacher.module)[name]), name


def test_mismatched_student_raises() -> None:
    teacher = EMATeacher(make_student())
    with pytest.raises(ValueError, match="differ"):
        teacher.update(nn.Linear(2, 3))
