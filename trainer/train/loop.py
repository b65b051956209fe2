"""The training loop. One optimizer step reads on one screen (`Trainer.fit`):

    while photos remain:
        window = self.step.forward_backward(batches)   # train_step on each micro-batch of the step
        self.step.optimizer_step(window)               # the one agreed all-reduce, then clip and step
        self.after_step(window)                        # log, draw, evaluate, save: each when it is due

The step (`DistillationStep`) makes one host synchronisation, the all-reduce in `optimizer_step` (four numbers: readable
photos, photos, non-finite flags, stop requests); the gradient norm and the loss stay on the device
and are read at log steps. Rank checks live in the helpers that save, log and print.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from core.choices import LOWER_IS_BETTER
from core.errors import RunError
from trainer.config import Config
from trainer.console import EXIT_NONFINITE, EXIT_OK, UnreadableReporter, print_error, say
from trainer.evaluate.evaluation import evaluate, format_table
from trainer.evaluate.visualize import comparison_grid
from trainer.train.checkpoint import all_finite, all_processes_agree, complete_states, save_student, save_training_state
from trainer.train.faults import Fault
from trainer.train.inputs import Targets

logger = get_logger(__name__)


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

    def last_step(self, photos_per_step: int) -> int:
        """The step at which the run's photos are all seen, at `photos_per_step` from now on."""
        return self.step + max(0, math.ceil((self.total_photos - self.photos_seen) / photos_per_step))


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


class StopRequested:
    """SIGINT / SIGTERM (Ctrl-C, a cluster's pre-emption) only set a flag; the loop saves a
    resumable state at the next step boundary, on every process together."""

    def __init__(self):
        self.flag = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.flag = True


@dataclass
class Window:
    """What the micro-batches of one optimizer step leave behind, on the device."""

    loss: torch.Tensor = 0.0  # averaged over the micro-batches
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    n_valid: torch.Tensor = 0  # readable photos
    n_images: int = 0
    outputs: tuple = ()  # (student input, teacher disparity, student disparity) of the last micro-batch
    ends_epoch: bool = False


