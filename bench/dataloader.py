"""Photos/s of the training data pipelines on phone-size photos: a folder of JPEGs against shards.

    python -m bench.dataloader [--photo-size 4032x3024] [--teacher-size 518] [--student-size 256]
        [--batch-size 8] [--workers 2] [--items 96] [--rounds 3] [--device cpu|cuda]
        [--step-json bench/results/train_step.json] [--json bench/results/dataloader.json]

The shipped sample photos are upscaled to `--photo-size` JPEGs (quality 92, a 12-megapixel phone's
size by default) in a temporary folder, which `trainer.prepare_shards` then writes as shards. In
rounds, interleaved, each pipeline is the trainer's own (`select_photos`, `build_datasets`,
`build_loaders`, the real preset's augmentation), with the photos cycled to `--items` items:

    folder                each worker reads the original file, decodes it (PIL: libjpeg-turbo at the
                          DCT scale that keeps the views' resolution) and renders uint8 views; the
                          device normalises them
    shards_cpu_decode     each worker reads the photo's bytes from its shard, decodes it and renders
                          uint8 views (data.decode_on=workers); the device normalises them
    shards_device_decode  each worker reads bytes only; the device decodes and renders the batch
                          (on the CPU this shows the reading cost alone)

What the device does to a batch (`finish_batch`) is timed apart over the same batches, on
`--device`, as `device_photos_per_s`.

`decoders`: one photo's decode and both training views, on one thread, in-process, interleaved:
the folder pipeline's decode (PIL's libjpeg-turbo at the DCT scale that keeps the views'
resolution) against torchvision.io's, the shards' decoder, which decodes JPEGs at full size only.

Reported per pipeline: photos/s (steady state, after the first batch), per worker and per core
(workers, or 1 without workers, at most the cores), the median of the rounds;
`shards_vs_folder_per_worker` is the key scripts read. With `--step-json` from `bench.train_step`,
each pipeline's photos/s (the slower of its workers and its device share) over the photos/s the
step consumes with loading hidden (`pipeline_vs_step`): above 1, the pipeline keeps up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg, read_file

from bench.common import SAMPLES, Cycled, bench_config, format_table, machine, synchronize, write_json
from core.cli import comma_choices
from data import TrainTransform, UnlabeledImageDataset
from trainer.prepare_shards import prepare_shards
from trainer.train.inputs import Targets, build_datasets, build_loaders, batch_finisher, select_photos

PIPELINES = ("folder", "shards_cpu_decode", "shards_device_decode")


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.dataloader", description=__doc__.split("\n\n")[0])
    parser.add_argument("--photo-size", default="4032x3024",
                        help="WxH the samples are upscaled to (portrait ones get HxW); 'shipped' keeps them as is")
    parser.add_argument("--teacher-size", type=int, default=518, help="a multiple of 14")
    parser.add_argument("--student-size", type=int, default=256, help="a multiple of 32")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (2 = this machine's cores)")
    parser.add_argument("--items", type=int, default=96, help="the sample photos cycled to this many a round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    parser.add_argument("--pipelines", default=",".join(PIPELINES), help=f"comma-separated: {', '.join(PIPELINES)}")
    parser.add_argument("--device", default="cpu", help="where shards_device_decode decodes and renders")
    parser.add_argument("--step-json", help="bench.train_step's JSON, to compare with the step's consumption")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    args.pipelines = comma_choices(parser, "--pipelines", args.pipelines, PIPELINES)
    return args


def make_phone_photos(folder: Path, size: str) -> dict:
    """The sample photos as phone-size JPEGs in `folder` -> what was made."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted(SAMPLES.glob("*.jpg"))
    if size == "shipped":
        for path in sources:
            (folder / path.name).write_bytes(path.read_bytes())
        return {"photos": len(sources), "size": "as shipped (at most 640 px)"}
    width, height = (int(v) for v in size.lower().split("x"))
    for path in sources:
        with Image.open(path) as image:
            image = image.convert("RGB")
            portrait = image.height > image.width
            image.resize((height, width) if portrait else (width, height), Image.Resampling.BICUBIC).save(
                folder / path.name, "JPEG", quality=92)
    mean_bytes = statistics.mean((folder / p.name).stat().st_size for p in sources)
    return {"photos": len(sources), "size": f"{width}x{height} JPEG quality 92 (upscaled samples)",
            "mean_file_mb": mean_bytes / 1e6}


