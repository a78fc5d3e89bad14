"""Inner knowledge distillation: the parent teaches the pruned child stage by stage.

Loss parts (combined in the loop): the inner loss is the mean over stages of the MSE
between the child's stage output (through a learned 1x1 projection where the child is
narrower) and the frozen parent's; the logit loss is KL(parent || child) at temperature T,
scaled by T^2 so its gradient does not shrink as T grows.

The projections start at the least-squares map from the child's features to the parent's
(`fit_projections`), not at a random init: a random 1x1 conv makes the first inner loss
large and its gradient drags the child's features toward an arbitrary mixing of channels,
which undoes what pruning kept before the projection has learned anything.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from kpc.artifact import LoadedModel
from kpc.errors import KpcError
from kpc.train.stages import find_stages, stage_channels


def check_teacher(child: LoadedModel, teacher: LoadedModel) -> None:
    """Refuse a teacher that is not the child's parent: same base architecture, and a prefix of its rounds.

    Inner distillation compares features stage by stage, which only means something when
    the teacher is the network the child was cut from (or an earlier round of it).
    """
    child_spec = {k: v for k, v in child.plan.model.items() if k != "pretrained"}
    teacher_spec = {k: v for k, v in teacher.plan.model.items() if k != "pretrained"}
    if child_spec != teacher_spec:
        diffs = [f"{key} {teacher_spec.get(key)!r} vs {child_spec.get(key)!r}"
                 for key in sorted(set(child_spec) | set(teacher_spec)) if child_spec.get(key) != teacher_spec.get(key)]
        raise KpcError(f"teacher {teacher.source} is not the parent of {child.source}: their base models differ "
                       f"({'; '.join(diffs)})")
    rounds = len(teacher.rounds)
    kept = [[g.to_json() for g in r.groups] for r in child.rounds[:rounds]]
    if kept != [[g.to_json() for g in r.groups] for r in teacher.rounds]:
        raise KpcError(f"teacher {teacher.source} is not the parent of {child.source}: its pruning rounds are not "
                       "the ones the child was cut from")
    if rounds and rounds == len(child.rounds):  # the child itself, or a copy: it would distill into itself
        raise KpcError(f"teacher {teacher.source} has every pruning round of {child.source}: it is the pruned child "
                       "(or a copy of it), not its parent; give the unpruned model the child was cut from")


class Student(nn.Module):
    """The child plus the child->parent projections, trained (and wrapped by DDP) as one module.

    The projections live only here: the saved artifact is `student.model`, the plain child.
    """

    def __init__(self, model: nn.Module, projections: dict[str, nn.Module] | None = None) -> None:
        super().__init__()
        self.model = model
        self.projections = nn.ModuleDict({_key(k): v for k, v in (projections or {}).items()})

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def project(self, stage: str, features: torch.Tensor) -> torch.Tensor:
        key = _key(stage)
        return self.projections[key](features) if key in self.projections else features


def _key(stage: str) -> str:
    return stage.replace(".", "__")  # ModuleDict keys cannot contain dots


def build_projections(child: nn.Module, parent: nn.Module,
                      example: torch.Tensor) -> tuple[list[str], dict[str, nn.Module]]:
    """The parent's stages and a 1x1 conv for every stage where the child's width differs."""
    stages = find_stages(parent, example)
    if not stages:
        raise KpcError("inner distillation found no stages (no 4-D feature maps) in this model: "
                       "use --ikd-weight 0 (logit distillation still works)")
    missing = [s for s in stages if s not in dict(child.named_modules())]
    if missing:
        raise KpcError(f"the child has no module {missing[0]!r} that the teacher has: it is not the teacher's child")
    parent_width = stage_channels(parent, example, stages)
    child_width = stage_channels(child, example, stages)
    projections: dict[str, nn.Module] = {}
    for stage in stages:
        if child_width[stage] != parent_width[stage]:
            projections[stage] = nn.Conv2d(child_width[stage], parent_width[stage], 1, bias=False)
    return stages, projections


class FeatureTap:
    """Forward hooks that keep the latest output of each named stage."""

    def __init__(self, model: nn.Module, stages: list[str]) -> None:
        modules = dict(model.named_modules())
        self.features: dict[str, torch.Tensor] = {}
        self._handles = [modules[name].register_forward_hook(self._keeper(name)) for name in stages]

    def _keeper(self, name: str):
        def keep(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            self.features[name] = output
        return keep

    def take(self) -> dict[str, torch.Tensor]:
        features, self.features = self.features, {}
        return features

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


@contextmanager
def tapped(model: nn.Module, stages: list[str]) -> Iterator[FeatureTap]:
    tap = FeatureTap(model, stages)
    try:
        yield tap
    finally:
        tap.close()


def _stage_features(model: nn.Module, stages: list[str], images: torch.Tensor) -> dict[str, torch.Tensor]:
    with tapped(model, stages) as tap:
        model(images)
        return tap.take()


def _as_rows(features: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) feature maps as (N*H*W, C) rows, in float64 for the normal equations."""
    return features.detach().double().movedim(1, -1).reshape(-1, features.shape[1])


