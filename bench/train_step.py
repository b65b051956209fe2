"""Images/s of one distillation step at the real architectures, split into its phases.

    python -m bench.train_step [--teacher-size 518] [--student-size 256] [--batch-size 2] [--steps 4]
        [--device cpu|cuda] [--variants live,cached,...] [--json bench/results/train_step.json]

Depth-Anything-V2-Small (built from its config, random weights) teaches MobileViT-XS + the real
preset's decoder (lean) with its loss, optimizer and augmentation
(trainer/configs/dav2_small_mobilevit_xs.yaml) on the sample photos. What is timed is the
trainer's own step, `trainer.train.loop.DistillationStep`
(`forward_backward` then `optimizer_step`), in four phases: data loading (the wait for the next batch
and its copy to the device), teacher forward (hooks on the teacher), student forward + loss +
backward (the rest of `forward_backward`), optimizer (`optimizer_step`: the agreed all-reduce,
clipping, AdamW, scheduler, zero_grad), with a device synchronisation at each boundary on GPU.
One more, untimed step per variant counts the step's host synchronisations (`host_syncs_per_step`;
see `bench.common.HostSyncCounter`).

All variants are built side by side and run in turn, one step each, so that a ratio between two
of them is measured under the same conditions even on a machine with other work running. With
`--workers 0` (the default) data loading is done in the step and measured; with workers, one
variant's workers prefetch while another computes.

`cached` reads the teacher's disparity from a cache that the real writer
(`trainer.train.cache_teacher.build_cache`) fills in a temporary folder, through the trainer's own
dataset for `distill.teacher_cache` (`CachedTeacherDataset`): no teacher forward, and no teacher
view rendered. The live variants run the same depth-only loss (feature
weight 0) for a fair `cached_speedup_vs_live`; `live_features` adds the preset's feature term (the
default recipe), and `cached_features` reads that term's teacher features from the cache too
(`distill.cache_features: stored`, the default): `cached_speedup_vs_live_default_recipe`, with
the cache's storage per photo (`cache_mb_per_photo`).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from accelerate import Accelerator

from bench.common import (HostSyncCounter, PeakRss, bench_config, build_teacher, current_rss, format_table,
                          machine, synchronize, trainer_step, write_json)
from modeling import DepthAnythingTeacher
from modeling.summary import count as count_parameters
from trainer.train.cache_teacher import build_cache
from trainer.config import Config
from core.cli import comma_choices
from trainer.train.distill import build_student
from trainer.train.loop import DistillationStep

PHASES = ("data_loading", "teacher_forward", "student_forward_backward", "optimizer")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Variant:
    cached: bool = False  # teacher disparity read from the cache: no teacher forward
    features: bool = False  # the preset's feature term too (needs the live teacher's features)
    teacher_dtype: str = "fp32"  # bf16/fp16: teacher backbone and neck cast, as on a GPU run; student fp32
    channels_last: bool = False  # student weights and inputs
    compile: bool = False  # student.compile(), as train.compile does


VARIANTS = {
    "live": Variant(),
    "cached": Variant(cached=True),
    "live_features": Variant(features=True),
    "cached_features": Variant(cached=True, features=True),
    "live_teacher_bf16": Variant(teacher_dtype="bf16"),
    "live_teacher_fp16": Variant(teacher_dtype="fp16"),
    "live_channels_last": Variant(channels_last=True),
    "live_compile": Variant(compile=True),
    "cached_channels_last_compile": Variant(cached=True, channels_last=True, compile=True),
}
DEFAULT_VARIANTS = {"cpu": "live,cached,live_features,cached_features", "cuda": ",".join(VARIANTS)}


@dataclass
class Runner:
    """One variant's step (the trainer's own), its batches, and what its timed steps measured."""

    variant: Variant
    step: DistillationStep
    batches: Iterator[dict]
    dataset: str  # the class under EpochSeededDataset: where the teacher targets come from
    seconds: dict[str, list[float]] = field(default_factory=lambda: {phase: [] for phase in PHASES})
    peak_bytes: int = 0
    host_syncs_per_step: int = -1
    warmup_s: float = 0.0  # the untimed first steps; with torch.compile, mostly compilation


def half_precision(teacher: DepthAnythingTeacher, dtype: torch.dtype) -> DepthAnythingTeacher:
    """A copy cast the way `DepthAnythingTeacher.place` casts it on a GPU: backbone and neck only."""
    copy_ = copy.deepcopy(teacher)
    copy_.model.backbone.to(dtype)
    copy_.model.neck.to(dtype)
    return copy_


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.train_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher-size", type=int, default=518, help="a multiple of 14")
    parser.add_argument("--student-size", type=int, default=256, help="a multiple of 32")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (0: loading timed in the step)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--variants", help=f"comma-separated, from {', '.join(VARIANTS)} "
                                           f"(default: {DEFAULT_VARIANTS['cpu']} on cpu, all on cuda)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--tiny", action="store_true", help="the tiny test teacher instead of V2-Small")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    args.variants = comma_choices(parser, "--variants", args.variants or DEFAULT_VARIANTS[args.device], VARIANTS)
    return args


def runner_config(variant: Variant, args: argparse.Namespace, cache_dir: Path) -> Config:
    overrides = [] if variant.features else ["distill.weights.feature=0"]
    if variant.cached:
        overrides.append(f"distill.teacher_cache={cache_dir}")
    return bench_config(args.teacher_size, args.student_size, args.batch_size, args.workers, args.tiny, *overrides)


def build_runner(variant: Variant, args: argparse.Namespace, accelerator: Accelerator, teacher: DepthAnythingTeacher,
                 cache_dir: Path) -> Runner:
    cfg = runner_config(variant, args, cache_dir)
    torch.manual_seed(cfg.seed)  # every variant starts from the same student
    student = build_student(cfg)
    if variant.channels_last:
        student.to(memory_format=torch.channels_last)
    if variant.compile:
        student.compile()
    step, batches, dataset = trainer_step(cfg, accelerator, teacher, args.warmup + args.steps + 1, student)
    return Runner(variant, step, batches, dataset)


class PhaseClock:
    """Wall time of the data wait and of the teacher's forward inside one `forward_backward`."""

    def __init__(self, runner: Runner, device: torch.device):
        self.device, self.data, self.teacher = device, 0.0, 0.0
        self._started = 0.0
        self._hooks = [runner.step.teacher.register_forward_pre_hook(self._teacher_starts),
                       runner.step.teacher.register_forward_hook(self._teacher_ends)]

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()

    def timed(self, batches: Iterator[dict]) -> Iterator[dict]:
        while True:
            start = time.perf_counter()
            batch = next(batches)
            synchronize(self.device)
            self.data += time.perf_counter() - start
            yield batch

    def _teacher_starts(self, module, inputs) -> None:
        synchronize(self.device)
        self._started = time.perf_counter()

    def _teacher_ends(self, module, inputs, output) -> None:
        synchronize(self.device)
        self.teacher += time.perf_counter() - self._started