def measure(cfg, items: int, device: torch.device) -> dict:
    """One pass of a pipeline: photos/s after the first batch, and for shards, what the device
    does to the same batches, in photos/s."""
    photos = select_photos(cfg)
    train, _, _ = build_datasets(cfg, None, Targets.LIVE, photos)  # no cache: no teacher
    loader, _, _ = build_loaders(cfg, Accelerator(cpu=True), Cycled(train, items), None, None)
    finish = batch_finisher(train, device)
    finishes_on_device = finish is not None
    start = time.perf_counter()
    batches = iter(loader)
    first = next(batches)
    after_first = time.perf_counter()
    kept = [first] if finishes_on_device else []
    count = 0
    for batch in batches:
        count += len(batch["valid"])
        if finishes_on_device:
            kept.append(batch)
    end = time.perf_counter()
    figures = {"photos_per_s": count / (end - after_first), "first_batch_s": after_first - start}
    if finishes_on_device:
        finish(dict(kept[0]))  # warm-up: CUDA context, nvJPEG handles
        synchronize(device)
        finished, begin = 0, time.perf_counter()
        for batch in kept[1:]:
            finished += len(finish(dict(batch))["valid"])
        synchronize(device)
        figures["device_photos_per_s"] = finished / (time.perf_counter() - begin)
    return figures


def time_decoders(folder: Path, teacher_size: int, student_size: int, rounds: int) -> dict:
    """Milliseconds a photo, on one thread: each decoder, then both training views (`TrainTransform`)."""
    photos = UnlabeledImageDataset(sorted(folder.glob("*.jpg")), TrainTransform(teacher_size, student_size))
    decoders = {"folder_pipeline": photos.load,
                "torchvision_io": lambda index: decode_jpeg(read_file(str(photos.paths[index])), mode=ImageReadMode.RGB,
                                                            apply_exif_orientation=True)}
    times: dict[str, list[float]] = {name: [] for name in decoders}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(rounds):
            for name, decode in decoders.items():
                start = time.perf_counter()
                for index in range(len(photos)):
                    photos.render(decode(index))
                times[name].append((time.perf_counter() - start) / len(photos) * 1e3)
    finally:
        torch.set_num_threads(threads)
    return {name: {"ms_per_photo": statistics.median(values), "rounds": values} for name, values in times.items()}


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bench-dataloader-") as tmp:
        folder, shards = Path(tmp) / "photos", Path(tmp) / "shards"
        made = make_phone_photos(folder, args.photo_size)
        sizes = (args.teacher_size, args.student_size, args.batch_size, args.workers, False)
        base = bench_config(*sizes, f"data.train_dir={folder}")
        begin = time.perf_counter()
        manifest = prepare_shards(base, shards, accelerator=Accelerator(cpu=True))
        prepare_s = time.perf_counter() - begin
        configs = {"folder": base,
                   "shards_cpu_decode": bench_config(*sizes, f"data.shards={shards}", "data.decode_on=workers"),
                   "shards_device_decode": bench_config(*sizes, f"data.shards={shards}", "data.decode_on=device")}
        rounds: dict[str, list[dict]] = {name: [] for name in args.pipelines}
        for _ in range(args.rounds):
            for name in args.pipelines:
                rounds[name].append(measure(configs[name], args.items, device))
        decoders = time_decoders(folder, args.teacher_size, args.student_size, args.rounds)

    per_unit = max(1, args.workers)
    pipelines = {}
    for name, runs in rounds.items():
        rate = statistics.median(run["photos_per_s"] for run in runs)
        pipelines[name] = {"photos_per_s": rate, "photos_per_s_per_worker": rate / per_unit,
                           "photos_per_s_per_core": rate / min(per_unit, cores),
                           "first_batch_s": statistics.median(run["first_batch_s"] for run in runs),
                           "rounds": [run["photos_per_s"] for run in runs]}
        if "device_photos_per_s" in runs[0]:
            pipelines[name]["device_photos_per_s"] = statistics.median(run["device_photos_per_s"] for run in runs)
            pipelines[name]["device"] = str(device)
    figures = {
        "benchmark": "dataloader",
        "machine": machine(device),
        "settings": {"teacher_size": args.teacher_size, "student_size": args.student_size,
                     "batch_size": args.batch_size, "workers": args.workers, "items": args.items,
                     "rounds": args.rounds, "photos": made,
                     "shards": {"seconds_to_prepare": prepare_s, "max_side": manifest["max_side"],
                                "quality": manifest["quality"],
                                "mean_photo_kb": manifest["splits"]["train"]["bytes"]
                                / max(1, manifest["splits"]["train"]["photos"]) / 1e3}},
        "pipelines": pipelines,
        "decoders": decoders,
    }
    if "folder" in pipelines and "shards_cpu_decode" in pipelines:
        figures["shards_vs_folder_per_worker"] = (pipelines["shards_cpu_decode"]["photos_per_s_per_worker"]
                                                  / pipelines["folder"]["photos_per_s_per_worker"])
    if args.step_json:
        compare_with_step(figures, args)
    print(format_report(figures))
    write_json(args.json, figures)
    return figures