@torch.no_grad()
def fit_projections(student: Student, parent: nn.Module, stages: list[str], batches: Iterable[torch.Tensor],
                    ridge: float = 1e-2) -> dict[str, float]:
    """Set every projection to the ridge least-squares map child -> parent over `batches`; both nets in eval mode.

    `ridge` is relative to the mean eigenvalue of the child's feature Gram matrix. It is not
    tiny on purpose: correlated child channels make plain least squares ill-conditioned, and
    then rounding differences (a different thread count, another DDP rank) grew into 1e-3
    differences in the fitted weights; at 1e-2 a 2-process run matches 1 process again.

    Returns the relative residual (unexplained fraction of the parent's feature energy) per
    projected stage, so a caller can log how far the child's features start from the parent's.
    The normal equations are accumulated batch by batch, so memory stays at C x C per stage.
    """
    projected = [s for s in stages if _key(s) in student.projections]
    if not projected:
        return {}
    child_was_training = student.model.training
    student.model.eval()
    gram: dict[str, torch.Tensor] = {}
    cross: dict[str, torch.Tensor] = {}
    energy: dict[str, float] = {}
    try:
        for images in batches:
            child = _stage_features(student.model, projected, images)
            target = _stage_features(parent, projected, images)
            for stage in projected:
                x, y = _as_rows(child[stage]), _as_rows(target[stage])
                gram[stage] = gram.get(stage, 0) + x.T @ x
                cross[stage] = cross.get(stage, 0) + x.T @ y
                energy[stage] = energy.get(stage, 0.0) + float((y * y).sum())
    finally:
        student.model.train(child_was_training)
    residuals: dict[str, float] = {}
    for stage in projected:
        a, b = gram[stage], cross[stage]
        damping = ridge * float(torch.trace(a)) / a.shape[0] + 1e-12
        solution = torch.linalg.solve(a + damping * torch.eye(a.shape[0], dtype=a.dtype, device=a.device), b)
        projection = student.projections[_key(stage)]
        weight = projection.weight  # (parent channels, child channels, 1, 1)
        weight.copy_(solution.T.reshape(weight.shape).to(weight.dtype))
        # ||y - xW||^2 = ||y||^2 - 2 tr(W'X'Y) + tr(W'X'XW), from the accumulated sums
        explained = float(2 * (solution * b).sum() - (solution * (a @ solution)).sum())
        residuals[stage] = max(0.0, 1.0 - explained / max(energy[stage], 1e-30))
    return residuals


def inner_loss(student: Student, child_features: dict[str, torch.Tensor],
               parent_features: dict[str, torch.Tensor], stages: list[str]) -> torch.Tensor:
    """Mean over stages of the MSE between the (projected) child features and the parent's."""
    losses = [F.mse_loss(student.project(s, child_features[s]).float(), parent_features[s].float()) for s in stages]
    return torch.stack(losses).mean()


def logit_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's soft-target loss: KL(teacher || student) at temperature T, times T^2."""
    t = float(temperature)
    log_student = F.log_softmax(student_logits.float() / t, dim=1)
    log_teacher = F.log_softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean") * (t * t)


class InnerDistillation(nn.Module):
    """Inner distillation for a user's own training loop: `logits, inner_loss = ikd(images)`.

    The parent runs frozen in eval mode (whatever `train()` is called with); the child runs
    in the module's mode, and a 1x1 projection maps each of its stage outputs to the
    parent's width where they differ. The projections are trained with the child and are
    not part of it: `ikd.child` is the plain pruned model to save. Call
    `fit_projections(batches)` once before training to start them at the least-squares
    map from the child's features to the parent's (random projections undo what pruning
    kept before they learn anything).

        ikd = kpc.InnerDistillation(parent, child, example_inputs)
        logits, inner = ikd(images)
        loss = F.cross_entropy(logits, labels) + 5.0 * inner
    """

    def __init__(self, parent: nn.Module, child: nn.Module, example_inputs: torch.Tensor) -> None:
        super().__init__()
        if not isinstance(example_inputs, torch.Tensor) or example_inputs.ndim != 4:
            raise KpcError("example_inputs should be one image batch of shape (N, C, H, W)")
        example = example_inputs.detach()[:1]
        self.stages, projections = build_projections(child, parent, example)
        self.student = Student(child, projections)
        self.parent = parent.eval().requires_grad_(False)

    @property
    def child(self) -> nn.Module:
        return self.student.model

    def train(self, mode: bool = True) -> InnerDistillation:
        super().train(mode)
        self.parent.eval()
        return self

    def fit_projections(self, batches: Iterable[torch.Tensor]) -> dict[str, float]:
        """Least-squares start for the projections; returns the unexplained fraction of the parent's features."""
        images = (b[0] if isinstance(b, (tuple, list)) else b for b in batches)
        return fit_projections(self.student, self.parent, self.stages, images)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), tapped(self.parent, self.stages) as tap:
            self.parent(images)
            parent_features = tap.take()
        with tapped(self.child, self.stages) as tap:
            logits = self.student(images)
            child_features = tap.take()
        return logits, inner_loss(self.student, child_features, parent_features, self.stages)
