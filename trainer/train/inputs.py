"""What a run trains on: the photos, their datasets and loaders, and where the teacher's
targets come from. Everything here runs before the loop and says what is wrong in one line."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset

from data import (CachedTeacherDataset, EvalTransform, LabeledDepthDataset, TrainTransform, UnlabeledImageDataset,
                  first_readable, no_images_message, scan_images, split_train_val)
from data.datasets import _decode_max_side
from trainer.train.cache_teacher import open_cache
from trainer.config import Config, ConfigError
from trainer.console import plural
from trainer.errors import RunError


class Targets(Enum):
    """Where a step's teacher targets come from, decided once from the configuration; the
    datasets, the loss and the step all follow this one decision."""

    LIVE = "the live teacher (depth and features)"
    CACHED_DEPTH_LIVE_FEATURES = "depth from the teacher cache, features from the live teacher"
    CACHED_DEPTH = "depth from the teacher cache; feature terms off"

    @classmethod
    def of(cls, cfg: Config) -> "Targets":
        if not cfg.distill.teacher_cache:
            return cls.LIVE
        w = cfg.distill.weights
        if (w.feature > 0 or w.attention > 0) and cfg.distill.cache_features == "live":
            return cls.CACHED_DEPTH_LIVE_FEATURES
        return cls.CACHED_DEPTH

    @property
    def runs_teacher(self) -> bool:
        """The teacher runs in the step (and the batch carries its input view)."""
        return self is not Targets.CACHED_DEPTH


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


def build_datasets(cfg: Config, teacher, targets: Targets, train_paths: list[Path], val_paths: list[Path]):
    """-> (train, validation or None, labeled or None)."""
    d = cfg.data
    augment = TrainTransform(d.teacher_size, d.student_size, scale=tuple(d.crop_scale),
                             ratio=tuple(d.crop_ratio), hflip_prob=d.hflip_prob, color_jitter=d.color_jitter)
    plain = EvalTransform(d.teacher_size, d.student_size)
    if targets is Targets.LIVE:
        photos = UnlabeledImageDataset(train_paths, augment)
    else:
        cache = open_cache(cfg, teacher, train_paths)
        photos = CachedTeacherDataset(train_paths, augment, cache, with_teacher_image=targets.runs_teacher)
    train = EpochSeededDataset(photos, cfg.seed)
    val = UnlabeledImageDataset(val_paths, plain) if val_paths else None
    labeled = None
    if d.labeled_dir is not None:
        labeled = LabeledDepthDataset(d.labeled_dir, plain, min_depth=d.labeled_min_depth,
                                      max_depth=d.labeled_max_depth, depth_scale=d.labeled_depth_scale,
                                      crop=d.labeled_crop)
    return train, val, labeled


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
