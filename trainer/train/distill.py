"""The trainable side of distillation as one module, and the objects built around it."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
from torch import nn

from losses import DistillationLoss
from modeling import DepthAnythingTeacher, StudentDepthModel
from trainer.config import Config


class DistillationModule(nn.Module):
    """Student plus the distillation loss (which owns the trainable feature adapters).

    One module so that `accelerator.prepare` wraps both in DDP: the adapters' gradients are
    synchronised with the student's and both are saved and restored in the training state.
    Only `student` is ever exported.
    """

    def __init__(self, student: StudentDepthModel, criterion: DistillationLoss, student_stages: list[int]):
        super().__init__()
        self.student = student
        self.criterion = criterion
        self.student_stages = list(student_stages)

    def forward(self, student_images: torch.Tensor, teacher_disparity: torch.Tensor,
                teacher_features: list[torch.Tensor] | None = None):
        """-> (total loss, {term: value}, student disparity (B, 1, H, W))."""
        if self.criterion.needs_teacher_features:
            disparity, features = self.student(student_images, return_features=True)
            features = [features[i] for i in self.student_stages]
        else:
            disparity, features = self.student(student_images), None
        total, terms = self.criterion(disparity, teacher_disparity, features, teacher_features)
        return total, terms, disparity


def build_teacher(cfg: Config) -> DepthAnythingTeacher:
    return DepthAnythingTeacher.from_pretrained(cfg.teacher.name, cfg.teacher.feature_layers)


def build_student(cfg: Config) -> StudentDepthModel:
    s = cfg.student
    # The training input size goes into the student's config.json: predict, export and evaluate
    # then run it at the size it learned, not at some default.
    return StudentDepthModel.build(s.backbone, s.decoder, s.decoder_width, s.head_width, pretrained=s.pretrained,
                                   input_size=cfg.data.student_size)


def build_module(cfg: Config, student: StudentDepthModel, teacher: DepthAnythingTeacher,
                 with_features: bool = True) -> DistillationModule:
    """`with_features=False` drops the feature and attention terms (a cached run without the
    live teacher has no teacher features to match)."""
    d = cfg.distill
    stages = d.student_stages
    weights = dataclasses.asdict(d.weights)
    if not with_features:
        weights.update(feature=0.0, attention=0.0)
    if len(stages) != len(teacher.feature_layers):
        raise ValueError(f"distill.student_stages {stages} must pair one-to-one with the teacher's "
                         f"feature layers {teacher.feature_layers} (set teacher.feature_layers)")
    criterion = DistillationLoss(
        weights=weights, normalization=d.normalization,
        student_channels=[student.feature_channels[i] for i in stages],
        teacher_channels=teacher.feature_channels, silog_lam=d.silog_lam,
        gradient_scales=d.gradient_scales, feature_kind=d.feature_kind, ssi_kind=d.ssi_kind,
        pixel_kind=d.pixel_kind)
    return DistillationModule(student, criterion, stages)


def build_optimizer(cfg: Config, module: DistillationModule) -> torch.optim.Optimizer:
    """AdamW with its own learning rate for encoder, decoder and adapters. Norms and biases get no
    weight decay, as is usual for both convnets and transformers."""
    o = cfg.optim
    parts = {"encoder": (module.student.encoder, o.lr * o.encoder_lr_mult),
             "decoder": (module.student.decoder, o.lr),
             "adapters": (module.criterion, o.lr * o.adapter_lr_mult)}
    groups = []
    for name, (part, lr) in parts.items():
        params = [p for p in part.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        for suffix, members, wd in (("", decay, o.weight_decay), ("_no_decay", no_decay, 0.0)):
            if members:
                groups.append({"name": name + suffix, "params": members, "lr": lr, "weight_decay": wd})
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas))


def warmup_cosine(step: float, warmup_steps: int, total_steps: float, min_ratio: float) -> float:
    """Learning-rate factor: linear warm-up from ~0 to 1, then cosine down to `min_ratio`.
    `step` may be fractional (a position in the run measured in photos, see `build_scheduler`)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer,
                    position: Callable[[], tuple[float, float]]) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up + cosine over the run measured in photos, not steps: `position()` gives (photos
    trained, photos in the whole run), both in units of the first launch's photos per step. A run
    resumed on another number of processes then gets the same lr at each photo count.

    The loop steps it once per optimizer step (Accelerate's `step_scheduler_with_optimizer` is
    off). transformers' warm-up/cosine schedules count `scheduler.step()` calls, hence this one."""
    warmup, ratio = cfg.optim.warmup_steps, cfg.optim.min_lr_ratio

    def factor(_calls: int) -> float:  # a plain function: LambdaLR saves a callable object's state
        done, total = position()
        return warmup_cosine(done, warmup, total, ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
