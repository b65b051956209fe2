"""Read the photo folder once and write it as WebDataset tar shards to train from (`data.shards=DIR`).

    python -m trainer.prepare_shards --config FILE --out DIR [section.key=value ...]
    accelerate launch -m trainer.prepare_shards --config FILE --out DIR     # each process writes its shards

Each photo is decoded once: EXIF orientation applied, converted to RGB, its longest side brought to
at most --max-side (default 2 x data.teacher_size: the pixels the folder pipeline decodes, so a
minimum-area training crop still has about the teacher's resolution), and stored as a JPEG. The
training and validation photos of the run's split go to train-*.tar and val-*.tar.

DIR must be missing, empty or an earlier shard folder. A re-run keeps every shard whose photos
and settings have not changed (so an interrupted run continues), rewrites the others, deletes
shards the new plan no longer has, and says what changed in the folder since.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from data.shards import (INDEX_FILE, MANIFEST_FILE, SPLITS, ShardsError, own_files, plan_fingerprint,
                         read_source_photo, reusable_shard, shard_count, shard_name, source_stat,
                         write_index_and_manifest, write_shard)
from data.teacher_cache import relative_key, train_val_paths
from trainer.config import Config, ConfigError, load_config
from core.cli import ArgumentParser
from trainer.console import plural, print_error, record_exit_code

logger = logging.getLogger(__name__)

PHOTOS_PER_SHARD = 1000  # ~200 MB of 1036-px JPEGs: large sequential reads, few files to list


class EncodeSource(Dataset):
    """The writer's workers: each photo decoded, resized and encoded as JPEG (or its failure)."""

    def __init__(self, paths: list[Path], max_side: int, quality: int):
        self.paths, self.max_side, self.quality = paths, max_side, quality

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        return read_source_photo(self.paths[index], self.max_side, self.quality)


def plan(cfg: Config, photos_per_shard: int, writers: int) -> dict[str, list[list[Path]]]:
    """split -> its shards, each a list of photos: the run's own train/val split, in order,
    cut into equal contiguous runs."""
    d = cfg.data
    try:
        train, val = train_val_paths(d.train_dir, d.val_dir, d.val_fraction, cfg.seed)
    except (FileNotFoundError, ValueError) as error:  # a missing or empty folder
        raise ConfigError(f"data.train_dir: {error}") from None
    shards = {}
    for split, paths in zip(SPLITS, (train, val)):
        count = shard_count(len(paths), photos_per_shard, writers)
        shards[split] = [list(part) for part in np.array_split(np.array(paths, dtype=object), count)] if count else []
    return shards


def source_root(cfg: Config, split: str) -> Path:
    return Path(cfg.data.val_dir) if split == "val" and cfg.data.val_dir is not None else Path(cfg.data.train_dir)


def prepare_shards(cfg: Config, out: str | Path, max_side: Optional[int] = None, quality: int = 95,
                   photos_per_shard: int = PHOTOS_PER_SHARD, accelerator: Optional[Accelerator] = None) -> dict:
    """Collective: each process writes (or keeps) its share of the shards; the main process then
    writes index.json and manifest.json. Returns the manifest."""
    start = time.perf_counter()
    accelerator = accelerator or Accelerator(cpu=True)
    out = Path(out)
    d = cfg.data
    max_side = max_side or 2 * max(d.teacher_size, d.student_size)
    if max_side < max(d.teacher_size, d.student_size):
        needed = max(d.teacher_size, d.student_size)
        raise ConfigError(f"--max-side {max_side} is below the training views ({needed} px); give at least {needed}")
    if not 1 <= quality <= 100:
        raise ConfigError(f"--quality {quality} must be in 1..100")
    previous = own_files(out)  # on every process, so all stop together on a refusal
    shards = plan(cfg, photos_per_shard, accelerator.num_processes)
    settings = {"max_side": max_side, "quality": quality, "format": 1}
    every = [(split, number) for split in SPLITS for number in range(len(shards[split]))]
    mine = every[accelerator.process_index::accelerator.num_processes]

    def listing(split: str, number: int) -> list[tuple[str, int, int]]:
        """(path relative to its folder, size, mtime_ns) of each photo of one shard: one stat a photo."""
        return [(relative_key(path, source_root(cfg, split)), *source_stat(path)) for path in shards[split][number]]

    # Each process stats its own shards' photos; the main process stats them all only to compare
    # with an earlier run (its own shards then reuse that listing).
    before = sources_of(previous) if accelerator.is_main_process else {}
    sources = {key: listing(*key) for key in (every if before else mine)}
    changed = changes(before, {(split, key): (size, mtime) for (split, _), entries in sources.items()
                               for key, size, mtime in entries}) if before else None
    out.mkdir(parents=True, exist_ok=True)  # on every process: a folder that cannot be made stops them all alike
    if accelerator.is_main_process:
        (out / MANIFEST_FILE).unlink(missing_ok=True)  # incomplete from here until the new manifest
    accelerator.wait_for_everyone()

    written, kept = {}, 0
    bar = tqdm(total=sum(len(shards[s][n]) for s, n in mine), desc="prepare shards", unit="photo",
               disable=not accelerator.is_local_main_process)
    for split, number in mine:
        paths, entries = shards[split][number], sources[(split, number)]
        fingerprint = plan_fingerprint(settings, entries)
        sidecar = reusable_shard(out, split, number, fingerprint)
        if sidecar is None:
            loader = DataLoader(EncodeSource(paths, max_side, quality), batch_size=None, num_workers=d.num_workers)
            serial = sum(len(s) for s in shards[split][:number])  # unique keys within the split
            members = [{"path": key, "serial": serial + i, "source": [size, mtime], **encoded}
                       for i, ((key, size, mtime), encoded) in enumerate(zip(entries, loader))]
            sidecar = write_shard(out, split, number, fingerprint, members)
        else:
            kept += 1
        written[(split, number)] = sidecar
        bar.update(len(paths))
    bar.close()

    shares = gather_object([(written, kept)])
    if accelerator.is_main_process:
        sidecars = {key: sidecar for share, _ in shares for key, sidecar in share.items()}
        manifest = finish(cfg, out, shards, sidecars, previous, settings, photos_per_shard,
                          {"changes_since_previous": changed, "shards_kept": sum(k for _, k in shares)})
        describe(out, manifest, time.perf_counter() - start)
    else:
        manifest = {}
    accelerator.wait_for_everyone()
    return manifest


