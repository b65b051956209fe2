"""Does distillation work? Students distilled by this trainer, scored on a world where depth is exact.

    python -m bench.quality [--tiny] [--ablations] [--out DIR] [--teacher DIR] [--work DIR] [--steps N] [--seed S]

1. Renders the synthetic worlds (`data.synthetic`): `train` scenes for the students to learn from,
   and the held-out `test` world (textures and layouts no train scene uses) to score on.
2. Takes the world teacher (`bench/world_teacher`, trained on the train world's exact depth by
   `python -m bench.world_teacher`; or `--teacher DIR`). From here on no student sees ground truth,
   except the one row that exists to show the ceiling.
3. Trains each student row through the trainer's own entry point (`trainer/main.py` with the
   `trainer/configs/world.yaml` preset and overrides), as a user would.
4. Scores every row on the test world with the protocol of `trainer.benchmark` (per image,
   least-squares scale and shift of the disparity to 1 / ground truth, Depth Anything V2's relative
   protocol), and against the teacher (the trainer's validation metric).
5. Writes `quality.md` (the table), `quality.json` (every figure and setting) and `quality.png`
   (image | ground truth | teacher | student, on one colour scale) into --out.

The rows: a constant map and the layout prior (each pixel's mean disparity over the train world:
what a model knows without looking at the image) bound the table from below; the teacher; the
default student; a student trained on ground truth directly, through the same trainer (its ceiling:
the train world's exact disparity goes in through the teacher-cache path, in place of the teacher's
maps); a student distilled from a teacher with random weights. The headline is the share of the
teacher's gain over the layout prior that the student keeps, (prior - student) / (prior - teacher),
in AbsRel and delta1.

`--tiny` (about 65 s on 2 cores, in the test suite) asks only whether distillation is wired right.
On 256 small scenes it distils two students side by side from the teacher's cached maps: one from
the maps as they are, a negative control from the maps flipped left-right (targets misaligned with
the student's input). The distilled student must lead the student before training and the control
by `MIN_LEAD` on the test world, against ground truth and against the teacher; a broken flip
between the student's view and its targets makes the control as good as it, and the check fails.
Beating the layout prior is the full run's job. `--ablations` adds one row per change from the
default recipe.

A rerun with the same --work (after a crash, or with --ablations after the headline run) reuses
each student an earlier run finished with the same command, training code (the files under core/,
data/, losses/, modeling/ and trainer/) and teacher weights, and trains the others. Rows that need
a GPU (`StudentRow.needs_gpu`) are left out, with one line, where none is.

Exit codes: 0 the report was written, 1 a mistake (one `error:` line) or a failed training run,
2 (--tiny) the report was written but the distilled student does not lead the student before
training and the negative control by `MIN_LEAD` (an `error:` line for each shortfall).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from PIL import Image
from safetensors.torch import load_file, save_file

from bench.world_teacher import SHIPPED as SHIPPED_TEACHER, build_model, Recipe
from data.synthetic import WorldError, WorldSpec, generate
from data.teacher_cache import INDEX_FILE
from trainer.benchmark.harness import depth_scores
from trainer.benchmark.models import BenchmarkModel, load_benchmark_model
from trainer.benchmark.readers import open_reader
from trainer.benchmark.suites import BENCHMARKS, PROTOCOLS, evaluation_mask
from trainer.config import load_config
from core.cli import ArgumentParser
from trainer.console import print_error
from core.choices import METRIC_NAMES
from trainer.evaluate.metrics import (depth_metrics, depth_to_disparity, depth_valid_mask_from_disparity,
                                      disparity_to_depth, least_squares_fit)
from trainer.evaluate.visualize import depth_comparison_picture
from core.errors import RunError
from trainer.train.checkpoint import save_student
from trainer.train.distill import build_student

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "trainer" / "configs" / "world.yaml"
SYNTHETIC = BENCHMARKS["synthetic"]
PROTOCOL = PROTOCOLS["disparity"]
SEED = 0  # the students' (weights, data order, split); --seed
WORLD_SEED = 0


@dataclass(frozen=True)
class Scale:
    """How big one mode of the run is."""
    train_images: int
    test_images: int
    render_size: int  # scenes are rendered square, this many pixels a side
    student_size: int
    steps: int  # optimizer steps of each student
    batch_size: int
    num_workers: int  # DataLoader workers of each training run
    val_fraction: float
    overrides: tuple[str, ...] = ()  # of the preset, for every student of this mode
    jobs: int = 1  # students trained at once
    threads: Optional[int] = None  # CPU threads of each (None: torch's default); a count gives its own bits


# The headline rows, 128 px: the size the world teacher sees (126). The three students train side by
# side on one thread each: two 1-thread runs do 1.45x the photos per second of one 2-thread run
# on 2 cores, and a third keeps both cores busy to the end (48 minutes one at a time, 2026-12-07).
# 1000 steps: at 500 the default student kept 81% of the teacher's gain in AbsRel but 70% in delta1;
# at 1000 (about 8 passes over the photos) 100% and 91% (bench/RESULTS.md).
FULL = Scale(train_images=2000, test_images=200, render_size=128, student_size=128, steps=1000, batch_size=16,
             num_workers=1, val_fraction=0.02, jobs=3, threads=1)
# 128 steps are too few for the preset's schedule (100 warm-up steps): the students would learn only
# the world's layout, which a flipped map teaches as well. A 6-step warm-up and lr 5e-3 make them
# learn the scenes' content within a minute (bench/RESULTS.md has the search). At 64 steps and 32
# test scenes the student's lead over the control swung from 0.012 to 0.029 with the seed and the
# machine; 128 of each hold it at 0.017 to 0.020 in delta1 (bench/RESULTS.md). The trainer validates
# on its own held-out photos only: the test world is scored here, once. The check is of the wiring
# (which pixel of the teacher's map each student pixel learns from), not of the loss: it keeps SILog,
# the loss its margins were measured with; after 64 steps the default SSI loss left the student and
# the control within 0.005 of each other on two seeds of three (bench/RESULTS.md).
TINY = Scale(train_images=256, test_images=128, render_size=128, student_size=64, steps=128, batch_size=8,
             num_workers=0, val_fraction=0.05,
             overrides=("optim.lr=5e-3", "optim.warmup_steps=6", "data.labeled_dir=null",
                        "distill.weights.silog=1", "distill.weights.ssi=0"), jobs=2, threads=1)


@dataclass(frozen=True)
class StudentRow:
    name: str
    targets: str = "teacher"  # teacher (live) | cache | flipped | ground_truth | random_teacher | untrained
    overrides: tuple[str, ...] = ()
    note: str = ""
    needs_gpu: bool = False  # too slow for the 15 minutes a row may take on 2 CPU cores


DEFAULT = StudentRow("student (default recipe)", note="distilled from the live teacher")
HEADLINE_ROWS = (
    DEFAULT,
    StudentRow("student trained on ground truth", "ground_truth", ("distill.weights.feature=0",),
               "the ceiling: exact disparity in place of the teacher's maps, no feature term"),
    StudentRow("student of a random teacher", "random_teacher", note="the teacher's architecture, random weights"),
)
TINY_DISTILLED = StudentRow("distilled student", "cache",
                            note="the teacher's cached maps: the control's, unflipped")
TINY_CONTROL = StudentRow("negative control: flipped teacher", "flipped",
                          note="the teacher's maps flipped left-right: targets misaligned with the student's input")
TINY_ROWS = (
    StudentRow("student before training", "untrained", note="the distilled student's random weights"),
    TINY_DISTILLED,
    TINY_CONTROL,
)
ABLATION_ROWS = (
    StudentRow("disparity terms only", overrides=("distill.weights.feature=0", "distill.weights.gradient=0")),
    StudentRow("disparity + gradient", overrides=("distill.weights.feature=0",)),
    StudentRow("+ feature x4", overrides=("distill.weights.feature=0.4",)),
    StudentRow("cached teacher", "cache"),
    StudentRow("DPT decoder", overrides=("student.decoder=dpt",)),
    StudentRow("MobileNetV4-Conv-Small", overrides=("student.backbone=mobilenetv4_conv_small",)),
    StudentRow("student input 384", overrides=("data.student_size=384",), needs_gpu=True,
               note="9x the pixels of a 128 px row: hours on 2 CPU cores"),
)


# --- the worlds -------------------------------------------------------------------------------

def render_worlds(work: Path, scale: Scale) -> dict[str, Path]:
    worlds = {}
    for world, count in (("train", scale.train_images), ("test", scale.test_images)):
        # The count in the name: the trainer reads every photo of the folder, so a folder a run with
        # more scenes left behind must not be shared.
        folder = work / "worlds" / f"{world}_{count}_{scale.render_size}px"
        started = time.perf_counter()
        written = generate(folder, WorldSpec(world, WORLD_SEED, scale.render_size, scale.render_size), count,
                           workers=2)
        if written:
            print(f"rendered {written} {world} scenes in {time.perf_counter() - started:.0f} s", flush=True)
        worlds[world] = folder
    return worlds


def layout_prior(depth_maps: Iterable[np.ndarray]) -> torch.Tensor:
    """(1, 1, H, W): each pixel's mean disparity over the depth maps (0 counts for the sky): what
    a model of the world knows without looking at the image."""
    total, count = None, 0
    for depth in depth_maps:
        disparity = depth_to_disparity(torch.from_numpy(depth))
        total, count = (disparity if total is None else total + disparity), count + 1
    return (total / count)[None, None]


# --- the rows' models -------------------------------------------------------------------------

def _blind(name: str, disparity: Callable[[], torch.Tensor], note: str) -> BenchmarkModel:
    """A row that never looks at the image."""
    return BenchmarkModel(name, False, lambda image: torch.zeros(1), lambda _: disparity(), note)


def launch(command: list[str], log: Path, env: Optional[dict[str, str]]) -> int:
    """`command` (the project's own Python tools) run from the repository, its output into `log`
    -> its exit code. (tests/test_quality.py runs the same commands in warm processes.)"""
    with open(log, "w") as out:
        return subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env).returncode


def _run(what: str, command: list[str], log: Path, env: Optional[dict[str, str]] = None) -> None:
    """A training or caching run, its output kept in `log`; a failure ends the quality run."""
    returncode = launch(command, log, env)
    if returncode:
        errors = [line for line in log.read_text().splitlines() if line.startswith("error:")]
        raise RunError(f"{what} failed (exit {returncode}): {errors[-1] if errors else 'see the log'}; "
                       f"its output is in {log}")


def common_overrides(worlds: dict[str, Path], scale: Scale, teacher: Path, seed: int) -> list[str]:
    return [f"data.train_dir={worlds['train'] / 'images'}", f"data.labeled_dir={worlds['test']}",
            f"data.student_size={scale.student_size}", f"data.num_workers={scale.num_workers}",
            f"data.val_fraction={scale.val_fraction}", f"teacher.name={teacher}", f"seed={seed}",
            f"train.max_steps={scale.steps}", f"train.batch_size={scale.batch_size}",
            f"train.save_every={scale.steps}", "train.keep_last=1", "export.enabled=false",
            f"log.image_every={scale.steps}", *scale.overrides]


def build_cache(work: Path, overrides: list[str]) -> Path:
    """The teacher's maps of every training scene, by the trainer's own cache writer. Written anew
    by every quality run: its check keys a cache by the teacher's config, not its weights, and a
    retrained teacher has the same config."""
    cache = work / "cache_teacher"
    _run("caching the teacher", [sys.executable, "-m", "trainer.train.cache_teacher", "--config", str(PRESET),
                                 "--cache-dir", str(cache), *overrides], work / "cache_teacher.log")
    return cache


def derived_cache(cache: Path, out: Path, train_dir: Path, replace: Callable[[Path, torch.Tensor], torch.Tensor],
                  features: str = "keep") -> Path:
    """A copy of the teacher cache whose depth maps are `replace(photo, map)`, its feature maps
    kept, flipped or dropped (`features`: keep | flip | drop, for a row without a feature term):
    the trainer reads it like the teacher's (same index and meta), so the row trains through the
    trainer's own cached-target path."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(cache, out)
    photo_of_hash = {entry["hash"]: train_dir / key for key, entry in
                     json.loads((cache / INDEX_FILE).read_text()).items() if entry["shard"]}
    for shard in sorted(out.glob("shard_*.safetensors")):
        tensors = load_file(shard)
        derived = {}
        for key, stored in tensors.items():
            if not key.endswith(".features"):
                derived[key] = replace(photo_of_hash[key], stored).to(stored.dtype).contiguous()
            elif features != "drop":
                derived[key] = stored.flip(-1).contiguous() if features == "flip" else stored
        save_file(derived, str(shard))
    return out


def _flip(_photo: Path, stored: torch.Tensor) -> torch.Tensor:
    return stored.flip(-1)


def _ground_truth(photo: Path, stored: torch.Tensor) -> torch.Tensor:
    """The photo's exact disparity at the stored map's size (area-averaged; the sky 0)."""
    depth = np.load(photo.parent.parent / "depth" / f"{photo.stem}.npy")
    return F.interpolate(depth_to_disparity(torch.from_numpy(depth))[None, None], size=stored.shape[-2:],
                         mode="area")[0]


@dataclass
class Training:
    """One student's run of trainer/main.py."""
    row: StudentRow
    command: list[str]
    log: Path
    student: Path  # the folder it writes
    provenance: dict  # what made the student: the command, the code, the teacher's weights

    @property
    def record(self) -> Path:
        """Written beside the student once its run has finished (trainer/main.py's --overwrite
        deletes it when a new run of the row starts, so a killed run leaves none)."""
        return self.student.parent / ROW_RECORD

    def finished_before(self) -> bool:
        """Whether an earlier quality run already trained this student with the same command, code
        and teacher: a rerun after a crash, or --ablations after the headline run, reuses it."""
        try:
            return self.student.is_dir() and json.loads(self.record.read_text()) == self.provenance
        except (OSError, ValueError):
            return False


ROW_RECORD = "quality_row.json"
# The code a student's numbers depend on: what trains it (the packages under the trainer, its presets).
TRAINING_CODE = ("core", "data", "losses", "modeling", "trainer")


def fingerprint(root: Path, paths: Iterable[Path]) -> str:
    """sha256 over the files' paths below `root` and their bytes, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def training_code(root: Path = REPO) -> str:
    return fingerprint(root, (path for package in TRAINING_CODE for path in (root / package).rglob("*")
                              if path.suffix in (".py", ".yaml") and "__pycache__" not in path.parts))


def prepare_student(row: StudentRow, slug: str, work: Path, worlds: dict[str, Path], scale: Scale,
                    teacher: Path, caches: dict[str, Path], seed: int, code: str) -> Training | Path:
    """One row's training run, or for the student before training its folder, written here."""
    overrides = common_overrides(worlds, scale, teacher, seed)
    if row.targets == "untrained":  # the student the trainer starts from: built as it builds it, from its seed
        folder = work / "runs" / slug / "student_last"
        folder.parent.mkdir(parents=True, exist_ok=True)
        set_seed(seed)
        if not save_student(build_student(load_config(PRESET, [*overrides, *row.overrides])), folder):
            raise RunError(f"could not write {folder}")
        return folder
    if row.targets == "random_teacher":
        teacher = work / "random_teacher"
        build_model(Recipe(seed=seed)).save_pretrained(teacher)
        overrides.append(f"teacher.name={teacher}")
    elif row.targets in ("cache", "flipped", "ground_truth"):
        if "teacher" not in caches:
            caches["teacher"] = build_cache(work, overrides)
        cache = caches["teacher"]
        if row.targets == "flipped":
            cache = derived_cache(cache, work / "cache_flipped", worlds["train"] / "images", _flip, features="flip")
        elif row.targets == "ground_truth":
            cache = derived_cache(cache, work / "cache_ground_truth", worlds["train"] / "images", _ground_truth,
                                  features="drop")
        overrides.append(f"distill.teacher_cache={cache}")
    run_dir = work / "runs" / slug
    command = [sys.executable, "trainer/main.py", "--config", str(PRESET), "--overwrite", f"output_dir={run_dir}",
               *overrides, *row.overrides]
    provenance = {"command": command[1:], "training_code": code,
                  "teacher": fingerprint(teacher, teacher.glob("*.safetensors"))}
    return Training(row, command, work / f"{slug}.log", run_dir / "student_last", provenance)


def train_students(trainings: list[Training], jobs: int, threads: Optional[int]) -> None:
    """Runs the trainings, `jobs` at a time, each on `threads` CPU threads."""
    env = None if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads)}

    def train(training: Training) -> None:
        if training.finished_before():
            print(f"reused '{training.row.name}': {training.student.parent} holds its student, trained by an "
                  f"earlier run of the same command on the same code and teacher", flush=True)
            return
        started = time.perf_counter()
        _run(f"training '{training.row.name}'", training.command, training.log, env)
        training.record.write_text(json.dumps(training.provenance, indent=1) + "\n")
        print(f"trained '{training.row.name}' in {time.perf_counter() - started:.0f} s", flush=True)

    with ThreadPoolExecutor(jobs) as pool:
        for finished in [pool.submit(train, training) for training in trainings]:
            finished.result()


