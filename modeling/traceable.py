"""Export the student at any input size that is a multiple of its `input_multiple`.

timm's MobileViT blocks compute their patch counts in Python (`math.ceil(H / patch)`), so the
TorchScript tracer freezes them into the ONNX graph and the file takes its export size only; the
dynamo exporter keeps them symbolic but takes a minute or more on a laptop CPU. Inside
`traceable_any_size(student)` each MobileViT block runs an equivalent forward whose sizes come from
the tensor's own shape, so the tracer records them as graph arithmetic and the file takes any
height and width at which no block needs to resize its map to whole patches, i.e. multiples of
`input_multiple(student)` (64 for MobileViT-XS: 2x2 patches on the stride-32 map). At those sizes
both forwards compute the same numbers, in the same order (tested bit for bit).
"""

from __future__ import annotations

import contextlib
import math
import types
from collections.abc import Iterator

import torch
from timm.models.mobilevit import MobileVitBlock, MobileVitV2Block
from torch import nn

# The deepest stride of the encoders the decoders take (stride 32 is their coarsest stage).
DEEPEST_STRIDE = 32


def _mobilevit_forward(self: MobileVitBlock, x: torch.Tensor) -> torch.Tensor:
    """timm's MobileVitBlock.forward for maps of whole patches, with unfold/fold as one reshape
    and permute each (the same element order as timm's two-step version)."""
    shortcut = x
    x = self.conv_1x1(self.conv_kxk(x))
    patch_h, patch_w = self.patch_size
    batch, channels, height, width = x.shape
    rows, cols = height // patch_h, width // patch_w
    # (B, C, H, W) -> (B * patch area, patches, C): timm's token order.
    x = x.reshape(batch, channels, rows, patch_h, cols, patch_w).permute(0, 3, 5, 2, 4, 1)
    x = x.reshape(batch * patch_h * patch_w, rows * cols, channels)
    x = self.norm(self.transformer(x))
    x = x.reshape(batch, patch_h, patch_w, rows, cols, channels).permute(0, 5, 3, 1, 4, 2)
    x = self.conv_proj(x.reshape(batch, channels, height, width))
    if self.conv_fusion is not None:
        x = self.conv_fusion(torch.cat((shortcut, x), dim=1))
    return x


def _mobilevit_v2_forward(self: MobileVitV2Block, x: torch.Tensor) -> torch.Tensor:
    """timm's MobileVitV2Block.forward for maps of whole patches (its non-CoreML layout)."""
    patch_h, patch_w = self.patch_size
    x = self.conv_1x1(self.conv_kxk(x))
    batch, channels, height, width = x.shape
    rows, cols = height // patch_h, width // patch_w
    x = x.reshape(batch, channels, rows, patch_h, cols, patch_w).permute(0, 1, 3, 5, 2, 4)
    x = self.norm(self.transformer(x.reshape(batch, channels, -1, rows * cols)))
    x = x.reshape(batch, channels, patch_h, patch_w, rows, cols).permute(0, 1, 4, 2, 5, 3)
    return self.conv_proj(x.reshape(batch, channels, height, width))


_FORWARDS = {MobileVitBlock: _mobilevit_forward, MobileVitV2Block: _mobilevit_v2_forward}


def _patch_blocks(model: nn.Module) -> list[nn.Module]:
    return [module for module in model.modules() if type(module) in _FORWARDS]


@contextlib.contextmanager
def traceable_any_size(model: nn.Module) -> Iterator[nn.Module]:
    """`model` with every MobileViT block running its shape-agnostic forward, restored on exit."""
    blocks = _patch_blocks(model)
    for block in blocks:
        block.forward = types.MethodType(_FORWARDS[type(block)], block)
    try:
        yield model
    finally:
        for block in blocks:
            del block.forward  # back to the class's own


def input_multiple(encoder: nn.Module, probe_size: int = 256) -> int:
    """The input sides at which the traceable forward is exact: multiples of the deepest stride
    and of (stride x patch side) of every MobileViT block in `encoder`."""
    strides, hooks = [], []
    for block in _patch_blocks(encoder):
        hooks.append(block.register_forward_pre_hook(
            lambda module, inputs: strides.append((probe_size // inputs[0].shape[-1]) * max(module.patch_size))))
    try:
        with torch.inference_mode():
            encoder(torch.zeros(1, 3, probe_size, probe_size))
    finally:
        for hook in hooks:
            hook.remove()
    return math.lcm(DEEPEST_STRIDE, *strides)