class DistillationStep:
    """One optimizer step of distillation: `train_step` on each micro-batch, then the agreed,
    clipped update. The trainer's loop runs it, and so does `bench.train_step`."""

    def __init__(self, cfg: Config, accelerator: Accelerator, module, teacher, targets: Targets, optimizer,
                 scheduler, progress: Progress, photos_per_step: int,
                 finish_batch: Optional[Callable[[dict], dict]] = None):
        self.cfg, self.accelerator, self.module = cfg, accelerator, module
        self.teacher, self.targets = teacher, targets
        self.optimizer, self.scheduler = optimizer, scheduler
        self.progress, self.photos_per_step = progress, photos_per_step
        # Shard batches become the step's views here, on the device: uint8 views are normalised,
        # encoded photos (data.decode_on=device) decoded and rendered.
        self.finish_batch = finish_batch or (lambda batch: batch)
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.float_buffers = [b for b in module.buffers() if b.is_floating_point()]
        self.stop_requested: Callable[[], bool] = lambda: False  # the trainer's signal flag, agreed on below
        self.stop_agreed = False
        self.grad_norm: Optional[torch.Tensor] = None  # of the last step taken; read at log steps
        # (index, valid) of every micro-batch, still on the device: the loop reads them at log steps.
        self.batch_validity: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward_backward(self, batches: Iterator[dict]) -> Window:
        """`train_step` on micro-batches until Accelerate says the gradients are synchronised:
        every `optim.grad_accum_steps` batches, or at the end of an epoch."""
        window, accum = Window(), self.cfg.optim.grad_accum_steps
        while True:
            batch = self.finish_batch(next(batches))
            with self.accelerator.accumulate(self.module):
                out = self.train_step(batch)
            window.loss = window.loss + out["loss"] / accum
            for name, value in out["terms"].items():
                window.terms[name] = window.terms.get(name, 0.0) + value.float() / accum
            window.n_valid = window.n_valid + out["n_valid"]
            window.n_images += len(batch["valid"])
            window.outputs = out["outputs"]
            self.batch_validity.append((batch["index"], batch["valid"]))
            if self.accelerator.sync_gradients:
                window.ends_epoch = self.accelerator.gradient_state.end_of_dataloader
                return window

    def train_step(self, batch: dict) -> dict:
        """Forward and backward of one micro-batch -> {"loss", "terms", "n_valid", "outputs"}, all
        detached and on the device.

        An unreadable photo's slot is filled with the batch's first readable photo, on the device
        (no host synchronisation); a batch with none still runs, with zero loss, so that every
        process takes part in DDP's gradient all-reduce."""
        valid = batch["valid"]
        first = valid.to(torch.int64).argmax().view(1)  # a 1-element index: x[0-dim tensor] would read it on the host

        def readable(x: torch.Tensor) -> torch.Tensor:
            return torch.where(valid.view(-1, *[1] * (x.dim() - 1)), x, x.index_select(0, first))

        images = readable(batch["student_image"])
        if self.cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        teacher_disparity, teacher_features = self.teacher_targets(batch, readable, images.shape[-2:])
        with self.accelerator.autocast():
            loss, terms, student_disparity = self.module(images, teacher_disparity, teacher_features)
        loss = loss * valid.any().to(loss.dtype)
        self.accelerator.backward(loss)
        return {"loss": loss.detach(), "terms": {k: v.detach() for k, v in terms.items()},
                "n_valid": valid.sum(), "outputs": (images, teacher_disparity, student_disparity.detach())}

    def teacher_targets(self, batch: dict, readable, size) -> tuple[torch.Tensor, Optional[list[torch.Tensor]]]:
        """(teacher disparity at the student's size, teacher features or None), from where
        `self.targets` says: the live teacher, the cache, or both."""
        if self.targets is Targets.CACHED_DEPTH:
            return readable(batch["teacher_disparity"]), None
        if self.targets is Targets.CACHED:  # (B, layers, C, h, w) fp16 -> a float map per layer
            features = readable(batch["teacher_features"]).float()
            return readable(batch["teacher_disparity"]), list(features.unbind(1))
        with torch.no_grad(), self.accelerator.autocast():
            live = self.teacher(readable(batch["teacher_image"]), output_size=size)
        if self.targets is Targets.LIVE:
            return live.disparity, live.features
        return readable(batch["teacher_disparity"]), live.features

    def optimizer_step(self, window: Window) -> None:
        """Decide on every process together whether the step is safe (the step's one host
        synchronisation: four numbers in one all-reduce), then clip and step, or skip."""
        acc, p = self.accelerator, self.progress
        bad = ~torch.isfinite(window.loss)
        if self.float_buffers:  # BatchNorm statistics were updated by the forward: a skip would not undo a NaN
            bad |= ~torch.stack([torch.isfinite(b).all() for b in self.float_buffers]).all()
        grads = [q.grad for q in self.params if q.grad is not None]
        if grads and acc.mixed_precision != "fp16":  # under fp16 an overflow is the grad scaler's business
            bad |= ~torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())
        # new_full launches a fill with the host value as its argument: no copy, no synchronisation.
        flags = torch.stack([window.n_valid.float(), bad.float(), window.loss.new_full((), float(window.n_images)),
                             window.loss.new_full((), float(self.stop_requested()))])
        n_valid, nonfinite, n_images, stops = acc.reduce(flags, "sum").tolist()
        self.stop_agreed = stops > 0  # one process interrupted -> all stop at the same step
        p.bad_images += int(n_images - n_valid)
        if n_valid > 0 and not nonfinite:
            self.grad_norm = acc.clip_grad_norm_(self.params, self.cfg.optim.grad_clip or float("inf"))
            self.optimizer.step()
        if nonfinite:
            p.nonfinite_steps += 1
            p.nonfinite_in_a_row += 1
            logger.warning(f"step {p.step}: non-finite loss, gradients or BatchNorm statistics, step skipped "
                           f"({p.nonfinite_in_a_row} in a row)")
        else:
            p.nonfinite_in_a_row = 0
        p.photos_seen += self.photos_per_step  # skipped steps too, like the step count
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


