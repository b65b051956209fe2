"""Distil a frozen Depth Anything V2 teacher into a phone-sized student, then ship it as ONNX.

    ./launch.sh --config trainer/configs/demo.yaml [section.key=value ...] [--overwrite] [--verbose]
    accelerate launch trainer/main.py --config FILE --resume latest     # continue a run, as saved

Read top to bottom: parse and check the configuration, build data, models, loss and optimizer,
hand what trains to Accelerate, run the loop (train_step / evaluate / save), export at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # `accelerate launch trainer/main.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.logging import get_logger
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, gather_object, set_seed
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from data import (CachedTeacherDataset, EvalTransform, LabeledDepthDataset, StaleCacheError, TrainTransform,
                  UnlabeledImageDataset, describe_ignored, first_readable, no_images_message, scan_images,
                  split_train_val)
from data.datasets import _decode_max_side
from modeling import StudentLoadError, TeacherLoadError, load_student
from trainer.cache_teacher import open_cache
from trainer.checkpoint import (STATES_DIR, CheckpointError, all_finite, all_processes_agree, complete_states,
                                load_training_state, resume_candidates, save_student, save_training_state)
from trainer.config import Config, ConfigError, flat_hparams, load_config, resume_config, to_yaml
from trainer.console import (ArgumentParser, UnreadableReporter, count_parameters, plural, print_error,
                             record_exit_code, say, setup_logging)
from trainer.distill import build_module, build_optimizer, build_scheduler, build_student, build_teacher
from trainer.errors import AgreedRunError, RunError
from trainer.evaluate import evaluate, format_table
from trainer.export import ExportError, export_student
from trainer.faults import Fault
from trainer.metrics import LOWER_IS_BETTER
from trainer.processes import check_world_size, die_with_launcher
from trainer.run_dir import (CONFIG_FILE, ONNX_FILE, RUN_MARKER, check_run_dir, check_shared, holds_run, start_run,
                             write_config)
from trainer.visualize import comparison_grid

logger = get_logger(__name__)

EXIT_OK, EXIT_SETUP, EXIT_NONFINITE, EXIT_EXPORT, EXIT_SAVE_FAILED = 0, 1, 2, 3, 4
EXIT_INTERRUPTED_EARLY = 130  # Ctrl-C before training started: nothing to save


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
    best_step: int = -1
    global_batch: int = 0  # photos per step over all processes when saved (to map a mid-epoch position)
    # The run's length and schedule are in photos, so that a run resumed on another number of
    # processes trains as much, with the same lr at each photo count. Photos are counted nominally:
    # batch size x processes x accumulation per step. The unit is fixed by the first launch.
    photos_seen: int = 0
    photos_per_step_at_start: int = 0
    photos_per_epoch_at_start: int = 0
    total_photos: int = 0  # from train.epochs / train.max_steps (which a resume may change)

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)

    def plan(self, cfg: Config, photos_per_step: int, steps_per_epoch: int) -> None:
        """Fix the units at the first launch; (re)compute the run's length in photos."""
        if not self.photos_per_step_at_start:
            self.photos_per_step_at_start = photos_per_step
            self.photos_per_epoch_at_start = photos_per_step * steps_per_epoch
            self.photos_seen = self.step * photos_per_step  # 0, or a state saved before photos were counted
        unit = self.photos_per_step_at_start
        t = cfg.train
        self.total_photos = t.max_steps * unit if t.max_steps else t.epochs * self.photos_per_epoch_at_start

    def schedule_position(self) -> tuple[float, float]:
        """(photos trained, photos in the run), in first-launch steps: the lr schedule's axis."""
        unit = self.photos_per_step_at_start or 1
        return self.photos_seen / unit, self.total_photos / unit

    def steps_left(self, photos_per_step: int) -> int:
        return max(0, math.ceil((self.total_photos - self.photos_seen) / photos_per_step))


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
    if not holds_run(run_dir):
        raise CheckpointError(f"--resume {args.resume}: {run_dir} holds no run to resume (no {RUN_MARKER}); "
                              f"check run_name/output_dir")
    cfg, changes, ignored = resume_config(run_dir / CONFIG_FILE, args.overrides, given)
    cfg.output_dir = str(run_dir)  # the run is where it was found, even if its folder was moved
    messages = [f"resuming with the run's saved configuration {run_dir / CONFIG_FILE}"]
    messages += [f"changed on resume: {change}" for change in changes]
    if ignored:
        messages.append(f"ignored: --config {args.config} differs from the saved run in {', '.join(ignored)} "
                        f"(a resumed run keeps its configuration; pass an override to change an allowed key)")
    return cfg, resume, messages


