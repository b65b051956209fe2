"""CPU latency, batch 1: the student presets against the teacher run the way a user could run it.

    python -m bench.inference [--teacher-size 518] [--student-size 256] [--threads N] [--rounds 10]
        [--presets lean,dpt64,lean_mnv4s] [--quant-modes dynamic,static] [--json bench/results/inference.json]

A user who wants cheaper depth than Depth-Anything-V2-Small at 518 can also export the teacher
to ONNX and run it at a lower resolution, so the student is compared with that:
- `teacher_onnx_<T>`: the teacher exported with the TorchScript tracer and run in onnxruntime at
  `--teacher-size` and at the student's size rounded down to the teacher's 14-pixel patch (252
  for 256), the comparison at equal output size;
- `teacher_pytorch_<T>`: the same teacher in eager PyTorch at `--teacher-size`, for reference;
- `student_<preset>_onnx_fp32` and `..._int8_<mode>` for every preset (`bench.common.
  STUDENT_PRESETS`: `lean`, the default student, `dpt64`, the first student's MiniDPT, and
  `lean_mnv4s`, the lean decoder on MobileNetV4-Conv-Small),
  exported by `trainer.ship.export.export_student` and quantised by `trainer.ship.quantize`;
- `student_encoder_only_onnx_fp32`: the default student's encoder alone, the floor under any
  decoder (`encoder_only_bound`: the ratios a decoder that cost nothing would give).
All models are Depth-Anything-V2-Small / MobileViT-XS built from their configs (random weights:
latency does not depend on them). Every runtime gets the same threads (torch.set_num_threads, ORT
intra_op_num_threads, inter_op 1). Runs are interleaved: each round runs every model once
untimed (the others have just evicted its caches) and then `--runs` timed times; after `--warmup`
untimed runs of each. Reported: median, p10 and p90 per model, GFLOPs and parameters per model.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import onnxruntime as ort
import torch
from torch import nn

from bench.common import (DEFAULT_PRESET, SAMPLES, STUDENT_PRESETS, build_student_preset, build_teacher,
                          format_table, latency_stats, machine, write_json)
from data import EvalTransform, list_images, load_rgb
from modeling.summary import count, gflops, same_size_as_teacher
from modeling.traceable import traceable_any_size
from core.cli import comma_choices
from trainer.ship.export import export_student
from trainer.ship.quantize import MODES, quantize_student

ENCODER = "student_encoder_only_onnx_fp32"
# What quantize_student's report says about int8 against fp32, kept in the figures.
ACCURACY_KEYS = ("aligned_abs_rel", "aligned_delta1", "max_abs_diff", "mean_abs_diff", "mean_abs_reference",
                 "num_images", "fp32_bytes", "int8_bytes", "compression")


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.inference", description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher-size", type=int, default=518, help="a multiple of 14")
    parser.add_argument("--student-size", type=int, default=256, help="a multiple of 64")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="for every runtime (default: all cores)")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds")
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each model per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs of each model first")
    parser.add_argument("--presets", default=",".join(STUDENT_PRESETS), help="student presets, comma-separated")
    parser.add_argument("--quant-modes", default=",".join(MODES), help="int8 modes, comma-separated; '' for none")
    parser.add_argument("--tiny", action="store_true", help="the tiny test teacher instead of V2-Small")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    args.presets = comma_choices(parser, "--presets", args.presets, STUDENT_PRESETS)
    args.quant_modes = comma_choices(parser, "--quant-modes", args.quant_modes, MODES)
    if DEFAULT_PRESET not in args.presets:
        parser.error(f"--presets must include the default student, {DEFAULT_PRESET}")
    return args


class DepthOnly(nn.Module):
    """The transformers teacher as image -> depth, for export and timing."""

    def __init__(self, teacher: nn.Module):
        super().__init__()
        self.teacher = teacher

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.teacher(pixel_values=pixel_values).predicted_depth


def export_plain(model: nn.Module, path: Path, size: int) -> None:
    """`model` traced at batch 1, size x size (the teacher; the student's encoder alone)."""
    with warnings.catch_warnings(), traceable_any_size(model):
        warnings.simplefilter("ignore")  # the tracer's notes on Python values in the position embedding
        torch.onnx.export(model, (torch.zeros(1, 3, size, size),), str(path), input_names=["image"],
                          opset_version=18, dynamo=False)


def onnx_runner(path: Path, image: torch.Tensor, threads: int) -> Callable[[], None]:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: image.numpy()}
    return lambda: session.run(None, feed)


