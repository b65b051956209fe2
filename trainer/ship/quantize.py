"""Post-training int8 quantisation of the exported student, checked against the fp32 file.

    python -m trainer.ship.quantize --onnx runs/demo/student.onnx [--output student.int8.onnx]
        [--mode dynamic|static] [--calibration data/samples] [--json quantize.json] [--overwrite]

Both modes run onnxruntime's `quant_pre_process` first (shape inference and graph fusions) and
then compare the int8 file with the fp32 one on the calibration photos, preprocessed exactly as
`trainer.ship.predict` does: max and mean |disparity difference|, and the AbsRel / delta1 of the int8
depth against the fp32 depth after the per-image scale-and-shift fit used in evaluation.

- dynamic (default): weights are int8 in the file, activations are quantised at run time. ORT's
  dynamic mode does cover Conv (as ConvInteger), not only MatMul, so MobileViT's convolutions
  shrink too. Weights are QUInt8: ConvInteger with int8 weights runs only on recent onnxruntime
  (added by microsoft/onnxruntime#26585, late 2025); older releases refuse to load such a file
  ("Could not find an implementation for ConvInteger"). uint8 x uint8 runs on every version this
  project allows, and is free of the uint8 x int8 saturation of AVX2 CPUs without VNNI.
- static: QDQ format, per-channel int8 weights and uint8 activations whose ranges come from the
  calibration photos. Only Conv, MatMul and Gemm are quantised (layer norms and softmax stay
  fp32), and weights use 7 bits (`reduce_range`): on an AVX2 CPU without VNNI that cut the error
  about six-fold, at the cost of one bit of weight precision elsewhere.

int8 is ~3x smaller on disk but not necessarily faster: on a 2-core AVX2 CPU the dynamic file ran
slower than fp32 (ConvInteger plus a run-time quantisation before every layer) and the static one
slightly faster. Time both files on the target before shipping one.

An existing `--output` or `--json` file is never replaced unless `--overwrite` is given. Exit
codes: 0 written and checked; 1 a mistake in the arguments, an input that is not a usable ONNX
file, or a quantisation that failed (the fp32 file is untouched); also 1 for arguments that cannot be parsed.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch

from data import list_images
from core.cli import ArgumentParser
from trainer.console import output_path_problem, print_error
from core.errors import first_line
from trainer.ship.fidelity import agreement, photo_batch
from trainer.ship.predict import load_predictor, onnx_input_size

logger = logging.getLogger(__name__)

MODES = ("dynamic", "static")
# Quantised in both modes; everything else (norms, softmax, resize) stays fp32.
QUANTIZED_OP_TYPES = ["Conv", "MatMul", "Gemm"]


class QuantizeError(RuntimeError):
    """The int8 file could not be written or does not run; the fp32 file is untouched."""


def _quantize(source: Path, target: Path, mode: str, images: torch.Tensor) -> None:
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)

    if mode == "dynamic":
        quantize_dynamic(source, target, op_types_to_quantize=QUANTIZED_OP_TYPES, weight_type=QuantType.QUInt8)
        return

    class CalibrationImages(CalibrationDataReader):
        def __init__(self, input_name: str) -> None:
            self.feeds = iter([{input_name: image[None].numpy()} for image in images])  # batches of 1

        def get_next(self) -> Optional[dict]:
            return next(self.feeds, None)

    import onnx

    input_name = onnx.load(str(source), load_external_data=False).graph.input[0].name
    quantize_static(source, target, CalibrationImages(input_name), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=QUANTIZED_OP_TYPES, per_channel=True, reduce_range=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def _pre_process(source: Path, target: Path) -> Path:
    """`target` after ORT's shape inference + fusions, or `source` if that fails (it is optional)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        # Without auto_merge the symbolic shape inference stops on this graph ("Incomplete symbolic
        # shape inference").
        quant_pre_process(str(source), str(target), auto_merge=True)
    except Exception as error:
        logger.warning("quantisation pre-processing failed (%s); quantising the model as exported",
                       first_line(error))
        return source
    return target


def _compare(fp32_path: Path, int8_path: Path, images: torch.Tensor, size: int, batch_size: int = 8) -> dict:
    fp32, int8 = load_predictor(fp32_path, size), load_predictor(int8_path, size)
    reference = torch.cat([fp32(batch) for batch in images.split(batch_size)])  # (N, 1, S, S)
    quantized = torch.cat([int8(batch) for batch in images.split(batch_size)])
    return agreement(quantized, reference)