def uses_live_teacher_features(cfg: Config) -> bool:
    """With a teacher cache, feature/attention terms still need the live teacher, unless
    `distill.cache_features=drop` drops them."""
    w = cfg.distill.weights
    dropped = cfg.distill.teacher_cache and cfg.distill.cache_features == "drop"
    return (w.feature > 0 or w.attention > 0) and not dropped


@dataclass
class Photos:
    train: list[Path]
    val: list[Path]
    ignored: dict[str, int] = field(default_factory=dict)  # files skipped by extension -> count


def _scan(key: str, folder: str) -> tuple[list[Path], dict[str, int]]:
    if not Path(folder).is_dir():
        raise ConfigError(f"{key}: folder '{folder}' does not exist")
    scan = scan_images(folder)
    if not scan.images:
        raise ConfigError(f"{key}: {no_images_message(folder, scan)}")
    return scan.images, scan.ignored


def _check_readable(paths: list[Path], what: str, folder: str, max_side: int) -> None:
    """Stop now if not one photo decodes: otherwise the run trains on nothing (loss 0) or
    validates on nothing (NaN) and ends 'successfully'. Costs one decode when the data is fine."""
    if not paths:
        return
    readable, failures = first_readable(paths, max_side)
    if readable is None:
        examples = "; ".join(f"{path.name} ({reason})" for path, reason in failures[:3])
        raise RunError(f"none of the {plural(len(paths), what + ' file')} under {folder} could be read: {examples}"
                       + (f"; ... ({len(failures) - 3} more)" if len(failures) > 3 else ""))


