"""Cross pseudo supervision (Chen et al., CVPR 2021; the official CPS + CutMix recipe): paper Table 10."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from brpg_lightning.errors import BRPGInputError
from brpg_lightning.methods.base import SegmentationModule
from brpg_lightning.methods.context import TrainStepContext
from brpg_lightning.methods.cutmix import apply_cutmix
from brpg_lightning.methods.pseudo_label import masked_cross_entropy
from brpg_lightning.models.ensemble import MeanLogits

EVAL_ON = ("net1", "mean")


class CPS(SegmentationModule):
    """L = sum over both networks of L_s + lambda_cps CE(net_i(x_mix), argmax net_j(x_u)), j != i.

    Two networks of the same architecture with different initialisations (``train.build_module`` builds
    the model config twice, so pretrained encoder weights are shared and every random draw differs):
    ``student`` is ``net1``, ``net2`` the second. Each step both networks predict the unlabeled weak view
    without gradient; their hard pseudo-labels (Eq. 3, no threshold) are CutMix'd with the image and each
    network learns from the other's. One :class:`TrainStepContext` per network (``network="net1"|"net2"``):
    its own labeled and mixed forwards, its own weak-view forward as ``unlabeled_teacher`` (BRPG bank
    features stay in that network's feature space) and the peer's pseudo-labels, the targets it is trained
    on. ``train.build_callbacks`` attaches one BRPG callback, with its own banks and prototypes, per network.

    Args:
        segmentor2: the second network. lambda_cps: CPS weight (CPS paper, PASCAL VOC: 1.5).
        cutmix_p: CutMix probability (official: always). strong_view: mix the colour-jittered view instead
            of the weak one (official: weak). eval_on: ``net1`` or ``mean`` (mean of both logits).
        **kwargs: :class:`SegmentationModule` arguments.
    """

    networks = ("net1", "net2")

    def __init__(
        self, *args: Any, segmentor2: nn.Module, lambda_cps: float = 1.5, cutmix_p: float = 1.0,
        strong_view: bool = False, eval_on: str = "net1", **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if eval_on not in EVAL_ON:
            raise BRPGInputError(f"method.eval_on={eval_on!r}; expected one of {', '.join(EVAL_ON)}")
        self.net2 = segmentor2
        self.lambda_cps, self.cutmix_p, self.strong_view = lambda_cps, cutmix_p, strong_view
        self.eval_on = eval_on

    @property
    def eval_model(self) -> nn.Module:
        return self.student if self.eval_on == "net1" else MeanLogits(self.student, self.net2)

    def eval_networks(self) -> list[nn.Module]:
        # the wrapper above is built on every access and is not a submodule: the checkpoint names its members
        return [self.student] if self.eval_on == "net1" else [self.student, self.net2]

    def trained_networks(self) -> list[nn.Module]:
        return [self.student, self.net2]

    def compute_step(self, batch: dict[str, Any]) -> list[TrainStepContext]:
        x_l, y_l = batch["labeled"]["image"], batch["labeled"]["mask"]
        nets = self.trained_networks()
        u = batch["unlabeled"]
        with torch.no_grad():  # official CPS: pseudo-labels of the un-mixed images, networks in train mode
            outs_w = [net(u["image"]) for net in nets]
            (_, c1, p1), (_, c2, p2) = (self.hard_pseudo_labels(o, u["valid"]) for o in outs_w)
            x_u = u["image_strong"] if self.strong_view else u["image"]
            x_m, p1, c1, p2, c2, _ = apply_cutmix(x_u, p1, c1, p2, c2, p=self.cutmix_p)
        targets = [(p2, c2), (p1, c1)]  # net1 learns from net2's pseudo-labels and vice versa
        contexts = []
        for name, net, out_w, (pseudo, conf) in zip(self.networks, nets, outs_w, targets, strict=True):
            out_l, out_u = net(torch.cat([x_l, x_m])).split([x_l.shape[0], x_m.shape[0]])
            ctx = self.new_context(out_l, y_l, name)
            ctx.unlabeled_teacher, ctx.unlabeled_student = out_w, out_u
            ctx.pseudo_labels, ctx.pseudo_confidence = pseudo, conf
            logits_u = out_u.logits_at(tuple(y_l.shape[-2:]))
            ctx.add_loss("L_s", self.supervised_loss(out_l, y_l))
            ctx.add_loss("L_cps", self.lambda_cps * masked_cross_entropy(logits_u, pseudo, torch.ones_like(u["valid"])))
            contexts.append(ctx)
        return contexts
