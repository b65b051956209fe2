"""Datasets: unlabeled photos for distillation, and image + metric depth pairs for evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from core.choices import CROPS
from core.errors import first_line

from .images import describe_unreadable, list_images, load_rgb, load_rgb_tensor
from .transforms import EvalTransform, TrainTransform, normalize_views

DEPTH_EXTENSIONS = (".png", ".npy", ".npz")

Transform = TrainTransform | EvalTransform
VIEWS = ("student_image", "teacher_image")


class UnlabeledImageDataset(Dataset):
    """Photos for distillation. Unreadable files give zero images with `valid=False`.

    With a `TrainTransform`, photos decode to tensors and the views come out uint8, as from shards:
    `finish_batch` normalises a batch of them on the device. With an `EvalTransform` (validation),
    they come out normalised.

    Skipping inside the dataset would change its length mid-epoch; returning a masked sample
    keeps the default collate working and lets the trainer count and ignore bad files. Nothing is
    logged here: DataLoader workers are separate processes, recreated every epoch, so a warning
    from `__getitem__` would repeat each epoch and in each worker. The caller collects the
    invalid `index` values and asks `unreadable_reason(index)` once per file, in its own process.
    """

    def __init__(self, paths: Sequence[Path], transform: Transform) -> None:
        self.paths = list(paths)
        self.transform = transform
        self.max_side = _decode_max_side(transform)

    @classmethod
    def from_folder(cls, folder: str | Path, transform: Transform) -> UnlabeledImageDataset:
        return cls(list_images(folder), transform)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        self.paths[index]  # an index past the end is an IndexError, not a blank sample (ends `for` loops)
        try:
            loaded = self.load(index)
        except Exception:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
            return {**self.blank_sample(), "valid": torch.tensor(False), "index": index}
        return {**self.render(loaded), "valid": torch.tensor(True), "index": index}

    def unreadable_reason(self, index: int) -> str:
        """Why sample `index` comes out invalid, in one line ("truncated JPEG"), or "" if it
        loads now. Loads it again, in the calling process."""
        try:
            self.load(index)
        except Exception as error:
            return self.describe(index, error)
        return ""

    # What a subclass with other inputs (CachedTeacherDataset) replaces:

    def load(self, index: int):
        """Read what sample `index` needs; raises for anything unreadable."""
        if isinstance(self.transform, TrainTransform):
            return load_rgb_tensor(self.paths[index], self.max_side)
        return load_rgb(self.paths[index], self.max_side)

    def render(self, image) -> dict[str, torch.Tensor]:
        return self.transform(image)

    def blank_sample(self) -> dict[str, torch.Tensor]:
        return _blank_views(self.transform)

    def describe(self, index: int, error: Exception) -> str:
        return describe_unreadable(self.paths[index], error)

    @property
    def finishes_on_device(self) -> bool:
        """Batches need `finish_batch` on the device: uint8 training views to normalise."""
        return isinstance(self.transform, TrainTransform)

    def finish_batch(self, batch: dict, device: torch.device) -> dict:
        """A training batch from the workers -> the step's views on `device`, normalised."""
        views = {name: batch[name].to(device, non_blocking=True) for name in VIEWS if name in batch}
        return {**batch, **normalize_views(views)}


