"""Teacher depth maps computed once and stored, and the dataset that crops them like the photos.

The teacher forward is most of a training step, yet its input is a fixed function of the photo and
the crop. So the writer (`python -m trainer.train.cache_teacher`) runs it once per photo on the WHOLE
image at `cache_size` x `cache_size`, and training crops, resizes and flips the stored map with the
same parameters as the student's view. A cache folder holds:

    shard_r{rank}_{k:05d}.safetensors  fp16 maps (1, S, S), one per distinct photo, keyed by content hash,
                 and, for a recipe with a feature term, "<hash>.features": the teacher's distilled
                 layers on its patch grid, (layers, C, S/14, S/14) fp16
    index.json   {path relative to train_dir: {"hash", "shard", "height", "width"}}; "shard" is null
                 for a file that could not be decoded (training marks it invalid anyway)
    meta.json    what produced the maps; written last, so a folder without it is incomplete

The writer only writes into a folder that is missing, empty or already a cache, and a rebuild
deletes only those names (and their `.tmp_` copies): a user's file beside them is never touched.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from core.errors import RunError, first_line

from .datasets import UnlabeledImageDataset, _blank_views, _decode_max_side
from .images import describe_unreadable, list_images, load_rgb_tensor, split_train_val
from core.choices import TEACHER_MULTIPLE

from .transforms import CropParams, TrainTransform, normalize, render_view

# 2: maps of the teacher view as torch renders it for training (`load_rgb_tensor`, `render_view`);
# version 1's came from PIL's rendering, a little off the views training now crops.
CACHE_VERSION = 2
META_FILE, INDEX_FILE = "meta.json", "index.json"
SHARD_NAME = re.compile(r"shard_r\d+_\d+\.safetensors")
TMP_PREFIX = ".tmp_"  # a file being written; renamed to its real name once complete
META_KEYS = ("version", "teacher", "teacher_config_hash", "cache_size")  # every meta.json the writer made has these
# Files an OS or a file browser drops into any folder it shows; they do not make a folder "used".
FOLDER_LITTER = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})
MAPS_PER_SHARD = 256  # ~140 MB shards of depth at cache_size 518: few files, each cheap to map
SHARD_BYTES = 512 * 2**20  # with features (~4.2 MB a photo for V2-Small at 518) shards close at this size


class StaleCacheError(RunError, ValueError):
    """The teacher cache does not match the run or the photos; the message says how to rebuild."""


class CacheDirError(ValueError):
    """The folder given for a new cache cannot take one: a file, a folder of other files, or one
    that cannot be created. The message says what to choose instead."""


def rebuild_hint(cache_dir: str | Path, verb: str = "rebuild") -> str:
    # Always with --cache-dir: the cache may have been named by an override the config file lacks.
    return (f"{verb} it with `python -m trainer.train.cache_teacher --config <your config> "
            f"--cache-dir {shlex.quote(str(cache_dir))}`")


def train_val_paths(
    train_dir: str | Path, val_dir: Optional[str | Path], val_fraction: float, seed: int
) -> tuple[list[Path], list[Path]]:
    """The photos a run trains and validates on: all of `train_dir` and `val_dir` when one is
    given, else a seeded `val_fraction` split of `train_dir`. The cache writer and the trainer
    both call this, so the cache covers exactly the photos training asks it for."""
    train_paths = list_images(train_dir)
    if val_dir is not None:
        return train_paths, list_images(val_dir)
    return split_train_val(train_paths, val_fraction, seed)


def read_photo(path: Path, max_side: int) -> tuple[str, torch.Tensor]:
    """-> (content hash, the photo as the training datasets decode it: `load_rgb_tensor`), from one
    read of the file. Raises for unreadable files."""
    data = Path(path).read_bytes()
    return content_hash(data), load_rgb_tensor(io.BytesIO(data), max_side)


def content_hash(data: bytes) -> str:
    # 64 bits of sha256: a chance collision among a million photos is ~3e-8.
    return hashlib.sha256(data).hexdigest()[:16]


def relative_key(path: Path, train_dir: str | Path) -> str:
    return Path(path).relative_to(train_dir).as_posix()


class CacheSourceDataset(Dataset):
    """The writer's input: each whole photo resized to `cache_size` x `cache_size` and normalised,
    exactly the teacher view `TrainTransform` renders for a crop covering the whole photo."""

    def __init__(self, paths: Sequence[Path], train_dir: str | Path, cache_size: int, student_size: int):
        self.paths, self.train_dir, self.cache_size = list(paths), Path(train_dir), cache_size
        self.max_side = _decode_max_side(TrainTransform(cache_size, student_size))  # the training datasets' decode size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        size = self.cache_size
        sample = {"key": relative_key(path, self.train_dir), "hash": "", "height": 0, "width": 0, "reason": ""}
        try:
            data = path.read_bytes()
            sample["hash"] = content_hash(data)
            image = load_rgb_tensor(io.BytesIO(data), self.max_side)
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
            # Not logged here (a worker process): the writer's loop logs `reason`, once per photo.
            sample["reason"] = describe_unreadable(path, error)
            return {**sample, "image": torch.zeros(3, size, size), "valid": torch.tensor(False)}
        height, width = image.shape[-2:]
        whole = CropParams(box=(0, 0, width, height), flip=False)
        return {**sample, "height": height, "width": width,
                "image": normalize(render_view(image, size, whole)), "valid": torch.tensor(True)}


class ShardWriter:
    """One process's share of a cache: fp16 maps in safetensors shards, and their index entries."""

    def __init__(self, cache_dir: str | Path, rank: int, maps_per_shard: int = MAPS_PER_SHARD):
        self.cache_dir, self.rank, self.maps_per_shard = Path(cache_dir), rank, maps_per_shard
        self.entries: dict[str, dict] = {}  # relative path -> index entry
        self.bytes_written = 0
        self._pending: dict[str, torch.Tensor] = {}  # content hash -> map, for the current shard
        self._shard_of_hash: dict[str, str] = {}  # a duplicate photo points at the first copy
        self._num_shards = 0

    @property
    def _current_shard(self) -> str:
        return f"shard_r{self.rank}_{self._num_shards:05d}.safetensors"

    def add(self, key: str, content_hash: str, height: int, width: int, disparity: torch.Tensor,
            features: Optional[torch.Tensor] = None) -> None:
        """disparity: (1, S, S) for the whole photo; features: (layers, C, S/14, S/14) or None."""
        if content_hash not in self._shard_of_hash:
            # A copy: safetensors refuses tensors that share storage (rows of one batch do).
            self._pending[content_hash] = disparity.to(torch.float16).clone()
            if features is not None:
                self._pending[f"{content_hash}.features"] = features.to(torch.float16).contiguous().clone()
            self._shard_of_hash[content_hash] = self._current_shard
        self.entries[key] = {"hash": content_hash, "shard": self._shard_of_hash[content_hash],
                             "height": height, "width": width}
        photos = sum(not name.endswith(".features") for name in self._pending)
        pending_bytes = sum(t.numel() * t.element_size() for t in self._pending.values())
        if photos >= self.maps_per_shard or pending_bytes >= SHARD_BYTES:
            self.flush()

    def skip(self, key: str, content_hash: str) -> None:
        # Listed, so that training knows the file and marks it invalid rather than calling the
        # cache incomplete; the hash (if the bytes were readable) tells a later fix of the file.
        self.entries[key] = {"hash": content_hash or None, "shard": None, "height": None, "width": None}

    def flush(self) -> None:
        if not self._pending:
            return
        path = self.cache_dir / self._current_shard
        tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
        save_file(self._pending, str(tmp))
        # safetensors creates its file 0600; a cache is data others (a training job run by another
        # user, a teammate) read, so give it the mode any other new file gets.
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
        self.bytes_written += path.stat().st_size
        self._pending = {}
        self._num_shards += 1


