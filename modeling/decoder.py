"""The student's decoders: four encoder stages (strides 4, 8, 16, 32) -> a (B, 1, H, W) map >= 0.

Two presets, both DPT-style (every stage fused top-down through residual conv units, then a
progressive upsampling head), chosen with `student.decoder`:
- `lean` (default): channels that narrow towards the fine stages (by default 96, 64, 48, 32 from
  stride 32 to stride 4), depthwise-separable residual units at strides 4 and 8 where the pixels
  are, full 3x3 units at strides 16 and 32 where they are cheap, the coarser path projected
  before it is upsampled, and a head that upsamples 4 -> 2 -> 1 at 16 channels. About 0.3
  GFLOPs at 256x256 against MobileViT-XS's 1.8 (see `python -m modeling.summary`).
- `dpt` (`dpt64` in the benchmarks: width 64, head 32): the first student's MiniDPT, one width
  at every stage and a 32-channel head at full resolution; 3.6 GFLOPs at 256x256.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from core.choices import DECODERS
# The widths each preset uses when the config leaves them out: (decoder_width, head_width).
DEFAULT_WIDTHS = {"lean": (96, 16), "dpt": (64, 32)}


def _upsample2x(x: torch.Tensor) -> torch.Tensor:
    # A fixed scale factor (not a size read off another tensor) keeps the ONNX graph free of
    # shape arithmetic; inputs are multiples of 32, so every stage doubles exactly.
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


def _conv3x3(width: int, separable: bool) -> nn.Module:
    if not separable:
        return nn.Conv2d(width, width, 3, padding=1)
    # MobileNet's split: a depthwise 3x3 for space, a pointwise 1x1 for channels; ~9x fewer
    # multiply-adds than a full 3x3 at these widths.
    return nn.Sequential(nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False),
                         nn.Conv2d(width, width, 1))


class ResidualConvUnit(nn.Module):
    """relu -> conv3x3 -> relu -> conv3x3, plus the input (DPT's RCU); `separable` splits each
    3x3 into depthwise + pointwise."""

    def __init__(self, width: int, separable: bool = False):
        super().__init__()
        self.conv1 = _conv3x3(width, separable)
        self.conv2 = _conv3x3(width, separable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Not in-place: the first ReLU must not overwrite `x`, which the skip still needs.
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FeatureFusionBlock(nn.Module):
    """MiniDPT's fusion: merge the coarser path into this stage, refine, double the resolution."""

    def __init__(self, width: int):
        super().__init__()
        self.skip_unit = ResidualConvUnit(width)
        self.out_unit = ResidualConvUnit(width)
        self.project = nn.Conv2d(width, width, 1)

    def forward(self, stage: torch.Tensor, coarser: torch.Tensor | None = None) -> torch.Tensor:
        x = self.skip_unit(stage)
        if coarser is not None:
            x = x + coarser
        return self.project(_upsample2x(self.out_unit(x)))


class UpsampleBlock(nn.Module):
    """2x bilinear upsampling followed by a 3x3 conv and ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(_upsample2x(x)))


def _top_down(reassemble: nn.ModuleList, fusion: nn.ModuleList, features: list[torch.Tensor]) -> torch.Tensor:
    stages = [project(f) for project, f in zip(reassemble, features)]
    path = None
    for fuse, stage in zip(reversed(fusion), reversed(stages)):  # stride 32 first
        path = fuse(stage, path)
    return path


def _check_stages(in_channels: list[int]) -> None:
    if len(in_channels) != 4:
        raise ValueError(f"the decoder expects 4 encoder stages, got {len(in_channels)}")


class MiniDPT(nn.Module):
    """The `dpt` preset: one `width` at every stage, the head at strides 2 and 1."""

    def __init__(self, in_channels: list[int], width: int = 64, head_width: int = 32):
        super().__init__()
        _check_stages(in_channels)
        self.reassemble = nn.ModuleList(nn.Conv2d(c, width, 1, bias=False) for c in in_channels)
        self.fusion = nn.ModuleList(FeatureFusionBlock(width) for _ in in_channels)
        self.head = nn.Sequential(
            nn.Conv2d(width, width // 2, 3, padding=1),  # at stride 2 after the last fusion
            UpsampleBlock(width // 2, head_width),  # back to input resolution
            nn.Conv2d(head_width, 1, 1),
            # Softplus rather than the teacher's ReLU: equally non-negative, but a freshly
            # initialised student cannot start with a dead output and no gradient.
            nn.Softplus(),
        )

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.head(_top_down(self.reassemble, self.fusion, features))  # (B, 1, H, W)


class LeanFusionBlock(nn.Module):
    """Refine this stage, add the coarser path (projected to this width at its own, 4x smaller
    resolution, then upsampled), refine the sum. The output stays at this stage's resolution."""

    def __init__(self, width: int, coarser_width: Optional[int], separable: bool):
        super().__init__()
        self.skip_unit = ResidualConvUnit(width, separable)
        self.project = nn.Conv2d(coarser_width, width, 1) if coarser_width else None
        self.out_unit = ResidualConvUnit(width, separable)

    def forward(self, stage: torch.Tensor, coarser: torch.Tensor | None = None) -> torch.Tensor:
        x = self.skip_unit(stage)
        if coarser is not None:
            x = x + _upsample2x(self.project(coarser))
        return self.out_unit(x)


def lean_widths(decoder_width: int) -> list[int]:
    """Stage widths from stride 4 to stride 32: a third, a half, two thirds of `decoder_width`,
    then all of it (96 -> 32, 48, 64, 96)."""
    return [max(1, decoder_width // 3), max(1, decoder_width // 2), max(1, 2 * decoder_width // 3), decoder_width]


class LeanDecoder(nn.Module):
    """The `lean` preset. By FLOPs at 256x256 (MobileViT-XS stages, `python -m modeling.summary`):
    full 3x3 units at 64x64 would cost 0.3 GFLOPs, separable ones 0.04; at 8x8 the full ones
    cost 0.04, so only the two fine stages are separable."""

    SEPARABLE = (True, True, False, False)  # strides 4, 8, 16, 32

    def __init__(self, in_channels: list[int], width: int = 96, head_width: int = 16):
        super().__init__()
        _check_stages(in_channels)
        widths = lean_widths(width)
        self.reassemble = nn.ModuleList(nn.Conv2d(c, w, 1, bias=False) for c, w in zip(in_channels, widths))
        coarser = [*widths[1:], None]
        self.fusion = nn.ModuleList(LeanFusionBlock(w, c, separable)
                                    for w, c, separable in zip(widths, coarser, self.SEPARABLE))
        self.head = nn.Sequential(
            nn.Conv2d(widths[0], head_width, 3, padding=1), nn.ReLU(),  # stride 4
            nn.Upsample(scale_factor=2.0, mode="bilinear", align_corners=False),
            _conv3x3(head_width, separable=True), nn.ReLU(),  # stride 2
            nn.Upsample(scale_factor=2.0, mode="bilinear", align_corners=False),
            nn.Conv2d(head_width, 1, 3, padding=1),  # full resolution: one output channel only
            nn.Softplus(),  # as MiniDPT's: never a dead output at initialisation
        )

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.head(_top_down(self.reassemble, self.fusion, features))  # (B, 1, H, W)


def build_decoder(name: str, in_channels: list[int], width: Optional[int] = None,
                  head_width: Optional[int] = None) -> nn.Module:
    """The `name` preset for encoder stages of `in_channels`; None widths take the preset's."""
    if name not in DECODERS:
        raise ValueError(f"unknown decoder {name!r}; choose from {', '.join(DECODERS)}")
    default_width, default_head = DEFAULT_WIDTHS[name]
    width, head_width = width or default_width, head_width or default_head
    return (LeanDecoder if name == "lean" else MiniDPT)(in_channels, width, head_width)
