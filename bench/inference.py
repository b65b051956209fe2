"""CPU latency of the teacher in PyTorch against the exported student in onnxruntime, batch 1.

    python -m bench.inference [--teacher-size 518] [--student-size 256] [--threads N] [--rounds 15]
        [--quant-modes dynamic,static] [--student runs/x/student_best] [--json bench/results/inference.json]

The teacher is Depth-Anything-V2-Small built from its config (random weights), fp32, as the
reference. The student (MobileViT-XS + MiniDPT at the real preset's widths, random weights unless
`--student` names a trained checkpoint) is exported with `trainer.ship.export.export_student` and
quantised to int8 with `trainer.ship.quantize.quantize_student`, which also measures the int8 file's
accuracy against the fp32 one on the sample photos.

Both runtimes get the same number of threads (torch.set_num_threads, ORT intra_op_num_threads).
Runs are interleaved: each round times one teacher run, then for each ONNX file one untimed run
(the teacher has just evicted its caches) and `--student-runs` timed ones. Reported: median,
p10 and p90 of the timed runs, after `--warmup` untimed runs of each model.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import onnxruntime as ort
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.common import SAMPLES, bench_config, build_teacher, format_table, latency_stats, machine, write_json
from data import EvalTransform, list_images, load_rgb
from modeling import StudentDepthModel
from trainer.train.distill import build_student
from trainer.ship.export import export_student
from trainer.ship.quantize import MODES, quantize_student

TEACHER = "teacher_pytorch_fp32"
STUDENT = "student_onnx_fp32"
# What quantize_student's report says about int8 against fp32, kept in the figures.
ACCURACY_KEYS = ("aligned_abs_rel", "aligned_delta1", "max_abs_diff", "mean_abs_diff", "mean_abs_fp32",
                 "num_images", "fp32_bytes", "int8_bytes", "compression")


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.inference", description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher-size", type=int, default=518, help="a multiple of 14")
    parser.add_argument("--student-size", type=int, default=256, help="a multiple of 32")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="for both runtimes (default: all cores)")
    parser.add_argument("--rounds", type=int, default=15, help="timed teacher runs")
    parser.add_argument("--student-runs", type=int, default=5, help="timed runs of each ONNX file per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs of each model first")
    parser.add_argument("--quant-modes", default=",".join(MODES), help="int8 modes, comma-separated; '' for none")
    parser.add_argument("--student", help="a trained student folder (config.json + model.safetensors)")
    parser.add_argument("--tiny", action="store_true", help="the tiny test teacher instead of V2-Small")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    args.quant_modes = [mode for mode in args.quant_modes.split(",") if mode]
    unknown = [mode for mode in args.quant_modes if mode not in MODES]
    if unknown:
        parser.error(f"unknown --quant-modes {unknown}; choose from {', '.join(MODES)}")
    return args


def gflops(model: Callable, *inputs) -> float:
    """Forward FLOPs (a multiply-add counts 2) of convolutions and matrix products, in billions."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(*inputs)
    return counter.get_total_flops() / 1e9


def onnx_runner(path: Path, image, threads: int) -> Callable[[], None]:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: image}
    return lambda: session.run(None, feed)


