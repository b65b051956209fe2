"""ONNX export of the student, verified against PyTorch with onnxruntime.

    python -m trainer.ship.export --checkpoint runs/demo/student_best [--output student.onnx] [--size 256]
        [--dynamic-hw] [--overwrite]

Two exporters, because timm's MobileViT computes its patch counts in Python:
- default (TorchScript tracer, seconds): dynamic batch, height and width fixed at the export size;
- `--dynamic-hw` (torch.export / dynamo, minutes on a laptop CPU): any multiple of 32.
Either way the file is run once at another size to record which sizes it really accepts.

The CLI exports at the size the student was trained at (config.json's `input_size`; 256 for
folders saved before it was recorded), writes `<checkpoint>/../student.onnx` by default and
refuses to replace an existing file (or its `.json` report) unless `--overwrite` is given.
Exit codes: 0 written and checked; 1 a mistake in the arguments, a student folder that cannot be
loaded, or an export that failed (nothing is left behind); also 1 for arguments that cannot be parsed.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
import torch
from torch import nn

from data.transforms import IMAGENET_MEAN, IMAGENET_STD
from trainer.console import ArgumentParser, output_path_problem
from trainer.errors import first_line

logger = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAME = "disparity"
DEFAULT_SIZE = 256  # the CLI's, for student folders saved before config.json recorded input_size


class ExportError(RuntimeError):
    """The ONNX file could not be written or does not match PyTorch."""


def _export(student: nn.Module, path: Path, size: int, opset: int, dynamic_hw: bool) -> None:
    example = torch.randn(1, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python ints in timm's MobileViT
        if dynamic_hw:
            dim = torch.export.Dim
            torch.onnx.export(student, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              opset_version=opset, dynamo=True, verbose=False,
                              dynamic_shapes={"images": {0: dim("batch", min=1, max=1024), 2: dim.AUTO, 3: dim.AUTO}})
        else:
            axes = {0: "batch"}
            torch.onnx.export(student, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              opset_version=opset, dynamo=False,
                              dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes})


def _max_abs_diff(session, student: nn.Module, shape: tuple[int, ...]) -> float:
    images = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    onnx_out = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0]
    with torch.no_grad():
        torch_out = student(images).numpy()
    return float(np.abs(onnx_out - torch_out).max())


def _add_metadata(path: Path, metadata: dict[str, str]) -> None:
    model = onnx.load(str(path))
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def export_student(student: nn.Module, path: Path, size: int, opset: int = 18, dynamic_hw: bool = False,
                   atol: float = 1e-3) -> dict:
    """Write `path`, check it with onnxruntime, write `<path>.json`; returns that report.
    Raises ExportError (the caller's checkpoints are untouched) if export or the check fails."""
    import onnxruntime as ort

    path = Path(path)
    tmp = path.with_name(f".tmp_{path.name}")  # renamed into place only once checked
    student = student.float().eval().cpu()
    try:
        _export(student, tmp, size, opset, dynamic_hw)
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        # Batch 2 at the export size proves the dynamic batch axis; tolerance covers fp32 kernels.
        max_diff = _max_abs_diff(session, student, (2, 3, size, size))
        if not max_diff <= atol:  # also catches NaN
            raise ExportError(f"ONNX output differs from PyTorch by {max_diff:.3g} (> export.atol={atol})")
        other = (1, 3, size + 64, size - 32 if size > 32 else size + 32)
        try:
            other_ok = _max_abs_diff(session, student, other) <= atol
        except Exception:  # onnxruntime refuses the shape: the file is fixed-size
            other_ok = False
        report = {
            "onnx": path.name, "opset": opset, "input": INPUT_NAME, "output": OUTPUT_NAME,
            "input_layout": "NCHW float32, RGB, ImageNet-normalised",
            "output_meaning": "relative inverse depth (disparity), >= 0, up to scale and shift",
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "export_size": [size, size],
            "dynamic_batch": True, "dynamic_hw": other_ok,
            "accepted_sizes": "any H, W multiple of 32" if other_ok else f"{size}x{size} only",
            "max_abs_diff_vs_pytorch": max_diff,
        }
        _add_metadata(tmp, {k: json.dumps(v) if not isinstance(v, str) else v for k, v in report.items()})
        os.replace(tmp, path)
        path.with_suffix(path.suffix + ".json").write_text(json.dumps(report, indent=2) + "\n")
    except ExportError:
        raise
    except Exception as error:
        raise ExportError(f"ONNX export to {path} failed: {first_line(error)}") from error
    finally:
        tmp.unlink(missing_ok=True)
    return report


def _output_problem(output: Path, overwrite: bool) -> Optional[str]:
    """Why the CLI must not write `output` (and its `.json` report), or None if it may."""
    report = output.with_suffix(output.suffix + ".json")
    if output.suffix != ".onnx":
        return f"--output {output} must end in .onnx"
    problem = output_path_problem(output, "--output", "a file path ending in .onnx")
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
    parser.add_argument("--output", help="a .onnx path; default: <checkpoint>/../student.onnx")
    parser.add_argument("--size", type=int,
                        help="export height = width, a multiple of 32; default: the size the student was trained at")
    parser.add_argument("--opset", type=int, default=18)
    parser.add_argument("--dynamic-hw", action="store_true", help="dynamo exporter, any input size (slow)")
    parser.add_argument("--atol", type=float, default=1e-3)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file and its .json")
    args = parser.parse_args(argv)
    if args.size is not None and (args.size <= 0 or args.size % 32):
        print(f"error: --size {args.size} must be a positive multiple of 32, e.g. 256", file=sys.stderr)
        return 1
    checkpoint = Path(args.checkpoint)
    output = Path(args.output) if args.output else checkpoint.parent / "student.onnx"
    # Checked before loading anything: a refused output should not cost an export.
    problem = _output_problem(output, args.overwrite)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    try:
        student = load_student(checkpoint)
    except StudentLoadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    size = args.size or student.input_size
    if size is None:
        size = DEFAULT_SIZE
        print(f"info: {checkpoint} records no input_size (saved before it was recorded); exporting at "
              f"{size}x{size} (pass --size to choose)", file=sys.stderr)
    elif size <= 0 or size % 32:  # only a hand-edited config.json gets here
        print(f"error: {checkpoint}/config.json records input_size {size}, not a positive multiple of 32; "
              f"pass --size", file=sys.stderr)
        return 1
    try:
        report = export_student(student, output, size, args.opset, args.dynamic_hw, args.atol)
    except ExportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    resolved = output.resolve()
    print(f"wrote {resolved} and {resolved.with_suffix(resolved.suffix + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