def quantize_student(onnx_path: str | Path, output_path: str | Path, mode: str,
                     calibration_images: Sequence[str | Path], size: int = 256) -> dict:
    """Write an int8 copy of `onnx_path` to `output_path` and return the comparison with fp32.

    `calibration_images` calibrate static mode and are the comparison set in both modes. `size` is
    used only for files exported with dynamic height and width. Raises QuantizeError, leaving no
    file at `output_path`, if quantisation fails or the int8 file does not run or is not finite.
    """
    onnx_path, output_path = Path(onnx_path), Path(output_path)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if output_path.resolve() == onnx_path.resolve():
        raise QuantizeError(f"output {output_path} is the fp32 model itself; choose another path")
    if not calibration_images:
        raise QuantizeError("no calibration images given")
    try:
        size = onnx_input_size(onnx_path, size)
    except (OSError, ValueError) as error:
        raise QuantizeError(str(error)) from None
    try:
        images = photo_batch(calibration_images, size)  # (N, 3, S, S)
    except ValueError as error:
        raise QuantizeError(f"calibration: {error}") from None

    # Everything is written in a scratch folder and moved into place only once it has been checked.
    with tempfile.TemporaryDirectory(prefix="quantize-") as scratch:
        scratch_output = Path(scratch) / output_path.name
        try:
            source = _pre_process(onnx_path, Path(scratch) / "preprocessed.onnx")
            _quantize(source, scratch_output, mode, images)
            report = _compare(onnx_path, scratch_output, images, size)
        except Exception as error:
            raise QuantizeError(f"{mode} quantisation of {onnx_path} failed: {first_line(error)}") from error
        if not all(math.isfinite(value) for value in report.values()):
            raise QuantizeError(f"{mode} int8 model gives non-finite disparity: {report}")
        output_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(scratch_output, output_path)
    fp32_bytes, int8_bytes = onnx_path.stat().st_size, output_path.stat().st_size
    return {"mode": mode, "fp32": str(onnx_path), "int8": str(output_path), "size": size,
            "fp32_bytes": fp32_bytes, "int8_bytes": int8_bytes, "compression": fp32_bytes / int8_bytes, **report}


def format_report(report: dict) -> str:
    header = f"{'mode':>8} | {'fp32 MB':>8} | {'int8 MB':>8} | {'ratio':>6} | {'max|d|':>8} | {'mean|d|':>8} | " \
             f"{'mean|fp32|':>10} | {'abs_rel*':>8} | {'delta1*':>8}"
    values = (f"{report['mode']:>8} | {report['fp32_bytes'] / 1e6:8.3f} | {report['int8_bytes'] / 1e6:8.3f} | "
              f"{report['compression']:5.2f}x | {report['max_abs_diff']:8.2e} | {report['mean_abs_diff']:8.2e} | "
              f"{report['mean_abs_reference']:10.2e} | {report['aligned_abs_rel']:8.2e} | "
              f"{report['aligned_delta1']:8.4f}")
    return (f"int8 vs fp32 disparity on {report['num_images']} images at {report['size']}x{report['size']} "
            f"(* depth after scale-and-shift fit)\n{header}\n{values}")


def _outputs_problem(onnx_path: Path, output: Path, json_path: Optional[Path], overwrite: bool) -> Optional[str]:
    """Why the CLI must not write `output` and `json_path`, or None; checked before any work."""
    if output.resolve() == onnx_path.resolve():
        return f"--output {output} is the fp32 model itself; choose another path"
    for path, flag, what in ((json_path, "--json", "a file path"), (output, "--output", "a file path ending in .onnx")):
        problem = output_path_problem(path, flag, what) if path is not None else None
        if problem:
            return problem
    existing = [path for path in (output, json_path) if path is not None and path.exists()]
    if existing and not overwrite:
        return (f"{existing[0]} already exists; pass --overwrite to replace it or choose another "
                f"{'--output' if existing[0] == output else '--json'}")
    return None


def main(argv: Optional[list[str]] = None) -> int:
    parser = ArgumentParser(prog="python -m trainer.ship.quantize", description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnx", required=True, help="fp32 student from trainer.ship.export")
    parser.add_argument("--output", help="default: <onnx stem>.int8.onnx beside it")
    parser.add_argument("--mode", choices=MODES, default="dynamic")
    parser.add_argument("--calibration", default="data/samples",
                        help="folder of photos: calibrates static mode, compares both modes")
    parser.add_argument("--max-images", type=int, default=32, help="use at most this many calibration photos")
    parser.add_argument("--size", type=int, default=256, help="input side for files with dynamic height/width")
    parser.add_argument("--json", help="also write the report here")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output or --json file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")

    onnx_path = Path(args.onnx)
    output = Path(args.output) if args.output else onnx_path.with_name(f"{onnx_path.stem}.int8.onnx")
    json_path = Path(args.json) if args.json else None
    problem = _outputs_problem(onnx_path, output, json_path, args.overwrite)
    if problem:
        print_error(problem)
        return 1
    try:
        calibration_images = list_images(args.calibration)[:args.max_images]
        report = quantize_student(onnx_path, output, args.mode, calibration_images, args.size)
    except (QuantizeError, OSError, ValueError) as error:
        print_error(str(error))
        return 1
    print(format_report(report))
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
