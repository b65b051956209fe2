"""Export of the student, verified against PyTorch: ONNX (checked with onnxruntime), a web page
that runs it in the browser (onnxruntime-web), or a LiteRT / TFLite file (checked with the LiteRT
interpreter).

    python -m trainer.ship.export --checkpoint runs/demo/student_best [--output student.onnx] [--size 256]
        [--atol 1e-3] [--overwrite]
    python -m trainer.ship.export --checkpoint runs/demo/student_best --web runs/demo/web [--overwrite]
    python -m trainer.ship.export --checkpoint runs/demo/student_best --format tflite [--output student.tflite]

The ONNX file takes any batch and, when the export size is a multiple of the student's input multiple
(64 for MobileViT-XS, see `modeling.traceable`), any height and width that are multiples of it:
the TorchScript tracer runs in seconds and the MobileViT blocks' patch counts become graph
arithmetic. At another multiple of 32 (e.g. 224) the file takes its export size only. The file is
checked against PyTorch at three sizes (one of them not square) and on the shipped sample photos;
`<output>.json` and the file's metadata record the sizes it accepts, the sizes checked, the largest
difference and the depth metrics of onnxruntime against PyTorch (`fidelity`).

`--web DIR` writes that ONNX file with a self-contained page into DIR (`trainer.ship.web`);
`--format tflite` writes a LiteRT file instead (`trainer.ship.litert`, needs the `mobile` extra).

The CLI exports at the size the student was trained at (config.json's `input_size`; 256 for
folders saved before it was recorded), writes `<checkpoint>/../student.onnx` (or `.tflite`) by
default and refuses to replace an existing file (or its `.json` report, or a page) unless
`--overwrite` is given; it never writes into a folder of files it did not write.
Exit codes: 0 written and checked; 1 a mistake in the arguments, a student folder that cannot be
loaded, or an export that failed (nothing is left behind); also 1 for arguments that cannot be parsed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from core.normalization import IMAGENET_MEAN, IMAGENET_STD
from modeling.traceable import input_multiple, traceable_any_size
from core.cli import ArgumentParser
from trainer.console import output_path_problem, print_error, shown_path
from core.errors import first_line
from trainer.ship.fidelity import agreement, photo_batch, sample_photos

logger = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAME = "disparity"
DEFAULT_SIZE = 256  # the CLI's, for student folders saved before config.json recorded input_size


class ExportError(RuntimeError):
    """The ONNX file could not be written or does not match PyTorch."""


def _export(student: nn.Module, path: Path, size: int, opset: int, any_size: bool) -> None:
    example = torch.randn(1, 3, size, size)
    axes = {0: "batch", 2: "height", 3: "width"} if any_size else {0: "batch"}
    forward = traceable_any_size(student) if any_size else contextlib.nullcontext()
    with forward, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python values in timm's code
        torch.onnx.export(student, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          opset_version=opset, dynamo=False, dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes})


def _run(session, images: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0])


def _max_abs_diff(session, student: nn.Module, shape: tuple[int, ...]) -> float:
    images = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float((_run(session, images) - student(images)).abs().max())


def _add_metadata(path: Path, metadata: dict[str, str]) -> None:
    import onnx  # here: every training run imports this module at its start (0.9 s), many never export

    model = onnx.load(str(path))
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


@contextlib.contextmanager
def staged_export(path: Path, failure: str) -> Iterator[tuple[Path, dict]]:
    """Yields a temporary path beside `path` for the block to write and check, and a dict for the
    block to fill with its report. Only when the block completes is the file renamed to `path` and
    the report written to `<path>.json`. Any other error than ExportError becomes
    ExportError(f"{failure}: ..."), and the temporary file never stays."""
    tmp = path.with_name(f".tmp_{path.name}")
    report: dict = {}
    try:
        yield tmp, report
        os.replace(tmp, path)
        path.with_suffix(path.suffix + ".json").write_text(json.dumps(report, indent=2) + "\n")
    except ExportError:
        raise
    except Exception as error:
        raise ExportError(f"{failure}: {first_line(error)}") from error
    finally:
        tmp.unlink(missing_ok=True)


def sizes_to_check(size: int, multiple: Optional[int]) -> list[tuple[int, int]]:
    """(H, W) pairs an export is verified at: its own size and, for a file that takes any
    multiple of `multiple`, a larger square and a non-square size."""
    if multiple is None:
        return [(size, size)]
    return [(size, size), (size + multiple, size + multiple), (size, size + 2 * multiple)]


def photo_fidelity(session, student: nn.Module, photos: Sequence[Path], size: int) -> dict:
    """onnxruntime against PyTorch on `photos` at size x size (`trainer.ship.fidelity.agreement`)."""
    images = photo_batch(photos, size)
    with torch.no_grad():
        reference = torch.cat([student(batch) for batch in images.split(8)])
    candidate = torch.cat([_run(session, batch) for batch in images.split(8)])
    return {"size": [size, size], **agreement(candidate, reference)}


def export_student(student: nn.Module, path: Path, size: int, opset: int = 18, atol: float = 1e-3,
                   photos: Optional[Sequence[Path]] = None) -> dict:
    """Write `path`, check it with onnxruntime, write `<path>.json`; returns that report.

    `photos` (default: the shipped samples) measure the export's fidelity in depth terms.
    Raises ExportError (the caller's checkpoints are untouched, nothing is left at `path`) if
    the export or a check fails."""
    import onnxruntime as ort

    path = Path(path)
    student = student.float().eval().cpu()
    multiple = input_multiple(student.encoder)
    any_size = size % multiple == 0
    checked = sizes_to_check(size, multiple if any_size else None)
    with staged_export(path, f"ONNX export to {path} failed") as (tmp, report):
        _export(student, tmp, size, opset, any_size)
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        # Batch 2 proves the dynamic batch axis; the tolerance covers fp32 kernel differences.
        differences = [_max_abs_diff(session, student, (2, 3, height, width)) for height, width in checked]
        failed = [(hw, difference) for hw, difference in zip(checked, differences) if not difference <= atol]
        if failed:  # `not <=` also catches NaN
            (height, width), difference = failed[0]
            raise ExportError(f"ONNX output differs from PyTorch by {difference:.3g} at {height}x{width} "
                              f"(> export.atol={atol})")
        max_diff = max(differences)
        fidelity = photo_fidelity(session, student, sample_photos() if photos is None else photos, size)
        accepted = (f"any H and W that are multiples of {multiple}" if any_size else f"{size}x{size} only "
                    f"(export at a multiple of {multiple} for a file that takes any size)")
        report.update({
            "onnx": path.name, "opset": opset, "input": INPUT_NAME, "output": OUTPUT_NAME,
            "input_layout": "NCHW float32, RGB, ImageNet-normalised",
            "output_meaning": "relative inverse depth (disparity), >= 0, up to scale and shift",
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "export_size": [size, size],
            "dynamic_batch": True, "dynamic_hw": any_size, "size_multiple": multiple if any_size else None,
            "accepted_sizes": accepted, "checked_sizes": [list(hw) for hw in checked],
            "max_abs_diff_vs_pytorch": max_diff, "fidelity": fidelity,
        })
        _add_metadata(tmp, {k: json.dumps(v) if not isinstance(v, str) else v for k, v in report.items()})
    return report


def _output_problem(output: Path, overwrite: bool, suffix: str = ".onnx") -> Optional[str]:
    """Why the CLI must not write `output` (and its `.json` report), or None if it may."""
    report = output.with_suffix(output.suffix + ".json")
    if output.suffix != suffix:
        return f"--output {output} must end in {suffix}"
    problem = output_path_problem(output, "--output", f"a file path ending in {suffix}")
    if problem:
        return problem
    existing = [path for path in (output, report) if path.exists()]
    if existing and not overwrite:
        also = f" (and {report.name})" if len(existing) == 2 else ""
        return f"{existing[0]} already exists{also}; pass --overwrite to replace it or choose another --output"
    return None


def main(argv: Optional[list[str]] = None) -> int:
    from modeling import StudentLoadError, load_student  # CLI-only import

    parser = ArgumentParser(prog="python -m trainer.ship.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="student folder (config.json + model.safetensors)")
    parser.add_argument("--format", choices=("onnx", "tflite"), default="onnx",
                        help="onnx (default) or tflite: a LiteRT file, needs pip install -e '.[mobile]'")
    parser.add_argument("--output", help="a .onnx (.tflite) path; default: <checkpoint>/../student.onnx (.tflite)")
    parser.add_argument("--web", metavar="DIR",
                        help="write the ONNX student with a web page that runs it in the browser into DIR")
    parser.add_argument("--onnxruntime-web", metavar="PACKAGE_DIR", type=Path,
                        help="the onnxruntime-web npm package to copy into --web DIR; "
                             "default: the project's (npm ci --prefix web)")
    parser.add_argument("--size", type=int,
                        help="export height = width, a multiple of 32; default: the size the student was trained at")
    parser.add_argument("--opset", type=int, default=18)
    # Kept so that scripts written for the dynamo exporter still run: any size is now the default.
    parser.add_argument("--dynamic-hw", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--atol", type=float, default=1e-3)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output file and its .json, or a page this tool wrote")
    args = parser.parse_args(argv)
    if args.dynamic_hw:
        print("note: --dynamic-hw is no longer needed: the export takes any multiple of 64 by default",
              file=sys.stderr)
    if args.size is not None and (args.size <= 0 or args.size % 32):
        print_error(f"--size {args.size} must be a positive multiple of 32, e.g. 256")
        return 1
    checkpoint = Path(args.checkpoint)
    output = Path(args.output) if args.output else checkpoint.parent / f"student.{args.format}"
    # Checked before loading anything: a refused output should not cost an export.
    problem = _target_problem(args, output)
    if problem:
        print_error(problem)
        return 1
    try:
        student = load_student(checkpoint)
    except StudentLoadError as error:
        print_error(str(error))
        return 1
    size = args.size or student.input_size
    if size is None:
        size = DEFAULT_SIZE
        print(f"info: {checkpoint} records no input_size (saved before it was recorded); exporting at "
              f"{size}x{size} (pass --size to choose)", file=sys.stderr)
    elif size <= 0 or size % 32:  # only a hand-edited config.json gets here
        print_error(f"{checkpoint}/config.json records input_size {size}, not a positive multiple of 32; pass --size")
        return 1
    try:
        if args.web:
            from trainer.ship.web import write_web_page

            report = write_web_page(student, Path(args.web), size, args.opset, args.atol, _runtime(args))
        elif args.format == "tflite":
            from trainer.ship.litert import export_tflite

            report = export_tflite(student, output, size, args.atol)
        else:
            report = export_student(student, output, size, args.opset, args.atol)
    except ExportError as error:
        print_error(str(error))
        return 1
    print(json.dumps(report, indent=2))
    if args.web:
        print(f"wrote the page into {shown_path(Path(args.web))}; serve it with: {report['serve']}")
    else:
        resolved = output.resolve()
        print(f"wrote {resolved} and {resolved.with_suffix(resolved.suffix + '.json')}")
    return 0


def _runtime(args: argparse.Namespace) -> Path:
    from trainer.ship.web import DEFAULT_RUNTIME

    return args.onnxruntime_web or DEFAULT_RUNTIME


def _target_problem(args: argparse.Namespace, output: Path) -> Optional[str]:
    """Why the CLI must not write what `args` ask for, or None."""
    if not args.web:
        return _output_problem(output, args.overwrite, f".{args.format}")
    from trainer.ship.web import runtime_problem, web_dir_problem

    if args.format != "onnx" or args.output:
        return "--web writes its own student.onnx into DIR; drop --format tflite and --output"
    return web_dir_problem(Path(args.web), args.overwrite) or runtime_problem(_runtime(args))


if __name__ == "__main__":
    sys.exit(main())