def run_step(runner: Runner, clock: PhaseClock, device: torch.device) -> dict[str, float]:
    """One optimizer step of the trainer -> seconds per phase."""
    clock.data = clock.teacher = 0.0
    start = time.perf_counter()
    window = runner.step.forward_backward(clock.timed(runner.batches))
    synchronize(device)
    backward = time.perf_counter()
    runner.step.optimizer_step(window)
    synchronize(device)
    end = time.perf_counter()
    student = backward - start - clock.data - clock.teacher
    return dict(zip(PHASES, (clock.data, clock.teacher, student, end - backward)))


def count_host_syncs(runner: Runner, device: torch.device) -> int:
    """Host synchronisations of one untimed step, the data wait left out."""
    batch = next(runner.batches)
    synchronize(device)
    with HostSyncCounter(device) as counter:
        runner.step.optimizer_step(runner.step.forward_backward(iter([batch])))
    return counter.count


def variant_figures(runner: Runner, batch_size: int) -> dict:
    seconds = {phase: np.asarray(values) for phase, values in runner.seconds.items()}
    total = sum(seconds.values())
    images = batch_size * len(total)
    return {
        "images_per_s": images / total.sum(),
        # What the step consumes when DataLoader workers hide the loading: the rate a data
        # pipeline must keep up with (bench.dataloader compares against this).
        "images_per_s_excluding_data": images / (total - seconds["data_loading"]).sum(),
        "ms_per_step": {**{phase: 1e3 * float(values.mean()) for phase, values in seconds.items()},
                        "total": 1e3 * float(total.mean())},
        "peak_memory_mb": runner.peak_bytes / 2**20,
        "host_syncs_per_step": runner.host_syncs_per_step,
        "warmup_s": runner.warmup_s,
        "loss_weights": dict(runner.step.accelerator.unwrap_model(runner.step.module).criterion.weights),
        "dataset": runner.dataset,
        "timed_steps": len(total),
        **asdict(runner.variant),
    }


