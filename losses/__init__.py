"""Distillation losses: disparity terms, feature terms, and their weighted combination."""

from core.choices import NORMALIZATIONS
from losses.combined import LOSS_TERMS, DistillationLoss
from losses.depth import (
    GradientLoss,
    PixelLoss,
    SILogLoss,
    SSILoss,
    normalize_disparity,
)
from losses.features import AttentionLoss, FeatureLoss

__all__ = [
    "LOSS_TERMS",
    "NORMALIZATIONS",
    "AttentionLoss",
    "DistillationLoss",
    "FeatureLoss",
    "GradientLoss",
    "PixelLoss",
    "SILogLoss",
    "SSILoss",
    "normalize_disparity",
]
