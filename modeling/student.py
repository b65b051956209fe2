"""The phone-sized student: a timm encoder (MobileViT-XS by default) and the MiniDPT decoder."""

from __future__ import annotations

import timm
import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from modeling.decoder import MiniDPT

# Encoder stages fed to the decoder: strides 4, 8, 16, 32 (timm's feature index 0 is stride 2).
ENCODER_OUT_INDICES = (1, 2, 3, 4)


class StudentLoadError(RuntimeError):
    """The student's backbone or its pretrained weights could not be had; the message says why."""


def create_encoder(backbone: str, pretrained: bool = False) -> nn.Module:
    if backbone not in timm.list_models():
        close = timm.list_models(f"*{backbone.split('_')[0]}*")[:8]
        raise StudentLoadError(f"timm does not know the student backbone '{backbone}'"
                               + (f"; similar names: {', '.join(close)}" if close else ""))
    try:
        return timm.create_model(backbone, pretrained=pretrained, features_only=True,
                                 out_indices=ENCODER_OUT_INDICES)
    except (OSError, RuntimeError) as error:  # hub unreachable, weights missing
        if not pretrained:
            raise
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise StudentLoadError(
            f"could not fetch pretrained weights for student backbone '{backbone}' ({reason}). "
            f"Fixes: student.pretrained=false (random init), HF_HUB_OFFLINE=1 with the weights in the "
            f"Hugging Face cache, or the offline demo config (trainer/configs/demo.yaml)") from None


class StudentDepthModel(nn.Module, PyTorchModelHubMixin, library_name="depth-distill",
                        tags=["depth-estimation", "knowledge-distillation"]):
    """Relative-depth (disparity) student. `save_pretrained(dir)` writes config.json and
    model.safetensors; `StudentDepthModel.from_pretrained(dir)` rebuilds it from those alone.

    The constructor arguments are what config.json records, so they never include `pretrained`:
    loading a saved student must not try to download ImageNet weights. Use `build` for that.
    """

    def __init__(self, backbone: str = "mobilevit_xs", decoder_width: int = 64, head_width: int = 32):
        super().__init__()
        self.encoder = create_encoder(backbone, pretrained=False)
        self.feature_channels: list[int] = self.encoder.feature_info.channels()
        self.decoder = MiniDPT(self.feature_channels, width=decoder_width, head_width=head_width)

    @classmethod
    def build(cls, backbone: str = "mobilevit_xs", decoder_width: int = 64, head_width: int = 32,
              pretrained: bool = False) -> "StudentDepthModel":
        model = cls(backbone=backbone, decoder_width=decoder_width, head_width=head_width)
        if pretrained:
            model.encoder.load_state_dict(create_encoder(backbone, pretrained=True).state_dict())
        return model

    def forward(self, images: torch.Tensor, return_features: bool = False):
        """images (B, 3, H, W), H and W multiples of 32 -> disparity (B, 1, H, W) [, features].

        With `return_features` the encoder stages (strides 4..32) come back too, from the same
        pass, for the feature and attention distillation terms.
        """
        features = self.encoder(images)
        disparity = self.decoder(features)
        if return_features:
            return disparity, features
        return disparity