def measure(runners: dict[str, Runner], args: argparse.Namespace, device: torch.device) -> None:
    """Warm-up, then timed steps, round-robin over the variants; then one step counting syncs."""
    rss = PeakRss() if device.type == "cpu" else None
    clocks = {name: PhaseClock(runner, device) for name, runner in runners.items()}
    try:
        for step in range(args.warmup + args.steps):
            for name, runner in runners.items():
                if rss is not None:
                    rss.take()
                else:
                    torch.cuda.reset_peak_memory_stats(device)
                phases = run_step(runner, clocks[name], device)
                peak = rss.take() if rss is not None else torch.cuda.max_memory_allocated(device)
                runner.peak_bytes = max(runner.peak_bytes, peak)
                if step < args.warmup:
                    runner.warmup_s += sum(phases.values())
                else:
                    for phase, seconds in phases.items():
                        runner.seconds[phase].append(seconds)
    finally:
        if rss is not None:
            rss.close()
        for clock in clocks.values():
            clock.close()  # its synchronisations are the benchmark's, not the step's
    for runner in runners.values():
        runner.host_syncs_per_step = count_host_syncs(runner, device)


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    teacher = build_teacher(args.tiny).to(device)
    variants = {name: VARIANTS[name] for name in args.variants}
    teachers = {dtype: teacher if dtype == "fp32" else half_precision(teacher, DTYPES[dtype])
                for dtype in {v.teacher_dtype for v in variants.values()}}
    accelerator = Accelerator(cpu=device.type == "cpu")  # only says the device to the trainer's helpers
    with tempfile.TemporaryDirectory(prefix="bench-teacher-cache-") as cache_dir:
        cache_dir = Path(cache_dir)
        cache = None
        if any(v.cached for v in variants.values()):
            # The sample photos' teacher maps (and features, when a variant has the feature term),
            # written by the trainer's own cache writer; a depth-only run reads the depth alone.
            with_features = any(v.cached and v.features for v in variants.values())
            cache = build_cache(runner_config(VARIANTS["cached_features" if with_features else "cached"], args,
                                              cache_dir), cache_dir, accelerator, teacher)
        runners = {name: build_runner(v, args, accelerator, teachers[v.teacher_dtype], cache_dir)
                   for name, v in variants.items()}
        resident = (torch.cuda.memory_allocated(device) if device.type == "cuda"
                    else current_rss())
        measure(runners, args, device)

    results = {name: variant_figures(runner, args.batch_size) for name, runner in runners.items()}
    student = next(iter(runners.values())).step.module.student
    figures = {
        "benchmark": "train_step",
        "machine": machine(device),
        "settings": {"device": args.device, "teacher_size": args.teacher_size, "student_size": args.student_size,
                     "batch_size": args.batch_size, "timed_steps": args.steps, "warmup_steps": args.warmup,
                     "dataloader_workers": args.workers, "torch_threads": args.threads,
                     "teacher": "tiny test teacher" if args.tiny else "Depth-Anything-V2-Small (random weights)",
                     "teacher_parameters": count_parameters(teacher),
                     "student": "mobilevit_xs + the preset's decoder (random weights)",
                     "student_parameters": count_parameters(student),
                     "memory": ("peak torch.cuda.max_memory_allocated during the variant's steps"
                                if device.type == "cuda"
                                else "peak process RSS during the variant's steps (sampled every 5 ms)"),
                     "resident_memory_mb_before_steps": resident / 2**20},
        "cached_targets_source": ("CachedTeacherDataset over fp16 safetensors shards written by "
                                  "trainer.train.cache_teacher.build_cache in a temporary folder"),
        "variants": results,
    }
    for live, cached, name in (("live", "cached", "cached_speedup_vs_live"),
                               ("live_features", "cached_features", "cached_speedup_vs_live_default_recipe")):
        if live in results and cached in results:
            for key in ("images_per_s", "images_per_s_excluding_data"):
                figures[name + key.removeprefix("images_per_s")] = results[cached][key] / results[live][key]
    if cache is not None:
        depth_mb = 2 * args.teacher_size ** 2 / 1e6  # one fp16 map at cache_size
        figures["cache_mb_per_photo"] = {"total": cache["megabytes_per_image"], "depth": depth_mb,
                                         "features": cache["megabytes_per_image"] - depth_mb
                                         if cache["features"] else 0.0}
    print(format_report(figures))
    write_json(args.json, figures)
    return figures


def format_report(figures: dict) -> str:
    s = figures["settings"]
    rows = [[name, r["images_per_s"], r["images_per_s_excluding_data"],
             *(r["ms_per_step"][phase] for phase in (*PHASES, "total")), r["peak_memory_mb"]]
            for name, r in figures["variants"].items()]
    title = (f"distillation step on {s['device']}: teacher {s['teacher_size']}, student {s['student_size']}, "
             f"batch {s['batch_size']}, {s['timed_steps']} timed steps, {s['dataloader_workers']} workers, "
             f"{s['torch_threads']} threads (ms are per step)")
    table = format_table(title, ["variant", "img/s", "img/s excl. data", "data ms", "teacher ms",
                                 "student fwd+bwd ms", "optim ms", "total ms", "peak MB"], rows)
    ratios = [f"{key}: {value:.2f}x" for key, value in figures.items() if key.startswith("cached_speedup")]
    return "\n".join([table, *ratios])


if __name__ == "__main__":
    main()