def finish(cfg: Config, out: Path, shards: dict, sidecars: dict, previous: list[Path], settings: dict,
           photos_per_shard: int, this_run: dict) -> dict:
    """Index and manifest from every shard's sidecar; files of an earlier plan deleted first."""
    current = {shard_name(split, number, suffix) for split, number in sidecars for suffix in ("tar", "json")}
    for path in previous:
        if path.name not in current and path.name not in (INDEX_FILE, MANIFEST_FILE) and path.exists():
            path.unlink()
    index, skipped, counts = {}, [], {}
    for split in SPLITS:
        entries = []
        for number in range(len(shards[split])):
            sidecar = sidecars[(split, number)]
            name = shard_name(split, number, "tar")
            entries += [[name, offset, size, width, height, path]
                        for path, offset, size, width, height, *_ in sidecar["samples"]]
            skipped += [[split, path, reason] for path, reason in sidecar["skipped"]]
        index[split] = entries
        counts[split] = {"photos": len(entries), "shards": len(shards[split]),
                         "bytes": sum((out / shard_name(split, n, "tar")).stat().st_size
                                      for n in range(len(shards[split])))}
    d = cfg.data
    manifest = {"splits": counts, "skipped": skipped, "max_side": settings["max_side"],
                "quality": settings["quality"], "photos_per_shard": photos_per_shard,
                "source": {"train_dir": str(d.train_dir), "val_dir": d.val_dir, "val_fraction": d.val_fraction,
                           "seed": cfg.seed},
                **this_run}
    write_index_and_manifest(out, index, manifest)
    return manifest


def sources_of(previous: list[Path]) -> dict[tuple[str, str], tuple[int, int]]:
    """(split, photo path) -> (size, mtime_ns) of each photo an earlier run's shards were made from."""
    sources = {}
    for path in previous:
        if path.suffix == ".json" and path.name not in (INDEX_FILE, MANIFEST_FILE) and not path.name.startswith("."):
            try:
                sidecar = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            split = path.name.split("-")[0]
            for sample in sidecar.get("samples", []):
                sources[(split, sample[0])] = tuple(sample[5:7])
    return sources


def changes(before: dict, now: dict) -> dict[str, int]:
    """Photos added, removed and changed (size or modification time) between two source listings."""
    return {"added": len(now.keys() - before.keys()), "removed": len(before.keys() - now.keys()),
            "changed": sum(before[key] != now[key] for key in now.keys() & before.keys())}


def describe(out: Path, manifest: dict, seconds: float) -> None:
    counts = manifest["splits"]
    parts = [f"{split}: {plural(c['photos'], 'photo')} in {plural(c['shards'], 'shard')} ({c['bytes'] / 1e6:.1f} MB)"
             for split, c in counts.items()]
    total = sum(c["shards"] for c in counts.values())
    print(f"shards {out}: {'; '.join(parts)}; {len(manifest['skipped'])} unreadable skipped; "
          f"{manifest['shards_kept']} of {total} shards kept from an earlier run; {seconds:.1f} s")
    for split, path, reason in manifest["skipped"]:
        logger.warning("skipped unreadable %s photo %s (%s)", split, path, reason)
    changed = manifest["changes_since_previous"]
    if changed and any(changed.values()):
        print(f"the photos changed since {out} was last written: {changed['added']} added, {changed['removed']} "
              f"removed, {changed['changed']} modified; the shards that hold them were rewritten")


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m trainer.prepare_shards", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the run's YAML preset, e.g. trainer/configs/demo.yaml")
    parser.add_argument("--out", required=True, help="the shard folder to write (missing, empty or earlier shards)")
    parser.add_argument("--max-side", type=int, help="longest side of a stored photo (default: 2 x data.teacher_size)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality of the stored photos (default 95)")
    parser.add_argument("--photos-per-shard", type=int, default=PHOTOS_PER_SHARD,
                        help=f"at most this many photos a shard (default {PHOTOS_PER_SHARD})")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.train_dir=photos/")
    return parser.parse_intermixed_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = parse_args(argv)
    try:
        if args.photos_per_shard < 1:
            raise ConfigError(f"--photos-per-shard {args.photos_per_shard} must be >= 1")
        cfg = load_config(args.config, args.overrides)
        prepare_shards(cfg, args.out, args.max_side, args.quality, args.photos_per_shard)
    except (ConfigError, ShardsError) as error:  # found alike by every process, before any writing
        print_error(str(error), agreed=True)
        return 1
    except OSError as error:  # a folder that cannot be made, a full disk: finished shards are kept for a re-run
        print_error(f"cannot write shards to {args.out} ({type(error).__name__}: {error}); the shards already "
                    f"finished are kept, and a re-run continues from them")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(record_exit_code(main()))
