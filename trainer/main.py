"""Distil a frozen Depth Anything V2 teacher into a phone-sized student, then ship it as ONNX.

    accelerate launch trainer/main.py --config trainer/configs/demo.yaml [section.key=value ...]
    accelerate launch trainer/main.py --config FILE --resume latest     # continue a run

Read top to bottom: parse and check the configuration, build data, models, loss and optimizer,
hand what trains to Accelerate, run the loop (train_step / evaluate / save), export at the end.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # `accelerate launch trainer/main.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from data import (CachedTeacherDataset, EvalTransform, LabeledDepthDataset, StaleCacheError, TrainTransform,
                  UnlabeledImageDataset, train_val_paths)
from modeling import StudentDepthModel, StudentLoadError, TeacherLoadError
from trainer.cache_teacher import open_cache
from trainer.checkpoint import (CheckpointError, all_finite, all_processes_agree, load_training_state,
                                resume_candidates, save_student, save_training_state)
from trainer.config import Config, ConfigError, flat_hparams, load_config, to_yaml
from trainer.distill import build_module, build_optimizer, build_scheduler, build_student, build_teacher
from trainer.evaluate import evaluate, format_table
from trainer.export import ExportError, export_student
from trainer.faults import Fault
from trainer.metrics import LOWER_IS_BETTER
from trainer.visualize import comparison_grid

logger = get_logger(__name__)

EXIT_OK, EXIT_SETUP, EXIT_NONFINITE, EXIT_EXPORT = 0, 1, 2, 3


class EpochSeededDataset(Dataset):
    """Makes each sample's augmentation a function of (seed, epoch, index) alone.

    Worker RNGs are otherwise seeded from the main process's RNG when an epoch's iterator starts,
    so a run resumed mid-epoch would draw different crops than the run it continues.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_003 + index) % 2**63)
            return self.dataset[index]


@dataclass
class Progress:
    """Counters saved with every training state (through `register_for_checkpointing`)."""

    step: int = 0  # optimizer steps taken (skipped ones included)
    epoch: int = 0
    batches_in_epoch: int = 0  # batches of `epoch` already consumed, for a mid-epoch resume
    bad_images: int = 0  # unreadable photos met so far (all processes)
    nonfinite_steps: int = 0
    nonfinite_in_a_row: int = 0
    best_value: float = math.nan
    global_batch: int = 0  # photos per step over all processes when saved (to map a mid-epoch position)

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


class StopRequested:
    """SIGINT / SIGTERM (Ctrl-C, a cluster's pre-emption) only set a flag; the loop saves a
    resumable state at the next step boundary, on every process together."""

    def __init__(self):
        self.flag = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.flag = True


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="trainer/main.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML preset, e.g. trainer/configs/demo.yaml")
    parser.add_argument("--resume", help="'latest' or a training-state folder (checkpoints/step_XXXXXXXX)")
    parser.add_argument("--overwrite", action="store_true", help="start over in an output_dir holding a run")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.lr=3e-4")
    return parser.parse_args(argv)


def check_run_dir(run_dir: Path, resume: Optional[str], overwrite: bool) -> None:
    """Refuse to mix two runs in one folder; runs on every process before any model is built."""
    holds_run = (run_dir / "config.yaml").is_file()
    if resume and not holds_run and not Path(resume).is_dir():
        raise ConfigError(f"--resume {resume}: {run_dir} holds no run to resume")
    if holds_run and not resume and not overwrite:
        raise ConfigError(f"output_dir {run_dir} already holds a run; pass --resume latest to continue it "
                          f"or --overwrite to start over (or choose another run_name)")


def uses_live_teacher_features(cfg: Config) -> bool:
    """With a teacher cache, feature/attention terms still need the live teacher, unless
    `distill.cache_features=drop` drops them."""
    w = cfg.distill.weights
    dropped = cfg.distill.teacher_cache and cfg.distill.cache_features == "drop"
    return (w.feature > 0 or w.attention > 0) and not dropped