def torch_runner(model: nn.Module, image: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.inference_mode():
            model(image)
    return run


def measure(runners: dict[str, Callable[[], None]], rounds: int, runs: int, warmup: int) -> dict[str, list]:
    """Seconds per timed run of each runner, interleaved round by round."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    seconds = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            run()  # untimed: the model run before this one has evicted this one's weights
            for _ in range(runs):
                start = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - start)
    return seconds


def photo_views(teacher_sizes: list[int], student_size: int) -> dict[int, torch.Tensor]:
    """The first sample photo as a (1, 3, S, S) input at each side S, normalised as in evaluation."""
    photo = load_rgb(list_images(SAMPLES)[0])
    views = {size: EvalTransform(size, student_size)(photo)["teacher_image"][None] for size in teacher_sizes}
    views[student_size] = EvalTransform(teacher_sizes[0], student_size)(photo)["student_image"][None]
    return views


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    same_size = same_size_as_teacher(args.student_size)
    teacher_sizes = list(dict.fromkeys((args.teacher_size, same_size)))
    views = photo_views(teacher_sizes, args.student_size)
    teacher = DepthOnly(build_teacher(args.tiny).model).eval()
    students = {name: build_student_preset(name) for name in args.presets}
    photos = list_images(SAMPLES)

    runners, gflop_counts, params, megabytes, int8, exports = {}, {}, {}, {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as folder:
        for size in teacher_sizes:
            name = f"teacher_onnx_{size}"
            export_plain(teacher, Path(folder) / f"{name}.onnx", size)
            runners[name] = onnx_runner(Path(folder) / f"{name}.onnx", views[size], args.threads)
            gflop_counts[name], params[name] = gflops(teacher, views[size]), count(teacher)
            megabytes[name] = (Path(folder) / f"{name}.onnx").stat().st_size / 1e6
        name = f"teacher_pytorch_{args.teacher_size}"
        runners[name] = torch_runner(teacher, views[args.teacher_size])
        gflop_counts[name], params[name] = gflop_counts[f"teacher_onnx_{args.teacher_size}"], count(teacher)
        for preset, student in students.items():
            fp32 = Path(folder) / f"student_{preset}.onnx"
            report = export_student(student, fp32, args.student_size, photos=photos)
            exports[preset] = {key: report[key] for key in ("accepted_sizes", "max_abs_diff_vs_pytorch")}
            files = {f"student_{preset}_onnx_fp32": fp32}
            for mode in args.quant_modes:
                path = Path(folder) / f"student_{preset}.int8_{mode}.onnx"
                report = quantize_student(fp32, path, mode, photos, args.student_size)
                files[f"student_{preset}_onnx_int8_{mode}"] = path
                int8[f"{preset}_{mode}"] = {key: report[key] for key in ACCURACY_KEYS}
            for name, path in files.items():
                runners[name] = onnx_runner(path, views[args.student_size], args.threads)
                gflop_counts[name], params[name] = gflops(student, views[args.student_size]), count(student)
                megabytes[name] = path.stat().st_size / 1e6
            if preset == DEFAULT_PRESET:
                name, encoder = ENCODER, student.encoder  # its four stages are the graph's outputs
                export_plain(encoder, Path(folder) / f"{name}.onnx", args.student_size)
                runners[name] = onnx_runner(Path(folder) / f"{name}.onnx", views[args.student_size], args.threads)
                gflop_counts[name], params[name] = gflops(encoder, views[args.student_size]), count(encoder)
                megabytes[name] = (Path(folder) / f"{name}.onnx").stat().st_size / 1e6
        seconds = measure(runners, args.rounds, args.runs, args.warmup)

    latency = {name: latency_stats(values) for name, values in seconds.items()}
    median = {name: stats["median_ms"] for name, stats in latency.items()}
    default = median[f"student_{DEFAULT_PRESET}_onnx_fp32"]
    figures = {
        "benchmark": "inference",
        "machine": machine(),
        "settings": {"batch_size": 1, "teacher_size": args.teacher_size, "teacher_same_size": same_size,
                     "student_size": args.student_size, "threads": args.threads,
                     "torch_threads": torch.get_num_threads(), "ort_intra_op_threads": args.threads,
                     "ort_inter_op_threads": 1, "rounds": args.rounds, "timed_runs_per_round": args.runs,
                     "warmup_runs": args.warmup, "presets": {name: STUDENT_PRESETS[name] for name in args.presets},
                     "default_preset": DEFAULT_PRESET,
                     "teacher": "tiny test teacher" if args.tiny else "Depth-Anything-V2-Small (random weights)",
                     "student": "each preset's encoder and decoder (random weights)",
                     "int8_accuracy": "int8 vs fp32 ONNX on the sample photos (which also calibrate static mode); "
                                      "aligned_* = depth metrics after the per-image scale-and-shift fit"},
        "latency": latency,
        "gflops": gflop_counts,
        "params": params,
        "onnx_megabytes": megabytes,
        "student_speedup_vs_teacher": median[f"teacher_onnx_{args.teacher_size}"] / default,
        "student_speedup_vs_teacher_same_size": median[f"teacher_onnx_{same_size}"] / default,
        "student_speedup_vs_teacher_pytorch": median[f"teacher_pytorch_{args.teacher_size}"] / default,
        "student_speedup_vs_presets": {preset: median[f"student_{preset}_onnx_fp32"] / default
                                       for preset in args.presets},
        # What the ratios above could reach with a decoder that cost nothing (the encoder alone).
        "encoder_only_bound": {
            "speedup_vs_teacher": median[f"teacher_onnx_{args.teacher_size}"] / median[ENCODER],
            "speedup_vs_teacher_same_size": median[f"teacher_onnx_{same_size}"] / median[ENCODER],
            "speedup_vs_presets": {preset: median[f"student_{preset}_onnx_fp32"] / median[ENCODER]
                                   for preset in args.presets
                                   if STUDENT_PRESETS[preset].get("backbone") == STUDENT_PRESETS[DEFAULT_PRESET].get(
                                       "backbone")},
            "share_of_default_student": median[ENCODER] / default},
        "int8": int8,
        "export": exports,
    }
    print(format_report(figures))
    write_json(args.json, figures)
    return figures


def format_report(figures: dict) -> str:
    s = figures["settings"]
    default = figures["latency"][f"student_{s['default_preset']}_onnx_fp32"]["median_ms"]
    rows = []
    for name, stats in figures["latency"].items():
        size = s["student_size"] if name.startswith("student") else int(name.rsplit("_", 1)[1])
        rows.append([name, f"{size}x{size}", stats["median_ms"], stats["p10_ms"], stats["p90_ms"], stats["runs"],
                     stats["median_ms"] / default, figures["gflops"][name], figures["params"][name] / 1e6,
                     figures["onnx_megabytes"].get(name, "")])
    title = (f"batch-1 CPU latency, {s['threads']} threads for every runtime (torch and onnxruntime); "
             f"the default student is {s['default_preset']}")
    lines = [format_table(title, ["model", "input", "median ms", "p10 ms", "p90 ms", "runs", "x default student",
                                  "GFLOPs", "params M", "MB"], rows),
             f"student_speedup_vs_teacher: {figures['student_speedup_vs_teacher']:.2f}x (teacher ORT at "
             f"{s['teacher_size']})",
             f"student_speedup_vs_teacher_same_size: {figures['student_speedup_vs_teacher_same_size']:.2f}x "
             f"(teacher ORT at {s['teacher_same_size']})",
             "student_speedup_vs_presets: " + ", ".join(
                 f"{name} {ratio:.2f}x" for name, ratio in figures["student_speedup_vs_presets"].items()),
             f"the default student's encoder alone is {figures['encoder_only_bound']['share_of_default_student']:.0%} "
             f"of its time: a free decoder would give at most "
             f"{figures['encoder_only_bound']['speedup_vs_teacher']:.1f}x / "
             f"{figures['encoder_only_bound']['speedup_vs_teacher_same_size']:.1f}x against the teacher and "
             + ", ".join(f"{ratio:.2f}x against {name}" for name, ratio in
                         figures["encoder_only_bound"]["speedup_vs_presets"].items() if name != s["default_preset"])]
    for name, q in figures["int8"].items():
        lines.append(f"int8 {name}: vs fp32 on {q['num_images']} photos: aligned abs_rel {q['aligned_abs_rel']:.4f}, "
                     f"delta1 {q['aligned_delta1']:.4f}, max |d disparity| {q['max_abs_diff']:.3g} "
                     f"(mean |fp32| {q['mean_abs_reference']:.3g}), {q['compression']:.2f}x smaller")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
