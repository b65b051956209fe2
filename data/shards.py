"""Photos prepared once into WebDataset tar shards, and the datasets that train from them.

A shard folder (`python -m trainer.prepare_shards`) holds:

    train-000000.tar ...  WebDataset layout: per photo `<n>.jpg` (upright RGB, longest side at most
    val-000000.tar ...    `max_side`, no EXIF) and `<n>.json` ({"path", "width", "height"})
    train-000000.json ... one per tar, written after it: where each photo's JPEG lies in the tar
                          (byte offset and size), and what the tar was made from (`plan`)
    index.json            every photo of each split, in order: [shard, offset, size, width, height, path]
    manifest.json         settings, counts, skipped photos and the source's fingerprint; written last,
                          so a folder without it is incomplete

Any WebDataset reader streams the tars. The trainer instead reads each photo's bytes by offset
(`fsspec`, so `s3://`, `gs://`, `https://` roots work with their fsspec package installed): a
map-style dataset, so the trainer's sampler, seeded augmentation and mid-epoch resume apply
unchanged, and the number of shards never decides how photos divide among processes and workers.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import fsspec
import numpy as np
import torch
from torch.utils.data import default_collate
from torchvision.io import ImageReadMode, decode_jpeg

from core.errors import first_line

from .datasets import UnlabeledImageDataset, _blank_views
from .images import describe_unreadable, load_rgb
from .teacher_cache import FOLDER_LITTER, TMP_PREFIX, new_file_mode, write_json_atomically
from .transforms import CropParams, EvalTransform, TrainTransform, normalize_views

SHARDS_VERSION = 1
MANIFEST_FILE, INDEX_FILE = "manifest.json", "index.json"
SPLITS = ("train", "val")
SHARD_FILE = re.compile(r"(train|val)-\d{6}\.(tar|json)")
MANIFEST_KEYS = ("version", "splits", "max_side", "quality")  # every manifest the writer made has these
JPEG_START, JPEG_END = b"\xff\xd8", b"\xff\xd9"


class ShardsError(ValueError):
    """A shard folder that cannot be read or written; the message says what to do."""


def shard_name(split: str, number: int, suffix: str) -> str:
    return f"{split}-{number:06d}.{suffix}"


def shard_count(num_photos: int, photos_per_shard: int, writers: int) -> int:
    """At most `photos_per_shard` photos a shard, the count rounded up to a multiple of 8 x the
    writing processes (so each writer has as many shards, and a streaming reader splits them evenly
    over 1, 2, 4 or 8 processes or workers), never more shards than photos."""
    if num_photos == 0:
        return 0
    needed = -(-num_photos // photos_per_shard)
    step = 8 * writers
    return min(num_photos, -(-needed // step) * step)


def plan_fingerprint(settings: dict, sources: Sequence[tuple[str, int, int]]) -> str:
    """What one shard is made of: the settings and each source photo's (path, size, mtime_ns)."""
    text = json.dumps([settings, [list(source) for source in sources]], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def source_stat(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def encode_photo(path: Path, max_side: int, quality: int) -> tuple[bytes, int, int]:
    """-> (JPEG bytes, width, height): the photo upright (EXIF applied), RGB, its longest side at
    most `max_side`, as the folder pipeline decodes it. Raises for unreadable files."""
    image = load_rgb(path, max_side)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue(), image.width, image.height


def write_shard(folder: Path, split: str, number: int, plan: str, members: Sequence[dict]) -> dict:
    """Write one tar (through a temporary name, then a rename), then its sidecar JSON: a shard is
    either complete with its sidecar or absent. `members`: {"path", "jpeg", "width", "height",
    "serial", "source"} for each readable photo, {"path", "reason"} for each skipped one."""
    import webdataset

    name = shard_name(split, number, "tar")
    tmp = folder / f"{TMP_PREFIX}{name}"
    readable = [m for m in members if "jpeg" in m]
    with open(tmp, "wb") as stream:
        writer = webdataset.TarWriter(stream)
        for m in readable:
            # A numeric key: WebDataset splits a key from its extensions at the first dot, and paths have dots.
            writer.write({"__key__": f"{m['serial']:09d}", "jpg": m["jpeg"],
                          "json": {"path": m["path"], "width": m["width"], "height": m["height"]}})
        writer.close()
    with tarfile.open(tmp) as tar:  # where each JPEG's bytes lie, for reading one photo by offset
        offsets = {member.name: (member.offset_data, member.size) for member in tar.getmembers()}
    samples = []
    for m in readable:
        offset, size = offsets[f"{m['serial']:09d}.jpg"]
        samples.append([m["path"], offset, size, m["width"], m["height"], *m["source"]])
    os.chmod(tmp, new_file_mode())
    os.replace(tmp, folder / name)
    sidecar = {"plan": plan, "tar_bytes": (folder / name).stat().st_size, "samples": samples,
               "skipped": [[m["path"], m["reason"]] for m in members if "jpeg" not in m]}
    write_json_atomically(folder / shard_name(split, number, "json"), sidecar)
    return sidecar


def reusable_shard(folder: Path, split: str, number: int, plan: str) -> Optional[dict]:
    """The sidecar of a complete shard made from the same plan (a re-run after a crash, or on a
    folder where this shard's photos did not change), else None."""
    sidecar_path, tar_path = folder / shard_name(split, number, "json"), folder / shard_name(split, number, "tar")
    try:
        sidecar = json.loads(sidecar_path.read_text())
        complete = sidecar["plan"] == plan and tar_path.stat().st_size == sidecar["tar_bytes"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return sidecar if complete else None


def write_index_and_manifest(folder: Path, index: dict[str, list], manifest: dict) -> None:
    """The index, then the manifest, each atomically: the folder is complete once the manifest is there."""
    write_json_atomically(folder / INDEX_FILE, index)
    write_json_atomically(folder / MANIFEST_FILE, {"version": SHARDS_VERSION, **manifest}, indent=1)


# --- the folder a writer may use -------------------------------------------------------------------


def own_files(folder: Path) -> list[Path]:
    """The files of a previous shard folder in `folder` (none if it is missing or empty): the only
    files a re-run may replace or delete. Raises ShardsError for a file, or a folder holding
    anything else: those are someone's files, never to be deleted or mixed with shards."""
    if not folder.exists():
        return []
    if not folder.is_dir():
        raise ShardsError(f"{folder} is a file, not a folder; choose an empty or new --out")
    entries = [path for path in folder.iterdir() if path.name not in FOLDER_LITTER]
    own = [path for path in entries if _is_own_file(path)]
    if len(own) != len(entries):
        other = next(path.name for path in entries if path not in own)
        raise ShardsError(f"{folder} holds files that are not photo shards (e.g. {other}); choose an empty "
                          f"or new --out")
    return own


def _is_own_file(path: Path) -> bool:
    name = path.name.removeprefix(TMP_PREFIX)
    if not path.is_file():
        return False
    if name == MANIFEST_FILE:
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError):
            return False
        return isinstance(manifest, dict) and all(key in manifest for key in MANIFEST_KEYS)
    if name == INDEX_FILE:
        try:
            with open(path, "rb") as file:
                head = file.read(64)
        except OSError:
            return False
        return head.startswith(b'{"train": [')
    return SHARD_FILE.fullmatch(name) is not None


# --- reading ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardPhoto:
    """Where one prepared photo lies: `shard` (a tar in the folder), its bytes at [offset, offset + size)."""

    shard: str
    offset: int
    size: int
    width: int
    height: int
    path: str  # relative to the source folder, for messages

    def __str__(self) -> str:
        return f"{self.path} (in {self.shard})"


class ShardSet:
    """A complete shard folder, local or behind any fsspec URL. Picklable: DataLoader workers get
    the filesystem object, not an open file."""

    def __init__(self, root: str, manifest: dict, index: dict[str, list]):
        self.root, self.manifest = root.rstrip("/"), manifest
        self.photos = {split: [ShardPhoto(*entry) for entry in index.get(split, [])] for split in SPLITS}
        self.fs, self.base = fsspec.core.url_to_fs(self.root)

    @classmethod
    def open(cls, root: str | Path, key: str = "data.shards") -> ShardSet:
        root = str(root)
        prepare = "write it with `python -m trainer.prepare_shards --config <your config> --out <folder>`"
        try:
            fs, base = fsspec.core.url_to_fs(root)
        except (ImportError, ValueError) as error:  # e.g. s3:// without s3fs installed
            raise ShardsError(f"{key}: cannot open {root} ({error})") from None
        try:
            if not fs.isdir(base):
                raise ShardsError(f"{key}: folder '{root}' does not exist; {prepare}")
            if not fs.isfile(f"{base}/{MANIFEST_FILE}"):
                raise ShardsError(f"{key}: {root} has no {MANIFEST_FILE}: not a shard folder, or its writing was "
                                  f"interrupted; {prepare}")
            manifest = json.loads(fs.cat_file(f"{base}/{MANIFEST_FILE}"))
            index = json.loads(fs.cat_file(f"{base}/{INDEX_FILE}"))
        except OSError as error:
            raise ShardsError(f"{key}: cannot read {root} ({type(error).__name__}: {error})") from None
        if manifest.get("version") != SHARDS_VERSION:
            raise ShardsError(f"{key}: {root} was written by version {manifest.get('version')} of the shard "
                              f"format; this trainer reads version {SHARDS_VERSION}; {prepare}")
        return cls(root, manifest, index)

    def read(self, photo: ShardPhoto) -> bytes:
        data = self.fs.cat_file(f"{self.base}/{photo.shard}", start=photo.offset, end=photo.offset + photo.size)
        if len(data) != photo.size:
            raise OSError(f"{photo.shard} ends {photo.size - len(data)} bytes early (truncated shard)")
        return data


def check_jpeg(data: bytes) -> None:
    """The cheap check a worker that does not decode can make: a JPEG starts and ends with its markers."""
    if not data.startswith(JPEG_START) or not data.rstrip(b"\x00").endswith(JPEG_END):
        raise OSError("damaged JPEG in shard (its start or end marker is missing)")


class ShardPhotoDataset(UnlabeledImageDataset):
    """Photos from a shard folder, as `UnlabeledImageDataset` gives photos from a folder.

    `decode_on`:
      "workers": each worker reads, decodes (torchvision's libjpeg-turbo: shards hold photos already
                 at `max_side`, so no DCT scaling is lost) and renders both views with `TrainTransform`,
                 as uint8; `finish_batch` normalises them on the device, as for a folder.
      "device":  workers only read bytes and draw the augmentation; `finish_batch` then decodes and
                 renders the batch where the step runs (GPU: nvJPEG and CUDA kernels), with the
                 same code and the same draws.
    With an `EvalTransform` (validation), photos are decoded with PIL as in the folder dataset.
    """

    def __init__(self, shards: ShardSet, photos: Sequence[ShardPhoto], transform, decode_on: str = "workers"):
        super().__init__([], transform)
        self.shards, self.photos, self.decode_on = shards, list(photos), decode_on
        self.paths = [str(photo) for photo in self.photos]  # what messages name

    def __len__(self) -> int:
        return len(self.photos)

    def load(self, index: int):
        data = self.shards.read(self.photos[index])
        if isinstance(self.transform, EvalTransform):
            return load_rgb(io.BytesIO(data), self.max_side)
        if self.decode_on == "device":
            check_jpeg(data)
            return np.frombuffer(data, dtype=np.uint8), self.photos[index].width, self.photos[index].height
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)

    def render(self, loaded) -> dict:
        if isinstance(self.transform, EvalTransform):
            return self.transform(loaded)
        if self.decode_on == "device":  # drawn from the size the index records: nothing is decoded here
            data, width, height = loaded
            return {"jpeg": data, "params": self.transform.draw(width, height)}
        return self.transform(loaded)  # uint8 views, normalised on the device

    def blank_sample(self) -> dict:
        if self.decode_on == "device" and isinstance(self.transform, TrainTransform):
            return {"jpeg": np.frombuffer(JPEG_START + JPEG_END, dtype=np.uint8),
                    "params": (CropParams(box=(0, 0, 1, 1), flip=False), None)}
        return _blank_views(self.transform)

    def describe(self, index: int, error: Exception) -> str:
        if isinstance(error, OSError):  # a missing or short shard, a damaged JPEG: the error says which
            return first_line(error)
        return f"undecodable JPEG in shard ({first_line(error)})"

    def unreadable_reason(self, index: int) -> str:
        """Why photo `index` comes out invalid, or "": read and decoded again here, as training
        decodes it (libjpeg-turbo through torchvision, stricter than PIL, for training photos)."""
        try:
            loaded = self.load(index)
            if self.decode_on == "device" and isinstance(self.transform, TrainTransform):
                decode_jpeg(torch.from_numpy(loaded[0].copy()), mode=ImageReadMode.RGB)
        except Exception as error:
            return self.describe(index, error)
        return ""

    def finish_batch(self, batch: dict, device: torch.device) -> dict:
        """A batch from the workers -> the step's views on `device`: uint8 views normalised, or
        (decode_on=device, `collate_encoded`) encoded photos decoded and rendered there. A photo that
        does not decode there becomes zeros with valid=False, as in the workers."""
        if "jpeg" not in batch:
            return super().finish_batch(batch, device)
        encoded = [torch.from_numpy(np.array(data)) for data in batch.pop("jpeg")]
        params = batch.pop("params")
        try:
            images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one bad photo fails the batched call: decode them one by one
            images = [_decode_or_none(data, device) for data in encoded]
        blank = normalize_views({name: view.to(device) for name, view in _blank_views(self.transform).items()})
        views = [self.transform.apply(image, crop, jitter, normalize=True) if image is not None else blank
                 for image, (crop, jitter) in zip(images, params)]
        stacked = {name: torch.stack([v[name] for v in views]) for name in blank}
        decoded = torch.tensor([image is not None for image in images], device=batch["valid"].device)
        return {**batch, **stacked, "valid": batch["valid"] & decoded}


def _decode_or_none(data: torch.Tensor, device: torch.device) -> Optional[torch.Tensor]:
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return None


def collate_encoded(samples: list[dict]) -> dict:
    """default_collate for everything but the encoded photos and their augmentation draws, which
    stay host-side Python lists (Accelerate moves only tensors; nvJPEG reads host memory)."""
    encoded = [sample.pop("jpeg") for sample in samples]
    params = [sample.pop("params") for sample in samples]
    return {**default_collate(samples), "jpeg": encoded, "params": params}


def read_source_photo(path: Path, max_side: int, quality: int) -> dict:
    """The writer's worker: one photo encoded, or why it cannot be (never raises: a bad photo is
    skipped and counted, not the end of the run)."""
    try:
        jpeg, width, height = encode_photo(path, max_side, quality)
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
        return {"reason": describe_unreadable(path, error)}
    return {"jpeg": jpeg, "width": width, "height": height}
