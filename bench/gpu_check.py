"""One prepared check of the trainer on a GPU: everything that needs one, measured in one go.

    python -m bench.gpu_check --out DIR [--budget-s 420] [--tiny]

Writes DIR/gpu_check.json and a readable DIR/gpu_check.md, whatever happens: each part runs in its
own process with its own share of `--budget-s`, and a part that overruns its share or fails is
stopped and recorded as such while the others go on. The parts:

1. environment: GPU name and memory, driver, CUDA, torch, transformers, timm, accelerate versions.
2. teacher: Depth-Anything-V2-Small (random weights) at 518, batch 32, three ways: fp32, bf16
   autocast over fp32 weights, bf16 weights (backbone and neck cast, head fp32: what training
   runs, `DepthAnythingTeacher.place`). Photos/s, achieved TFLOP/s (FlopCounterMode's count) and
   its fraction of the GPU's dense bf16 peak, and each bf16 way against fp32 on the sample photos
   as depth metrics (aligned abs_rel, delta1, max abs disparity difference).
3. step: the trainer's own step (`bench.train_step`: `DistillationStep`) at batch 32, teacher
   live and cached, depth-only and with the default recipe's feature term (features live or stored
   in the cache), with channels_last and torch.compile (compilation timed apart as `warmup_s`):
   photos/s, peak memory, host syncs per step, the teacher / student / optimizer shares.
4. data_pipeline: `bench.dataloader` with a worker per core, 12-MP JPEGs: the folder pipeline,
   shards decoded in the workers and shards decoded on the GPU, each against each step variant.
5. resume: a short real run through `accelerate launch` (single-GPU config, real architectures,
   random weights, the sample photos cycled) killed with SIGKILL mid-epoch and resumed, against an
   uninterrupted run: max abs difference of the final weights, bit-identical or not.

Without CUDA each part says "skipped: no CUDA". `--tiny` runs every part on whatever device there
is with the tiny teacher, small sizes and few steps: that is how the tests know the script works
before any GPU has been seen. On a bare machine it needs only the project's own dependencies;
nothing is downloaded (the models are built from their configs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

REPO = Path(__file__).resolve().parents[1]
PARTS = ("environment", "teacher", "step", "step_compile", "data_pipeline", "resume")
# Shares of --budget-s, handed out as the parts run: each gets its share of the time still left,
# so what one part does not use goes to the later ones. torch.compile gets a part of its own, so
# that a compilation that overruns loses only its own figures; the resume part launches three runs.
BUDGET_SHARES = {"environment": 0.04, "teacher": 0.14, "step": 0.22, "step_compile": 0.20, "data_pipeline": 0.12,
                 "resume": 0.28}
# Dense bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s (no sparsity).
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0,
                    "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0, "RTX 4090": 165.0}
NO_CUDA = "skipped: no CUDA"


def bf16_peak_tflops(name: str) -> Optional[float]:
    """The first table entry whose key appears in the device name (the longest keys come first)."""
    for key in sorted(BF16_PEAK_TFLOPS, key=len, reverse=True):
        if key in name:
            return BF16_PEAK_TFLOPS[key]
    return None


# --- the parts (each runs in its own process: `--part NAME`) -----------------------------------------

def part_environment(tiny: bool, work: Path) -> dict:
    import accelerate
    import timm
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "transformers": transformers.__version__, "timm": timm.__version__,
            "accelerate": accelerate.__version__, "cpu_cores": os.cpu_count()}
    if not torch.cuda.is_available():
        return {**info, "gpu": NO_CUDA}
    properties = torch.cuda.get_device_properties(0)
    driver = None
    if shutil.which("nvidia-smi"):
        query = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30)
        driver = query.stdout.strip().splitlines()[0] if query.returncode == 0 and query.stdout.strip() else None
    return {**info, "gpu": properties.name, "gpu_memory_gib": properties.total_memory / 2**30,
            "gpu_count": torch.cuda.device_count(), "driver": driver,
            "bf16_peak_tflops": bf16_peak_tflops(properties.name)}


def _sample_batch(size: int, batch_size: int) -> torch.Tensor:
    from data import EvalTransform, list_images, load_rgb
    from trainer.ship.fidelity import SAMPLE_PHOTOS

    photos = [EvalTransform(size, 64)(load_rgb(path))["teacher_image"] for path in list_images(SAMPLE_PHOTOS)]
    return torch.stack([photos[index % len(photos)] for index in range(batch_size)])


def _photos_per_s(run, batch_size: int, device: torch.device, seconds: float) -> float:
    """Photos/s of `run()` over batches of `batch_size`, after two untimed runs, for ~`seconds`."""
    from bench.common import synchronize

    for _ in range(2):
        run()
    synchronize(device)
    runs, start = 0, time.perf_counter()
    while runs < 3 or time.perf_counter() - start < seconds:
        run()
        runs += 1
        synchronize(device)
    return runs * batch_size / (time.perf_counter() - start)


def part_teacher(tiny: bool, work: Path) -> dict:
    from bench.common import build_teacher
    from modeling.summary import teacher_gflops
    from trainer.ship.fidelity import agreement

    cuda = torch.cuda.is_available()
    if not cuda and not tiny:
        return {"status": NO_CUDA}
    device = torch.device("cuda" if cuda else "cpu")
    size, batch_size, seconds = (56, 4, 0.5) if tiny else (518, 32, 8.0)
    teacher = build_teacher(tiny)
    gflops_per_photo = teacher_gflops(teacher.model.eval(), size)
    images = _sample_batch(size, batch_size).to(device)
    peak = bf16_peak_tflops(torch.cuda.get_device_name(device)) if cuda else None
    results, reference = {}, None
    ways = {"fp32": ("no", False), "bf16_autocast_fp32_weights": ("no", True),
            "bf16_weights": ("bf16", False)}  # (how the teacher is placed, autocast around it)
    for name, (placement, autocast) in ways.items():
        if not cuda and name != "fp32":
            results[name] = {"status": NO_CUDA}
            continue
        placed = build_teacher(tiny).place(device, placement)
        context = torch.autocast("cuda", torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)

        def run(placed=placed, context=context) -> torch.Tensor:
            with torch.inference_mode(), context:
                return placed(images).disparity.float()

        photos_per_s = _photos_per_s(run, batch_size, device, seconds)
        tflops = gflops_per_photo * photos_per_s / 1e3
        output = run()
        figures = {"photos_per_s": photos_per_s, "achieved_tflops": tflops,
                   "fraction_of_bf16_peak": tflops / peak if peak else None}
        if reference is None:
            reference = output
        else:
            figures["vs_fp32"] = agreement(output, reference)
        results[name] = figures
        del placed, run
        if cuda:
            torch.cuda.empty_cache()
    return {"teacher": "tiny test teacher" if tiny else "Depth-Anything-V2-Small (random weights)",
            "size": size, "batch_size": batch_size, "gflops_per_photo": gflops_per_photo,
            "bf16_peak_tflops": peak, "ways": results}


def part_step(tiny: bool, work: Path) -> dict:
    from bench import train_step

    cuda = torch.cuda.is_available()
    if not cuda and not tiny:
        return {"status": NO_CUDA}
    if tiny:
        args = ["--tiny", "--teacher-size", "42", "--student-size", "64", "--batch-size", "2", "--steps", "1",
                "--warmup", "1", "--variants", "live,cached"]
    else:
        args = ["--batch-size", "32", "--steps", "6", "--warmup", "2", "--workers", str(min(8, os.cpu_count())),
                "--variants", "live,cached,live_features,cached_features,live_teacher_bf16,live_channels_last"]
    figures = train_step.main([*args, "--device", "cuda" if cuda else "cpu", "--json", str(work / "step.json")])
    if not cuda:
        figures["not_measured"] = f"the bf16 teacher and channels_last variants: {NO_CUDA}"
    return figures


def part_step_compile(tiny: bool, work: Path) -> dict:
    """The compiled variants; `warmup_s` (two untimed steps) is mostly compilation."""
    from bench import train_step

    if not torch.cuda.is_available():
        return {"status": NO_CUDA}
    args = ["--tiny", "--teacher-size", "42", "--student-size", "64", "--batch-size", "2", "--steps", "1"] if tiny \
        else ["--batch-size", "32", "--steps", "6", "--workers", str(min(8, os.cpu_count()))]
    return train_step.main([*args, "--warmup", "2", "--device", "cuda", "--variants",
                            "live_compile,cached_channels_last_compile", "--json", str(work / "step_compile.json")])


def part_data_pipeline(tiny: bool, work: Path) -> dict:
    from bench import dataloader

    step_json = work / "step.json"
    if not step_json.is_file():
        return {"status": "skipped: the step part wrote no figures to compare with"}
    if not torch.cuda.is_available() and not tiny:
        return {"status": NO_CUDA}
    size = ["--teacher-size", "42", "--student-size", "64", "--items", "8", "--rounds", "1", "--photo-size",
            "shipped"] if tiny else ["--items", "384", "--rounds", "2"]
    workers = 1 if tiny else os.cpu_count()
    batch_size = 2 if tiny else 32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return dataloader.main([*size, "--batch-size", str(batch_size), "--workers", str(workers), "--device", device,
                            "--step-json", str(step_json), "--json", str(work / "dataloader.json")])


def _launch(run_dir: Path, args: list[str], tiny: bool, fault: Optional[str] = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("DEPTH_DISTILL_FAULT", None)
    if fault:
        env["DEPTH_DISTILL_FAULT"] = fault
    launcher = "cpu" if tiny and not torch.cuda.is_available() else "single_gpu"
    if launcher == "cpu":
        env["ACCELERATE_USE_CPU"] = "true"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "accelerate_configs" / f"{launcher}.yaml"), str(REPO / "trainer" / "main.py"),
               *args, f"output_dir={run_dir}"]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)


def part_resume(tiny: bool, work: Path) -> dict:
    from safetensors.torch import load_file

    if not torch.cuda.is_available() and not tiny:
        return {"status": NO_CUDA}
    # Photos: the samples, 2 steps an epoch at batch 4 (8 photos, no validation split), so step
    # 5 is mid-epoch; states at steps 3 and 6; 8 steps in all.
    common = ["data.train_dir=data/samples", "data.val_fraction=0", "export.enabled=false",
              "train.save_every=3", "train.max_steps=8", "train.batch_size=4", "log.log_every=1"]
    if tiny:
        args = ["--config", "trainer/configs/demo.yaml", *common, "data.num_workers=0"]
    else:
        from bench.common import build_teacher

        teacher_dir = work / "teacher_v2_small_random"
        build_teacher(False).save_pretrained(teacher_dir)
        args = ["--config", "trainer/configs/dav2_small_mobilevit_xs.yaml", *common, f"teacher.name={teacher_dir}",
                "student.pretrained=false", "data.num_workers=4"]
    runs = work / "runs"
    started = time.perf_counter()
    reference = _launch(runs / "uninterrupted", args, tiny)
    killed = _launch(runs / "killed", args, tiny, fault="sigkill@5")
    resumed = _launch(runs / "killed", [*args, "--resume", "latest"], tiny)
    codes = {"uninterrupted": reference.returncode, "killed": killed.returncode, "resumed": resumed.returncode}
    if reference.returncode or resumed.returncode or not killed.returncode:
        tail = (resumed if resumed.returncode else reference).stderr.strip().splitlines()[-3:]
        return {"status": "failed", "exit_codes": codes, "stderr_tail": tail}
    a = load_file(runs / "uninterrupted" / "student_last" / "model.safetensors")
    b = load_file(runs / "killed" / "student_last" / "model.safetensors")
    max_diff = max((a[key].float() - b[key].float()).abs().max().item() for key in a)
    identical = all(torch.equal(a[key], b[key]) for key in a)
    return {"exit_codes": codes, "seconds": time.perf_counter() - started, "max_abs_diff": max_diff,
            "bit_identical": identical,
            "why": ("same photos, order, augmentation and RNG states after the resume" if identical else
                    "the resumed run replays the same photos and RNG states; the difference comes from "
                    "non-deterministic GPU kernels (atomics in backward, autotuned algorithms): "
                    "train.deterministic=true trades speed for bit-identical resumes")}


PART_FUNCTIONS = {"environment": part_environment, "teacher": part_teacher, "step": part_step,
                  "step_compile": part_step_compile, "data_pipeline": part_data_pipeline, "resume": part_resume}


# --- the driver --------------------------------------------------------------------------------------

def run_part(name: str, out: Path, budget_s: float, tiny: bool) -> dict:
    """Run one part in its own process; its JSON, or what stopped it."""
    result_path = out / "parts" / f"{name}.json"
    result_path.unlink(missing_ok=True)
    command = [sys.executable, "-m", "bench.gpu_check", "--part", name, "--out", str(out)]
    command += ["--tiny"] if tiny else []
    started = time.perf_counter()
    # A session of its own, so that an overrun stops the part's launchers and trainers too.
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=budget_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return {"status": f"stopped: over its budget of {budget_s:.0f} s", "seconds": budget_s}
    seconds = time.perf_counter() - started
    if process.returncode or not result_path.is_file():
        lines = (stderr or stdout).strip().splitlines()
        return {"status": f"failed (exit {process.returncode}): {lines[-1] if lines else 'no output'}",
                "seconds": seconds}
    return {**json.loads(result_path.read_text()), "seconds": seconds}


def check(out: Path, budget_s: float, tiny: bool) -> dict:
    (out / "parts").mkdir(parents=True, exist_ok=True)
    started, report = time.perf_counter(), {}
    for index, name in enumerate(PARTS):
        left = budget_s - (time.perf_counter() - started)
        if left < 5:
            report[name] = {"status": "skipped: the total budget was spent"}
            continue
        # Its share of what is left, so that time a part did not need goes to the parts after it.
        share = BUDGET_SHARES[name] / sum(BUDGET_SHARES[later] for later in PARTS[index:])
        report[name] = run_part(name, out, left * share, tiny)
        print(f"{name}: {report[name].get('status', 'done')} ({report[name].get('seconds', 0):.0f} s)", flush=True)
    figures = {"benchmark": "gpu_check", "tiny": tiny, "budget_s": budget_s,
               "wall_s": time.perf_counter() - started, **report}
    (out / "gpu_check.json").write_text(json.dumps(figures, indent=2) + "\n")
    (out / "gpu_check.md").write_text(format_markdown(figures))
    return figures


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def format_markdown(figures: dict) -> str:
    lines = [f"# GPU check{' (tiny mode)' if figures['tiny'] else ''}", "",
             f"Wall time {figures['wall_s']:.0f} s of a {figures['budget_s']:.0f} s budget.", ""]
    env = figures["environment"]
    lines += ["## 1. Environment", ""] + [f"- {key}: {_fmt(value)}" for key, value in env.items()] + [""]

    teacher = figures["teacher"]
    lines += ["## 2. Teacher", ""]
    if "ways" in teacher:
        lines += [f"{teacher['teacher']} at {teacher['size']}x{teacher['size']}, batch {teacher['batch_size']}, "
                  f"{_fmt(teacher['gflops_per_photo'])} GFLOPs a photo; the GPU's dense bf16 peak: "
                  f"{_fmt(teacher['bf16_peak_tflops']) or 'unknown'} TFLOP/s.", "",
                  "| way | photos/s | TFLOP/s | of bf16 peak | vs fp32: aligned abs_rel | delta1 | max abs diff |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for way, result in teacher["ways"].items():
            if "photos_per_s" not in result:
                lines.append(f"| {way} | {result.get('status', '')} | | | | | |")
                continue
            versus = result.get("vs_fp32", {})
            lines.append(f"| {way} | {_fmt(result['photos_per_s'])} | {_fmt(result['achieved_tflops'])} | "
                         f"{_fmt(result['fraction_of_bf16_peak'])} | {_fmt(versus.get('aligned_abs_rel'))} | "
                         f"{_fmt(versus.get('aligned_delta1'))} | {_fmt(versus.get('max_abs_diff'))} |")
    else:
        lines.append(teacher.get("status", ""))
    lines.append("")

    lines += ["## 3. The trainer's distillation step", "",
              "| variant | photos/s | peak MB | host syncs | teacher ms | student ms | optimizer ms | warm-up s |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    notes = []
    for part in ("step", "step_compile"):
        step = figures[part]
        for name, variant in step.get("variants", {}).items():
            ms = variant["ms_per_step"]
            lines.append(f"| {name} | {_fmt(variant['images_per_s'])} | {_fmt(variant['peak_memory_mb'])} | "
                         f"{variant['host_syncs_per_step']} | {_fmt(ms['teacher_forward'])} | "
                         f"{_fmt(ms['student_forward_backward'])} | {_fmt(ms['optimizer'])} | "
                         f"{_fmt(variant['warmup_s'])} |")
        if "variants" not in step:
            notes.append(f"{part}: {step.get('status', '')}")
        if "not_measured" in step:
            notes.append(f"not measured: {step['not_measured']}")
    lines += ([""] + [f"- {note}" for note in notes] if notes else []) + [""]

    data = figures["data_pipeline"]
    lines += ["## 4. Data pipeline against the step", ""]
    if "pipelines" in data:
        variants = list(data["step_images_per_s_excluding_data"])
        lines += ["| pipeline | photos/s (workers) | device's share, photos/s | "
                  + " | ".join(f"pipeline / step '{v}'" for v in variants) + " |",
                  "|---|---|---|" + "---|" * len(variants)]
        for name, p in data["pipelines"].items():
            ratios = data["pipeline_vs_step"][name]
            lines.append(f"| {name} | {_fmt(p['photos_per_s'])} | {_fmt(p.get('device_photos_per_s', ''))} | "
                         + " | ".join(_fmt(ratios[v]) for v in variants) + " |")
        lines += ["", f"{data['settings']['photos']['size']}, {data['settings']['workers']} workers; above 1 the "
                      f"pipeline keeps the step fed."]
    else:
        lines.append(data.get("status", ""))
    lines.append("")

    resume = figures["resume"]
    lines += ["## 5. SIGKILL mid-epoch, then resume", ""]
    if "bit_identical" in resume:
        lines.append(f"Final weights against an uninterrupted run: max abs diff {_fmt(resume['max_abs_diff'])}, "
                     f"bit-identical: {resume['bit_identical']} ({resume['why']}).")
    else:
        lines.append(f"{resume.get('status', '')} {resume.get('stderr_tail', '')}".strip())
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.md and the parts' files")
    parser.add_argument("--budget-s", type=float, default=420.0, help="total wall time, shared among the parts")
    parser.add_argument("--tiny", action="store_true", help="tiny models and sizes, on any device (for tests)")
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # one part, in its own process
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.part:
        work = out / "parts"
        work.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f"gpu-check-{args.part}-") as scratch:
            figures = PART_FUNCTIONS[args.part](args.tiny, work if args.part != "resume" else Path(scratch))
        (work / f"{args.part}.json").write_text(json.dumps(figures, indent=2) + "\n")
        return figures
    figures = check(out, args.budget_s, args.tiny)
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return figures


if __name__ == "__main__":
    main()
