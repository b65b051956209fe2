"""Capacity check: how closely each student preset learns to imitate one fixed teacher.

    python -m bench.fidelity [--presets lean,dpt64,lean_mnv4s] [--targets live,cached,cached_depth_only]
        [--steps 300] [--batch-size 4] [--teacher-size 126] [--student-size 128] [--threads N]
        [--json bench/results/fidelity.json]

There are no real teacher weights here (no model hub), so real depth quality cannot be measured.
What can be measured is capacity: every preset is distilled, by the trainer's own step
(`trainer.train.loop.DistillationStep` with the real preset's losses, optimizer and augmentation),
from the same fixed random teacher (the seeded tiny Depth Anything) for the same number of steps,
from the same seed, on the same photos (the shipped samples' seeded training split), and is then
scored against that teacher on the photos held out of training (the seeded validation split) and
on the training photos themselves (the whole photo, as evaluation sees it):
- `aligned_abs_rel`, `aligned_delta1`: depth after the per-image scale-and-shift fit, as the
  trainer's evaluation does;
- `gradient_error`: mean |grad student - grad teacher| over mean |grad teacher| after both maps are
  normalised by median and mean absolute deviation: the edge term, 0 for identical edges;
- the same three for a constant map (what any student must beat) as `constant_baseline`.

`--targets` also trains each preset from a teacher cache that the real writer fills: `cached`
reads depth and the feature term's teacher features from it (the default recipe's cached run;
stored features are the whole photo's, cropped), `cached_depth_only` drops the feature term
(`distill.cache_features=drop`). Scored against the same live teacher, they show what each
approximation costs; a row is named `<preset>` for live targets, `<preset>+<targets>` otherwise.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Optional

import torch
from accelerate import Accelerator

from bench.common import (DEFAULT_PRESET, STUDENT_PRESETS, bench_config, format_table, machine,
                          trainer_step, write_json)
from data import EvalTransform, UnlabeledImageDataset
from losses.depth import normalize_disparity
from modeling import DepthAnythingTeacher
from modeling.summary import count
from core.cli import comma_choices
from trainer.ship.fidelity import agreement
from trainer.train.cache_teacher import build_cache
from trainer.train.inputs import Targets, select_photos

SCORES = ("aligned_abs_rel", "aligned_delta1", "gradient_error")
TARGETS = {"live": [], "cached": [], "cached_depth_only": ["distill.cache_features=drop"]}


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.fidelity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default=",".join(STUDENT_PRESETS), help="student presets, comma-separated")
    parser.add_argument("--targets", default="live", help=f"comma-separated, from {', '.join(TARGETS)}")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per preset")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--teacher-size", type=int, default=126, help="a multiple of 14")
    parser.add_argument("--student-size", type=int, default=128, help="a multiple of 32")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    args.presets = comma_choices(parser, "--presets", args.presets, STUDENT_PRESETS)
    args.targets = comma_choices(parser, "--targets", args.targets, TARGETS)
    return args


def preset_config(args: argparse.Namespace, preset: str, *targets: str):
    overrides = [f"student.{key}={value}" for key, value in STUDENT_PRESETS[preset].items()] + list(targets)
    # The demo's optimiser settings: the student starts from random weights here, as in the demo.
    return bench_config(args.teacher_size, args.student_size, args.batch_size, 0, True, "data.val_fraction=0.25",
                        f"train.max_steps={args.steps}", "optim.lr=1e-3", "optim.encoder_lr_mult=1.0",
                        "optim.warmup_steps=20", *overrides)


def gradient_error(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per image: mean |grad s - grad t| / mean |grad t|, both maps median/MAD-normalised."""
    s, t = normalize_disparity(student, "median_mad"), normalize_disparity(teacher, "median_mad")
    error = ((s.diff(dim=-1) - t.diff(dim=-1)).abs().flatten(1).mean(1)
             + (s.diff(dim=-2) - t.diff(dim=-2)).abs().flatten(1).mean(1))
    scale = t.diff(dim=-1).abs().flatten(1).mean(1) + t.diff(dim=-2).abs().flatten(1).mean(1)
    return error / scale.clamp_min(1e-12)


