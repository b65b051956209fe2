"""Colour-mapped depth images for TensorBoard and for `trainer.ship.predict`: the one place that
turns a colormap's name into colours (`lut`, `colorize`, `colour_ramp`), for the grids, predict's
pictures and legends, and the browser page's table."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from core.normalization import IMAGENET_MEAN, IMAGENET_STD


@lru_cache(maxsize=4)
def lut(name: str) -> torch.Tensor:
    """(256, 3) in [0, 1]: matplotlib's colormap `name`, from its low end to its high end.
    ValueError naming some choices if matplotlib has no such colormap."""
    import matplotlib  # imported lazily: only image logging needs it

    if name not in matplotlib.colormaps:
        raise ValueError(f"matplotlib has no colormap {name!r}; try Spectral_r, magma or viridis")
    return torch.tensor(matplotlib.colormaps[name](range(256))[:, :3], dtype=torch.float32)


def colorize(maps: torch.Tensor, colormap: str = "Spectral_r", stretch: bool = True) -> torch.Tensor:
    """(B, 1, H, W) -> (B, 3, H, W) in [0, 1]. With `stretch` each map is stretched between its
    2nd and 98th percentiles so one bright pixel does not wash out the rest; without, the maps
    must already be in [0, 1]."""
    scaled = maps.detach().float()
    if stretch:
        flat = scaled.flatten(1)
        low = flat.quantile(0.02, dim=1).view(-1, 1, 1, 1)
        high = flat.quantile(0.98, dim=1).view(-1, 1, 1, 1)
        scaled = (scaled - low) / (high - low).clamp_min(1e-8)
    scaled = scaled.clamp(0, 1)
    index = (scaled * 255).round().long().squeeze(1)  # (B, H, W)
    return lut(colormap).to(maps.device)[index].permute(0, 3, 1, 2)


def denormalize(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() * std + mean).clamp(0, 1)


# Tiles are enlarged (by a whole factor, nearest neighbour) to at least this height, so a 128 px
# student's maps are not postage stamps in TensorBoard.
MIN_TILE_HEIGHT = 192
COLUMN_TITLES = ("input", "teacher", "student", "|teacher - student|")
BAR_HEIGHT, TEXT_HEIGHT = 10, 18


def _unit(x: torch.Tensor) -> torch.Tensor:
    flat = x.detach().float().flatten(1)
    low, high = flat.min(1).values.view(-1, 1, 1, 1), flat.max(1).values.view(-1, 1, 1, 1)
    return (x.float() - low) / (high - low).clamp_min(1e-8)


def label_font(size: int):
    """PIL's built-in font at `size` pixels (scalable since Pillow 10.1), or its fixed bitmap font."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # older Pillow or no FreeType
        return ImageFont.load_default()


def _labelled_strip(width: int, labels: list[tuple[int, str, str]]) -> torch.Tensor:
    """(3, TEXT_HEIGHT, width) white strip; `labels` are (column, text, anchor 'mm'|'lm'|'rm')."""
    from PIL import Image, ImageDraw

    strip = Image.new("RGB", (width, TEXT_HEIGHT), "white")
    draw = ImageDraw.Draw(strip)
    font = label_font(12)
    for x, text, anchor in labels:
        draw.text((x, TEXT_HEIGHT // 2), text, fill="black", font=font, anchor=anchor)
    return torch.from_numpy(np.asarray(strip).copy()).permute(2, 0, 1).float() / 255


def colour_ramp(length: int, colormap: str) -> torch.Tensor:
    """(3, length) in [0, 1]: the colormap from its low end to its high end, as `colorize` colours
    (the legend of every colour-mapped picture)."""
    return colorize(torch.linspace(0, 1, length).view(1, 1, 1, length), colormap, stretch=False)[0, :, 0]


def _colour_bar(width: int, colormap: str) -> torch.Tensor:
    """(3, BAR_HEIGHT, width): the colormap from its low end (left) to its high end (right)."""
    return colour_ramp(width, colormap)[:, None].expand(3, BAR_HEIGHT, width)


def comparison_grid(images: torch.Tensor, teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Rows of input | teacher | student | |error| under column titles, with colour bars that say
    which end is near and far, as one (3, H, W) image in [0, 1].

    Teacher and student are min-max normalised per image first, since both are relative depth
    with arbitrary scale; the error is between those normalised maps."""
    teacher_unit, student_unit = _unit(teacher), _unit(student)
    columns = [denormalize(images), colorize(teacher_unit, stretch=False), colorize(student_unit, stretch=False),
               colorize((teacher_unit - student_unit).abs(), "magma", stretch=False)]
    rows = torch.cat(columns, dim=3).cpu()  # (B, 3, h, 4w)
    factor = max(1, math.ceil(MIN_TILE_HEIGHT / rows.shape[-2]))
    rows = F.interpolate(rows, scale_factor=factor, mode="nearest")
    tile = rows.shape[-1] // 4
    width = rows.shape[-1]
    header = _labelled_strip(width, [(tile * i + tile // 2, title, "mm") for i, title in enumerate(COLUMN_TITLES)])
    # Disparity: high (right end of the bar) is near. The error bar runs from equal to most different.
    bars = torch.ones(3, BAR_HEIGHT, width)
    bars[:, :, tile:3 * tile] = _colour_bar(2 * tile, "Spectral_r")
    bars[:, :, 3 * tile:] = _colour_bar(width - 3 * tile, "magma")
    legend = _labelled_strip(width, [(tile + 2, "far", "lm"), (3 * tile - 2, "near", "rm"),
                                     (3 * tile + 2, "same", "lm"), (width - 2, "differs", "rm")])
    return torch.cat([header, *rows, bars, legend], dim=1)  # (3, H, W)


def depth_comparison_picture(images: list[torch.Tensor], columns: dict[str, list[torch.Tensor]],
                             colormap: str = "Spectral_r") -> torch.Tensor:
    """Rows of input | one column per map, under titles, with ONE colour scale for every map and
    a colour bar: for comparing predictions with ground truth, each already aligned to it.

    images: (3, H, W) in [0, 1]; columns: {title: [(H, W) disparity]}, the first column the
    reference (ground truth). Disparity 0 (the sky) is the bar's far end, the reference's 98th
    percentile its near end."""
    reference = torch.cat([m.flatten() for m in next(iter(columns.values()))])
    near = reference[reference > 0].quantile(0.98).clamp_min(1e-8) if (reference > 0).any() else torch.tensor(1.0)
    tiles = [torch.stack(images)]
    for maps in columns.values():
        tiles.append(colorize((torch.stack(maps)[:, None] / near).clamp(0, 1), colormap, stretch=False))
    rows = torch.cat(tiles, dim=3).cpu()  # (B, 3, h, (1 + columns) w)
    factor = max(1, math.ceil(MIN_TILE_HEIGHT / rows.shape[-2]))
    rows = F.interpolate(rows, scale_factor=factor, mode="nearest")
    width, tile = rows.shape[-1], rows.shape[-1] // len(tiles)
    titles = ("input", *columns)
    header = _labelled_strip(width, [(tile * i + tile // 2, title, "mm") for i, title in enumerate(titles)])
    bars = torch.ones(3, BAR_HEIGHT, width)
    bars[:, :, tile:] = _colour_bar(width - tile, colormap)
    legend = _labelled_strip(width, [(tile + 2, "far (sky)", "lm"), (width - 2, "near", "rm")])
    return torch.cat([header, *rows, bars, legend], dim=1)  # (3, H, W)