def select_photos(cfg: Config) -> tuple[list[Path], list[Path]]:
    """Training and validation photos; runs before any model is built, so a missing or empty
    folder is reported at once. Errors name the config key to fix."""
    d = cfg.data
    for key, folder in (("data.train_dir", d.train_dir), ("data.val_dir", d.val_dir),
                        ("data.labeled_dir", d.labeled_dir), ("distill.teacher_cache", cfg.distill.teacher_cache)):
        if folder is not None and not Path(folder).is_dir():
            raise ConfigError(f"{key}: folder '{folder}' does not exist")
    try:
        return train_val_paths(d.train_dir, d.val_dir, d.val_fraction, cfg.seed)
    except ValueError as error:  # an empty folder
        raise ConfigError(str(error)) from None


def build_datasets(cfg: Config, teacher, train_paths: list[Path], val_paths: list[Path]):
    """-> (train, validation or None, labeled or None)."""
    d = cfg.data
    augment = TrainTransform(d.teacher_size, d.student_size, scale=tuple(d.crop_scale),
                             ratio=tuple(d.crop_ratio), hflip_prob=d.hflip_prob, color_jitter=d.color_jitter)
    plain = EvalTransform(d.teacher_size, d.student_size)
    if cfg.distill.teacher_cache:
        cache = open_cache(cfg, teacher, train_paths)
        photos = CachedTeacherDataset(train_paths, augment, cache, with_teacher_image=uses_live_teacher_features(cfg))
    else:
        photos = UnlabeledImageDataset(train_paths, augment)
    train = EpochSeededDataset(photos, cfg.seed)
    val = UnlabeledImageDataset(val_paths, plain) if val_paths else None
    labeled = None
    if d.labeled_dir is not None:
        labeled = LabeledDepthDataset(d.labeled_dir, plain, min_depth=d.labeled_min_depth,
                                      max_depth=d.labeled_max_depth, depth_scale=d.labeled_depth_scale,
                                      crop=d.labeled_crop)
    return train, val, labeled


def train_step(module, teacher, batch: dict, accelerator: Accelerator, channels_last: bool,
               poison: bool = False):
    """Forward and backward of one micro-batch -> (loss, terms, number of readable images, outputs).

    Unreadable photos are dropped from the batch; a batch with none left still runs (with zero
    loss) so that every DDP process takes part in the gradient all-reduce."""
    valid = batch["valid"]
    n_valid = valid.sum()
    any_valid = bool(n_valid > 0)  # one host sync, reused below
    keep = valid if any_valid else torch.ones_like(valid)
    student_images = batch["student_image"][keep]
    if channels_last:
        student_images = student_images.contiguous(memory_format=torch.channels_last)
    teacher_disparity, teacher_features = batch.get("teacher_disparity"), None
    if teacher_disparity is not None:  # read from the teacher cache
        teacher_disparity = teacher_disparity[keep]
    if "teacher_image" in batch:  # the live teacher: depth unless cached, and features
        with torch.no_grad(), accelerator.autocast():
            teacher_out = teacher(batch["teacher_image"][keep], output_size=student_images.shape[-2:])
        teacher_features = teacher_out.features
        if teacher_disparity is None:
            teacher_disparity = teacher_out.disparity
    with accelerator.autocast():
        loss, terms, student_disparity = module(student_images, teacher_disparity, teacher_features)
    if not any_valid:
        loss = loss * 0.0
    if poison:  # fault injection (tests only)
        loss = loss * float("nan")
    accelerator.backward(loss)
    outputs = (student_images, teacher_disparity, student_disparity.detach())
    return loss.detach(), {k: v.detach() for k, v in terms.items()}, n_valid, outputs


