"""What a run trains on: the photos, their datasets and loaders, and where the teacher's
targets come from. Everything here runs before the loop and says what is wrong in one line."""

from __future__ import annotations

import atexit
import functools
import multiprocessing
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset

from data import (CachedTeacherDataset, EvalTransform, LabeledDepthDataset, TrainTransform, UnlabeledImageDataset,
                  first_readable, no_images_message, scan_images, split_train_val)
from data.datasets import _decode_max_side
from data.shards import ShardPhotoDataset, ShardSet, ShardsError, collate_encoded
from trainer.train.cache_teacher import open_cache
from trainer.config import Config, ConfigError, feature_terms_on
from trainer.console import plural, say
from core.errors import RunError


class Targets(Enum):
    """Where a step's teacher targets come from, decided once from the configuration; the
    datasets, the loss and the step all follow this one decision."""

    LIVE = "the live teacher (depth and features)"
    CACHED = "depth and features from the teacher cache"
    CACHED_DEPTH_LIVE_FEATURES = "depth from the teacher cache, features from the live teacher"
    CACHED_DEPTH = "depth from the teacher cache; feature terms off"

    @classmethod
    def of(cls, cfg: Config) -> "Targets":
        if not cfg.distill.teacher_cache:
            return cls.LIVE
        if not feature_terms_on(cfg) or cfg.distill.cache_features == "drop":
            return cls.CACHED_DEPTH
        return cls.CACHED if cfg.distill.cache_features == "stored" else cls.CACHED_DEPTH_LIVE_FEATURES

    @property
    def runs_teacher(self) -> bool:
        """The teacher runs in the step (and the batch carries its input view)."""
        return self in (Targets.LIVE, Targets.CACHED_DEPTH_LIVE_FEATURES)

    @property
    def has_features(self) -> bool:
        """The step has the teacher's features to match (live or stored)."""
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
            # The CPU generator alone (all the augmentation draws from): torch.manual_seed would also
            # queue a lazy seeding of every accelerator backend, ~1 ms a sample.
            torch.default_generator.manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_003 + index) % 2**63)
            return self.dataset[index]


@dataclass
class Photos:
    train: list  # Paths of a folder, or ShardPhotos of `shards`
    val: list
    source: str  # where they are read from, for messages
    val_source: str = ""  # where the validation photos come from when not from the config's split
    ignored: dict[str, int] = field(default_factory=dict)  # files skipped by extension -> count
    shards: Optional[ShardSet] = None


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
    if d.shards is not None:
        return _select_shards(cfg)
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
    return Photos(train, val, d.train_dir, ignored=ignored)


def _select_shards(cfg: Config) -> Photos:
    d = cfg.data
    if d.labeled_dir is not None and not Path(d.labeled_dir).is_dir():
        raise ConfigError(f"data.labeled_dir: folder '{d.labeled_dir}' does not exist")
    try:
        shards = ShardSet.open(d.shards)
    except ShardsError as error:
        raise ConfigError(str(error)) from None
    train, val = shards.photos["train"], shards.photos["val"]
    if not train:
        raise ConfigError(f"data.shards: {d.shards} holds no training photo")
    stored, needed = shards.manifest["max_side"], _decode_max_side(EvalTransform(d.teacher_size, d.student_size))
    if stored < needed:
        say(f"warning: data.shards: photos in {d.shards} are at most {stored} px, fewer than the {needed} px "
            f"the folder pipeline decodes for data.teacher_size={d.teacher_size}; crops are upsampled")
    for what, photos in (("training", train), ("validation", val)):
        # As for a folder: stop now if not one photo reads (one read and decode when the data is fine).
        dataset = ShardPhotoDataset(shards, photos, EvalTransform(d.teacher_size, d.student_size))
        reasons = (dataset.unreadable_reason(i) for i in range(len(photos)))
        if photos and all(reasons):
            raise RunError(f"none of the {plural(len(photos), what + ' photo')} in {d.shards} could be read: "
                           f"{photos[0]}: {dataset.unreadable_reason(0)}")
    source = f"shards {d.shards} (decoded on the {decode_location(cfg)})"
    return Photos(train, val, source, val_source="from the same shards", shards=shards)