def new_file_mode() -> int:
    """The mode `open()` gives a new file: 0666 less the umask (0644 with the usual 022)."""
    umask = os.umask(0o022)  # the only way to read the umask is to set it: put it straight back
    os.umask(umask)
    return 0o666 & ~umask


def check_cache_dir(cache_dir: str | Path) -> list[Path]:
    """-> the files of a previous cache in `cache_dir`: the only files a rebuild may delete (none
    for a missing or empty folder). Raises CacheDirError for a file, or for a folder holding other
    files and no teacher cache: those are someone's, and must be neither deleted nor mixed with a
    cache. Read-only, so every process may call it before the main process clears anything."""
    cache_dir = Path(cache_dir)
    if not cache_dir.exists():
        return []
    if not cache_dir.is_dir():
        raise CacheDirError(f"{cache_dir} is a file, not a folder; choose an empty or new --cache-dir")
    entries = [path for path in cache_dir.iterdir() if path.name not in FOLDER_LITTER]
    own = [path for path in entries if _is_cache_file(path)]
    # A meta.json or index.json the writer did not make would be overwritten by the new cache.
    clashing = [path.name for path in entries if path.name in (META_FILE, INDEX_FILE) and path not in own]
    if (entries and not own) or clashing:
        raise CacheDirError(f"{cache_dir} holds files that are not a teacher cache; choose an empty or new "
                            f"--cache-dir")
    return own