class Trainer:
    """Holds what the loop needs between steps; each method does one thing of the loop."""

    def __init__(self, cfg: Config, accelerator: Accelerator, module, teacher, optimizer, scheduler,
                 train_loader, val_loader, labeled_loader, progress: Progress, total_steps: int):
        self.cfg, self.accelerator, self.module, self.teacher = cfg, accelerator, module, teacher
        self.optimizer, self.scheduler = optimizer, scheduler
        self.train_loader, self.val_loader, self.labeled_loader = train_loader, val_loader, labeled_loader
        self.progress, self.total_steps = progress, total_steps
        self.run_dir = cfg.run_dir
        self.stop = StopRequested()
        self.sums: dict[str, torch.Tensor] = {}  # detached running sums, reduced at log time
        self.steps_since_log, self.images_since_log, self.time_of_log = 0, 0, time.perf_counter()
        self.last_eval_step = -1
        self.fault = Fault.from_env()
        self.stop_agreed = False
        self.float_buffers = [b for b in module.buffers() if b.is_floating_point()]

    @property
    def student(self):
        return self.accelerator.unwrap_model(self.module).student

    def optimizer_step(self, loss: torch.Tensor, n_valid: torch.Tensor, n_images: int) -> Optional[float]:
        """At a gradient-sync boundary: decide on every process together whether the step is
        safe, then clip and step. Returns the grad norm, or None if the step was skipped.

        This is the loop's one per-step synchronisation: four numbers in one all-reduce."""
        device = loss.device
        # BatchNorm statistics were updated by the forward already: a NaN there is not undone by a skip.
        buffers_bad = torch.zeros((), dtype=torch.bool, device=device)
        if self.float_buffers:
            buffers_bad = ~torch.stack([torch.isfinite(b).all() for b in self.float_buffers]).all().to(device)
        flags = torch.stack([n_valid.float().to(device), torch.tensor(float(n_images), device=device),
                             (~torch.isfinite(loss) | buffers_bad).float(),
                             torch.tensor(float(self.stop.flag), device=device)])
        n_valid_all, n_images_all, nonfinite_ranks, stop_ranks = self.accelerator.reduce(flags, "sum").tolist()
        self.stop_agreed = stop_ranks > 0  # one process interrupted -> all stop at the same step
        self.progress.bad_images += int(n_images_all - n_valid_all)
        grad_norm = None
        if n_valid_all > 0 and nonfinite_ranks == 0:
            clip = self.cfg.optim.grad_clip or float("inf")
            grad_norm = float(self.accelerator.clip_grad_norm_(self.module.parameters(), clip))
            # Under fp16 an infinite norm is the grad scaler's business: it skips and backs off.
            if not math.isfinite(grad_norm) and self.accelerator.mixed_precision != "fp16":
                nonfinite_ranks, grad_norm = 1, None
            else:
                self.optimizer.step()
        if nonfinite_ranks:
            self.progress.nonfinite_steps += 1
            self.progress.nonfinite_in_a_row += 1
            logger.warning(f"step {self.progress.step}: non-finite loss, gradients or BatchNorm statistics, "
                           f"step skipped ({self.progress.nonfinite_in_a_row} in a row)")
        else:
            self.progress.nonfinite_in_a_row = 0
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def log_scalars(self, grad_norm: Optional[float]) -> dict[str, float]:
        names = sorted(self.sums)
        means = self.accelerator.reduce(torch.stack([self.sums[n] for n in names]), "mean")
        count = max(1, self.steps_since_log)
        values = {f"train/{n}": v / count for n, v in zip(names, means.tolist())}
        elapsed = time.perf_counter() - self.time_of_log
        values["train/images_per_s"] = self.images_since_log * self.accelerator.num_processes / max(elapsed, 1e-9)
        for group in self.optimizer.param_groups:
            if not group["name"].endswith("_no_decay"):  # same lr as its decayed twin
                values[f"lr/{group['name']}"] = group["lr"]
        if grad_norm is not None:
            values["train/grad_norm"] = grad_norm
        values["train/bad_images"] = self.progress.bad_images
        values["train/nonfinite_steps"] = self.progress.nonfinite_steps
        self.accelerator.log(values, step=self.progress.step)
        self.sums, self.steps_since_log, self.images_since_log = {}, 0, 0
        self.time_of_log = time.perf_counter()
        return values

    def log_images(self, outputs) -> None:
        if not self.accelerator.is_main_process:
            return
        images, teacher_disparity, student_disparity = (t[: self.cfg.log.num_images] for t in outputs)
        grid = comparison_grid(images, teacher_disparity, student_disparity)
        tracker = self.accelerator.get_tracker("tensorboard", unwrap=True)
        tracker.add_image("samples/input_teacher_student_error", grid, global_step=self.progress.step)

    def run_evaluation(self) -> None:
        if self.progress.step == self.last_eval_step:
            return
        self.last_eval_step = self.progress.step
        results = {}
        if self.val_loader is not None:
            results["val_teacher"] = evaluate(self.accelerator, self.student, self.val_loader, self.teacher,
                                              align=self.cfg.eval.align)
        if self.labeled_loader is not None:
            results["val_gt"] = evaluate(self.accelerator, self.student, self.labeled_loader, align=self.cfg.eval.align,
                                         labeled=True, max_depth=self.cfg.data.labeled_max_depth)
        for prefix, metrics in results.items():
            self.accelerator.log({f"{prefix}/{k}": v for k, v in metrics.items()}, step=self.progress.step)
            self.accelerator.print(format_table(metrics, f"step {self.progress.step} {prefix}"))
        if not results:
            return
        main_set = results.get("val_gt", results.get("val_teacher"))
        metric = self.cfg.eval.best_metric
        value, best = main_set[metric], self.progress.best_value
        improved = math.isnan(best) or (value < best if LOWER_IS_BETTER[metric] else value > best)
        if improved and math.isfinite(value):
            self.progress.best_value = value
            if self.accelerator.is_main_process:
                save_student(self.student, self.run_dir / "student_best")
        self.accelerator.wait_for_everyone()

    def save_state(self) -> None:
        if not all_processes_agree(self.accelerator, all_finite(self.module)):  # all skip, or none
            logger.error(f"step {self.progress.step}: weights are not finite; training state not saved")
            return
        path = save_training_state(self.accelerator, self.run_dir, self.progress.step, self.cfg.train.keep_last)
        if path is not None:
            logger.info(f"saved training state {path}")

    def fit(self) -> int:
        cfg, acc, progress = self.cfg, self.accelerator, self.progress
        bar = tqdm(total=self.total_steps, initial=progress.step, desc="distill", dynamic_ncols=True,
                   disable=not acc.is_local_main_process)
        self.module.train()
        accum = cfg.optim.grad_accum_steps
        while progress.step < self.total_steps:
            self.train_loader.dataset.epoch = progress.epoch
            self.train_loader.set_epoch(progress.epoch)
            loader = self.train_loader
            if progress.batches_in_epoch:
                loader = acc.skip_first_batches(self.train_loader, progress.batches_in_epoch)
            loss_sum, valid_sum, n_images, term_sums = 0.0, 0, 0, {}
            for batch in loader:
                progress.batches_in_epoch += 1
                with acc.accumulate(self.module):
                    poison = self.fault is not None and self.fault.poison_loss(progress.step, acc.process_index)
                    loss, terms, n_valid, outputs = train_step(self.module, self.teacher, batch, acc,
                                                               cfg.train.channels_last, poison)
                    loss_sum, valid_sum = loss_sum + loss / accum, valid_sum + n_valid
                    for name, value in terms.items():
                        term_sums[name] = term_sums.get(name, 0.0) + value.float() / accum
                    n_images += len(batch["valid"])
                    if not acc.sync_gradients:
                        continue
                    grad_norm = self.optimizer_step(loss_sum, valid_sum, n_images)
                progress.step += 1
                self.steps_since_log += 1
                self.images_since_log += n_images
                for name, value in {"loss": loss_sum, **term_sums}.items():
                    self.sums[name] = self.sums.get(name, 0.0) + value
                loss_sum, valid_sum, n_images, term_sums = 0.0, 0, 0, {}
                if progress.nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
                    acc.print(f"error: {progress.nonfinite_in_a_row} steps in a row had a non-finite loss, gradients "
                              f"or BatchNorm statistics; stopping (last good training state kept; lower optim.lr?)")
                    return EXIT_NONFINITE
                if progress.step % cfg.log.log_every == 0:
                    values = self.log_scalars(grad_norm)
                    bar.set_postfix(loss=f"{values['train/loss']:.4f}",
                                    img_s=f"{values['train/images_per_s']:.1f}")
                if progress.step % cfg.log.image_every == 0:
                    self.log_images(outputs)
                if cfg.eval.every and progress.step % cfg.eval.every == 0:
                    self.run_evaluation()
                if progress.step % cfg.train.save_every == 0 or self.stop_agreed:
                    self.save_state()
                bar.update(1)
                if self.stop_agreed:
                    acc.print(f"interrupted: resumable state saved at step {progress.step}; "
                              f"continue with --resume latest")
                    return EXIT_OK
                if self.fault is not None:
                    self.fault.after_step(progress.step, acc.process_index)
                if progress.step >= self.total_steps:
                    break
            else:  # the epoch ran to its end
                progress.epoch += 1
                progress.batches_in_epoch = 0
                self.run_evaluation()
                continue
            break
        bar.close()
        return EXIT_OK