# --- scoring ----------------------------------------------------------------------------------

def _align(disparity: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """`disparity` scaled and shifted to `target` by least squares over `valid` (for the picture)."""
    scale, shift = least_squares_fit(disparity.reshape(1, -1), target.reshape(1, -1), valid.reshape(1, -1),
                                     valid.sum().view(1))
    return disparity * scale[0] + shift[0]


@torch.no_grad()
def score(models: list[BenchmarkModel], teacher: BenchmarkModel, test_world: Path, count: int,
          picture_rows: int = 3) -> tuple[dict[str, dict[str, float]], dict[str, list[torch.Tensor]]]:
    """{model: {gt_abs_rel, gt_delta1, teacher_abs_rel, teacher_delta1}} averaged over the test
    world, and the first `picture_rows` images' aligned disparity maps for the picture."""
    reader = open_reader("synthetic", test_world)
    sums: dict[str, dict[str, list[float]]] = {model.name: {} for model in models}
    shown: dict[str, list[torch.Tensor]] = {"image": [], "ground truth": []}
    for index in range(min(count, len(reader))):
        sample = reader.load(index)
        size = (sample.image.height, sample.image.width)
        depth = torch.from_numpy(sample.depth)
        valid = evaluation_mask(sample.depth, sample.real, SYNTHETIC)
        truth = torch.where(valid, depth_to_disparity(depth), 0.0)
        maps = {}
        for model in models:
            disparity = model.predict(model.prepare(sample.image)[None]).float()
            maps[model.name] = F.interpolate(disparity, size=size, mode="bilinear", align_corners=False)
        # Against the teacher, the trainer's validation metric: where the teacher sees finite depth.
        reference = depth_valid_mask_from_disparity(maps[teacher.name]) & valid.view(1, 1, *size)
        for model in models:
            disparity, found = maps[model.name], sums[model.name]
            row = depth_scores(disparity, depth, valid, SYNTHETIC, PROTOCOL)[0]
            found.setdefault("gt_abs_rel", []).append(float(row[METRIC_NAMES.index("abs_rel")]))
            found.setdefault("gt_delta1", []).append(float(row[METRIC_NAMES.index("delta1")]))
            if model is not teacher:
                versus = depth_metrics(disparity_to_depth(disparity), disparity_to_depth(maps[teacher.name]),
                                       reference, align="scale_shift")
                found.setdefault("teacher_abs_rel", []).append(float(versus["abs_rel"][0]))
                found.setdefault("teacher_delta1", []).append(float(versus["delta1"][0]))
            if index < picture_rows:
                shown.setdefault(model.name, []).append(_align(disparity[0, 0], truth, valid))
        if index < picture_rows:
            shown["image"].append(torch.from_numpy(np.asarray(sample.image).copy()).permute(2, 0, 1).float() / 255)
            shown["ground truth"].append(truth)
    results = {name: {key: float(np.nanmean(values)) for key, values in found.items()} for name, found in sums.items()}
    return results, shown


# What --tiny requires of the distilled student: a lead of at least this much over the student
# before training and over the negative control, on the test world. Each sits halfway between the
# smallest lead of correct code and the largest with the flip of the cached maps broken (the leads
# measured are in tests/test_quality.py). delta1 against the teacher tells content from layout.
MIN_LEAD = {"gt_abs_rel": 0.007, "teacher_delta1": 0.009}


def lead(metric: str, student: float, other: float) -> float:
    """How much better `student` is than `other` on `metric` (AbsRel falls, delta1 rises)."""
    return other - student if "abs_rel" in metric else student - other


def distillation_failures(results: dict[str, dict[str, float]]) -> list[str]:
    """--tiny's verdict: each way the distilled student fails to lead the student before training
    and the control by MIN_LEAD (none: distillation is wired right)."""
    distilled = results[TINY_DISTILLED.name]
    failures = []
    for other in (TINY_ROWS[0].name, TINY_CONTROL.name):
        for metric, needed in MIN_LEAD.items():
            found = lead(metric, distilled[metric], results[other][metric])
            if not found >= needed:
                failures.append(f"{metric}: the distilled student's {distilled[metric]:.3f} leads "
                                f"'{other}' ({results[other][metric]:.3f}) by {found:.3f}, less than {needed}")
    return failures


def share_of_gain(prior: float, teacher: float, student: float) -> float:
    """(prior - student) / (prior - teacher): 1 keeps all of the teacher's gain, 0 none of it."""
    gain = prior - teacher
    return (prior - student) / gain if gain else math.nan


# --- the report -------------------------------------------------------------------------------

def format_report(results: dict, rows: list[str], headline: Optional[dict], settings: dict) -> str:
    lines = ["| model | AbsRel ↓ | δ1 ↑ | AbsRel vs teacher ↓ | δ1 vs teacher ↑ |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name in rows:
        r = results[name]
        versus = (f"{r['teacher_abs_rel']:.3f} | {r['teacher_delta1']:.3f}" if "teacher_abs_rel" in r else "– | –")
        lines.append(f"| {name} | {r['gt_abs_rel']:.3f} | {r['gt_delta1']:.3f} | {versus} |")
    if headline:
        lines += ["", f"Share of the teacher's gain over the layout prior that the default student keeps: "
                      f"**{headline['abs_rel']:.0%} in AbsRel, {headline['delta1']:.0%} in δ1**."]
    lines += ["", f"Test world: {settings['test_images']} scenes at {settings['render_size']} px; "
                  f"{PROTOCOL.definition} ({PROTOCOL.source}). Students: {settings['steps']} steps of "
                  f"{settings['batch_size']} at {settings['student_size']} px on {settings['train_images']} "
                  f"train scenes."]
    return "\n".join(lines)


def write_outputs(out: Path, report: dict, table: str, picture: torch.Tensor) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.md").write_text(table + "\n")
    (out / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
    Image.fromarray((picture.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()).save(out / "quality.png")


def run(args: argparse.Namespace) -> dict:
    scale = TINY if args.tiny else FULL
    if args.steps:
        scale = Scale(**{**asdict(scale), "steps": args.steps})
    teacher_dir = Path(args.teacher).resolve()
    if not (teacher_dir / "config.json").is_file():
        raise RunError(f"--teacher {args.teacher}: no Depth Anything folder (config.json + model.safetensors) there")
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        worlds = render_worlds(work, scale)
    except WorldError as error:
        raise RunError(str(error)) from None
    rows = list(TINY_ROWS if args.tiny else HEADLINE_ROWS) + (list(ABLATION_ROWS) if args.ablations else [])
    if not torch.cuda.is_available():
        for row in [row for row in rows if row.needs_gpu]:
            print(f"left out '{row.name}': it needs a GPU ({row.note})", flush=True)
            rows.remove(row)
    students, caches, trainings, code = {}, {}, [], training_code()
    for row in rows:
        slug = "".join(c if c.isalnum() else "_" for c in row.name.lower()).strip("_")
        prepared = prepare_student(row, slug, work, worlds, scale, teacher_dir, caches, args.seed, code)
        if isinstance(prepared, Training):
            trainings.append(prepared)
        students[row.name] = prepared.student if isinstance(prepared, Training) else prepared
    train_students(trainings, scale.jobs, scale.threads)
    device = torch.device("cpu")
    teacher = load_benchmark_model(f"teacher:{teacher_dir}", device, Recipe.size)
    teacher.name = "teacher"
    prior = layout_prior(np.load(path) for path in sorted((worlds["train"] / "depth").glob("*.npy")))
    blind = [_blind("constant map", lambda: torch.ones_like(prior), "1 everywhere"),
             _blind("layout prior", lambda: prior, "mean train-world disparity per pixel")]
    student_models = []
    for name, folder in students.items():
        model = load_benchmark_model(str(folder), device)
        model.name = name
        student_models.append(model)
    results, shown = score([*blind, teacher, *student_models], teacher, worlds["test"], scale.test_images)
    order = ["constant map", "layout prior", "teacher", *students]
    headline, failures = None, []
    student = TINY_DISTILLED if args.tiny else DEFAULT
    if args.tiny:
        failures = distillation_failures(results)
    else:
        headline = {metric: share_of_gain(results["layout prior"][f"gt_{metric}"],
                                          results["teacher"][f"gt_{metric}"],
                                          results[DEFAULT.name][f"gt_{metric}"]) for metric in ("abs_rel", "delta1")}
    shown_teacher = teacher_dir.relative_to(REPO) if teacher_dir.is_relative_to(REPO) else teacher_dir
    settings = {**asdict(scale), "teacher": str(shown_teacher), "preset": str(PRESET.relative_to(REPO)),
                "world_seed": WORLD_SEED, "seed": args.seed, "seconds": round(time.perf_counter() - started)}
    table = format_report(results, order, headline, settings)
    report = {"settings": settings, "rows": {row.name: {"targets": row.targets, "overrides": list(row.overrides),
                                                        "note": row.note} for row in rows},
              "results": results, "headline": headline}
    if args.tiny:
        report["check"] = {"min_lead": MIN_LEAD, "failures": failures}
    picture = depth_comparison_picture(shown["image"], {"ground truth": shown["ground truth"],
                                                        "teacher": shown["teacher"],
                                                        "student": shown[student.name]})
    write_outputs(Path(args.out), report, table, picture)
    print(table, flush=True)
    print(f"wrote {Path(args.out) / 'quality.md'}, quality.json and quality.png in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    if args.tiny:
        print("distillation check: " + ("passed" if not failures else "FAILED"), flush=True)
    return report


def main(argv: Optional[list[str]] = None) -> int:
    parser = ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true",
                        help="is distillation wired right? a student and a flipped-teacher control on small "
                             "scenes (about 65 s; exit 2 when the student does not lead)")
    parser.add_argument("--ablations", action="store_true", help="add one row per change from the default recipe")
    parser.add_argument("--teacher", default=str(SHIPPED_TEACHER), help="the teacher folder (default: %(default)s)")
    parser.add_argument("--out", help="where quality.md/.json/.png go (default: bench/; with --tiny, the work folder)")
    parser.add_argument("--work", help="worlds, caches and training runs (default: runs/quality[_tiny])")
    parser.add_argument("--steps", type=int, help="optimizer steps of each student (default: the mode's)")
    parser.add_argument("--seed", type=int, default=SEED,
                        help="the students' seed: weights, data order, validation split (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps {args.steps} must be at least 1")
    args.work = args.work or str(REPO / "runs" / ("quality_tiny" if args.tiny else "quality"))
    args.out = args.out or (args.work if args.tiny else str(REPO / "bench"))
    try:
        report = run(args)
    except RunError as error:  # every loading error is a RunError
        print_error(str(error))
        return 1
    for failure in report.get("check", {}).get("failures", []):
        print_error(f"distillation check: {failure}")
    return 2 if report.get("check", {}).get("failures") else 0


if __name__ == "__main__":
    sys.exit(main())
