"""Mean-teacher weights: an exponential moving average of the student (paper Sec. 3.3, after timm's ModelEmaV3).

U2PL schedule: after the supervised-only epochs the teacher is copied from the student
(:meth:`EMATeacher.copy_from`), then :meth:`EMATeacher.update` runs after every optimiser step with
``t`` = updates since the copy, so the first update has decay 0 (teacher = student) and the decay ramps
as ``min(1 - 1 / (t + 1), decay)``.

``buffers=False`` (U2PL's ``train_semi.py``): the EMA covers parameters only; the teacher's buffers (BN running
statistics) are left to the teacher's own train-mode forwards, which the method runs, and the copy after the
supervised-only epochs passes ``buffers=False`` to :meth:`EMATeacher.copy_from` too.

Create the teacher from the bare student, before any DDP wrapping, and pass the bare student (not a
DDP wrapper) to :meth:`EMATeacher.update`: parameters and buffers are matched by name.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class EMATeacher(nn.Module):
    """Teacher network whose parameters and float buffers follow an EMA of the student's.

    ``t <- d * t + (1 - d) * s`` for every float parameter and float buffer (BN running mean/var);
    integer buffers (``num_batches_tracked``) are copied. The teacher's parameters never require grad.

    Args:
        model: the student; deep-copied.
        decay: the EMA decay ``d`` (0.99 in U2PL / BRPG).
        ramp: use ``min(1 - 1 / (t + 1), decay)`` instead of the fixed ``decay``.
        buffers: also average float buffers and copy integer ones (timm ``ModelEmaV3``); False: parameters
            only (U2PL), buffers untouched by :meth:`update`.

    Attributes:
        module: the teacher network; ``forward`` calls it.
        steps: long buffer (saved in checkpoints), number of :meth:`update` calls since creation or
            the last :meth:`copy_from`.

    Example:
        >>> student = nn.Linear(2, 1)
        >>> teacher = EMATeacher(student, decay=0.99)
        >>> teacher.update(student), teacher.update(student), teacher.get_decay(int(teacher.steps))
        (0.0, 0.5, 0.6666666666666667)
    """

    steps: Tensor

    def __init__(self, model: nn.Module, decay: float = 0.99, ramp: bool = True, buffers: bool = True) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)
        self.decay = float(decay)
        self.ramp = bool(ramp)
        self.buffers = bool(buffers)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def get_decay(self, step: int) -> float:
        """Decay for the update after ``step`` earlier updates: ``min(1 - 1/(step+1), decay)`` or ``decay``."""
        if not self.ramp:
            return self.decay
        return min(1.0 - 1.0 / (step + 1), self.decay)

    def _pairs(self, model: nn.Module, buffers: bool = True) -> list[tuple[Tensor, Tensor]]:
        """``(teacher, student)`` tensors of every parameter (and buffer), matched by name."""
        mine = dict(self.module.named_parameters())
        theirs = dict(model.named_parameters())
        if buffers:
            mine.update(self.module.named_buffers())
            theirs.update(model.named_buffers())
        if mine.keys() != theirs.keys():
            diff = sorted(mine.keys() ^ theirs.keys())
            raise ValueError(f"teacher and student tensors differ in names: {diff[:5]}")
        return [(mine[name], theirs[name]) for name in mine]

    @torch.no_grad()
    def copy_from(self, model: nn.Module, buffers: bool = True) -> None:
        """Make every parameter (and, with ``buffers``, every buffer) an exact copy of ``model``'s; reset
        :attr:`steps` to 0. ``buffers=False`` is U2PL's copy after the supervised-only epochs: parameters only,
        the teacher keeps the BN statistics of its own train-mode forwards."""
        for t, s in self._pairs(model, buffers=buffers):
            t.copy_(s)
        self.steps.zero_()

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        """One EMA step towards ``model`` with ``d = get_decay(steps)``; then ``steps += 1``. Returns ``d``."""
        decay = self.get_decay(int(self.steps))
        lerp_t, lerp_s = [], []
        for t, s in self._pairs(model, buffers=self.buffers):
            if t.is_floating_point():
                lerp_t.append(t)
                lerp_s.append(s.to(dtype=t.dtype))
            else:
                t.copy_(s)
        if lerp_t:
            # lerp: t + (1 - d) * (s - t) == d * t + (1 - d) * s (exactly s when d == 0)
            torch._foreach_lerp_(lerp_t, lerp_s, weight=1.0 - decay)
        self.steps += 1
        return decay

    def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003
        """The teacher's forward: ``self.module(*args, **kwargs)``."""
        return self.module(*args, **kwargs)
