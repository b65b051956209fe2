"""Distil a frozen Depth Anything V2 teacher into a phone-sized student, then ship it as ONNX.

    ./launch.sh --config trainer/configs/demo.yaml [section.key=value ...] [--overwrite] [--verbose]
    accelerate launch trainer/main.py --config FILE --resume latest     # continue a run, as saved

Read top to bottom: parse and check the configuration, build data, models, loss and optimizer,
hand what trains to Accelerate, run the loop (train_step / evaluate / save), export at the end.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # `accelerate launch trainer/main.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.logging import get_logger
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, set_seed
from tqdm.contrib.logging import logging_redirect_tqdm

from data import StaleCacheError, describe_ignored
from modeling import StudentLoadError, TeacherLoadError, load_student
from modeling.summary import count as count_parameters
from trainer.config import Config, ConfigError, flat_hparams, load_config, resume_config, to_yaml
from trainer.console import (ArgumentParser, launched_rank, plural, print_error, record_exit_code,
                             register_with_launcher, say, setup_logging, shown_path)
from trainer.errors import AgreedRunError, RunError
from trainer.processes import check_world_size, die_with_launcher
from trainer.ship.export import ExportError, export_student
from trainer.train.checkpoint import STATES_DIR, CheckpointError, all_finite, load_training_state, resume_candidates
from trainer.train.distill import build_module, build_optimizer, build_scheduler, build_student, build_teacher
from trainer.train.inputs import Photos, Targets, build_datasets, build_loaders, batch_finisher, select_photos
from trainer.train.loop import (EXIT_EXPORT, EXIT_OK, EXIT_SAVE_FAILED, EXIT_SETUP, DistillationStep, Progress,
                                Trainer, remap_epoch_position)
from trainer.train.run_dir import CONFIG_FILE, ONNX_FILE, RUN_MARKER, check_run_dir, holds_run, prepare_run_dir

logger = get_logger(__name__)

EXIT_INTERRUPTED_EARLY = 130  # Ctrl-C or SIGTERM before training started: nothing to save


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = ArgumentParser(prog="trainer/main.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML preset, e.g. trainer/configs/demo.yaml (a resumed run uses its saved "
                                         "config.yaml; --config then only locates the run)")
    parser.add_argument("--resume", help="'latest', a run folder (runs/NAME) or a training-state folder "
                                         "(runs/NAME/checkpoints/step_XXXXXXXX)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an output_dir holding a run (deletes only that run's own outputs)")
    parser.add_argument("--verbose", action="store_true", help="also show the libraries' info messages")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.lr=3e-4")
    # Intermixed: `--config X run_name=a --overwrite data.train_dir=b` reads as a user means it.
    return parser.parse_intermixed_args(argv)


def locate_resumed_run(resume: str, given: Optional[Config]) -> tuple[Path, str]:
    """-> (run folder, what to load: 'latest' or a state folder) for `--resume`."""
    if resume == "latest":
        if given is None:
            raise ConfigError("--resume latest needs --config (to find the run), or pass the run folder: "
                              "--resume runs/<run_name>")
        return given.run_dir, "latest"
    path = Path(resume)
    if holds_run(path):
        return path, "latest"
    if path.parent.name == STATES_DIR and holds_run(path.parent.parent):
        return path.parent.parent, resume
    raise CheckpointError(f"--resume {resume}: neither 'latest', a run folder (holding {RUN_MARKER}) nor a "
                          f"training-state folder of one (runs/<run_name>/{STATES_DIR}/step_XXXXXXXX)")


def resolve_config(args: argparse.Namespace) -> tuple[Config, Optional[str], list[str]]:
    """-> (configuration, what to resume from or None, messages for the user).

    A new run reads --config and the overrides. A resumed run is the run that was saved: its own
    config.yaml, plus only those overrides that do not change what it trains (`RESUMABLE_KEYS`)."""
    given = load_config(args.config, args.overrides) if args.config else None
    if not args.resume:
        if given is None:
            raise ConfigError("--config FILE is required to start a run, e.g. --config trainer/configs/demo.yaml")
        return given, None, []
    run_dir, resume = locate_resumed_run(args.resume, given)
    check_run_dir(run_dir, args.resume, overwrite=False)  # a folder holding no run is refused here
    cfg, changes, ignored = resume_config(run_dir / CONFIG_FILE, args.overrides, given)
    cfg.output_dir = str(run_dir)  # the run is where it was found, even if its folder was moved
    messages = [f"resuming with the run's saved configuration {run_dir / CONFIG_FILE}"]
    messages += [f"changed on resume: {change}" for change in changes]
    if ignored:
        messages.append(f"ignored: --config {args.config} differs from the saved run in {', '.join(ignored)} "
                        f"(a resumed run keeps its configuration; pass an override to change an allowed key)")
    return cfg, resume, messages


def export_final(accelerator: Accelerator, cfg: Config, student) -> int:
    """The main process exports the best student (the last one if there was no evaluation); the
    others wait for it at the end of the run."""
    if not accelerator.is_main_process:
        return EXIT_OK
    best = cfg.run_dir / "student_best"
    source = best if best.is_dir() else cfg.run_dir / "student_last"
    if not source.is_dir() and not all_finite(student):
        logger.error("no finite student to export (student_best/student_last were refused); nothing exported")
        return EXIT_EXPORT
    try:
        model = load_student(source) if source.is_dir() else student
        report = export_student(model, cfg.run_dir / ONNX_FILE, cfg.data.student_size,
                                cfg.export.opset, atol=cfg.export.atol)
    except (ExportError, StudentLoadError) as error:
        logger.error(f"{error}; the safetensors checkpoints are intact")
        return EXIT_EXPORT
    logger.info(f"exported {source.name} to {cfg.run_dir / ONNX_FILE}: max |onnx - torch| = "
                f"{report['max_abs_diff_vs_pytorch']:.2e}, sizes accepted: {report['accepted_sizes']}")
    return EXIT_OK


def log_hparams(accelerator: Accelerator, cfg: Config, labeled: bool) -> None:
    """The configuration as TensorBoard HParams, in the run's own event file (Accelerate's
    `init_trackers(config=...)` writes a second run folder named by a timestamp), with the metrics
    the HParams table and parallel-coordinates views compare runs by."""
    from torch.utils.tensorboard.summary import hparams

    if not accelerator.is_main_process:
        return
    metrics = [f"best/{cfg.eval.best_metric}", "val_teacher/abs_rel", "val_teacher/delta1", "train/loss",
               "train/images_per_s"] + (["val_gt/abs_rel", "val_gt/delta1"] if labeled else [])
    writer = accelerator.get_tracker("tensorboard", unwrap=True)
    for summary in hparams(flat_hparams(cfg), {name: 0.0 for name in metrics}):
        writer.file_writer.add_summary(summary)


def start_summary(cfg: Config, accelerator: Accelerator, photos: Photos, teacher, student, targets: Targets,
                  photos_per_step: int, total_steps: int, resumed_from: Optional[Path]) -> str:
    d = cfg.data
    split = f"from {d.val_dir}" if d.val_dir else f"({d.val_fraction:.0%} of them, seed {cfg.seed})"
    lines = [
        f"run '{cfg.run_name}' -> {shown_path(cfg.run_dir)}"
        + (f" (resumed from {resumed_from.name})" if resumed_from else " (new run)"),
        f"  photos: {len(photos.train)} for training from {photos.source}, {len(photos.val)} for validation "
        + (photos.val_source or split),
        f"  teacher: {cfg.teacher.name} ({count_parameters(teacher) / 1e6:.2f} M parameters) at {d.teacher_size} px; "
        f"targets: {targets.value}" + (f" ({cfg.distill.teacher_cache})" if cfg.distill.teacher_cache else ""),
        f"  student: {cfg.student.backbone} + {cfg.student.decoder} decoder "
        f"({count_parameters(student) / 1e6:.2f} M parameters) at {d.student_size} px",
        f"  {plural(accelerator.num_processes, 'process', 'es')} on {accelerator.device.type}, mixed precision "
        f"{accelerator.mixed_precision}, {photos_per_step} photos per step, {total_steps} steps",
    ]
    if photos.ignored:
        lines.insert(2, f"  ignored (not a photo format this trainer reads): {describe_ignored(photos.ignored)}")
    return "\n".join(lines)


def end_summary(cfg: Config, trainer: "Trainer", wall_seconds: float, code: int) -> str:
    p = trainer.progress
    rate = trainer.photos_trained / trainer.train_seconds if trainer.train_seconds > 0 else float("nan")
    lines = [f"{'done' if code == EXIT_OK else f'ended with exit code {code}'} after {wall_seconds:.1f} s: "
             f"step {p.step} of {trainer.total_steps}, {trainer.photos_trained} photos trained at "
             f"{rate:.1f} photos/s (training time only)"]
    if p.best_step >= 0:
        lines.append(f"  best {cfg.eval.best_metric} {p.best_value:.4f} at step {p.best_step} -> "
                     f"{cfg.run_dir / 'student_best'}")
    outputs = [cfg.run_dir / name for name in ("student_last", ONNX_FILE) if (cfg.run_dir / name).exists()]
    outputs.append(cfg.run_dir / "tensorboard")
    lines.append(f"  outputs: {', '.join(map(str, outputs))}")
    return "\n".join(lines)


def join_processes(cfg: Config) -> Accelerator:
    """The Accelerator, which joins this process to its peers (if any) within
    `train.process_group_timeout_s`: a peer that died during set-up, on this node or another,
    ends the wait with a message instead of a silent hang."""
    try:
        return Accelerator(
            mixed_precision=cfg.train.mixed_precision, log_with="tensorboard",
            gradient_accumulation_steps=cfg.optim.grad_accum_steps,
            project_config=ProjectConfiguration(project_dir=str(cfg.run_dir), logging_dir=str(cfg.run_dir)),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
            # The loop steps the scheduler itself, once per optimizer step (skipped ones included).
            step_scheduler_with_optimizer=False,
            kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.process_group_timeout_s))])
    except (RuntimeError, ValueError) as error:  # torch's DistStoreError / timeouts derive from RuntimeError
        if "timed out" not in str(error).lower() and "timeout" not in str(error).lower():
            raise
        raise RunError(f"the other processes did not join within train.process_group_timeout_s="
                       f"{cfg.train.process_group_timeout_s} s: one failed during set-up (see its node's output) "
                       f"or cannot be reached (MAIN_PROCESS_IP, port, firewall)") from None


def run(cfg: Config, resume: Optional[str], overwrite: bool, messages: list[str]) -> int:
    started = time.perf_counter()
    check_run_dir(cfg.run_dir, resume, overwrite)
    states = resume_candidates(cfg.run_dir, resume) if resume else []  # a missing state is said now
    photos = select_photos(cfg)
    targets = Targets.of(cfg)
    teacher = build_teacher(cfg)
    train, val, labeled = build_datasets(cfg, teacher, targets, photos)
    accelerator = join_processes(cfg)
    check_world_size(accelerator)
    set_seed(cfg.seed)
    if cfg.train.deterministic:
        # warn_only: some CUDA kernels (bilinear upsampling's backward) have no deterministic
        # version; they warn instead of stopping the run. cuBLAS needs a fixed workspace.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    accelerator.wait_for_everyone()  # every process has checked the folder before it changes
    for message in messages:
        say(message)
    prepare_run_dir(accelerator, cfg.run_dir, to_yaml(cfg), resume, overwrite)

    teacher.place(accelerator.device, accelerator.mixed_precision)
    student = build_student(cfg)
    if cfg.train.channels_last:
        student.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        student.compile()
    module = build_module(cfg, student, teacher, with_features=targets.has_features)
    optimizer = build_optimizer(cfg, module)
    train_loader, val_loader, labeled_loader = build_loaders(cfg, accelerator, train, val, labeled)
    progress = Progress()
    scheduler = build_scheduler(cfg, optimizer, progress.schedule_position)
    module, optimizer, scheduler, train_loader = accelerator.prepare(module, optimizer, scheduler, train_loader)
    val_loader, labeled_loader = (accelerator.prepare(x) if x is not None else None
                                  for x in (val_loader, labeled_loader))
    accelerator.register_for_checkpointing(progress)
    state = None
    if resume:
        state = load_training_state(accelerator, states)
    remap_epoch_position(progress, accelerator.num_processes * cfg.train.batch_size)
    photos_per_step = cfg.train.batch_size * accelerator.num_processes * cfg.optim.grad_accum_steps
    progress.plan(cfg, photos_per_step, max(1, math.ceil(len(train_loader) / cfg.optim.grad_accum_steps)))
    say(start_summary(cfg, accelerator, photos, teacher, student, targets, photos_per_step,
                      progress.last_step(photos_per_step), state))
    if state is not None:
        say(f"resumed from {state} at step {progress.step} (epoch {progress.epoch}, batch "
            f"{progress.batches_in_epoch})")
    accelerator.init_trackers("tensorboard")
    if not resume:
        log_hparams(accelerator, cfg, labeled is not None)
    step = DistillationStep(cfg, accelerator, module, teacher, targets, optimizer, scheduler, progress,
                            photos_per_step, finish_batch=batch_finisher(train, accelerator.device))
    trainer = Trainer(cfg, step, train_loader, val_loader, labeled_loader)
    with logging_redirect_tqdm():
        code = trainer.fit()
        trainer.close_window()
        trainer.report_unreadable()
        if code == EXIT_OK and not trainer.stop_agreed:
            trainer.run_evaluation()
            if not trainer.save_final():
                code = EXIT_SAVE_FAILED
            elif cfg.export.enabled:
                code = export_final(accelerator, cfg, trainer.student)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if not trainer.stop_agreed:
        say(end_summary(cfg, trainer, time.perf_counter() - started, code))
    return code


# Mistakes a user can make and fix: each is reported as one line, never as a traceback.
USER_ERRORS = (ConfigError, RunError, TeacherLoadError, StudentLoadError, CheckpointError, StaleCacheError)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    # Until the loop takes SIGTERM over (a flag, then a saved state), it ends set-up like Ctrl-C:
    # one line and a recorded exit code, not a silent death the launcher would report at length.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    register_with_launcher()
    die_with_launcher()
    try:
        cfg, resume, messages = resolve_config(args)
        code = run(cfg, resume, args.overwrite, messages)
    except USER_ERRORS as error:
        print_error(str(error), agreed=isinstance(error, AgreedRunError))
        code = EXIT_SETUP
    except KeyboardInterrupt:  # Ctrl-C / SIGTERM before the loop took the signals over: nothing to save yet
        if launched_rank() == 0:
            print("interrupted before training started; nothing was saved", file=sys.stderr)
        code = EXIT_INTERRUPTED_EARLY
    record_exit_code(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
