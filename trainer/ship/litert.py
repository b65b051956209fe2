"""LiteRT (TensorFlow Lite) export of the student with litert-torch, checked with the LiteRT
interpreter against PyTorch.

    pip install -e ".[mobile]"
    python -m trainer.ship.export --checkpoint runs/demo/student_best --format tflite

The file takes one NHWC float32 photo of the export size (RGB, ImageNet-normalised: the layout
Android's and iOS's LiteRT APIs hand over) as `image` and returns `disparity`, (1, H, W, 1). It is
checked against PyTorch on a random input (`atol`) and on the shipped sample photos
(`trainer.ship.fidelity.agreement`); `<file>.json` records the figures and the file's size.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from core.normalization import IMAGENET_MEAN, IMAGENET_STD
from core.errors import first_line
from trainer.ship.export import INPUT_NAME, OUTPUT_NAME, ExportError, staged_export
from trainer.ship.fidelity import agreement, photo_batch, sample_photos

INSTALL_HINT = 'pip install -e ".[mobile]" (litert-torch and ai-edge-litert)'


class ChannelsLast(nn.Module):
    """The student with NHWC input and output, the layout LiteRT's image APIs use; the permutes
    are folded into the converted graph."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student = student

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        return {OUTPUT_NAME: self.student(image.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)}


def _runner(path: Path):
    """NCHW batch -> NCHW disparity through the LiteRT interpreter, one photo at a time."""
    from ai_edge_litert.interpreter import Interpreter

    signature = Interpreter(model_path=str(path)).get_signature_runner()

    def run(images: torch.Tensor) -> torch.Tensor:
        outputs = [signature(**{INPUT_NAME: image[None].permute(0, 2, 3, 1).numpy()})[OUTPUT_NAME]
                   for image in images]
        return torch.from_numpy(np.concatenate(outputs)).permute(0, 3, 1, 2)
    return run


def export_tflite(student: nn.Module, path: Path, size: int, atol: float = 1e-3,
                  photos: Optional[Sequence[Path]] = None) -> dict:
    """Write `path` (a .tflite file), check it with the LiteRT interpreter, write `<path>.json`;
    returns that report. Raises ExportError, leaving nothing at `path`, if the converter is not
    installed, the conversion fails or the file does not match PyTorch."""
    try:
        import litert_torch
    except ImportError as error:
        raise ExportError(f"the LiteRT export needs the mobile extra: {INSTALL_HINT} ({first_line(error)})") from error
    path = Path(path)
    student = student.float().eval().cpu()
    with staged_export(path, f"LiteRT conversion to {path} failed") as (tmp, report):
        example = torch.zeros(1, size, size, 3)
        litert_torch.convert(ChannelsLast(student).eval(), sample_kwargs={INPUT_NAME: example}).export(str(tmp))
        run = _runner(tmp)
        random = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            max_diff = float((run(random) - student(random)).abs().max())
        if not max_diff <= atol:  # `not <=` also catches NaN
            raise ExportError(f"LiteRT output differs from PyTorch by {max_diff:.3g} at {size}x{size} "
                              f"(> --atol {atol})")
        images = photo_batch(sample_photos() if photos is None else photos, size)
        with torch.no_grad():
            reference = torch.cat([student(batch) for batch in images.split(8)])
        report.update({
            "tflite": path.name, "converter": f"litert-torch {litert_torch.__version__}",
            "input": INPUT_NAME, "output": OUTPUT_NAME,
            "input_layout": f"NHWC float32 (1, {size}, {size}, 3), RGB, ImageNet-normalised",
            "output_layout": f"NHWC float32 (1, {size}, {size}, 1)",
            "output_meaning": "relative inverse depth (disparity), >= 0, up to scale and shift",
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "export_size": [size, size],
            "file_mb": round(tmp.stat().st_size / 1e6, 2), "max_abs_diff_vs_pytorch": max_diff,
            "fidelity": {"size": [size, size], **agreement(run(images), reference)},
        })
    return report
