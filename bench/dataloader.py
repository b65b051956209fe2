"""Images/s of the training data pipeline alone, against what a training step consumes.

    python -m bench.dataloader [--teacher-size 518] [--student-size 256] [--batch-size 8] [--workers 2]
        [--items 200] [--step-json bench/results/train_step.json] [--json bench/results/dataloader.json]

The trainer's own pipeline: `build_datasets` (the photos through `UnlabeledImageDataset` +
`TrainTransform`, wrapped in `EpochSeededDataset`) and `build_loaders` (its DataLoader), with the
real preset's augmentation, on the sample photos cycled to `--items` items. The first batch (worker
start-up) is timed apart. With `--step-json` from `bench.train_step`, `pipeline_vs_step` is this
pipeline's images/s over the images/s the live step consumes once loading is hidden by workers
(`images_per_s_excluding_data`): above 1, the workers keep the step fed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Optional

from accelerate import Accelerator

from bench.common import Cycled, bench_config, format_table, machine, write_json
from trainer.train.inputs import Targets, build_datasets, build_loaders, select_photos


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.dataloader", description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher-size", type=int, default=518, help="a multiple of 14")
    parser.add_argument("--student-size", type=int, default=256, help="a multiple of 32")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2,
                        help="DataLoader workers (the preset says 8 for a GPU node; 2 = this machine's cores)")
    parser.add_argument("--items", type=int, default=200, help="the sample photos cycled to this many")
    parser.add_argument("--step-json", help="bench.train_step's JSON, to compare with the step's consumption")
    parser.add_argument("--json", help="write the figures here")
    return parser.parse_args(argv)


def step_consumption(path: str) -> tuple[dict[str, float], dict]:
    """Images/s each live variant of a bench.train_step run consumes with loading hidden, and its settings."""
    step = json.loads(Path(path).read_text())
    # The cached variants read a different dataset (CachedTeacherDataset), not this pipeline.
    rates = {name: v["images_per_s_excluding_data"] for name, v in step["variants"].items()
             if v["dataset"] == "UnlabeledImageDataset"}
    return rates, step["settings"]


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    cfg = bench_config(args.teacher_size, args.student_size, args.batch_size, args.workers, tiny=False)
    photos = select_photos(cfg)
    train, _, _ = build_datasets(cfg, None, Targets.LIVE, photos)  # no cache: no teacher
    loader, _, _ = build_loaders(cfg, Accelerator(cpu=True), Cycled(train, args.items), None, None)

    start = time.perf_counter()
    batches = iter(loader)
    first_batch = len(next(batches)["valid"])
    first = time.perf_counter()
    images = sum(len(batch["valid"]) for batch in batches)
    end = time.perf_counter()

    figures = {
        "benchmark": "dataloader",
        "machine": machine(),
        "settings": {"teacher_size": args.teacher_size, "student_size": args.student_size,
                     "batch_size": args.batch_size, "workers": args.workers, "items": args.items,
                     "photos": f"{len(train)} sample photos (at most 640 px) cycled to {args.items} items",
                     "pipeline": "EpochSeededDataset(UnlabeledImageDataset(TrainTransform)) through build_loaders"},
        "images_per_s": images / (end - first),  # steady state, after the first batch
        "first_batch_s": first - start,  # worker start-up and the first batch
        "images_per_s_with_startup": (images + first_batch) / (end - start),
    }
    if args.step_json:
        rates, step_settings = step_consumption(args.step_json)
        figures["step_images_per_s_excluding_data"] = rates
        figures["step_settings"] = step_settings
        figures["pipeline_vs_step_by_variant"] = {name: figures["images_per_s"] / rate for name, rate in rates.items()}
        if "live" in rates:
            figures["pipeline_vs_step"] = figures["pipeline_vs_step_by_variant"]["live"]
        sizes = (args.teacher_size, args.student_size)
        if (step_settings["teacher_size"], step_settings["student_size"]) != sizes:
            print(f"warning: the step ran at teacher/student sizes {step_settings['teacher_size']}/"
                  f"{step_settings['student_size']}, this pipeline at {sizes[0]}/{sizes[1]}")
    print(format_report(figures))
    write_json(args.json, figures)
    return figures


def format_report(figures: dict) -> str:
    s = figures["settings"]
    rows = [["pipeline (steady state)", figures["images_per_s"], ""],
            ["pipeline (with start-up)", figures["images_per_s_with_startup"], ""]]
    for name, rate in figures.get("step_images_per_s_excluding_data", {}).items():
        rows.append([f"train step '{name}', loading excluded", rate, figures["images_per_s"] / rate])
    title = (f"training data pipeline: teacher {s['teacher_size']}, student {s['student_size']}, batch "
             f"{s['batch_size']}, {s['workers']} workers, {s['items']} items")
    lines = [format_table(title, ["what", "images/s", "pipeline / step"], rows)]
    if "pipeline_vs_step" in figures:
        lines.append(f"pipeline_vs_step: {figures['pipeline_vs_step']:.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
