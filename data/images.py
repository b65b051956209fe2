"""Find, decode and split the image files of a photo folder, and say why a file would not decode."""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms.v2.functional import pil_to_tensor

from core.errors import first_line

# iPhones save HEIC by default. pillow-heif is a dependency, but the package must still import
# without it: .heic files are then listed all the same, and each is reported as needing it.
try:
    import pillow_heif
except ImportError:  # pragma: no cover
    pillow_heif = None
else:
    pillow_heif.register_heif_opener()

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".heic", ".heif")
HEIF_EXTENSIONS = (".heic", ".heif")
# Major brands of the ISO-BMFF `ftyp` box that mark a HEIF still image or sequence (HEVC-coded
# HEIC from phones, and the generic image/sequence brands). AVIF has its own brands ("avif").
HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"})
# Key of `ImageScan.ignored` for files and folders whose name starts with a dot.
HIDDEN = "(hidden)"
NO_EXTENSION = "(no extension)"

# PIL refuses images over 2 * MAX_IMAGE_PIXELS (default ~89 MP) as decompression bombs, which
# rejects genuine 108/200 MP phone photos. 400 MP admits those and still stops absurd files.
Image.MAX_IMAGE_PIXELS = 400_000_000

# 16-bit sources decode as I;16* or, for some PNG/TIFF variants, as 32-bit "I" holding 0..65535.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


@dataclass
class ImageScan:
    """What `scan_images` found: the image files, sorted, and a count of what it left out.

    `ignored` maps a lower-case suffix (".txt", ".cr2") or "(no extension)" to the number of files
    not taken for their extension, and "(hidden)" to the number of hidden entries skipped: files
    and folders whose name starts with a dot (.DS_Store, macOS's "._IMG_0001.jpg" resource forks,
    .git); a hidden folder counts once and is not walked.
    """

    images: list[Path] = field(default_factory=list)
    ignored: dict[str, int] = field(default_factory=dict)


def scan_images(folder: str | Path) -> ImageScan:
    """Every image file under `folder` (recursive), sorted by path relative to `folder`, and what
    was left out. Raises FileNotFoundError for a missing folder; an empty result is not an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    scan = ImageScan()
    # os.walk, like the rglob it replaces, does not follow symlinked folders (no cycles).
    for parent, dir_names, file_names in os.walk(folder):
        hidden_dirs = [name for name in dir_names if name.startswith(".")]
        # Pruning in place stops os.walk descending into them: a .git or .thumbnails can be huge.
        dir_names[:] = [name for name in dir_names if not name.startswith(".")]
        _count(scan.ignored, HIDDEN, len(hidden_dirs))
        for name in file_names:
            path = Path(parent, name)
            suffix = path.suffix.lower()
            if name.startswith("."):
                _count(scan.ignored, HIDDEN)
            elif suffix not in IMAGE_EXTENSIONS:
                _count(scan.ignored, suffix or NO_EXTENSION)
            elif path.is_file():  # a broken symlink is neither an image nor worth a count
                scan.images.append(path)
    # Sort on the relative posix path so the order (and hence any seeded split or sampler) is the
    # same on every machine, whatever the folder is called or which OS separator it uses.
    scan.images.sort(key=lambda path: path.relative_to(folder).as_posix())
    return scan


def list_images(folder: str | Path) -> list[Path]:
    """Every image file under `folder` (recursive), sorted by path relative to `folder`.

    Raises FileNotFoundError for a missing folder and ValueError, naming what the folder holds
    instead, when it has no image."""
    scan = scan_images(folder)
    if not scan.images:
        raise ValueError(no_images_message(folder, scan))
    return scan.images


def no_images_message(folder: str | Path, scan: ImageScan) -> str:
    kinds = "/".join(extension.lstrip(".") for extension in IMAGE_EXTENSIONS)
    found = f"; it holds {describe_ignored(scan.ignored)}" if scan.ignored else "; it is empty"
    return f"no images ({kinds}) found under {folder}{found}"


def describe_ignored(ignored: dict[str, int], limit: int = 5) -> str:
    """{".txt": 1, ".cr2": 3} -> "3 .cr2, 1 .txt": the most common first, at most `limit` kinds."""
    ranked = sorted(ignored.items(), key=lambda item: (-item[1], item[0]))
    text = ", ".join(f"{count} {kind}" for kind, count in ranked[:limit])
    return text + (f" and {len(ranked) - limit} other kinds" if len(ranked) > limit else "")


def _count(counts: dict[str, int], key: str, amount: int = 1) -> None:
    if amount:
        counts[key] = counts.get(key, 0) + amount


def first_readable(
    paths: Iterable[str | Path], max_side: int | None = None
) -> tuple[Optional[Path], list[tuple[Path, str]]]:
    """Decode `paths` in order until one loads. -> (that path, or None if none did; the (path,
    one-line reason) of each file that failed before it). Lets a caller stop a run whose photos
    are all unreadable before it builds anything, naming what is wrong with them."""
    failures: list[tuple[Path, str]] = []
    for path in map(Path, paths):
        try:
            load_rgb(path, max_side)
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
            failures.append((path, describe_unreadable(path, error)))
        else:
            return path, failures
    return None, failures


def load_rgb(path: str | Path, max_side: int | None = None) -> Image.Image:
    """Decode `path` as an upright 8-bit RGB image, its longest side at most `max_side`.

    Raises whatever PIL raises for unreadable files; callers decide whether to skip them.
    """
    image = _decode_rgb(path, max_side)
    if max_side is not None and max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    return image


def load_rgb_tensor(path: str | Path, max_side: int | None = None) -> torch.Tensor:
    """Decode `path` as an upright uint8 (3, H, W) tensor, for the training views that torch renders
    (`TrainTransform`). A JPEG decodes at the smallest of libjpeg's 1/1 to 1/8 DCT scales that keeps
    both sides >= `max_side`; nothing is resized further, because the views resize straight from
    their crop. (torchvision.io decodes JPEGs at full size only: for a 12 MP photo that decode alone
    costs more than this whole function; bench/RESULTS.md has the figures.)"""
    return pil_to_tensor(_decode_rgb(path, max_side))


def _decode_rgb(path: str | Path, max_side: int | None = None) -> Image.Image:
    """An upright RGB image; a JPEG at the DCT scale `load_rgb_tensor` describes, anything else whole."""
    with Image.open(path) as image:
        if max_side is not None and image.format == "JPEG":
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale while the result stays >= max_side on
            # both axes: a 12 MP phone photo then decodes several times faster.
            image.draft("RGB", (max_side, max_side))
        # exif_transpose loads the pixels (so truncated files fail here, inside `with`) and returns
        # a copy, so nothing returned keeps the file open.
        image = ImageOps.exif_transpose(image)
    return _to_rgb(image)


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


# --- why a file would not decode --------------------------------------------------------------

_HEADER_BYTES = 64
_MAGIC = (  # (prefix, format) for the formats whose failures deserve a name
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def describe_unreadable(path: str | Path, error: BaseException) -> str:
    """A one-line reason why `path` failed to decode with `error`, from the file's first bytes:
    "empty file", "truncated JPEG", "not an image (an HTML page)", "a HEIC photo with a .jpg name;
    pillow-heif is needed to read it (pip install pillow-heif)", ..."""
    path = Path(path)
    try:
        with open(path, "rb") as file:
            header = file.read(_HEADER_BYTES)
    except OSError as read_error:  # missing, a folder, no permission: the error says which
        return f"cannot be read ({first_line(read_error)})"
    if not header:
        return "empty file"
    if isinstance(error, Image.DecompressionBombError):
        return f"too large ({first_line(error)})"
    kind = _image_format(header)
    if kind == "HEIC":
        return _describe_heic(path, error)
    if kind is None:
        # PIL may still have tried a decoder on it ("BM..." text looks like a BMP to it), so the
        # content decides first, PIL's error only when the content is nothing we recognise.
        content = _describe_content(header)
        if content is not None:
            return f"not an image ({content})"
        if isinstance(error, UnidentifiedImageError):
            return f"not an image (unknown format, first bytes {header[:4].hex(' ')})"
        return f"unreadable ({first_line(error)})"
    if _is_truncation(error):
        return f"truncated {kind}"
    return f"corrupt {kind} ({_error_detail(error)})"