class Trainer:
    """Holds what the loop needs between steps; each method does one thing of the loop."""

    def __init__(self, cfg: Config, step: DistillationStep, train_loader, val_loader, labeled_loader):
        self.cfg, self.step = cfg, step
        # What the loop's other duties use of the step's pieces (evaluation, saving, lr logging).
        self.accelerator, self.module, self.teacher = step.accelerator, step.module, step.teacher
        self.optimizer, self.progress = step.optimizer, step.progress
        self.train_loader, self.val_loader, self.labeled_loader = train_loader, val_loader, labeled_loader
        self.total_steps = self.progress.last_step(step.photos_per_step)  # for the progress bar
        self.run_dir = cfg.run_dir
        self.stop = StopRequested()
        self.step.stop_requested = lambda: self.stop.flag
        self.sums: dict[str, torch.Tensor] = {}  # detached running sums, reduced at log time
        self.steps_since_log, self.images_since_log, self.time_of_log = 0, 0, time.perf_counter()
        # Seconds spent evaluating, saving and drawing since the last log: not training time.
        self.paused_since_log = 0.0
        self.train_seconds, self.photos_trained = 0.0, 0  # this launch, for the end summary
        self.last_eval_step = -1
        self.last_saved_step, self.last_save_ok = -1, False
        self.unreadable_train = UnreadableReporter(train_loader.dataset.dataset, "training")
        self.unreadable_val = None if val_loader is None else UnreadableReporter(val_loader.dataset, "validation")
        self.unreadable_labeled = (None if labeled_loader is None
                                   else UnreadableReporter(labeled_loader.dataset, "ground-truth"))
        self.step_end_hooks: list = []  # called with the step count after each step (fault injection)
        fault = Fault.from_env()
        if fault is not None:
            fault.install(self)

    @property
    def student(self):
        return self.accelerator.unwrap_model(self.module).student

    @property
    def stop_agreed(self) -> bool:
        return self.step.stop_agreed

    # --- the loop ---------------------------------------------------------------------------

    def fit(self) -> int:
        """Optimizer steps until the run's photos are seen -> exit code."""
        p = self.progress
        self.module.train()
        batches = self.micro_batches()
        self.bar = tqdm(total=self.total_steps, initial=p.step, desc="distill", dynamic_ncols=True,
                        disable=not self.accelerator.is_main_process)
        with contextlib.closing(self.bar):
            while p.photos_seen < p.total_photos:
                window = self.step.forward_backward(batches)
                self.step.optimizer_step(window)
                if p.nonfinite_in_a_row >= self.cfg.train.max_nonfinite_steps:
                    print_error(f"{p.nonfinite_in_a_row} steps in a row had a non-finite loss, gradients "
                                f"or BatchNorm statistics; stopping (last good training state kept; "
                                f"lower optim.lr?)", agreed=True)
                    return EXIT_NONFINITE
                self.after_step(window)
                self.bar.update(1)
                if self.stop_agreed:
                    say(f"interrupted: resumable state saved at step {p.step}; continue with --resume latest")
                    return EXIT_OK
        return EXIT_OK

    def micro_batches(self) -> Iterator[dict]:
        """Every batch of every epoch, for ever. The epoch and the position in it live in
        `progress` (saved with each state): a resumed run continues mid-epoch where it stopped."""
        p = self.progress
        while True:
            self.train_loader.dataset.epoch = p.epoch
            self.train_loader.set_epoch(p.epoch)
            loader = self.train_loader
            if p.batches_in_epoch:
                loader = self.accelerator.skip_first_batches(self.train_loader, p.batches_in_epoch)
            for batch in loader:
                p.batches_in_epoch += 1
                yield batch
            p.epoch, p.batches_in_epoch = p.epoch + 1, 0

    def after_step(self, window: Window) -> None:
        p, c = self.progress, self.cfg
        p.step += 1
        self.steps_since_log += 1
        self.images_since_log += window.n_images
        for name, value in {"loss": window.loss, **window.terms}.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        if p.step % c.log.log_every == 0:
            values = self.log_scalars()
            self.bar.set_postfix(loss=f"{values['train/loss']:.4f}", img_s=f"{values['train/images_per_s']:.1f}")
        with self.paused():
            if p.step % c.log.image_every == 0:
                self.log_images(window.outputs)
            if window.ends_epoch or (c.eval.every and p.step % c.eval.every == 0):
                self.run_evaluation()
            if p.step % c.train.save_every == 0 or self.stop_agreed:
                self.save_state()
        for hook in self.step_end_hooks:
            hook(p.step)

    # --- what the loop does when due --------------------------------------------------------

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
        bad = [int(i) for index, valid in self.step.batch_validity for i in index[~valid.bool()].tolist()]
        self.step.batch_validity = []
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

    def log_scalars(self) -> dict[str, float]:
        self.report_unreadable()
        names = sorted(self.sums)
        means = self.accelerator.reduce(torch.stack([self.sums[n] for n in names]), "mean")
        count = max(1, self.steps_since_log)
        values = {f"train/{n}": v / count for n, v in zip(names, means.tolist())}
        values["train/images_per_s"] = self.close_window()
        for group in self.optimizer.param_groups:
            if not group["name"].endswith("_no_decay"):  # same lr as its decayed twin
                values[f"lr/{group['name']}"] = group["lr"]
        if self.step.grad_norm is not None:
            values["train/grad_norm"] = float(self.step.grad_norm)
        values["train/bad_images"] = self.progress.bad_images
        values["train/nonfinite_steps"] = self.progress.nonfinite_steps
        values["train/photos_seen"] = self.progress.photos_seen  # the same x-axis on any number of processes
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
                                         labeled=True, max_depth=self.cfg.data.labeled_max_depth,
                                         reporter=self.unreadable_labeled)
        for prefix, metrics in results.items():
            if not metrics.get("num_images"):  # NaN metrics would pass for a result
                raise RunError(f"evaluation at step {self.progress.step}: no {prefix} image could be scored: each "
                               f"was unreadable (named above) or its reference depth had no valid pixel "
                               f"(training states are kept)")
            self.accelerator.log({f"{prefix}/{k}": v for k, v in metrics.items()}, step=self.progress.step)
            say(format_table(metrics, f"step {self.progress.step} {prefix}"))
        if not results:
            return
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
        main = self.accelerator.is_main_process
        student_saved = save_student(self.student, self.run_dir / "student_last") if main else True
        if all_processes_agree(self.accelerator, state_saved and student_saved):
            return True
        states = complete_states(self.run_dir)
        kept = [str(states[-1]) if states else "no training state"]
        kept += [str(self.run_dir / name) for name in ("student_best", "student_last")
                 if (self.run_dir / name).is_dir()]
        print_error(f"could not save the end of the run at step {self.progress.step} (full disk? see the "
                    f"log above); kept: {', '.join(kept)}", agreed=True)
        return False