def select_photos(cfg: Config) -> Photos:
    """Training and validation photos; runs before any model is built, so a missing or empty
    folder, or one where nothing decodes, is reported at once. Errors name the key to fix."""
    d = cfg.data
    for key, folder in (("data.labeled_dir", d.labeled_dir), ("distill.teacher_cache", cfg.distill.teacher_cache)):
        if folder is not None and not Path(folder).is_dir():
            raise ConfigError(f"{key}: folder '{folder}' does not exist")
    train, ignored = _scan("data.train_dir", d.train_dir)
    if d.val_dir is not None:
        val, val_ignored = _scan("data.val_dir", d.val_dir)
        ignored = {ext: ignored.get(ext, 0) + val_ignored.get(ext, 0) for ext in {*ignored, *val_ignored}}
    else:
        train, val = split_train_val(train, d.val_fraction, cfg.seed)
    max_side = _decode_max_side(EvalTransform(d.teacher_size, d.student_size))
    _check_readable(train, "training", d.train_dir, max_side)
    _check_readable(val, "validation", d.val_dir or d.train_dir, max_side)
    return Photos(train, val, ignored)


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
                 train_loader, val_loader, labeled_loader, progress: Progress, photos_per_step: int):
        self.cfg, self.accelerator, self.module, self.teacher = cfg, accelerator, module, teacher
        self.optimizer, self.scheduler = optimizer, scheduler
        self.train_loader, self.val_loader, self.labeled_loader = train_loader, val_loader, labeled_loader
        self.progress, self.photos_per_step = progress, photos_per_step
        self.total_steps = progress.step + progress.steps_left(photos_per_step)  # for the progress bar
        self.run_dir = cfg.run_dir
        self.stop = StopRequested()
        self.sums: dict[str, torch.Tensor] = {}  # detached running sums, reduced at log time
        self.steps_since_log, self.images_since_log, self.time_of_log = 0, 0, time.perf_counter()
        # Seconds spent evaluating, saving and drawing since the last log: not training time.
        self.paused_since_log = 0.0
        self.train_seconds, self.photos_trained = 0.0, 0  # this launch, for the end summary
        self.last_eval_step = -1
        self.last_saved_step, self.last_save_ok = -1, False
        self.val_metrics: dict[str, dict[str, float]] = {}
        # (index, valid) of every micro-batch since the last log, still on the device: reading
        # them is left to the log step, which synchronises anyway.
        self.batch_validity: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.unreadable_train = UnreadableReporter(train_loader.dataset.dataset, "training")
        self.unreadable_val = None if val_loader is None else UnreadableReporter(val_loader.dataset, "validation")
        self.fault = Fault.from_env()
        if self.fault is not None:
            self.fault.install(accelerator, self.student, progress)
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
        self.progress.photos_seen += self.photos_per_step  # skipped steps too, like the step count
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside is not training time (evaluation, checkpoints, image grids)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.paused_since_log += time.perf_counter() - start

    def report_unreadable(self) -> None:
        """Collective: name the photos found unreadable since the last call, once per run."""
        bad = [int(i) for index, valid in self.batch_validity for i in index[~valid.bool()].tolist()]
        self.batch_validity = []
        found = [i for share in gather_object([bad]) for i in share]
        if self.accelerator.is_main_process:
            self.unreadable_train.report(found)

    def close_window(self) -> float:
        """Training photos/s since the last call, added to the run's totals (no collective)."""
        elapsed = time.perf_counter() - self.time_of_log - self.paused_since_log
        photos = self.images_since_log * self.accelerator.num_processes
        self.train_seconds += elapsed
        self.photos_trained += photos
        self.images_since_log, self.time_of_log, self.paused_since_log = 0, time.perf_counter(), 0.0
        return photos / max(elapsed, 1e-9)

    def log_scalars(self, grad_norm: Optional[float]) -> dict[str, float]:
        self.report_unreadable()
        names = sorted(self.sums)
        means = self.accelerator.reduce(torch.stack([self.sums[n] for n in names]), "mean")
        count = max(1, self.steps_since_log)
        values = {f"train/{n}": v / count for n, v in zip(names, means.tolist())}
        values["train/images_per_s"] = self.close_window()
        for group in self.optimizer.param_groups:
            if not group["name"].endswith("_no_decay"):  # same lr as its decayed twin
                values[f"lr/{group['name']}"] = group["lr"]
        if grad_norm is not None:
            values["train/grad_norm"] = grad_norm
        values["train/bad_images"] = self.progress.bad_images
        values["train/photos_seen"] = self.progress.photos_seen  # the same x-axis on any number of processes
        values["train/nonfinite_steps"] = self.progress.nonfinite_steps
        self.accelerator.log(values, step=self.progress.step)
        self.sums, self.steps_since_log = {}, 0
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
                                              align=self.cfg.eval.align, reporter=self.unreadable_val)
        if self.labeled_loader is not None:
            results["val_gt"] = evaluate(self.accelerator, self.student, self.labeled_loader, align=self.cfg.eval.align,
                                         labeled=True, max_depth=self.cfg.data.labeled_max_depth)
        for prefix, metrics in results.items():
            if not metrics.get("num_images"):  # every image failed: NaN metrics would pass for a result
                raise RunError(f"evaluation at step {self.progress.step}: no {prefix} image could be read; "
                               f"fix or remove the unreadable files named above (training states are kept)")
            self.accelerator.log({f"{prefix}/{k}": v for k, v in metrics.items()}, step=self.progress.step)
            say(format_table(metrics, f"step {self.progress.step} {prefix}"), self.accelerator.is_main_process)
        if not results:
            return
        self.val_metrics = results
        main_set = results.get("val_gt", results.get("val_teacher"))
        metric = self.cfg.eval.best_metric
        value, best = main_set[metric], self.progress.best_value
        improved = math.isnan(best) or (value < best if LOWER_IS_BETTER[metric] else value > best)
        if improved and math.isfinite(value):
            self.progress.best_value, self.progress.best_step = value, self.progress.step
            self.accelerator.log({f"best/{metric}": value}, step=self.progress.step)
            if self.accelerator.is_main_process:
                save_student(self.student, self.run_dir / "student_best")
        self.accelerator.wait_for_everyone()

    def save_state(self) -> bool:
        """Collective. True if the state of this step is on disk (saved now or just before)."""
        if self.progress.step == self.last_saved_step:  # the last step was a save step already
            return self.last_save_ok
        self.last_saved_step, self.last_save_ok = self.progress.step, False
        if not all_processes_agree(self.accelerator, all_finite(self.module)):  # all skip, or none
            logger.error(f"step {self.progress.step}: weights are not finite; training state not saved")
            return False
        path = save_training_state(self.accelerator, self.run_dir, self.progress.step, self.cfg.train.keep_last)
        if path is not None:
            logger.info(f"saved training state {path}")
        self.last_save_ok = path is not None
        return self.last_save_ok

    def save_final(self) -> bool:
        """Collective: the last training state, then `student_last`. False (with one error line
        saying what was kept) if either failed on any process."""
        state_saved = self.save_state()
        student_saved = save_student(self.student, self.run_dir / "student_last") if self.accelerator.is_main_process \
            else True
        if all_processes_agree(self.accelerator, state_saved and student_saved):
            return True
        if self.accelerator.is_main_process:
            states = complete_states(self.run_dir)
            kept = [str(states[-1]) if states else "no training state"]
            kept += [str(self.run_dir / name) for name in ("student_best", "student_last")
                     if (self.run_dir / name).is_dir()]
            print(f"error: could not save the end of the run at step {self.progress.step} (full disk? see the "
                  f"log above); kept: {', '.join(kept)}", file=sys.stderr, flush=True)
        return False

    def fit(self) -> int:
        cfg, acc, progress = self.cfg, self.accelerator, self.progress
        bar = tqdm(total=self.total_steps, initial=progress.step, desc="distill", dynamic_ncols=True,
                   disable=not acc.is_main_process)
        self.module.train()
        accum = cfg.optim.grad_accum_steps
        while progress.photos_seen < progress.total_photos:
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
                    self.batch_validity.append((batch["index"], batch["valid"]))
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
                    bar.close()
                    if acc.is_main_process:
                        print(f"error: {progress.nonfinite_in_a_row} steps in a row had a non-finite loss, gradients "
                              f"or BatchNorm statistics; stopping (last good training state kept; lower optim.lr?)",
                              file=sys.stderr, flush=True)
                    return EXIT_NONFINITE
                if progress.step % cfg.log.log_every == 0:
                    values = self.log_scalars(grad_norm)
                    bar.set_postfix(loss=f"{values['train/loss']:.4f}",
                                    img_s=f"{values['train/images_per_s']:.1f}")
                with self.paused():
                    if progress.step % cfg.log.image_every == 0:
                        self.log_images(outputs)
                    if cfg.eval.every and progress.step % cfg.eval.every == 0:
                        self.run_evaluation()
                    if progress.step % cfg.train.save_every == 0 or self.stop_agreed:
                        self.save_state()
                bar.update(1)
                if self.stop_agreed:
                    bar.close()
                    say(f"interrupted: resumable state saved at step {progress.step}; continue with --resume latest",
                        acc.is_main_process)
                    return EXIT_OK
                if self.fault is not None:
                    self.fault.after_step(progress.step, acc.process_index)
                if progress.photos_seen >= progress.total_photos:
                    break
            else:  # the epoch ran to its end
                progress.epoch += 1
                progress.batches_in_epoch = 0
                with self.paused():
                    self.run_evaluation()
                continue
            break
        bar.close()
        return EXIT_OK


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