def check_world_size(accelerator: Accelerator) -> None:
    """`accelerate launch --multi_gpu --num_processes 2` on a machine without GPUs starts two
    processes that each believe they are alone unless ACCELERATE_USE_CPU=true: they would train
    two separate models and overwrite each other's files."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise ConfigError(f"the launcher started {launched} processes but Accelerate sees "
                          f"{accelerator.num_processes}; on a CPU-only machine set ACCELERATE_USE_CPU=true "
                          f"(or use accelerate_configs/cpu_2proc.yaml through launch.sh)")


def _ignore_interrupts(worker_id: int) -> None:
    # Ctrl-C and a scheduler's SIGTERM reach the whole process group: workers must not die of
    # them mid-batch, or the main process fails before it can save its state. They exit with it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def build_loaders(cfg: Config, accelerator: Accelerator, train, val, labeled):
    workers = cfg.data.num_workers
    common = dict(num_workers=workers, worker_init_fn=_ignore_interrupts if workers else None,
                  pin_memory=accelerator.device.type == "cuda")
    train_loader = DataLoader(train, batch_size=cfg.train.batch_size, shuffle=True, **common)

    val_loader = None if val is None else DataLoader(val, batch_size=cfg.eval.batch_size, **common)
    # Ground truth keeps its own resolution, which may vary within a set (KITTI): one image a batch.
    labeled_loader = None if labeled is None else DataLoader(labeled, batch_size=1, **common)
    return train_loader, val_loader, labeled_loader


def remap_epoch_position(progress: Progress, global_batch: int) -> None:
    """A run resumed on another number of processes (or batch size) shards the epoch differently:
    carry the position over in photos, not in per-process batches."""
    if progress.global_batch and progress.global_batch != global_batch and progress.batches_in_epoch:
        photos_seen = progress.batches_in_epoch * progress.global_batch
        progress.batches_in_epoch = photos_seen // global_batch
        logger.warning(f"resumed with {global_batch} photos per step instead of {progress.global_batch}: "
                       f"continuing epoch {progress.epoch} after ~{photos_seen} photos; the resumed run is "
                       f"no longer bit-identical to an uninterrupted one")
    progress.global_batch = global_batch


def export_final(cfg: Config, student) -> int:
    """Main process only: export the best student (the last one if there was no evaluation)."""
    best = cfg.run_dir / "student_best"
    source = best if best.is_dir() else cfg.run_dir / "student_last"
    if not source.is_dir() and not all_finite(student):
        logger.error("no finite student to export (student_best/student_last were refused); nothing exported")
        return EXIT_EXPORT
    try:
        model = StudentDepthModel.from_pretrained(str(source)) if source.is_dir() else student
        report = export_student(model, cfg.run_dir / "student.onnx", cfg.data.student_size,
                                cfg.export.opset, atol=cfg.export.atol)
    except ExportError as error:
        logger.error(f"{error}; the safetensors checkpoints are intact")
        return EXIT_EXPORT
    logger.info(f"exported {source.name} to {cfg.run_dir / 'student.onnx'}: max |onnx - torch| = "
                f"{report['max_abs_diff_vs_pytorch']:.2e}, sizes accepted: {report['accepted_sizes']}")
    return EXIT_OK


def run(cfg: Config, resume: Optional[str], overwrite: bool) -> int:
    check_run_dir(cfg.run_dir, resume, overwrite)
    train_paths, val_paths = select_photos(cfg)
    teacher = build_teacher(cfg)
    train, val, labeled = build_datasets(cfg, teacher, train_paths, val_paths)
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision, log_with="tensorboard",
        gradient_accumulation_steps=cfg.optim.grad_accum_steps,
        project_config=ProjectConfiguration(project_dir=str(cfg.run_dir), logging_dir=str(cfg.run_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        # The loop steps the scheduler once per counted optimizer step itself (skipped ones
        # included), so the schedule is in steps whatever the process count or grad scaler does.
        step_scheduler_with_optimizer=False)
    check_world_size(accelerator)
    set_seed(cfg.seed)
    if cfg.train.deterministic:
        # warn_only: some CUDA kernels (bilinear upsampling's backward) have no deterministic
        # version; they warn instead of stopping the run. cuBLAS needs a fixed workspace.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    accelerator.wait_for_everyone()  # every process has checked the folder before it changes
    if accelerator.is_main_process:
        if overwrite and not resume:
            shutil.rmtree(cfg.run_dir, ignore_errors=True)
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        (cfg.run_dir / "config.yaml").write_text(to_yaml(cfg))

    teacher.to(accelerator.device)
    if accelerator.device.type == "cuda" and accelerator.mixed_precision in ("bf16", "fp16"):
        # Frozen weights need no fp32 master copy: half precision halves the teacher's memory.
        teacher.to(torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float16)
    student = build_student(cfg)
    if cfg.train.channels_last:
        student.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        student.compile()
    if cfg.distill.teacher_cache:
        logger.info(f"teacher depth from the cache {cfg.distill.teacher_cache}; feature terms "
                    + ("use the live teacher" if uses_live_teacher_features(cfg) else "are off"))
    module = build_module(cfg, student, teacher, with_features=uses_live_teacher_features(cfg))
    optimizer = build_optimizer(cfg, module)
    train_loader, val_loader, labeled_loader = build_loaders(cfg, accelerator, train, val, labeled)
    steps_per_epoch = math.ceil(len(train_loader) / accelerator.num_processes / cfg.optim.grad_accum_steps)
    total_steps = cfg.train.max_steps or cfg.train.epochs * max(1, steps_per_epoch)
    scheduler = build_scheduler(cfg, optimizer, total_steps)
    module, optimizer, scheduler, train_loader = accelerator.prepare(module, optimizer, scheduler, train_loader)
    val_loader, labeled_loader = (accelerator.prepare(x) if x is not None else None
                                  for x in (val_loader, labeled_loader))
    progress = Progress()
    accelerator.register_for_checkpointing(progress)
    if resume:
        state = load_training_state(accelerator, resume_candidates(cfg.run_dir, resume))
        accelerator.print(f"resumed from {state} at step {progress.step} (epoch {progress.epoch}, "
                          f"batch {progress.batches_in_epoch})")
    remap_epoch_position(progress, accelerator.num_processes * cfg.train.batch_size)
    accelerator.init_trackers("tensorboard", config=flat_hparams(cfg))
    trainer = Trainer(cfg, accelerator, module, teacher, optimizer, scheduler, train_loader, val_loader,
                      labeled_loader, progress, total_steps)
    code = trainer.fit()
    if code == EXIT_OK and not trainer.stop_agreed:
        trainer.run_evaluation()
        trainer.save_state()
        if accelerator.is_main_process:
            save_student(trainer.student, cfg.run_dir / "student_last")
            if cfg.export.enabled:
                code = export_final(cfg, trainer.student)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return code


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        return run(cfg, args.resume, args.overwrite)
    except (ConfigError, TeacherLoadError, StudentLoadError, CheckpointError, StaleCacheError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_SETUP


if __name__ == "__main__":
    sys.exit(main())
