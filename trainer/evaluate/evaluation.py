"""Evaluation: student vs teacher on unlabeled photos, and student vs ground truth on labeled sets.

Used after every epoch by the trainer, and on its own through `python -m trainer.evaluate`
(trainer/evaluate/cli.py, which checks the arguments first).

Per-image metrics are gathered with `gather_for_metrics`, so the averages are the same on 1 or N
processes and the padding Accelerate adds to uneven shards is never counted.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from data import EvalTransform, LabeledDepthDataset, UnlabeledImageDataset, no_images_message, scan_images
from modeling import DepthAnythingTeacher, load_student
from trainer.console import UnreadableReporter, say, shown_path
from core.errors import RunError
from trainer.processes import check_world_size
from core.choices import METRIC_NAMES
from trainer.evaluate.metrics import (average_metrics, depth_metrics, depth_valid_mask_from_disparity,
                                      disparity_to_depth)


def _batch_metrics(student: nn.Module, teacher: Optional[DepthAnythingTeacher], batch: dict,
                   align: str, labeled: bool, max_depth: Optional[float]) -> torch.Tensor:
    """Per-image metrics of one batch as a (B, len(METRIC_NAMES)) tensor."""
    student_disparity = student(batch["student_image"]).float()  # (B, 1, S, S)
    if labeled:
        target = batch["depth"]  # (B, 1, H, W) metres, at the ground truth's own resolution
        valid = batch["valid_mask"]
        student_disparity = F.interpolate(student_disparity, size=target.shape[-2:], mode="bilinear",
                                          align_corners=False)
    else:
        teacher_disparity = teacher(batch["teacher_image"], output_size=student_disparity.shape[-2:]).disparity
        target = disparity_to_depth(teacher_disparity)
        # Sky and other ~zero-disparity pixels have no finite depth; unreadable photos count as empty.
        valid = depth_valid_mask_from_disparity(teacher_disparity) & batch["valid"].view(-1, 1, 1, 1)
    per_image = depth_metrics(disparity_to_depth(student_disparity), target, valid, align=align,
                              max_depth=max_depth)
    return torch.stack([per_image[name] for name in METRIC_NAMES], dim=1)


@torch.no_grad()
def evaluate(accelerator: Accelerator, student: nn.Module, loader: DataLoader,
             teacher: Optional[DepthAnythingTeacher] = None, align: str = "scale_shift",
             labeled: bool = False, max_depth: Optional[float] = None, reporter=None) -> dict[str, float]:
    """Average metrics over every image of `loader` (a prepared loader), on all processes.

    Unreadable photos (and unreadable image/depth pairs of a labeled set) count as empty images;
    `reporter.report(indices)`, if given, is called on the main process with their dataset indices."""
    was_training = student.training
    student.eval()
    rows = []
    for batch in loader:
        with accelerator.autocast():
            metrics = _batch_metrics(student, teacher, batch, align, labeled, max_depth)
        # The sample's index and validity travel in the same gather as its metrics.
        metrics = torch.cat([metrics, batch["index"].view(-1, 1).to(metrics),
                             batch["valid"].view(-1, 1).to(metrics)], dim=1)
        rows.append(accelerator.gather_for_metrics(metrics))
    student.train(was_training)
    table = torch.cat(rows).cpu() if rows else torch.empty(0, len(METRIC_NAMES) + 2)
    unreadable = table[:, -2][table[:, -1] == 0].long().tolist()
    if reporter is not None and accelerator.is_main_process:
        reporter.report(unreadable)
    return average_metrics({name: table[:, i] for i, name in enumerate(METRIC_NAMES)})


def format_table(metrics: dict[str, float], title: str = "") -> str:
    names = [n for n in METRIC_NAMES if n in metrics]
    header = " | ".join(f"{n:>8}" for n in names)
    values = " | ".join(f"{metrics[n]:8.4f}" for n in names)
    count = f"  ({int(metrics.get('num_images', 0))} images)"
    return f"{title}{count}\n{header}\n{values}"


def _dataset(args: argparse.Namespace, cfg, transform: EvalTransform):
    d = cfg.data
    if args.labeled:
        try:
            return LabeledDepthDataset(args.data, transform, min_depth=args.min_depth or d.labeled_min_depth,
                                       max_depth=args.max_depth or d.labeled_max_depth,
                                       depth_scale=d.labeled_depth_scale, crop=args.crop or d.labeled_crop)
        except (FileNotFoundError, ValueError) as error:  # no images, unpaired files, bad ranges
            raise RunError(f"--data {args.data}: {error}") from None
    scan = scan_images(args.data)
    if not scan.images:
        raise RunError(f"--data: {no_images_message(args.data, scan)}")
    return UnlabeledImageDataset(scan.images, transform)


def run(args: argparse.Namespace) -> dict[str, float]:
    """The evaluation `python -m trainer.evaluate` asks for, its arguments checked (trainer/evaluate/cli.py)."""
    from trainer.config import load_config  # CLI-only import

    checkpoint = Path(args.checkpoint)
    student = load_student(checkpoint)
    run_config = Path(args.config) if args.config else checkpoint.parent / "config.yaml"
    cfg = load_config(run_config if run_config.is_file() else None)
    if not run_config.is_file() and not args.labeled:
        # Without the run's configuration the default (hub) teacher would be loaded.
        say(f"no run configuration at {run_config}: using the default teacher {cfg.teacher.name} "
            f"(pass --config to choose another)")
    # The student runs at the size it was trained at; the run's config says so for old folders.
    student_size = getattr(student, "input_size", None) or cfg.data.student_size
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision)
    check_world_size(accelerator)
    transform = EvalTransform(cfg.data.teacher_size, student_size)
    dataset = _dataset(args, cfg, transform)
    teacher = None
    if not args.labeled:
        teacher = DepthAnythingTeacher.from_pretrained(cfg.teacher.name, cfg.teacher.feature_layers)
        teacher.place(accelerator.device, accelerator.mixed_precision)
    # Inference only: the student goes to the device unwrapped; only the loader is sharded.
    student.to(accelerator.device)
    # Ground truth keeps its own resolution, which may vary within a set (KITTI): one image a batch.
    batch_size = args.batch_size or (1 if args.labeled else cfg.eval.batch_size)
    loader = accelerator.prepare(DataLoader(dataset, batch_size=batch_size, num_workers=cfg.data.num_workers))
    reporter = UnreadableReporter(dataset, "ground-truth" if args.labeled else "evaluation")
    metrics = evaluate(accelerator, student, loader, teacher, align=args.align or cfg.eval.align,
                       labeled=args.labeled, max_depth=args.max_depth or cfg.data.labeled_max_depth
                       if args.labeled else None, reporter=reporter)
    reference = "ground truth" if args.labeled else f"teacher {cfg.teacher.name}"
    say(format_table(metrics, f"student {checkpoint} vs {reference}"))
    if not metrics.get("num_images"):
        raise RunError(f"--data {args.data}: none of the images could be read; no metrics")
    if args.json and accelerator.is_main_process:
        Path(args.json).write_text(json.dumps(metrics, indent=2) + "\n")
        say(f"wrote {shown_path(Path(args.json))}")
    return metrics
