"""MiniDPT: a light DPT-style decoder (reassemble, top-down fusion, upsampling head)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _upsample2x(x: torch.Tensor) -> torch.Tensor:
    # A fixed scale factor (not a size read off another tensor) keeps the ONNX graph free of
    # shape arithmetic; inputs are multiples of 32, so every stage doubles exactly.
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


class ResidualConvUnit(nn.Module):
    """relu -> conv3x3 -> relu -> conv3x3, plus the input (DPT's RCU)."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Not in-place: the first ReLU must not overwrite `x`, which the skip still needs.
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FeatureFusionBlock(nn.Module):
    """Merge the coarser path into this stage's features, refine, then double the resolution."""

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


class MiniDPT(nn.Module):
    """Decodes four encoder stages (strides 4, 8, 16, 32) to a (B, 1, H, W) non-negative map."""

    def __init__(self, in_channels: list[int], width: int = 64, head_width: int = 32):
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f"MiniDPT expects 4 encoder stages, got {len(in_channels)}")
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
        stages = [project(f) for project, f in zip(self.reassemble, features)]  # each (B, width, H/s, W/s)
        path = None
        for fuse, stage in zip(reversed(self.fusion), reversed(stages)):  # stride 32 first
            path = fuse(stage, path)
        return self.head(path)  # (B, 1, H, W)
