"""Depth maps for photos from a trained student: a checkpoint folder (PyTorch) or an ONNX file.

    python -m trainer.predict photo.jpg more_photos/ --model runs/demo/student_best --output depth/
    python -m trainer.predict more_photos/ --model runs/demo/student.onnx --output depth/ --npy

Each photo is decoded upright (EXIF orientation applied), resized whole to size x size and
normalised exactly like the student's evaluation view, and its disparity is resized back to the
photo's own size. Written per photo: `<stem>_depth.png`, a colour-mapped RGB image, and with
`--npy` `<stem>_depth.npy`, the raw float32 (H, W) disparity (relative: up to scale and shift).
A fixed-size ONNX file (the default export) runs at its own size; `--size` applies to checkpoints
and dynamic-size files.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from data import EvalTransform, list_images, load_rgb
from data.transforms import TEACHER_MULTIPLE, check_input_sizes
from trainer.visualize import colorize

logger = logging.getLogger(__name__)

# (B, 3, S, S) ImageNet-normalised float32 -> (B, 1, S, S) float32 disparity, on the CPU.
Predictor = Callable[[torch.Tensor], torch.Tensor]

# torch.quantile, which colorize uses, refuses inputs of more than 2**24 elements.
_MAX_COLORIZE_PIXELS = 2**24


def onnx_input_size(onnx_path: str | Path, size: int) -> int:
    """The square input side `onnx_path` accepts: its fixed H = W, or `size` if H, W are dynamic."""
    import onnx

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX file {onnx_path} does not exist")
    try:
        graph = onnx.load(str(onnx_path), load_external_data=False).graph
        dims = graph.input[0].type.tensor_type.shape.dim  # (batch, 3, H, W)
    except Exception as error:  # protobuf's DecodeError and friends
        raise ValueError(f"{onnx_path} is not an ONNX model ({type(error).__name__}: {error})") from None
    # dim_value is set (> 0) for a fixed axis; a dynamic one has a dim_param name instead.
    height, width = (dim.dim_value for dim in dims[2:4])
    if not (height and width):
        return size
    if height != width:
        raise ValueError(f"{onnx_path} takes {height}x{width} inputs; predict needs a square size")
    return height


def load_predictor(model_path: str | Path, size: int) -> Predictor:
    """A function from (B, 3, size, size) normalised images to (B, 1, size, size) disparity.

    `model_path` is a student folder (config.json + model.safetensors), run with PyTorch on the
    GPU if there is one, or a `.onnx` file, run with onnxruntime on the CPU. Raises ValueError if
    the model cannot take `size` (see `onnx_input_size` for the size an ONNX file needs).
    """
    model_path = Path(model_path)
    check_input_sizes(TEACHER_MULTIPLE, size)  # the student's own rule: a multiple of 32
    if model_path.suffix == ".onnx":
        return _onnx_predictor(model_path, size)
    if not (model_path / "config.json").is_file():
        raise FileNotFoundError(f"{model_path} is neither a .onnx file nor a student folder (no config.json)")
    from modeling import StudentDepthModel

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    student = StudentDepthModel.from_pretrained(str(model_path)).float().eval().to(device)

    @torch.no_grad()
    def predict(images: torch.Tensor) -> torch.Tensor:
        return student(images.to(device)).float().cpu()

    return predict


def _onnx_predictor(onnx_path: Path, size: int) -> Predictor:
    import onnxruntime as ort

    accepted = onnx_input_size(onnx_path, size)
    if accepted != size:
        raise ValueError(f"{onnx_path} accepts {accepted}x{accepted} inputs only, not {size}x{size}")
    try:
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime's exception types derive from Exception only
        raise ValueError(f"onnxruntime cannot load {onnx_path}: {str(error).strip().splitlines()[0]}") from None
    input_name, output_name = session.get_inputs()[0].name, session.get_outputs()[0].name

    def predict(images: torch.Tensor) -> torch.Tensor:
        feed = {input_name: images.detach().float().cpu().numpy()}
        return torch.from_numpy(session.run([output_name], feed)[0])

    return predict


def collect_images(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders expanded with `list_images`; each file once, first mention first.

    A path that is neither a folder nor an existing file is kept, so it is reported and counted
    as unreadable like any other bad file."""
    paths, seen = [], set()
    for item in map(Path, inputs):
        try:
            found = list_images(item) if item.is_dir() else [item]
        except ValueError as error:  # a folder without images
            logger.warning("skipping %s (%s)", item, error)
            continue
        for path in found:
            if path.resolve() not in seen:
                seen.add(path.resolve())
                paths.append(path)
    return paths


