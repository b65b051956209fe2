"""Find, decode and split the image files of a photo folder."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")

# PIL refuses images over 2 * MAX_IMAGE_PIXELS (default ~89 MP) as decompression bombs, which
# rejects genuine 108/200 MP phone photos. 400 MP admits those and still stops absurd files.
Image.MAX_IMAGE_PIXELS = 400_000_000

# 16-bit sources decode as I;16* or, for some PNG/TIFF variants, as 32-bit "I" holding 0..65535.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def list_images(folder: str | Path) -> list[Path]:
    """Every image file under `folder` (recursive), sorted by path relative to `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    paths = [
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
    ]
    if not paths:
        raise ValueError(f"no images (jpg/jpeg/png/webp/bmp/tiff) found under {folder}")
    # Sort on the relative posix path so the order (and hence any seeded split or sampler) is the
    # same on every machine, whatever the folder is called or which OS separator it uses.
    return sorted(paths, key=lambda path: path.relative_to(folder).as_posix())


def load_rgb(path: str | Path, max_side: int | None = None) -> Image.Image:
    """Decode `path` as an upright 8-bit RGB image, its longest side at most `max_side`.

    Raises whatever PIL raises for unreadable files; callers decide whether to skip them.
    """
    with Image.open(path) as image:
        if max_side is not None and image.format == "JPEG":
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale while the result stays >= max_side on
            # both axes: a 12 MP phone photo then decodes several times faster.
            image.draft("RGB", (max_side, max_side))
        # exif_transpose loads the pixels (so truncated files fail here, inside `with`) and returns
        # a copy, so nothing returned keeps the file open.
        image = ImageOps.exif_transpose(image)
    image = _to_rgb(image)
    if max_side is not None and max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
        return _high_bit_depth_to_rgb(image)
    if image.mode == "P":
        # Going through RGBA avoids PIL's warning about palette transparency given as bytes.
        image = image.convert("RGBA")
    return image.convert("RGB")


def _high_bit_depth_to_rgb(image: Image.Image) -> Image.Image:
    # PIL's own convert clips these modes at 255, turning a 16-bit photo almost entirely white.
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        # Float images have no fixed range: stretch the one they use.
        low, high = np.nanmin(values), np.nanmax(values)
    else:
        low, high = 0.0, 65535.0
    scaled = (values - low) * (255.0 / max(high - low, 1e-12))
    gray = np.clip(np.nan_to_num(scaled), 0, 255).round().astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


def split_train_val(
    paths: Sequence[Path], val_fraction: float, seed: int
) -> tuple[list[Path], list[Path]]:
    """Split `paths` into sorted (train, val) lists; the same inputs always give the same split."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    # Sorting first makes the split independent of the order the caller listed the files in.
    ordered = sorted(paths)
    n = len(ordered)
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n >= 2:
        n_val = max(n_val, 1)
    # Never so many that nothing is left to train on (round() can reach n for tiny folders).
    n_val = min(n_val, max(n - 1, 0))
    # A private generator: the split must not depend on (or disturb) the global RNG state.
    val_indices = set(random.Random(seed).sample(range(n), n_val))
    train = [path for i, path in enumerate(ordered) if i not in val_indices]
    val = [path for i, path in enumerate(ordered) if i in val_indices]
    return train, val
