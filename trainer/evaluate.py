"""Evaluation: student vs teacher on unlabeled photos, and student vs ground truth on labeled sets.

Used after every epoch by the trainer, and on its own:

    python -m trainer.evaluate --checkpoint runs/demo/student_best --data data/samples [--json m.json]
    accelerate launch -m trainer.evaluate --checkpoint DIR --data NYU_DIR --labeled --crop eigen_nyu

Per-image metrics are gathered with `gather_for_metrics`, so the averages are the same on 1 or N
processes and the padding Accelerate adds to uneven shards is never counted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from data import EvalTransform, LabeledDepthDataset, UnlabeledImageDataset, list_images
from modeling import DepthAnythingTeacher, StudentDepthModel
from trainer.metrics import (METRIC_NAMES, average_metrics, depth_metrics, depth_valid_mask_from_disparity,
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
             labeled: bool = False, max_depth: Optional[float] = None) -> dict[str, float]:
    """Average metrics over every image of `loader` (a prepared loader), on all processes."""
    was_training = student.training
    student.eval()
    rows = []
    for batch in loader:
        with accelerator.autocast():
            rows.append(accelerator.gather_for_metrics(
                _batch_metrics(student, teacher, batch, align, labeled, max_depth)))
    student.train(was_training)
    table = torch.cat(rows) if rows else torch.empty(0, len(METRIC_NAMES))
    return average_metrics({name: table[:, i].cpu() for i, name in enumerate(METRIC_NAMES)})


def format_table(metrics: dict[str, float], title: str = "") -> str:
    names = [n for n in METRIC_NAMES if n in metrics]
    header = " | ".join(f"{n:>8}" for n in names)
    values = " | ".join(f"{metrics[n]:8.4f}" for n in names)
    count = f"  ({int(metrics.get('num_images', 0))} images)"
    return f"{title}{count}\n{header}\n{values}"


def _parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="student folder (config.json + model.safetensors)")
    parser.add_argument("--data", required=True, help="folder of photos, or of images/ + depth/ with --labeled")
    parser.add_argument("--labeled", action="store_true", help="compare with ground-truth depth")
    parser.add_argument("--config", help="run config for the teacher and sizes (default: the run's config.yaml)")
    parser.add_argument("--align", choices=["none", "median", "scale_shift"], default=None)
    parser.add_argument("--crop", choices=["eigen_nyu", "garg_kitti", "eigen_kitti"], default=None)
    parser.add_argument("--min-depth", type=float, default=None)
    parser.add_argument("--max-depth", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--json", help="write the averaged metrics here as one JSON object")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    from trainer.config import load_config  # CLI-only import

    args = _parse_args(argv)
    checkpoint = Path(args.checkpoint)
    if not (checkpoint / "config.json").is_file():
        print(f"error: {checkpoint} is not a student folder (no config.json)", file=sys.stderr)
        return 2
    run_config = Path(args.config) if args.config else checkpoint.parent / "config.yaml"
    cfg = load_config(run_config if run_config.is_file() else None)
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision)
    transform = EvalTransform(cfg.data.teacher_size, cfg.data.student_size)
    teacher, max_depth = None, None
    if args.labeled:
        d = cfg.data
        max_depth = args.max_depth or d.labeled_max_depth
        dataset = LabeledDepthDataset(args.data, transform, min_depth=args.min_depth or d.labeled_min_depth,
                                      max_depth=max_depth, depth_scale=d.labeled_depth_scale,
                                      crop=args.crop or d.labeled_crop)
    else:
        dataset = UnlabeledImageDataset(list_images(args.data), transform)
        teacher = DepthAnythingTeacher.from_pretrained(cfg.teacher.name, cfg.teacher.feature_layers)
        teacher.to(accelerator.device)
    # Inference only: the student goes to the device unwrapped; only the loader is sharded.
    student = StudentDepthModel.from_pretrained(str(checkpoint)).to(accelerator.device)
    # Ground truth keeps its own resolution, which may vary within a set (KITTI): one image a batch.
    batch_size = args.batch_size or (1 if args.labeled else cfg.eval.batch_size)
    loader = accelerator.prepare(DataLoader(dataset, batch_size=batch_size, num_workers=cfg.data.num_workers))
    metrics = evaluate(accelerator, student, loader, teacher, align=args.align or cfg.eval.align,
                       labeled=args.labeled, max_depth=max_depth)
    reference = "ground truth" if args.labeled else f"teacher {cfg.teacher.name}"
    accelerator.print(format_table(metrics, f"student {checkpoint} vs {reference}"))
    if args.json and accelerator.is_main_process:
        Path(args.json).write_text(json.dumps(metrics, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
