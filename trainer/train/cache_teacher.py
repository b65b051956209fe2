"""Run the frozen teacher once over the training photos and store its depth maps.

    python -m trainer.train.cache_teacher --config FILE [section.key=value ...] [--cache-dir DIR]
    accelerate launch -m trainer.train.cache_teacher --config FILE     # each process takes a share

Training with `distill.teacher_cache=DIR` then reads the maps instead of running the teacher every
step. The maps are of the whole photo at data.teacher_size; the trainer crops them like the photo.
When the recipe has a feature term and `distill.cache_features` is `stored` (the default), the
teacher's feature maps on its patch grid are stored too, so the step runs no teacher at all.
DIR must be missing, empty or a previous cache (which is replaced); any other folder is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from data.teacher_cache import (CacheDirError, CacheSourceDataset, ShardWriter, StaleCacheError, TeacherCache,
                                check_cache_dir, clear_cache, train_val_paths, write_index)
from modeling import DepthAnythingTeacher, TeacherLoadError
from core.cli import ArgumentParser
from trainer.console import print_error, record_exit_code
from trainer.config import Config, ConfigError, cache_stores_features, load_config
from trainer.train.distill import build_teacher

logger = logging.getLogger(__name__)

# Config fields that say how a model was saved (where, by which library version, in which dtype),
# not what it computes: the same teacher loaded from memory, a folder or the hub hashes alike.
_PROVENANCE_KEYS = ("_name_or_path", "architectures", "dtype", "torch_dtype", "transformers_version")


def teacher_config_hash(teacher: DepthAnythingTeacher) -> str:
    """A short hash of the teacher's architecture config and weights: a cache made by another
    checkpoint, even one of the same architecture under the same path, is told apart. Hashing
    the weights costs a fraction of a second for V2-Small (~0.1 GB), a few seconds for Large."""

    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k not in _PROVENANCE_KEYS}
        return node

    config = strip(json.loads(teacher.model.config.to_json_string()))
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name, tensor in teacher.model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())  # call it before any half-precision cast
    return digest.hexdigest()[:16]


def open_cache(cfg: Config, teacher: DepthAnythingTeacher, train_paths: list[Path],
               with_features: bool = False) -> TeacherCache:
    """The cache at `distill.teacher_cache`, checked against this run's teacher, size and photos
    (and, `with_features`, holding the feature maps of the teacher's distilled layers)."""
    return TeacherCache.open(cfg.distill.teacher_cache, cfg.teacher.name, teacher_config_hash(teacher),
                             cfg.data.teacher_size, train_paths, cfg.data.train_dir,
                             feature_layers=teacher.feature_layers if with_features else None)


def build_cache(cfg: Config, cache_dir: str | Path, accelerator: Optional[Accelerator] = None,
                teacher: Optional[DepthAnythingTeacher] = None) -> dict:
    """Collective: every process caches its share of the training photos; the main process then
    writes index.json and meta.json. Returns the summary numbers. Raises ConfigError for a missing
    or empty data.train_dir, CacheDirError for a folder that is not (and cannot become) a cache."""
    start = time.perf_counter()
    accelerator = accelerator or Accelerator(mixed_precision=cfg.train.mixed_precision)
    d, cache_dir = cfg.data, Path(cache_dir)
    try:
        paths, _ = train_val_paths(d.train_dir, d.val_dir, d.val_fraction, cfg.seed)
    except (FileNotFoundError, ValueError) as error:  # a missing or empty folder
        raise ConfigError(f"data.train_dir: {error}") from None
    check_cache_dir(cache_dir)  # on every process, so all of them stop together on a refusal
    with_features = cache_stores_features(cfg)
    teacher = teacher or build_teacher(cfg)
    fingerprint = teacher_config_hash(teacher)  # of the weights as loaded, before any half-precision cast
    teacher.place(accelerator.device, accelerator.mixed_precision)
    if accelerator.is_main_process:
        clear_cache(cache_dir)
    accelerator.wait_for_everyone()

    writer = ShardWriter(cache_dir, accelerator.process_index)
    with accelerator.split_between_processes(paths) as my_paths:
        source = CacheSourceDataset(my_paths, d.train_dir, d.teacher_size, d.student_size)
        loader = DataLoader(source, batch_size=cfg.eval.batch_size, num_workers=d.num_workers,
                            pin_memory=accelerator.device.type == "cuda")
        for batch in tqdm(loader, desc="cache teacher", disable=not accelerator.is_local_main_process):
            valid = batch["valid"]
            if valid.any():
                with torch.no_grad(), accelerator.autocast():
                    out = teacher(batch["image"][valid].to(accelerator.device))  # disparity (b, 1, S, S)
                maps = iter(out.disparity.to(torch.float16).cpu())
                # (b, layers, C, S/14, S/14): the teacher's features of the whole photo on its patch grid
                features = iter(torch.stack(out.features, 1).to(torch.float16).cpu()) if with_features else None
            for i, key in enumerate(batch["key"]):
                if valid[i]:
                    writer.add(key, batch["hash"][i], int(batch["height"][i]), int(batch["width"][i]), next(maps),
                               next(features) if with_features else None)
                else:
                    writer.skip(key, batch["hash"][i])
                    # Each photo is in one process's share and met once: one line per bad photo.
                    logger.warning("skipping unreadable image %s (%s)", Path(d.train_dir) / key, batch["reason"][i])
    writer.flush()

    shares = gather_object([(writer.entries, writer.bytes_written)])
    entries = {key: entry for share_entries, _ in shares for key, entry in share_entries.items()}
    num_skipped = sum(entry["shard"] is None for entry in entries.values())
    summary = {"num_images": len(entries) - num_skipped, "num_skipped": num_skipped,
               "megabytes": sum(size for _, size in shares) / 1e6, "features": with_features}
    summary["megabytes_per_image"] = summary["megabytes"] / max(1, summary["num_images"])
    if accelerator.is_main_process:
        write_index(cache_dir, entries, {
            "teacher": cfg.teacher.name, "teacher_config_hash": fingerprint,
            "cache_size": d.teacher_size, "train_dir": str(d.train_dir),
            "feature_layers": teacher.feature_layers if with_features else None,
            # One width for every layer: the writer stacks them, as a ViT's layers allow.
            "feature_channels": teacher.feature_channels[0] if with_features else None,
            "num_images": summary["num_images"], "num_skipped": num_skipped})
    accelerator.wait_for_everyone()
    summary["seconds"] = time.perf_counter() - start
    what = "depth and features" if with_features else "depth"
    accelerator.print(f"teacher cache {cache_dir}: {what} of {summary['num_images']} images cached, {num_skipped} "
                      f"unreadable skipped, {summary['megabytes']:.1f} MB written "
                      f"({summary['megabytes_per_image']:.2f} MB an image) in {summary['seconds']:.1f} s")
    return summary


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m trainer.train.cache_teacher", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the run's YAML preset, e.g. trainer/configs/demo.yaml")
    parser.add_argument("--cache-dir", help="where to write the cache (default: distill.teacher_cache)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.teacher_size=518")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        cache_dir = args.cache_dir or cfg.distill.teacher_cache
        if cache_dir is None:
            raise ConfigError("no cache folder: pass --cache-dir DIR or set distill.teacher_cache")
        build_cache(cfg, cache_dir)
    except (ConfigError, TeacherLoadError, StaleCacheError, CacheDirError) as error:
        # Found alike by every process (the folder check runs on each), so said once, not once a process.
        print_error(str(error), agreed=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(record_exit_code(main()))