def start_summary(cfg: Config, accelerator: Accelerator, photos: Photos, teacher, student, total_steps: int,
                  resumed_from: Optional[Path]) -> str:
    d, t = cfg.data, cfg.train
    per_step = t.batch_size * accelerator.num_processes * cfg.optim.grad_accum_steps
    lines = [
        f"run '{cfg.run_name}' -> {cfg.run_dir.resolve()}"
        + (f" (resumed from {resumed_from.name})" if resumed_from else " (new run)"),
        f"  photos: {len(photos.train)} for training from {d.train_dir}, {len(photos.val)} for validation"
        + (f" from {d.val_dir}" if d.val_dir else f" ({d.val_fraction:.0%} of them, seed {cfg.seed})"),
        f"  teacher: {cfg.teacher.name} ({count_parameters(teacher):.2f} M parameters) at {d.teacher_size} px"
        + (f", depth from the cache {cfg.distill.teacher_cache}" if cfg.distill.teacher_cache else ""),
        f"  student: {cfg.student.backbone} + MiniDPT ({count_parameters(student):.2f} M parameters) at "
        f"{d.student_size} px",
        f"  {plural(accelerator.num_processes, 'process', 'es')} on {accelerator.device.type}, mixed precision "
        f"{accelerator.mixed_precision}, {per_step} photos per step, {total_steps} steps",
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
    teacher = build_teacher(cfg)
    train, val, labeled = build_datasets(cfg, teacher, photos.train, photos.val)
    accelerator = join_processes(cfg)
    check_world_size(accelerator)
    set_seed(cfg.seed)
    if cfg.train.deterministic:
        # warn_only: some CUDA kernels (bilinear upsampling's backward) have no deterministic
        # version; they warn instead of stopping the run. cuBLAS needs a fixed workspace.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    accelerator.wait_for_everyone()  # every process has checked the folder before it changes
    main_process = accelerator.is_main_process
    for message in messages:
        say(message, main_process)
    if main_process:
        if resume:
            write_config(cfg.run_dir, to_yaml(cfg))  # unchanged, or with the allowed changes above
        else:
            deleted = start_run(cfg.run_dir, to_yaml(cfg), overwrite)
            if deleted:
                say(f"--overwrite: deleted the previous run's {', '.join(deleted)} in {cfg.run_dir}")
    check_shared(accelerator, cfg.run_dir)

    teacher.place(accelerator.device, accelerator.mixed_precision)
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
    total_steps = progress.step + progress.steps_left(photos_per_step)
    say(start_summary(cfg, accelerator, photos, teacher, student, total_steps, state), main_process)
    if state is not None:
        say(f"resumed from {state} at step {progress.step} (epoch {progress.epoch}, batch "
            f"{progress.batches_in_epoch})", main_process)
    accelerator.init_trackers("tensorboard")
    if not resume:
        log_hparams(accelerator, cfg, labeled is not None)
    trainer = Trainer(cfg, accelerator, module, teacher, optimizer, scheduler, train_loader, val_loader,
                      labeled_loader, progress, photos_per_step)
    with logging_redirect_tqdm():
        code = trainer.fit()
        trainer.close_window()
        trainer.report_unreadable()
        if code == EXIT_OK and not trainer.stop_agreed:
            trainer.run_evaluation()
            if not trainer.save_final():
                code = EXIT_SAVE_FAILED
            elif main_process and cfg.export.enabled:
                code = export_final(cfg, trainer.student)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if not trainer.stop_agreed:
        say(end_summary(cfg, trainer, time.perf_counter() - started, code), main_process)
    return code


# Mistakes a user can make and fix: each is reported as one line, never as a traceback.
USER_ERRORS = (ConfigError, RunError, TeacherLoadError, StudentLoadError, CheckpointError, StaleCacheError)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    die_with_launcher()
    try:
        cfg, resume, messages = resolve_config(args)
        code = run(cfg, resume, args.overwrite, messages)
    except USER_ERRORS as error:
        print_error(str(error), agreed=isinstance(error, AgreedRunError))
        code = EXIT_SETUP
    except KeyboardInterrupt:  # Ctrl-C before the loop took over the signal: nothing to save yet
        print("interrupted before training started; nothing was saved", file=sys.stderr)
        code = EXIT_INTERRUPTED_EARLY
    record_exit_code(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