def measure(runners: dict[str, Callable[[], None]], rounds: int, student_runs: int, warmup: int) -> dict[str, list]:
    """Seconds per run of each runner; the first is the teacher, run once per round."""
    (teacher_name, teacher), *students = runners.items()
    for run in runners.values():
        for _ in range(warmup):
            run()
    seconds = {name: [] for name in runners}
    for _ in range(rounds):
        start = time.perf_counter()
        teacher()
        seconds[teacher_name].append(time.perf_counter() - start)
        for name, run in students:
            run()  # untimed: the teacher has just evicted the student's weights from the caches
            for _ in range(student_runs):
                start = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - start)
    return seconds


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    photos = list_images(SAMPLES)
    views = EvalTransform(args.teacher_size, args.student_size)(load_rgb(photos[0]))
    teacher_image = views["teacher_image"][None]  # (1, 3, T, T)
    student_image = views["student_image"][None]  # (1, 3, S, S)
    teacher = build_teacher(args.tiny).model.eval()  # the plain transformers model: depth only
    if args.student:
        student = StudentDepthModel.from_pretrained(args.student)
    else:
        torch.manual_seed(0)
        student = build_student(bench_config(args.teacher_size, args.student_size, 1, 0, args.tiny))
    student.eval()

    def run_teacher() -> None:
        with torch.inference_mode():
            teacher(pixel_values=teacher_image)

    with tempfile.TemporaryDirectory(prefix="bench-inference-") as folder:
        onnx_path = Path(folder) / "student.onnx"
        export = export_student(student, onnx_path, args.student_size)
        files, int8 = {STUDENT: onnx_path}, {}
        for mode in args.quant_modes:
            path = Path(folder) / f"student.int8_{mode}.onnx"
            report = quantize_student(onnx_path, path, mode, photos, args.student_size)
            files[f"student_onnx_int8_{mode}"], int8[mode] = path, {key: report[key] for key in ACCURACY_KEYS}
        runners = {TEACHER: run_teacher,
                   **{name: onnx_runner(path, student_image.numpy(), args.threads) for name, path in files.items()}}
        seconds = measure(runners, args.rounds, args.student_runs, args.warmup)
        megabytes = {name: path.stat().st_size / 1e6 for name, path in files.items()}

    latency = {name: latency_stats(values) for name, values in seconds.items()}
    teacher_ms = latency[TEACHER]["median_ms"]
    for mode, figures in int8.items():
        int8_ms = latency[f"student_onnx_int8_{mode}"]["median_ms"]
        figures.update(speedup_vs_fp32_student=latency[STUDENT]["median_ms"] / int8_ms,
                       speedup_vs_teacher=teacher_ms / int8_ms)
    flops = {"teacher": gflops(teacher, teacher_image), "student": gflops(student, student_image)}
    figures = {
        "benchmark": "inference",
        "machine": machine(),
        "settings": {"batch_size": 1, "teacher_size": args.teacher_size, "student_size": args.student_size,
                     "torch_threads": torch.get_num_threads(), "ort_intra_op_threads": args.threads,
                     "ort_inter_op_threads": 1, "rounds": args.rounds, "student_runs_per_round": args.student_runs,
                     "warmup_runs": args.warmup,
                     "teacher": "tiny test teacher" if args.tiny else "Depth-Anything-V2-Small (random weights)",
                     "student": args.student or "mobilevit_xs + MiniDPT (preset widths, random weights)",
                     "int8_accuracy": "int8 vs fp32 student on the sample photos (which also calibrate static "
                                      "mode); aligned_* = depth metrics after the per-image scale-and-shift fit"},
        "latency": latency,
        "onnx_megabytes": megabytes,
        "gflops": {**flops, "teacher_over_student": flops["teacher"] / flops["student"]},
        "student_speedup_vs_teacher": teacher_ms / latency[STUDENT]["median_ms"],
        "int8": int8,
        "export": export,
    }
    print(format_report(figures))
    write_json(args.json, figures)
    return figures


def format_report(figures: dict) -> str:
    s = figures["settings"]
    teacher_ms = figures["latency"][TEACHER]["median_ms"]
    rows = []
    for name, stats in figures["latency"].items():
        size = s["teacher_size"] if name == TEACHER else s["student_size"]
        rows.append([name, f"{size}x{size}", stats["median_ms"], stats["p10_ms"], stats["p90_ms"], stats["runs"],
                     teacher_ms / stats["median_ms"], figures["onnx_megabytes"].get(name, "")])
    title = (f"batch-1 CPU latency, {s['torch_threads']} torch threads = {s['ort_intra_op_threads']} ORT intra-op "
             f"threads")
    lines = [format_table(title, ["model", "input", "median ms", "p10 ms", "p90 ms", "runs", "speedup vs teacher",
                                  "MB"], rows),
             f"student_speedup_vs_teacher: {figures['student_speedup_vs_teacher']:.2f}x "
             f"(forward GFLOPs {figures['gflops']['teacher']:.3g} / {figures['gflops']['student']:.3g} = "
             f"{figures['gflops']['teacher_over_student']:.1f}x)"]
    for mode, q in figures["int8"].items():
        lines.append(f"int8 {mode}: {q['speedup_vs_fp32_student']:.2f}x the fp32 student; vs fp32 on "
                     f"{q['num_images']} photos: aligned abs_rel {q['aligned_abs_rel']:.4f}, delta1 "
                     f"{q['aligned_delta1']:.4f}, max |d disparity| {q['max_abs_diff']:.3g} "
                     f"(mean |fp32| {q['mean_abs_fp32']:.3g})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
