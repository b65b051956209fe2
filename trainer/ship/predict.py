"""Depth maps for photos from a trained student: a checkpoint folder (PyTorch) or an ONNX file.

    python -m trainer.ship.predict photo.jpg more_photos/ --model runs/demo/student_best --output depth/
    python -m trainer.ship.predict more_photos/ --model runs/demo/student.onnx --output depth/ --npy --side-by-side

Each photo is decoded upright (EXIF orientation applied), resized whole to size x size and
normalised exactly like the student's evaluation view, and its disparity is resized back to the
photo's own size. Written per photo into the `--output` folder (created if missing):
- `<stem>_depth.png`: the disparity, colour-mapped (high disparity = near);
- with `--npy`, `<stem>_depth.npy`: the raw float32 (H, W) disparity (relative: up to scale and shift);
- with `--side-by-side`, `<stem>_compare.png`: the photo, its depth map and a colour bar marked
  near / far, next to each other (scaled down to at most 1024 pixels high).

The size defaults to the model's own: the `input_size` a checkpoint recorded at training (256 for
folders saved before it was recorded), a fixed-size ONNX file's input, or the size an any-size ONNX
file was exported at (the student's training size). `--size` applies to checkpoints and any-size
ONNX files (a multiple of 64 for MobileViT students, as the file records); a fixed-size file
refuses any other size.

Existing files are never replaced without `--overwrite`: every target is checked before any model
is loaded. Unreadable photos are skipped with one warning each and counted in the summary.

Exit codes: 0 at least one depth map written; 1 a mistake in the arguments, a model that cannot be
loaded or run, files in the way, or no photo that could be read; also 1 for arguments that cannot be parsed.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from data import EvalTransform, list_images, load_rgb
from core.choices import STUDENT_MULTIPLE, TEACHER_MULTIPLE, check_multiple
from core.cli import ArgumentParser
from trainer.console import plural, print_error
from core.errors import first_line
from trainer.evaluate.visualize import colorize, colour_ramp, label_font, lut

logger = logging.getLogger(__name__)

# (B, 3, S, S) ImageNet-normalised float32 -> (B, 1, S, S) float32 disparity, on the CPU.
Predictor = Callable[[torch.Tensor], torch.Tensor]

# For student folders saved before config.json recorded input_size, and dynamic-size ONNX files.
DEFAULT_SIZE = 256
# torch.quantile, which colorize uses, refuses inputs of more than 2**24 elements in some torch releases
# (2.14.1 on the CPU no longer does); colouring a downscaled copy of a larger map costs one resize.
_MAX_COLORIZE_PIXELS = 2**24
# Side-by-side images of 12 MP photos would be 24 MP PNGs, slow to write and to open.
COMPARE_MAX_HEIGHT = 1024


class LoadedModel(NamedTuple):
    predict: Predictor
    size: int  # the square input side it runs at
    size_note: Optional[str]  # set when the size is a fallback the user should hear about


class OutputsInTheWay(ValueError):
    """Files the run would write already exist (or are its own input photos)."""


def _check_size(size: int) -> None:
    check_multiple("size", size, STUDENT_MULTIPLE)


class OnnxInput(NamedTuple):
    fixed: Optional[int]  # the square side of a fixed-size file; None if H, W are dynamic
    multiple: Optional[int]  # for a dynamic file exported here: the sides must be multiples of it
    accepted: str  # the sizes it accepts, in words
    exported_at: Optional[int] = None  # for a dynamic file exported here: the size it was exported at


def _onnx_input(onnx_path: Path) -> OnnxInput:
    import onnx

    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX file {onnx_path} does not exist" if not onnx_path.exists()
                                else f"{onnx_path} is a folder, not an ONNX file")
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
        dims = model.graph.input[0].type.tensor_type.shape.dim  # (batch, 3, H, W)
        height, width = (dim.dim_value for dim in dims[2:4])
    except Exception as error:  # protobuf's DecodeError, an empty graph, ...
        raise ValueError(f"{onnx_path} is not an ONNX model ({first_line(error)})") from None
    # trainer.ship.export records what the file was found to accept; files from elsewhere may not.
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    recorded = metadata.get("accepted_sizes")
    # dim_value is set (> 0) for a fixed axis; a dynamic one has a dim_param name instead.
    if not (height and width):
        multiple = metadata.get("size_multiple", "null")
        try:  # the student's training size, which export_student exports at
            exported_at = int(json.loads(metadata["export_size"])[0])
        except (KeyError, ValueError, TypeError, IndexError):
            exported_at = None
        return OnnxInput(None, int(multiple) if multiple.isdigit() else None,
                         recorded or "H and W of its own choosing (the file records none)", exported_at)
    if height != width:
        raise ValueError(f"{onnx_path} takes {height}x{width} inputs; predict needs a square size")
    return OnnxInput(height, None, recorded or f"{height}x{width} only")


def onnx_input_size(onnx_path: str | Path, size: int) -> int:
    """The square input side `onnx_path` accepts: its fixed H = W, or `size` if H, W are dynamic."""
    fixed = _onnx_input(Path(onnx_path)).fixed
    return size if fixed is None else fixed


def load_model(model_path: str | Path, size: Optional[int] = None) -> LoadedModel:
    """The predictor for `model_path` and the side it runs at: `size` if given, else the model's own.

    `model_path` is a student folder (config.json + model.safetensors), run with PyTorch on the
    GPU if there is one, or a `.onnx` file, run with onnxruntime on the CPU (and run once here, so
    a size it refuses fails before any output is written). Raises ValueError (one line) if the
    model cannot be loaded or cannot take `size`, FileNotFoundError if an ONNX file is missing.
    """
    model_path = Path(model_path)
    if model_path.suffix == ".onnx":
        return _load_onnx(model_path, size)
    if model_path.is_file():
        raise ValueError(f"{model_path} is neither a .onnx file nor a student folder (config.json + "
                         f"model.safetensors)")
    return _load_checkpoint(model_path, size)


def load_predictor(model_path: str | Path, size: Optional[int] = None) -> Predictor:
    """`load_model(model_path, size).predict`."""
    return load_model(model_path, size).predict


def _load_checkpoint(folder: Path, size: Optional[int]) -> LoadedModel:
    from modeling import StudentLoadError, load_student

    try:
        student = load_student(folder)
    except StudentLoadError as error:  # already one line naming the file; ValueError is what callers catch
        raise ValueError(str(error)) from None
    note = None
    if size is None:
        size = student.input_size
    if size is None:
        size = DEFAULT_SIZE
        note = (f"{folder} records no input_size (saved before it was recorded); running at {size}x{size} "
                f"(pass --size to choose)")
    _check_size(size)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    student = student.float().eval().to(device)

    @torch.no_grad()
    def predict(images: torch.Tensor) -> torch.Tensor:
        return student(images.to(device)).float().cpu()

    return LoadedModel(predict, size, note)


def _load_onnx(onnx_path: Path, size: Optional[int]) -> LoadedModel:
    import onnxruntime as ort

    fixed, multiple, accepted, exported_at = _onnx_input(onnx_path)
    if fixed is not None and size is not None and size != fixed:
        raise ValueError(f"{onnx_path} accepts {fixed}x{fixed} inputs only, not {size}x{size}; "
                         f"leave out --size or pass --size {fixed}")
    size = fixed or size or exported_at or DEFAULT_SIZE
    _check_size(size)
    if multiple and size % multiple:
        near = max(multiple, round(size / multiple) * multiple)
        raise ValueError(f"{onnx_path} accepts sizes that are multiples of {multiple} only, not {size}; "
                         f"pass e.g. --size {near}")
    try:
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime's exception types derive from Exception only
        raise ValueError(f"onnxruntime cannot load {onnx_path}: {first_line(error)}") from None
    input_name, output_name = session.get_inputs()[0].name, session.get_outputs()[0].name

    def predict(images: torch.Tensor) -> torch.Tensor:
        feed = {input_name: images.detach().float().cpu().numpy()}
        side = images.shape[-1]
        try:
            disparity = torch.from_numpy(session.run([output_name], feed)[0])
        except Exception as error:  # a shape the graph cannot take
            raise ValueError(f"{onnx_path} refuses {side}x{side} inputs ({first_line(error)}); it accepts "
                             f"{accepted}") from None
        # A graph that reshapes to a fixed size can run at another and return maps of the wrong shape.
        if tuple(disparity.shape) != (len(images), 1, side, side):
            raise ValueError(f"{onnx_path} gives {tuple(disparity.shape)} for {len(images)} inputs of {side}x{side}, "
                             f"not ({len(images)}, 1, {side}, {side}); it accepts {accepted}")
        return disparity

    predict(torch.zeros(1, 3, size, size))  # a refused size fails here, before any file is written
    return LoadedModel(predict, size, None)


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


def output_files(stem: str, output_dir: Path, save_npy: bool, side_by_side: bool) -> list[Path]:
    """Every file written for the photo given `stem`, the depth PNG first."""
    files = [output_dir / f"{stem}_depth.png"]
    if save_npy:
        files.append(output_dir / f"{stem}_depth.npy")
    if side_by_side:
        files.append(output_dir / f"{stem}_compare.png")
    return files


def check_output_dir(output_dir: Path) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output {output_dir} is a file; give a folder (it is created if missing)")


def check_outputs_free(image_paths: Sequence[Path], output_dir: Path, save_npy: bool, side_by_side: bool,
                       overwrite: bool) -> None:
    """Raise OutputsInTheWay if the run would replace a file: an input photo (always refused) or,
    without `overwrite`, anything already in `output_dir`."""
    targets = [file for stem in output_stems(image_paths)
               for file in output_files(stem, output_dir, save_npy, side_by_side)]
    inputs = {path.resolve(): path for path in image_paths}
    for target in targets:
        if target.resolve() in inputs:
            raise OutputsInTheWay(f"{target} would replace the input photo {inputs[target.resolve()]}; "
                                  f"choose another --output")
    existing = [target for target in targets if target.exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        them = "them" if len(existing) > 1 else "it"
        raise OutputsInTheWay(f"{output_dir}/ already holds {existing[0].name}{more}; pass --overwrite to replace "
                              f"{them} or choose another --output")


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


def colour_bar(height: int, colormap: str) -> Image.Image:
    """A white strip `height` pixels high: the colormap from its high end ("near": colorize maps
    high disparity there) at the top row to its low end ("far") at the bottom row, labelled."""
    font_size = max(10, min(48, height // 16))
    font = label_font(font_size)
    pad, bar_width = max(2, font_size // 4), font_size
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = math.ceil(max(probe.textlength(word, font=font) for word in ("near", "far")))
    legend = Image.new("RGB", (3 * pad + bar_width + text_width, height), "white")
    rows = colour_ramp(height, colormap).flip(-1).T  # (height, 3), near first
    bar = np.repeat((rows * 255).round().to(torch.uint8).numpy()[:, None, :], bar_width, axis=1)
    legend.paste(Image.fromarray(bar), (pad, 0))
    draw = ImageDraw.Draw(legend)
    text_x = 2 * pad + bar_width
    draw.text((text_x, 0), "near", fill="black", font=font)
    draw.text((text_x, max(0, height - font.getbbox("far")[3] - 1)), "far", fill="black", font=font)
    return legend


def side_by_side_image(photo: Image.Image, depth: Image.Image, colormap: str) -> Image.Image:
    """photo | depth | colour bar, one image at most COMPARE_MAX_HEIGHT pixels high."""
    if photo.height > COMPARE_MAX_HEIGHT:
        scale = COMPARE_MAX_HEIGHT / photo.height
        panel = (max(1, round(photo.width * scale)), COMPARE_MAX_HEIGHT)
        photo = photo.resize(panel, Image.Resampling.BILINEAR)
        depth = depth.resize(panel, Image.Resampling.BILINEAR)
    legend = colour_bar(photo.height, colormap)
    canvas = Image.new("RGB", (2 * photo.width + legend.width, photo.height), "white")
    canvas.paste(photo, (0, 0))
    canvas.paste(depth, (photo.width, 0))
    canvas.paste(legend, (2 * photo.width, 0))
    return canvas


def _write_outputs(disparity: torch.Tensor, photo: Image.Image, files: list[Path], colormap: str) -> None:
    """disparity (1, 1, S, S) -> `files` (from `output_files`) for one photo."""
    full = F.interpolate(disparity, size=(photo.height, photo.width), mode="bilinear",
                         align_corners=False)  # (1, 1, H, W)
    depth = _colour_image(full, colormap)
    # zlib level 3: a third of the default's encoding time for ~15% larger files.
    depth.save(files[0], compress_level=3)
    for path in files[1:]:
        if path.suffix == ".npy":
            np.save(path, full[0, 0].numpy().astype(np.float32))
        else:
            side_by_side_image(photo, depth, colormap).save(path, compress_level=3)


def write_depth_maps(image_paths: Sequence[Path], model: LoadedModel, output_dir: Path, save_npy: bool = False,
                     side_by_side: bool = False, batch_size: int = 4, colormap: str = "Spectral_r") -> list[Path]:
    """Run `model` over `image_paths` and write each photo's files; returns the depth PNGs written.
    Unreadable files are logged once each and skipped."""
    output_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    batch: list[tuple[torch.Tensor, Image.Image, list[Path]]] = []  # (model input, photo, its files)

    def flush() -> None:
        disparity = model.predict(torch.stack([image for image, _, _ in batch]))  # (B, 1, S, S)
        for one, (_, photo, files) in zip(disparity.split(1), batch, strict=True):
            _write_outputs(one, photo, files, colormap)
            written.append(files[0])
        batch.clear()

    for path, stem in zip(image_paths, output_stems(image_paths), strict=True):
        try:
            photo = load_rgb(path)
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
            logger.warning("skipping unreadable image %s (%s)", path, first_line(error))
            continue
        batch.append((preprocess(photo, model.size), photo, output_files(stem, output_dir, save_npy, side_by_side)))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return written


def predict_paths(paths: Iterable[str | Path], model_path: str | Path, output_dir: str | Path,
                  size: Optional[int] = None, save_npy: bool = False, batch_size: int = 4,
                  colormap: str = "Spectral_r", side_by_side: bool = False, overwrite: bool = False) -> list[Path]:
    """Write depth maps for every readable image in `paths` (files or folders) into `output_dir`.

    Returns the written `<stem>_depth.png` paths (the other files, if any, beside each). `size`
    defaults to the model's own (see `load_model`). Raises OutputsInTheWay, before loading the
    model, if a file would be replaced without `overwrite`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    lut(colormap)  # an unknown colormap is refused before any work
    output_dir = Path(output_dir)
    check_output_dir(output_dir)
    image_paths = collect_images(paths)
    check_outputs_free(image_paths, output_dir, save_npy, side_by_side, overwrite)
    model = load_model(model_path, size)
    if model.size_note:
        logger.info(model.size_note)
    return write_depth_maps(image_paths, model, output_dir, save_npy, side_by_side, batch_size, colormap)


