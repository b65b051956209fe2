"""Losses between student and teacher intermediate feature maps.

Both take ``forward(student_features, teacher_features)``: equal-length lists of ``(B, C, h, w)``
maps, pair ``i`` matched by position; student and teacher may differ in channels and grid size.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _check_pair_count(
    student_features: list[Tensor], teacher_features: list[Tensor], expected: int | None
) -> None:
    if not student_features:
        raise ValueError("feature losses need at least one (student, teacher) feature pair")
    if len(student_features) != len(teacher_features):
        raise ValueError(
            f"got {len(student_features)} student and {len(teacher_features)} teacher feature "
            "maps; they are matched pairwise, so the counts must be equal"
        )
    if expected is not None and len(student_features) != expected:
        raise ValueError(
            f"got {len(student_features)} feature pairs but the loss was built with "
            f"{expected} adapters"
        )


def _resize_to(x: Tensor, size: torch.Size) -> Tensor:
    """Bilinearly resize (B, C, h, w) to the (H, W) in ``size``, skipping the no-op case."""
    if x.shape[-2:] == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _channel_layer_norm(x: Tensor) -> Tensor:
    """Normalise each spatial position's channel vector, (B, C, H, W) -> same.

    ``group_norm(x, 1)`` would pool over C, H and W together; moving channels last makes
    ``layer_norm`` act on C alone, without learnable affine parameters.
    """
    return F.layer_norm(x.movedim(1, -1), x.shape[1:2]).movedim(-1, 1)


class FeatureLoss(nn.Module):
    """Feature distillation through trainable 1x1 adapters (one per matched pair).

    Student feature ``i`` ``(B, Cs_i, h, w)`` -> 1x1 conv to ``Ct_i`` channels -> bilinear resize to
    the teacher's ``(Ht, Wt)`` -> optional per-position channel layer norm on both sides (the two
    networks' activations live on unrelated scales) -> mean L1, or ``1 - cosine`` over channels
    averaged over positions. The result is the mean over pairs. The adapters are training-only:
    they belong with the student in the optimiser, never in the exported model.
    """

    def __init__(
        self,
        student_channels: list[int],
        teacher_channels: list[int],
        kind: str = "l1",
        layer_norm: bool = True,
    ) -> None:
        super().__init__()
        if not student_channels or len(student_channels) != len(teacher_channels):
            raise ValueError(
                f"student_channels {student_channels} and teacher_channels {teacher_channels} "
                "must be non-empty and of the same length"
            )
        if kind not in ("l1", "cosine"):
            raise ValueError(f"FeatureLoss kind must be 'l1' or 'cosine', got {kind!r}")
        self.kind = kind
        self.layer_norm = layer_norm
        self.adapters = nn.ModuleList(
            nn.Conv2d(cs, ct, kernel_size=1) for cs, ct in zip(student_channels, teacher_channels)
        )

    def forward(self, student_features: list[Tensor], teacher_features: list[Tensor]) -> Tensor:
        _check_pair_count(student_features, teacher_features, len(self.adapters))
        pair_losses = []
        for adapter, student, teacher in zip(self.adapters, student_features, teacher_features):
            projected = _resize_to(adapter(student), teacher.shape[-2:])  # (B, Ct, Ht, Wt)
            if self.layer_norm:
                projected, teacher = _channel_layer_norm(projected), _channel_layer_norm(teacher)
            if self.kind == "l1":
                pair_losses.append((projected - teacher).abs().mean())
            else:
                pair_losses.append(1 - F.cosine_similarity(projected, teacher, dim=1).mean())
        return torch.stack(pair_losses).mean()


class AttentionLoss(nn.Module):
    """Attention transfer (Zagoruyko & Komodakis 2017); needs no adapters.

    Each map is reduced to a spatial attention ``mean_c |F|^p`` (B, 1, h, w), the student's is
    bilinearly resized to the teacher's grid, both are flattened and L2-normalised over positions,
    and the loss is their mean squared difference, averaged over pairs. Channel counts may differ.
    """

    def __init__(self, p: float = 2) -> None:
        super().__init__()
        self.p = p

    def _attention(self, features: Tensor) -> Tensor:
        return features.abs().pow(self.p).mean(1, keepdim=True)  # (B, 1, h, w)

    def forward(self, student_features: list[Tensor], teacher_features: list[Tensor]) -> Tensor:
        _check_pair_count(student_features, teacher_features, None)
        pair_losses = []
        for student, teacher in zip(student_features, teacher_features):
            teacher_attention = self._attention(teacher)
            student_attention = _resize_to(self._attention(student), teacher_attention.shape[-2:])
            student_flat = F.normalize(student_attention.flatten(1), dim=1)  # (B, Ht*Wt)
            teacher_flat = F.normalize(teacher_attention.flatten(1), dim=1)
            pair_losses.append(F.mse_loss(student_flat, teacher_flat))
        return torch.stack(pair_losses).mean()
