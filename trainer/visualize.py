"""Colour-mapped depth images for TensorBoard and for `trainer.predict`."""

from __future__ import annotations

from functools import lru_cache

import torch

from data.transforms import IMAGENET_MEAN, IMAGENET_STD


@lru_cache(maxsize=4)
def _lut(name: str) -> torch.Tensor:
    import matplotlib  # imported lazily: only image logging needs it

    return torch.tensor(matplotlib.colormaps[name](range(256))[:, :3], dtype=torch.float32)  # (256, 3)


def colorize(maps: torch.Tensor, colormap: str = "Spectral_r") -> torch.Tensor:
    """(B, 1, H, W) -> (B, 3, H, W) in [0, 1], each map stretched between its 2nd and 98th
    percentiles so one bright pixel does not wash out the rest."""
    flat = maps.detach().float().flatten(1)
    low = flat.quantile(0.02, dim=1).view(-1, 1, 1, 1)
    high = flat.quantile(0.98, dim=1).view(-1, 1, 1, 1)
    scaled = ((maps.float() - low) / (high - low).clamp_min(1e-8)).clamp(0, 1)
    index = (scaled * 255).round().long().squeeze(1)  # (B, H, W)
    return _lut(colormap).to(maps.device)[index].permute(0, 3, 1, 2)


def denormalize(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() * std + mean).clamp(0, 1)


def comparison_grid(images: torch.Tensor, teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Rows of input | teacher | student | |error|, as one (3, B*H, 4*W) image in [0, 1].

    Teacher and student are min-max normalised per image first, since both are relative depth
    with arbitrary scale; the error is between those normalised maps."""

    def unit(x: torch.Tensor) -> torch.Tensor:
        flat = x.detach().float().flatten(1)
        low, high = flat.min(1).values.view(-1, 1, 1, 1), flat.max(1).values.view(-1, 1, 1, 1)
        return (x.float() - low) / (high - low).clamp_min(1e-8)

    teacher_unit, student_unit = unit(teacher), unit(student)
    columns = [denormalize(images), colorize(teacher_unit), colorize(student_unit),
               colorize((teacher_unit - student_unit).abs(), "magma")]
    rows = torch.cat(columns, dim=3)  # (B, 3, H, 4W)
    return torch.cat(list(rows), dim=1).cpu()  # (3, B*H, 4W)