def compare_with_step(figures: dict, args: argparse.Namespace) -> None:
    """Each pipeline's photos/s over what each step variant consumes with loading hidden."""
    step = json.loads(Path(args.step_json).read_text())
    rates = {name: v["images_per_s_excluding_data"] for name, v in step["variants"].items()}
    figures["step_images_per_s_excluding_data"] = rates
    figures["step_settings"] = step["settings"]
    figures["pipeline_vs_step"] = {
        pipeline: {variant: feed(p) / rate for variant, rate in rates.items()}
        for pipeline, p in figures["pipelines"].items()}
    sizes = (args.teacher_size, args.student_size)
    if (step["settings"]["teacher_size"], step["settings"]["student_size"]) != sizes:
        print(f"warning: the step ran at teacher/student sizes {step['settings']['teacher_size']}/"
              f"{step['settings']['student_size']}, these pipelines at {sizes[0]}/{sizes[1]}")


def feed(pipeline: dict) -> float:
    """What a pipeline can hand the step a second: the slower of the workers and the device's share."""
    return min(pipeline["photos_per_s"], pipeline.get("device_photos_per_s", float("inf")))


def format_report(figures: dict) -> str:
    s = figures["settings"]
    rows = []
    for name, p in figures["pipelines"].items():
        rows.append([name, p["photos_per_s"], p["photos_per_s_per_worker"], p["photos_per_s_per_core"],
                     p.get("device_photos_per_s", "")])
    title = (f"training data pipelines: {s['photos']['size']}, teacher {s['teacher_size']}, student "
             f"{s['student_size']}, batch {s['batch_size']}, {s['workers']} workers, {s['items']} items, "
             f"median of {s['rounds']} rounds")
    lines = [format_table(title, ["pipeline", "photos/s", "per worker", "per core", "device's share, photos/s"], rows)]
    if "shards_vs_folder_per_worker" in figures:
        lines.append(f"shards_vs_folder_per_worker: {figures['shards_vs_folder_per_worker']:.2f}x")
    lines.append("a photo decoded and rendered, one thread: " + ", ".join(
        f"{name} {d['ms_per_photo']:.1f} ms" for name, d in figures["decoders"].items()))
    for pipeline, ratios in figures.get("pipeline_vs_step", {}).items():
        lines.append(f"{pipeline} / step: " + ", ".join(f"{v} {r:.2f}x" for v, r in ratios.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