class LabeledDepthDataset(Dataset):
    """`root/images/<stem>.<ext>` paired with metric depth `root/depth/<stem>.(png|npy|npz)`.

    Depth stays at its original resolution so metrics are computed against the real ground truth,
    not a resampled copy; predictions are upsampled to it instead.

    A pair that cannot be read (a corrupt or truncated image or depth file) comes out as blank views
    with no valid pixel and `valid=False`, like an unreadable photo of `UnlabeledImageDataset`: the
    evaluation skips it and names it once (`unreadable_reason`), instead of stopping.
    """

    def __init__(
        self,
        root: str | Path,
        transform: EvalTransform,
        min_depth: float = 1e-3,
        max_depth: float = 10.0,
        depth_scale: float = 1000.0,
        crop: str | None = None,
    ) -> None:
        if crop is not None and crop not in CROPS:
            raise ValueError(f"unknown crop {crop!r}; expected None or one of {sorted(CROPS)}")
        if not 0 <= min_depth < max_depth:
            raise ValueError(f"need 0 <= min_depth < max_depth, got {min_depth} and {max_depth}")
        root = Path(root)
        self.pairs = _pair_by_stem(root / "images", root / "depth")
        self.transform = transform
        self.min_depth = min_depth
        self.max_depth = max_depth
        self.depth_scale = depth_scale
        self.crop = crop
        self.max_side = _decode_max_side(transform)

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def paths(self) -> list[Path]:
        """The images, by which a sample is named (UnreadableReporter)."""
        return [image for image, _ in self.pairs]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        self.pairs[index]  # an index past the end is an IndexError, not a blank sample (ends `for` loops)
        try:
            views, depth = self.load(index)
        except Exception:  # PIL and numpy raise OSError, ValueError, EOFError, ... for bad files
            blank = torch.zeros(1, 1, 1)
            return {**_blank_views(self.transform), "depth": blank, "valid_mask": blank.bool(),
                    "valid": torch.tensor(False), "index": index}
        valid_mask = torch.isfinite(depth) & (depth > self.min_depth) & (depth < self.max_depth)
        if self.crop is not None:
            valid_mask &= crop_mask(*depth.shape, CROPS[self.crop])
        return {
            **views,
            "depth": depth[None],  # (1, H, W)
            "valid_mask": valid_mask[None],  # (1, H, W)
            "valid": torch.tensor(True),
            "index": index,
        }

    def load(self, index: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(the image's views, its (H, W) depth in metres); raises for anything unreadable."""
        image_path, depth_path = self.pairs[index]
        depth = torch.from_numpy(load_depth(depth_path, self.depth_scale))
        return self.transform(load_rgb(image_path, self.max_side)), depth

    def unreadable_reason(self, index: int) -> str:
        """Why pair `index` comes out invalid, in one line naming the file, or "" if it loads now."""
        image_path, depth_path = self.pairs[index]
        try:
            load_rgb(image_path, self.max_side)
        except Exception as error:
            return describe_unreadable(image_path, error)
        try:
            load_depth(depth_path, self.depth_scale)
        except Exception as error:
            return f"its depth {depth_path.name}: {first_line(error)}"
        return ""


def _decode_max_side(transform: Transform) -> int:
    # Decoding at twice the largest input side leaves even a minimum-area random crop at about the
    # teacher's resolution, while big JPEGs decode at 1/2 to 1/8 scale, several times faster.
    return 2 * max(transform.teacher_size, transform.student_size)


def load_depth(path: Path, depth_scale: float) -> np.ndarray:
    """(H, W) float32 metres: PNG integers divided by depth_scale (1000 for mm), arrays as is."""
    suffix = path.suffix.lower()
    if suffix == ".png":
        with Image.open(path) as image:
            depth = np.asarray(image, dtype=np.float32) / depth_scale
    elif suffix == ".npy":
        depth = np.load(path)
    else:
        with np.load(path) as archive:
            if "depth" in archive:
                depth = archive["depth"]
            elif len(archive.files) == 1:
                depth = archive[archive.files[0]]
            else:
                raise ValueError(f"{path} holds arrays {archive.files} but none named 'depth'")
    depth = np.squeeze(depth).astype(np.float32)
    if depth.ndim != 2:
        raise ValueError(f"depth map {path} has shape {depth.shape}; expected (H, W)")
    return depth


def crop_mask(
    height: int, width: int, fractions: tuple[float, float, float, float]
) -> torch.Tensor:
    top, bottom, left, right = fractions
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[int(top * height) : int(bottom * height), int(left * width) : int(right * width)] = True
    return mask


def _list_depth_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"depth folder {folder} does not exist")
    return sorted(
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in DEPTH_EXTENSIONS and path.is_file()
    )


def _pair_by_stem(image_folder: Path, depth_folder: Path) -> list[tuple[Path, Path]]:
    images = _by_stem(list_images(image_folder), image_folder)
    depths = _by_stem(_list_depth_files(depth_folder), depth_folder)
    missing_depth = sorted(images.keys() - depths.keys())
    missing_image = sorted(depths.keys() - images.keys())
    if missing_depth or missing_image:
        raise ValueError(
            f"images without depth: {missing_depth[:5]} ({len(missing_depth)} in all); "
            f"depth without images: {missing_image[:5]} ({len(missing_image)} in all)"
        )
    return [(images[stem], depths[stem]) for stem in sorted(images)]


def _by_stem(paths: list[Path], folder: Path) -> dict[str, Path]:
    # Key on the path below the folder without its extension, so subfolders may repeat names.
    by_stem: dict[str, Path] = {}
    for path in paths:
        stem = path.relative_to(folder).with_suffix("").as_posix()
        if stem in by_stem:
            raise ValueError(f"{by_stem[stem]} and {path} share the stem {stem!r}")
        by_stem[stem] = path
    return by_stem


def _blank_views(transform: Transform) -> dict[str, torch.Tensor]:
    """Zeros in place of an unreadable photo's views: uint8 as a `TrainTransform` renders them."""
    dtype = torch.uint8 if isinstance(transform, TrainTransform) else torch.float32
    return {
        "teacher_image": torch.zeros(3, transform.teacher_size, transform.teacher_size, dtype=dtype),
        "student_image": torch.zeros(3, transform.student_size, transform.student_size, dtype=dtype),
    }