def summary(written: int, skipped: int, output_dir: str | Path) -> str:
    line = f"wrote {plural(written, 'depth map')} to {output_dir}"
    return line + (f" ({skipped} skipped: unreadable, see the warnings above)" if skipped else "")


def main(argv: Optional[list[str]] = None) -> int:
    parser = ArgumentParser(prog="python -m trainer.ship.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    parser.add_argument("--model", required=True, help="student folder (config.json + model.safetensors) or .onnx")
    parser.add_argument("--output", required=True, help="folder for <stem>_depth.png (and .npy, _compare.png)")
    parser.add_argument("--size", type=int, help="input side, a multiple of 32; default: the model's own "
                                                 "(its training size; a fixed-size ONNX file's input)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--npy", action="store_true", help="also write the raw float32 disparity, <stem>_depth.npy")
    parser.add_argument("--side-by-side", action="store_true",
                        help="also write <stem>_compare.png: photo | depth | near-far colour bar")
    parser.add_argument("--colormap", default="Spectral_r", help="any matplotlib colormap name")
    parser.add_argument("--overwrite", action="store_true", help="replace files already in --output")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")

    output_dir = Path(args.output)
    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
        if args.size is not None:
            _check_size(args.size)
        lut(args.colormap)
        check_output_dir(output_dir)
        image_paths = collect_images(args.inputs)
        if not image_paths:
            raise ValueError("no images found in the inputs; give image files or folders that hold some")
        # Before the model is loaded: a refused run should cost nothing.
        check_outputs_free(image_paths, output_dir, args.npy, args.side_by_side, args.overwrite)
        model = load_model(args.model, args.size)
        if model.size_note:
            print(f"info: {model.size_note}", file=sys.stderr)
        written = write_depth_maps(image_paths, model, output_dir, args.npy, args.side_by_side, args.batch_size,
                                   args.colormap)
    except (OSError, ValueError) as error:  # bad arguments, model missing or refused
        print_error(str(error))
        return 1
    print(summary(len(written), len(image_paths) - len(written), args.output))
    if not written:
        print_error(f"none of the {len(image_paths)} inputs could be read as an image")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