def decode_location(cfg: Config) -> str:
    """data.decode_on with "auto" resolved: the device when the run trains on a GPU."""
    if cfg.data.decode_on != "auto":
        return cfg.data.decode_on
    on_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return "device" if torch.cuda.is_available() and not on_cpu else "workers"


def build_datasets(cfg: Config, teacher, targets: Targets, photos: Photos):
    """-> (train, validation or None, labeled or None)."""
    d = cfg.data
    augment = TrainTransform(d.teacher_size, d.student_size, scale=tuple(d.crop_scale),
                             ratio=tuple(d.crop_ratio), hflip_prob=d.hflip_prob, color_jitter=d.color_jitter)
    plain = EvalTransform(d.teacher_size, d.student_size)
    if photos.shards is not None:
        train_photos = ShardPhotoDataset(photos.shards, photos.train, augment, decode_location(cfg))
        val = ShardPhotoDataset(photos.shards, photos.val, plain) if photos.val else None
    else:
        if targets is Targets.LIVE:
            train_photos = UnlabeledImageDataset(photos.train, augment)
        else:
            cache = open_cache(cfg, teacher, photos.train, with_features=targets is Targets.CACHED)
            train_photos = CachedTeacherDataset(photos.train, augment, cache, with_teacher_image=targets.runs_teacher,
                                                with_features=targets is Targets.CACHED)
        val = UnlabeledImageDataset(photos.val, plain) if photos.val else None
    train = EpochSeededDataset(train_photos, cfg.seed)
    labeled = None
    if d.labeled_dir is not None:
        labeled = LabeledDepthDataset(d.labeled_dir, plain, min_depth=d.labeled_min_depth,
                                      max_depth=d.labeled_max_depth, depth_scale=d.labeled_depth_scale,
                                      crop=d.labeled_crop)
    return train, val, labeled


def photo_dataset(dataset: Dataset) -> Dataset:
    """The dataset of photos under its wrappers (EpochSeededDataset, a benchmark's Cycled)."""
    while hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    return dataset


def batch_finisher(train: Dataset, device: torch.device) -> Optional[Callable[[dict], dict]]:
    """What turns a batch from the workers into the step's views on `device` (shards: uint8 views
    normalised, or encoded photos decoded and rendered), or None when the workers hand over finished views."""
    photos = photo_dataset(train)
    if not getattr(photos, "finishes_on_device", False):
        return None
    return functools.partial(photos.finish_batch, device=device)


def _ignore_interrupts(worker_id: int) -> None:
    # Ctrl-C and a scheduler's SIGTERM reach the whole process group: workers must not die of
    # them mid-batch, or the main process fails before it can save its state. They exit with it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _kill_workers_left_at_exit() -> None:
    # At exit, multiprocessing ends its daemonic children with SIGTERM and then waits for them. A
    # worker above ignores SIGTERM, and one whose loader iterator was never shut down (still
    # referenced when the interpreter exits) would hold a finished run forever. Nothing it does is
    # needed any more: kill it.
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


def build_loaders(cfg: Config, accelerator: Accelerator, train, val, labeled):
    workers = cfg.data.num_workers
    if workers:  # once, and after multiprocessing's own exit handler, so that it runs before it
        atexit.unregister(_kill_workers_left_at_exit)
        atexit.register(_kill_workers_left_at_exit)
    common = dict(num_workers=workers, worker_init_fn=_ignore_interrupts if workers else None,
                  pin_memory=accelerator.device.type == "cuda")
    # Photos decoded on the device travel as bytes, which only a list can batch.
    collate = collate_encoded if getattr(photo_dataset(train), "decode_on", None) == "device" else None
    train_loader = DataLoader(train, batch_size=cfg.train.batch_size, shuffle=True, collate_fn=collate, **common)

    val_loader = None if val is None else DataLoader(val, batch_size=cfg.eval.batch_size, **common)
    # Ground truth keeps its own resolution, which may vary within a set (KITTI): one image a batch.
    labeled_loader = None if labeled is None else DataLoader(labeled, batch_size=1, **common)
    return train_loader, val_loader, labeled_loader
