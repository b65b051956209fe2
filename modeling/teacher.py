"""The frozen Depth Anything V2 teacher, through Hugging Face `transformers`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import huggingface_hub
import torch
import torch.nn.functional as F
from torch import nn
from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

from core.errors import RunError, first_line

PATCH_SIZE = 14
# Short names for the official V2 checkpoints; any other hub id or local directory works too.
TEACHER_PRESETS = {
    "small": "depth-anything/Depth-Anything-V2-Small-hf",
    "base": "depth-anything/Depth-Anything-V2-Base-hf",
    "large": "depth-anything/Depth-Anything-V2-Large-hf",
}


class TeacherLoadError(RunError):
    """The teacher could not be loaded; the message says what to do."""


@dataclass
class TeacherOutput:
    disparity: torch.Tensor  # (B, 1, h, w) relative inverse depth, >= 0, float32
    features: list[torch.Tensor]  # each (B, C, H/14, W/14), LayerNorm-ed backbone outputs


def small_config() -> DepthAnythingConfig:
    """The Depth-Anything-V2-Small architecture (24.8 M parameters), for benchmarks and summaries."""
    # image_size=518 as in the released config: it sizes the position embeddings (37x37 + 1 tokens).
    backbone = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=518,
                            out_indices=[3, 6, 9, 12], reshape_hidden_states=False)
    return DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=384,
                               neck_hidden_sizes=[48, 96, 192, 384], fusion_hidden_size=64)


def tiny_config() -> DepthAnythingConfig:
    """A ~0.2 M parameter Depth Anything with the real code path, for tests and the offline demo."""
    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                            intermediate_size=64, out_indices=[1, 2, 3, 4], reshape_hidden_states=False)
    return DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32,
                               neck_hidden_sizes=[16, 32, 32, 32], fusion_hidden_size=16,
                               head_hidden_size=8)


def init_random(model: DepthAnythingForDepthEstimation) -> None:
    """Random weights for a Depth Anything built from a config (the tiny test teacher, the V2-Small
    architecture of the benchmarks) that give a positive, image-dependent map, from torch's seed.

    PyTorch's default init for convolutions and linear layers, not transformers' std-0.02 one,
    which leaves a random teacher predicting ~1e-7 everywhere (V2-Small: 0 to 1.5e-4, a third of
    the pixels 0): a map with nothing to distil, score or compare."""
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.LayerNorm)):
            module.reset_parameters()
        elif name.endswith("embeddings") and hasattr(module, "position_embeddings"):
            nn.init.trunc_normal_(module.position_embeddings, std=0.02)
            nn.init.trunc_normal_(module.cls_token, std=0.02)
            nn.init.zeros_(module.mask_token)
        elif hasattr(module, "lambda1"):  # Dinov2's layer scale
            nn.init.constant_(module.lambda1, model.config.backbone_config.layerscale_value)
    # The head ends in ReLU: with a random negative bias every pixel can come out 0 (it did, for
    # one seed in two). A positive bias keeps the output positive where the random features allow.
    nn.init.constant_(model.head.conv3.bias, 0.1)


def _load_error(name: str, error: Exception) -> TeacherLoadError:
    reason = first_line(error)
    # huggingface_hub reads HF_HUB_OFFLINE once, at import: ask it rather than the environment.
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        where = "offline mode (HF_HUB_OFFLINE) and it is not in the cache"
    else:
        where = "the model hub unreachable or the id wrong"
    return TeacherLoadError(
        f"could not load teacher '{name}' ({where}: {reason}). Fixes: set teacher.name to a local "
        f"directory holding a downloaded checkpoint (config.json + model.safetensors), or run with "
        f"HF_HUB_OFFLINE=1 and a filled Hugging Face cache, or use the offline demo config "
        f"(trainer/configs/demo.yaml, teacher.name=tiny)"
    )


class DepthAnythingTeacher(nn.Module):
    """Frozen Depth Anything: one backbone pass gives both the depth and the distilled features."""

    def __init__(self, model: DepthAnythingForDepthEstimation, feature_layers: Optional[list[int]] = None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        out_indices = list(model.config.backbone_config.out_indices)
        layers = list(feature_layers) if feature_layers is not None else out_indices
        unknown = [layer for layer in layers if layer not in out_indices]
        if unknown:
            # Only the layers the neck reads come out of the single backbone pass; others would
            # need a second pass or pre-LayerNorm hidden states, which the decoder never sees.
            raise ValueError(f"teacher feature layers {unknown} are not among this teacher's "
                             f"backbone out_indices {out_indices}; choose from those")
        self.feature_positions = [out_indices.index(layer) for layer in layers]
        self.feature_layers = layers

    @classmethod
    def from_pretrained(cls, name_or_path: str, feature_layers: Optional[list[int]] = None) -> "DepthAnythingTeacher":
        """Load from a hub id, a preset name (small/base/large), a local directory, or 'tiny'."""
        if name_or_path == "tiny":
            return cls.tiny(feature_layers)
        name = TEACHER_PRESETS.get(name_or_path, name_or_path)
        looks_local = name.startswith((".", "/", "~")) or Path(name).expanduser().exists()
        if looks_local and not Path(name).expanduser().is_dir():
            raise TeacherLoadError(f"teacher directory '{name}' does not exist; give a folder saved "
                                   f"with save_pretrained, a hub id, or 'tiny'")
        try:
            source = str(Path(name).expanduser()) if looks_local else name
            # float32 whatever the file stores (the world teacher ships float16 tensors to halve
            # its size); `place` casts to half precision where the run asks for it.
            model = DepthAnythingForDepthEstimation.from_pretrained(source, dtype=torch.float32)
        except (OSError, ValueError) as error:  # hub errors subclass OSError; bad ids raise ValueError
            raise _load_error(name, error) from None
        return cls(model, feature_layers)

    @classmethod
    def tiny(cls, feature_layers: Optional[list[int]] = None, seed: int = 0) -> "DepthAnythingTeacher":
        # Seeded so every process of a run, and every test, builds the same random teacher.
        with torch.random.fork_rng(devices=[]):
            model = DepthAnythingForDepthEstimation(tiny_config())
            # Every weight set here, from one seed, in one order: how much randomness transformers'
            # own init draws changes between its releases (5.17 and 5.24 gave different weights,
            # and 5.17's made the head's final ReLU zero every pixel: nothing to distil or score).
            torch.manual_seed(seed)
            init_random(model)
        return cls(model, feature_layers)

    def save_pretrained(self, path: str | Path) -> None:
        self.model.save_pretrained(path)

    def train(self, mode: bool = True) -> "DepthAnythingTeacher":
        # Frozen for good: `model.train()` on a parent must not switch dropout or norms on.
        return super().train(False)

    @property
    def feature_channels(self) -> list[int]:
        return [self.model.config.backbone_config.hidden_size] * len(self.feature_layers)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.backbone.parameters()).dtype

    def place(self, device: torch.device | str, mixed_precision: Optional[str] = None) -> "DepthAnythingTeacher":
        """Put the teacher on `device` the one way training, the cache writer and evaluation share,
        so cached and live targets come from the same numbers. On a GPU with bf16/fp16 the backbone
        and neck are cast to half precision (frozen weights need no fp32 copy: half the memory); the
        depth head stays fp32 and runs outside autocast (see `forward`)."""
        self.to(device)
        if torch.device(device).type == "cuda" and mixed_precision in ("bf16", "fp16"):
            half = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
            self.model.backbone.to(half)
            self.model.neck.to(half)
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor, output_size: Optional[tuple[int, int]] = None) -> TeacherOutput:
        """images: (B, 3, H, W) ImageNet-normalised, H and W multiples of 14."""
        batch, _, height, width = images.shape
        if height % PATCH_SIZE or width % PATCH_SIZE:
            raise ValueError(f"teacher input {height}x{width} is not a multiple of {PATCH_SIZE}; "
                             f"the patch grid would silently drop the remainder")
        grid_h, grid_w = height // PATCH_SIZE, width // PATCH_SIZE
        images = images.to(self.dtype)
        # Same steps as DepthAnythingForDepthEstimation.forward, kept apart so the LayerNorm-ed
        # feature maps the neck reads are available without a second backbone pass.
        feature_maps = self.model.backbone(images).feature_maps  # each (B, 1 + N, C)
        neck_maps = self.model.neck(list(feature_maps), grid_h, grid_w)
        # The head in fp32, outside any autocast: in bf16 its output is rounded to ~0.4%, a
        # stepped map whose finite differences the gradient loss would then match.
        head_dtype = next(self.model.head.parameters()).dtype
        with torch.autocast(device_type=images.device.type, enabled=False):
            neck_maps = [m.to(head_dtype) for m in neck_maps]
            disparity = self.model.head(neck_maps, grid_h, grid_w).unsqueeze(1).float()  # (B, 1, H, W)
        if output_size is not None and tuple(output_size) != (height, width):
            disparity = F.interpolate(disparity, size=tuple(output_size), mode="bilinear", align_corners=False)
        features = []
        for position in self.feature_positions:
            tokens = feature_maps[position][:, 1:]  # drop the class token: (B, N, C)
            features.append(tokens.transpose(1, 2).reshape(batch, -1, grid_h, grid_w))
        return TeacherOutput(disparity=disparity, features=features)
