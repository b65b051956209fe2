"""One training run, top to bottom: build data, models, loss and optimizer, hand what trains to
Accelerate, run the loop (train_step / evaluate / save), export at the end.

`trainer/main.py` calls `run` once the configuration has been read and checked: everything here
(torch, the models, Accelerate) loads only for a configuration that holds.
"""

from __future__ import annotations

import math
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.logging import get_logger
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, set_seed
from tqdm.contrib.logging import logging_redirect_tqdm

from core.errors import RunError
from data import describe_ignored
from modeling import StudentLoadError, load_student
from modeling.summary import count as count_parameters
from trainer.config import Config, flat_hparams, to_yaml
from trainer.console import EXIT_EXPORT, EXIT_OK, EXIT_SAVE_FAILED, plural, say, shown_path
from trainer.processes import check_world_size
from trainer.ship.export import ExportError, export_student
from trainer.train.checkpoint import all_finite, load_training_state, resume_candidates
from trainer.train.distill import build_module, build_optimizer, build_scheduler, build_student, build_teacher
from trainer.train.inputs import Photos, Targets, build_datasets, build_loaders, batch_finisher, select_photos
from trainer.train.loop import DistillationStep, Progress, Trainer, remap_epoch_position
from trainer.train.run_dir import ONNX_FILE, check_run_dir, prepare_run_dir

logger = get_logger(__name__)


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