def output_stems(paths: Sequence[Path]) -> list[str]:
    """`<stem>`, or `<stem>_1`, `<stem>_2`, ... for later files with a stem already taken, so photos
    from different folders never overwrite each other. Case-insensitive, for macOS and Windows."""
    taken, stems = set(), []
    for path in paths:
        stem, n = path.stem, 0
        while stem.casefold() in taken:
            n += 1
            stem = f"{path.stem}_{n}"
        taken.add(stem.casefold())
        stems.append(stem)
    return stems


def preprocess(image: Image.Image, size: int) -> torch.Tensor:
    """(3, size, size): the student view of EvalTransform (whole image, bilinear, ImageNet-normalised)."""
    # The teacher view is not needed; the smallest legal teacher size keeps rendering it cheap.
    return EvalTransform(TEACHER_MULTIPLE, size)(image)["student_image"]


def _colour_image(disparity: torch.Tensor, colormap: str) -> Image.Image:
    """(1, 1, H, W) disparity -> RGB image of the same size."""
    pixels = disparity.shape[-2] * disparity.shape[-1]
    if pixels <= _MAX_COLORIZE_PIXELS:
        colour = colorize(disparity, colormap)  # (1, 3, H, W) in [0, 1]
    else:
        # Huge photos (>16 MP): colour a smaller copy and enlarge that. The map was upsampled from
        # size x size anyway, so no detail is lost.
        scale = math.sqrt(_MAX_COLORIZE_PIXELS / pixels) * 0.99
        small = F.interpolate(disparity, scale_factor=scale, mode="bilinear", align_corners=False)
        colour = F.interpolate(colorize(small, colormap), size=disparity.shape[-2:], mode="bilinear",
                               align_corners=False).clamp(0, 1)
    rgb = (colour[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()  # (H, W, 3)
    return Image.fromarray(rgb)  # (H, W, 3) uint8 is RGB


def _write_outputs(disparity: torch.Tensor, original_size: tuple[int, int], stem: str, output_dir: Path,
                   save_npy: bool, colormap: str) -> Path:
    """disparity (1, 1, S, S) -> files for one photo of (width, height) `original_size`."""
    width, height = original_size
    full = F.interpolate(disparity, size=(height, width), mode="bilinear", align_corners=False)  # (1, 1, H, W)
    png_path = output_dir / f"{stem}_depth.png"
    # zlib level 3: a third of the default's encoding time for ~15% larger files.
    _colour_image(full, colormap).save(png_path, compress_level=3)
    if save_npy:
        np.save(output_dir / f"{stem}_depth.npy", full[0, 0].numpy().astype(np.float32))
    return png_path


def predict_paths(paths: Iterable[str | Path], model_path: str | Path, output_dir: str | Path, size: int = 256,
                  save_npy: bool = False, batch_size: int = 4, colormap: str = "Spectral_r") -> list[Path]:
    """Write depth maps for every readable image in `paths` (files or folders) into `output_dir`.

    Returns the written `<stem>_depth.png` paths (each `.npy`, if any, beside its PNG). Unreadable
    files are logged once each and skipped. A fixed-size ONNX file runs at its own size, not `size`.
    """
    import matplotlib

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if colormap not in matplotlib.colormaps:
        raise ValueError(f"matplotlib has no colormap {colormap!r}")
    image_paths = collect_images(paths)
    if Path(model_path).suffix == ".onnx":
        size = onnx_input_size(model_path, size)
    predictor = load_predictor(model_path, size)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    written: list[Path] = []
    batch: list[tuple[torch.Tensor, tuple[int, int], str]] = []  # (image, (width, height), stem)

    def flush() -> None:
        disparity = predictor(torch.stack([image for image, _, _ in batch]))  # (B, 1, S, S)
        for one, (_, original_size, stem) in zip(disparity.split(1), batch, strict=True):
            written.append(_write_outputs(one, original_size, stem, output_dir, save_npy, colormap))
        batch.clear()

    for path, stem in zip(image_paths, output_stems(image_paths), strict=True):
        try:
            image = load_rgb(path)
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
            logger.warning("skipping unreadable image %s (%s: %s)", path, type(error).__name__, error)
            continue
        batch.append((preprocess(image, size), image.size, stem))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return written


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    parser.add_argument("--model", required=True, help="student folder (config.json + model.safetensors) or .onnx")
    parser.add_argument("--output", required=True, help="folder for <stem>_depth.png (and .npy)")
    parser.add_argument("--size", type=int, default=256,
                        help="input side, a multiple of 32 (a fixed-size ONNX file uses its own)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--npy", action="store_true", help="also write the raw float32 disparity")
    parser.add_argument("--colormap", default="Spectral_r", help="any matplotlib colormap name")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")

    image_paths = collect_images(args.inputs)
    try:
        written = predict_paths(image_paths, args.model, args.output, args.size, args.npy, args.batch_size,
                                args.colormap)
    except (OSError, ValueError) as error:  # model missing or unreadable, size refused
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {len(written)} depth maps to {args.output} ({len(image_paths) - len(written)} skipped)")
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