def _is_cache_file(path: Path) -> bool:
    name = path.name.removeprefix(TMP_PREFIX)
    if not path.is_file() or not (name in (META_FILE, INDEX_FILE) or SHARD_NAME.fullmatch(name)):
        return False
    if path.name == META_FILE:
        return _is_cache_meta(path)
    if path.name == INDEX_FILE:
        return _is_cache_index(path)
    return True  # shard_r*_*.safetensors and any .tmp_ copy: names only this writer uses


def _is_cache_meta(path: Path) -> bool:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):  # unreadable, not UTF-8, not JSON
        return False
    return isinstance(meta, dict) and all(key in meta for key in META_KEYS)


def _is_cache_index(path: Path) -> bool:
    # Only the start: an index of a million photos is ~100 MB, and every process checks the folder.
    # The writer's index is compact JSON with sorted keys: '{"a.jpg": {"hash": ..., "shard": ...'.
    try:
        with open(path, "rb") as file:
            head = file.read(1 << 16).strip()
    except OSError:
        return False
    return head == b"{}" or (head.startswith(b'{"') and b'"shard": ' in head)


def clear_cache(cache_dir: str | Path) -> None:
    """Create `cache_dir`, or remove a previous cache's files from it (meta first, so it stops
    counting as complete at once); other files in the folder are left alone. Refuses (CacheDirError)
    a folder that `check_cache_dir` refuses."""
    cache_dir = Path(cache_dir)
    own = check_cache_dir(cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CacheDirError(f"cannot create cache folder {cache_dir} ({type(error).__name__}: {error}); "
                            f"choose another --cache-dir") from None
    for path in sorted(own, key=lambda path: path.name != META_FILE):
        path.unlink()


def write_index(cache_dir: str | Path, entries: dict[str, dict], meta: dict) -> None:
    """Index, then meta, each through a temporary file and a rename: a crash at any point leaves
    either the complete cache or one without meta.json, never a half-written file."""
    write_json_atomically(Path(cache_dir) / INDEX_FILE, entries)
    write_json_atomically(Path(cache_dir) / META_FILE, {"version": CACHE_VERSION, **meta}, indent=1)


def write_json_atomically(path: Path, content: Any, indent: Optional[int] = None) -> None:
    """`content` as JSON (sorted keys) at `path`, through a temporary file and a rename: readers
    see the old file or the whole new one, never a half-written one."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    tmp.write_text(json.dumps(content, indent=indent, sort_keys=True))
    os.chmod(tmp, new_file_mode())  # what write_text gave it, unless a previous tmp file lingered
    os.replace(tmp, path)


class TeacherCache:
    """Read side of a cache folder. Shards are opened lazily, once per process: a handle made in
    the main process is never used by a DataLoader worker."""

    def __init__(self, cache_dir: Path, index: dict[str, dict], cache_size: int, train_dir: Path,
                 feature_shape: Optional[tuple[int, int]] = None):
        self.cache_dir, self.index, self.cache_size, self.train_dir = cache_dir, index, cache_size, train_dir
        self.feature_shape = feature_shape  # (layers, channels) of the stored features, when a run reads them
        self._handles: dict[str, Any] = {}
        self._pid: Optional[int] = None

    @classmethod
    def open(cls, cache_dir: str | Path, teacher_name: str, teacher_config_hash: str, cache_size: int,
             paths: Sequence[Path], train_dir: str | Path, feature_layers: Optional[list[int]] = None) -> TeacherCache:
        """Check that the cache was made by this teacher at this size and covers `paths` (and, with
        `feature_layers`, holds the teacher's features of those layers)."""
        cache_dir = Path(cache_dir)
        rebuild = rebuild_hint(cache_dir)
        if not cache_dir.is_dir():
            raise StaleCacheError(f"teacher cache {cache_dir} does not exist; {rebuild_hint(cache_dir, 'build')}")
        if not (cache_dir / META_FILE).is_file() or not (cache_dir / INDEX_FILE).is_file():
            raise StaleCacheError(f"teacher cache {cache_dir} is incomplete (no {META_FILE}: its writing was "
                                  f"interrupted); {rebuild}")
        meta = json.loads((cache_dir / META_FILE).read_text())
        expected = {"version": CACHE_VERSION, "teacher": teacher_name,
                    "teacher_config_hash": teacher_config_hash, "cache_size": cache_size}
        for key, value in expected.items():
            if meta.get(key) != value:
                raise StaleCacheError(f"teacher cache {cache_dir} has {key}={meta.get(key)!r} but this run "
                                      f"needs {value!r}; {rebuild}")
        if feature_layers is not None and meta.get("feature_layers") != list(feature_layers):
            held = (f"the features of layers {meta['feature_layers']}" if meta.get("feature_layers")
                    else "no teacher features")
            raise StaleCacheError(f"teacher cache {cache_dir} holds {held}, but this run's feature term needs layers "
                                  f"{list(feature_layers)}; {rebuild} (it stores them while "
                                  f"distill.cache_features=stored), or set distill.cache_features=live")
        index = json.loads((cache_dir / INDEX_FILE).read_text())
        keys = [relative_key(path, train_dir) for path in paths]
        missing = [key for key in keys if key not in index]
        if missing:
            raise StaleCacheError(f"{len(missing)} of {len(keys)} training images are not in teacher cache "
                                  f"{cache_dir} (first: {missing[0]}); {rebuild}")
        shards = {index[key]["shard"] for key in keys} - {None}
        absent = sorted(shard for shard in shards if not (cache_dir / shard).is_file())
        if absent:
            raise StaleCacheError(f"teacher cache {cache_dir} lacks {len(absent)} shard file(s) "
                                  f"(first: {absent[0]}); {rebuild}")
        feature_shape = None if feature_layers is None else (len(feature_layers), meta["feature_channels"])
        return cls(cache_dir, index, cache_size, Path(train_dir), feature_shape)

    def __getstate__(self) -> dict:
        # Spawned DataLoader workers unpickle the cache: handles never travel, each process opens its own.
        return {**self.__dict__, "_handles": {}, "_pid": None}

    def _shard(self, name: str):
        if self._pid != os.getpid():  # first use, or a forked worker holding its parent's handles
            self._handles, self._pid = {}, os.getpid()
        if name not in self._handles:
            self._handles[name] = safe_open(str(self.cache_dir / name), framework="pt")
        return self._handles[name]

    def get(self, path: Path, content_hash: str) -> torch.Tensor:
        """-> (1, cache_size, cache_size) float32 teacher disparity of the whole photo."""
        key = relative_key(path, self.train_dir)
        entry = self.index[key]
        if entry["hash"] != content_hash:
            raise StaleCacheError(f"{path} changed since the teacher cache {self.cache_dir} was written; "
                                  f"{rebuild_hint(self.cache_dir)}")
        if entry["shard"] is None:  # unchanged, yet it decodes now: e.g. pillow-heif installed since
            raise StaleCacheError(f"{path} could not be decoded when the teacher cache {self.cache_dir} was written, "
                                  f"so it has no teacher map; {rebuild_hint(self.cache_dir)}")
        return self._shard(entry["shard"]).get_tensor(content_hash).float()

    def get_features(self, path: Path, content_hash: str) -> torch.Tensor:
        """-> (layers, C, S/14, S/14) fp16 teacher features of the whole photo (after `get` checked it)."""
        entry = self.index[relative_key(path, self.train_dir)]
        return self._shard(entry["shard"]).get_tensor(f"{content_hash}.features")


class CacheReadError(RuntimeError):
    """A photo's teacher map could not be read from its shard (a damaged file)."""


class CachedTeacherDataset(UnlabeledImageDataset):
    """Like `UnlabeledImageDataset`, with the teacher's disparity read from a cache instead of
    computed: one crop + flip is drawn and applied to the photo and to the cached map alike.

    Returns {"student_image": (3, s, s) uint8, "teacher_disparity": (1, s, s) float32, "valid", "index"},
    plus "teacher_image": (3, t, t) uint8 when `with_teacher_image` (feature terms still need the live
    teacher). Unreadable files, photos changed since caching and damaged maps give zeros with
    valid=False (raising would stop one process's loader while the others wait for it in a
    collective) and log nothing, as in `UnlabeledImageDataset`; `unreadable_reason(index)` says why.
    """

    def __init__(self, paths: Sequence[Path], transform: TrainTransform, cache: TeacherCache,
                 with_teacher_image: bool, with_features: bool = False) -> None:
        super().__init__(paths, transform)
        self.cache, self.with_teacher_image, self.with_features = cache, with_teacher_image, with_features
        self.feature_grid = transform.teacher_size // TEACHER_MULTIPLE  # the live teacher's grid on a crop

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        path = self.paths[index]
        photo_hash, image = read_photo(path, self.max_side)
        try:
            disparity = self.cache.get(path, photo_hash)
            features = self.cache.get_features(path, photo_hash) if self.with_features else None
            return image, disparity, features
        except StaleCacheError:
            raise
        except Exception as error:  # a damaged shard: safetensors' own errors
            raise CacheReadError(f"its teacher map in {self.cache.cache_dir} cannot be read "
                                 f"({first_line(error)})") from None

    def render(self, loaded: tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]) -> dict[str, torch.Tensor]:
        image, cached, features = loaded
        height, width = image.shape[-2:]
        params, jitter = self.transform.draw(width, height)
        views = self.transform.apply(image, params, jitter, teacher_view=self.with_teacher_image)
        left, upper, right, lower = params.box
        fractions = (left / width, upper / height, right / width, lower / height)
        sample = {**views, "teacher_disparity": crop_map(cached, fractions, self.transform.student_size, params.flip)}
        if features is not None:
            # The same crop and flip on the teacher's patch grid, resampled to the grid the live
            # teacher would give for the crop; fp16 until the device (a quarter of a float view's bytes).
            grid = crop_map(features.float().flatten(0, 1), fractions, self.feature_grid, params.flip)
            sample["teacher_features"] = grid.view(*features.shape[:2], *grid.shape[-2:]).to(torch.float16)
        return self._select(sample)

    def blank_sample(self) -> dict[str, torch.Tensor]:
        size, grid = self.transform.student_size, self.feature_grid
        sample = {**_blank_views(self.transform), "teacher_disparity": torch.zeros(1, size, size)}
        if self.with_features:
            sample["teacher_features"] = torch.zeros(*self.cache.feature_shape, grid, grid, dtype=torch.float16)
        return self._select(sample)

    def describe(self, index: int, error: Exception) -> str:
        if isinstance(error, (StaleCacheError, CacheReadError)):
            return str(error)
        return describe_unreadable(self.paths[index], error)

    def _select(self, sample: dict) -> dict:
        if not self.with_teacher_image:
            sample.pop("teacher_image", None)
        return sample


def crop_map(disparity: torch.Tensor, fractions: tuple[float, float, float, float], size: int,
             flip: bool) -> torch.Tensor:
    """(C, H, W) map of a whole photo -> (C, size, size) map of the region `fractions` (left,
    upper, right, lower, as fractions of the photo), bilinear, then mirrored if `flip`.

    Output pixel centres are placed in the region as the views' resize places them, and sampled
    with align_corners=False and border clamping: for the whole photo this is exactly
    F.interpolate(bilinear), the live teacher's resize to the student size.
    """
    left, upper, right, lower = fractions
    steps = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    xs = (left + (right - left) * steps) * 2 - 1  # grid_sample's [-1, 1] spans the whole map
    ys = (upper + (lower - upper) * steps) * 2 - 1
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack([grid_x, grid_y], dim=-1)[None]  # (1, size, size, 2) as (x, y)
    cropped = F.grid_sample(disparity[None], grid, mode="bilinear", padding_mode="border",
                            align_corners=False)[0]  # (1, size, size)
    return cropped.flip(-1) if flip else cropped
