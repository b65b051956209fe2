"""How closely an exported or quantised student reproduces its reference, in the terms that matter
for relative depth: the raw disparity difference, and depth metrics after the per-image
scale-and-shift fit that evaluation uses (as Core ML model cards report conversion fidelity).

The comparison photos default to the ones the project ships (`data/samples`), so every report is
made on the same real photos wherever it runs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

import data
from data import list_images, load_rgb
from core.errors import first_line
from trainer.evaluate.metrics import depth_metrics, depth_valid_mask_from_disparity, disparity_to_depth
from trainer.ship.predict import preprocess

logger = logging.getLogger(__name__)

SAMPLE_PHOTOS = Path(data.__file__).resolve().parent / "samples"


def sample_photos() -> list[Path]:
    return list_images(SAMPLE_PHOTOS)


def photo_batch(paths: Sequence[str | Path], size: int) -> torch.Tensor:
    """(N, 3, size, size) of the readable photos, preprocessed as `trainer.ship.predict` does.
    Raises ValueError if none can be read."""
    views = []
    for path in paths:
        try:
            views.append(preprocess(load_rgb(path), size))
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
            logger.warning("skipping unreadable image %s (%s)", path, first_line(error))
    if not views:
        raise ValueError(f"none of the {len(paths)} comparison photos could be read")
    return torch.stack(views)


def agreement(candidate: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """`candidate` against `reference` disparity, both (N, 1, H, W): raw differences, and depth
    abs_rel / delta1 after the scale-and-shift fit (the output is relative depth, so a constant
    scale or shift is not an error)."""
    difference = (candidate - reference).abs()
    aligned = depth_metrics(disparity_to_depth(candidate), disparity_to_depth(reference),
                            depth_valid_mask_from_disparity(reference), align="scale_shift")
    return {"num_images": len(reference), "max_abs_diff": difference.max().item(),
            "mean_abs_diff": difference.mean().item(), "mean_abs_reference": reference.abs().mean().item(),
            "aligned_abs_rel": aligned["abs_rel"].nanmean().item(),
            "aligned_delta1": aligned["delta1"].nanmean().item()}