def _describe_heic(path: Path, error: BaseException) -> str:
    # PIL picks a decoder by content, not by name, so a HEIC renamed .jpg (or sent by an app that
    # keeps the old name) decodes fine with pillow-heif; it fails only without it, or when damaged.
    suffix = path.suffix.lower()
    if suffix in HEIF_EXTENSIONS:
        what = "a HEIC photo"
    else:
        what = f"a HEIC photo with a {path.suffix} name" if suffix else "a HEIC photo without an extension"
    if not heif_supported():
        return f"{what}; pillow-heif is needed to read it (pip install pillow-heif)"
    if _is_truncation(error):
        return f"{what}, truncated"
    return f"{what}, corrupt ({_error_detail(error)})"


def heif_supported() -> bool:
    """Whether PIL can open HEIC/HEIF now (pillow-heif installed and its opener registered)."""
    return "HEIF" in Image.ID


def _image_format(header: bytes) -> Optional[str]:
    for prefix, kind in _MAGIC:
        if header.startswith(prefix):
            return kind
    if header[:4] == b"RIFF" and header[8:12] == b"WEBP":
        return "WEBP"
    if header[:2] == b"BM" and header[6:10] == bytes(4):  # "BM", file size, 4 reserved zero bytes
        return "BMP"
    brand = _iso_media_brand(header)
    if brand in HEIF_BRANDS:
        return "HEIC"
    if brand in (b"avif", b"avis"):
        return "AVIF"
    return None


def _iso_media_brand(header: bytes) -> Optional[bytes]:
    # ISO-BMFF (HEIF, AVIF, MP4, MOV) opens with a box: 4-byte size, then "ftyp" and the major brand.
    return header[8:12] if header[4:8] == b"ftyp" else None


def _describe_content(header: bytes) -> Optional[str]:
    brand = _iso_media_brand(header)
    if brand is not None:
        return f"ISO media of brand {brand.decode('latin-1').strip()!r}, e.g. a video"
    if header.startswith(b"%PDF"):
        return "a PDF"
    if header.startswith(b"PK\x03\x04"):
        return "a ZIP archive"
    text = header.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head")):
        return "an HTML page, e.g. a download's error page"
    if text.startswith(b"<?xml") or text.startswith(b"<svg"):
        return "XML or SVG"
    if _looks_like_text(header):
        return "text"
    return None


def _looks_like_text(header: bytes) -> bool:
    try:
        decoded = header.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(header) - 3:  # not just a character cut in two by the header's end
            return False
        decoded = header[: error.start].decode("utf-8")
    return all(char.isprintable() or char in "\t\r\n" for char in decoded)


def _is_truncation(error: BaseException) -> bool:
    # PIL: "image file is truncated", "Truncated File Read"; libheif: "Unexpected end of file".
    message = str(error).lower()
    return "truncated" in message or "end of file" in message


def _error_detail(error: BaseException) -> str:
    if isinstance(error, UnidentifiedImageError):  # its message is just "cannot identify image file <path>"
        return "its header cannot be parsed"
    return first_line(error)