def scores(student_disparity: torch.Tensor, teacher_disparity: torch.Tensor) -> dict[str, float]:
    # The aligned depth metrics are the ones an export's fidelity is reported in.
    aligned = agreement(student_disparity, teacher_disparity)
    return {"aligned_abs_rel": aligned["aligned_abs_rel"], "aligned_delta1": aligned["aligned_delta1"],
            "gradient_error": gradient_error(student_disparity, teacher_disparity).mean().item()}


@torch.no_grad()
def score_on(student: torch.nn.Module, teacher: DepthAnythingTeacher, paths, cfg) -> dict:
    """The student against the teacher on the whole photos at `paths`, and a constant map's scores."""
    dataset = UnlabeledImageDataset(paths, EvalTransform(cfg.data.teacher_size, cfg.data.student_size))
    batch = torch.utils.data.default_collate([dataset[index] for index in range(len(dataset))])
    was_training = student.training
    student.eval()
    predicted = student(batch["student_image"]).float()
    student.train(was_training)
    target = teacher(batch["teacher_image"], output_size=predicted.shape[-2:]).disparity.float()
    constant = torch.ones_like(target)  # a flat map: the alignment fits it to the mean; no edges at all
    return {"num_images": len(dataset), **scores(predicted, target),
            "constant_baseline": scores(constant, target)}


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    accelerator = Accelerator(cpu=True)
    teacher = DepthAnythingTeacher.tiny()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-fidelity-cache-") as cache_dir:
        cached = [f"distill.teacher_cache={cache_dir}"]
        if any(name != "live" for name in args.targets):  # depth and features, as the default recipe writes it
            build_cache(preset_config(args, DEFAULT_PRESET), cache_dir, accelerator, teacher)
        for preset in args.presets:
            for targets in args.targets:
                cfg = preset_config(args, preset, *([] if targets == "live" else cached + TARGETS[targets]))
                step, batches, _ = trainer_step(cfg, accelerator, teacher, args.steps)
                for _ in range(args.steps):
                    step.optimizer_step(step.forward_backward(batches))
                student = accelerator.unwrap_model(step.module).student
                photos = select_photos(cfg)
                name = preset if targets == "live" else f"{preset}+{targets}"
                results[name] = {"params": count(student), "targets": Targets.of(cfg).value,
                                 "held_out": score_on(student, teacher, photos.val, cfg),
                                 "training_photos": score_on(student, teacher, photos.train, cfg)}
                print(f"{name}: held-out {results[name]['held_out']}", flush=True)
    figures = {
        "benchmark": "fidelity",
        "machine": machine(),
        "settings": {"steps": args.steps, "batch_size": args.batch_size, "teacher_size": args.teacher_size,
                     "student_size": args.student_size, "threads": args.threads, "teacher": "tiny (seed 0)",
                     "presets": {name: STUDENT_PRESETS[name] for name in args.presets},
                     "targets": args.targets,
                     "default_preset": DEFAULT_PRESET,
                     "recipe": "trainer/configs/dav2_small_mobilevit_xs.yaml's losses and augmentation, lr 1e-3, "
                               "encoder lr x1, warm-up 20 steps, students from random weights"},
        "presets": results,
    }
    print(format_report(figures))
    write_json(args.json, figures)
    return figures


def format_report(figures: dict) -> str:
    s = figures["settings"]
    rows = []
    for preset, result in figures["presets"].items():
        for split in ("held_out", "training_photos"):
            scored = result[split]
            rows.append([preset, split, scored["num_images"], *(scored[key] for key in SCORES)])
    baseline = next(iter(figures["presets"].values()))["held_out"]["constant_baseline"]
    rows.append(["constant map", "held_out", next(iter(figures["presets"].values()))["held_out"]["num_images"],
                 *(baseline[key] for key in SCORES)])
    title = (f"agreement with the fixed tiny teacher after {s['steps']} steps of batch {s['batch_size']} "
             f"(teacher {s['teacher_size']}, student {s['student_size']})")
    return format_table(title, ["student", "photos", "images", *SCORES], rows)


if __name__ == "__main__":
    main()
