"""Losses between student and teacher disparity maps.

Depth Anything V2 predicts relative inverse depth (disparity): unique only up to an unknown scale
and shift, and exactly zero where it sees "infinitely far". Every term here therefore takes a
validity mask, guards its divisions and logs, and keeps no state between calls.

All depth terms are called as ``loss(student, teacher, mask=None)`` on ``(B, 1, H, W)`` maps, with
``mask`` a bool ``(B, 1, H, W)`` tensor (``None`` means every pixel is valid), and return a scalar.
"""

import torch
from torch import Tensor, nn

from core.choices import check_normalization

# sqrt has an infinite slope at 0 (autograd gives 0 * inf = NaN when the student matches the teacher
# up to scale); flooring the radicand keeps the gradient finite at the cost of a 1e-4 loss floor.
_MIN_RADICAND = 1e-8


def _flatten(x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """(B, 1, H, W) map and bool mask -> values (B, N) and a float validity weight (B, N)."""
    values = x.flatten(1)
    if mask is None:
        return values, torch.ones_like(values)
    return values, mask.flatten(1).to(values.dtype)


def _masked_mean(values: Tensor, valid: Tensor) -> Tensor:
    """Per-row mean over valid entries, (B, N) -> (B,); a row with no valid entry gives 0."""
    return (values * valid).sum(1) / valid.sum(1).clamp_min(1)


def _mean_over_valid_images(per_image: Tensor, valid: Tensor) -> Tensor:
    """Average (B,) per-image losses over images with at least one valid pixel.

    Multiplying (rather than indexing) keeps a graph to the student even when every image is
    empty, so ``backward()`` still works and yields zero gradients.
    """
    has_valid = (valid.sum(1) > 0).to(per_image.dtype)
    return (per_image * has_valid).sum() / has_valid.sum().clamp_min(1)


def normalize_disparity(
    x: Tensor, mode: str, mask: Tensor | None = None, eps: float = 1e-6
) -> Tensor:
    """Per-image affine normalisation of a (B, 1, H, W) disparity map.

    The statistics come from valid pixels only; the resulting affine map is applied to every pixel,
    so values at invalid pixels are finite but not meaningful.

    - ``"none"``: unchanged.
    - ``"max"``: divide by the max, so the map peaks at 1; keeps positive maps positive (what
      ``SILogLoss`` needs) and removes scale but not shift.
    - ``"median_mad"`` (the default in ``DistillationLoss``): subtract the median, divide by the
      mean absolute deviation from it, as in MiDaS and Distill-Any-Depth. Depth Anything V2's
      output is only defined up to scale and shift, so this scale-and-shift-invariant form stops
      the student being penalised for the teacher's arbitrary choice of both; median and MAD are
      also robust to outlying pixels in a way min and max are not.
    - ``"minmax"``: map [min, max] to [0, 1]; also affine-invariant, but set by two extreme pixels.

    Divisors are clamped at ``eps`` so constant or all-zero maps come out finite (a constant map
    becomes all zeros under ``median_mad`` and ``minmax``).
    """
    check_normalization(mode)
    if mode == "none":
        return x
    values, valid = _flatten(x, mask)
    is_valid = valid.bool()
    # (B, 1, 1, 1) statistics broadcast back over the map.
    if mode == "max":
        peak = torch.where(is_valid, values, -torch.inf).amax(1)
        return x / peak.clamp_min(eps).view(-1, 1, 1, 1)
    if mode == "minmax":
        low = torch.where(is_valid, values, torch.inf).amin(1)
        high = torch.where(is_valid, values, -torch.inf).amax(1)
        # An image without valid pixels has low=inf, high=-inf: zero both to keep the output finite.
        has_valid = is_valid.any(1)
        low = torch.where(has_valid, low, 0.0)
        span = torch.where(has_valid, high - low, 0.0)
        return (x - low.view(-1, 1, 1, 1)) / span.clamp_min(eps).view(-1, 1, 1, 1)
    # median_mad. nanmedian ignores the NaN-filled invalid pixels; with an even count it takes the
    # lower median, an actual pixel, so the result is exactly affine-equivariant.
    median = torch.where(is_valid, values, torch.nan).nanmedian(1).values
    median = torch.where(is_valid.any(1), median, 0.0)
    mad = _masked_mean((values - median[:, None]).abs(), valid)
    return (x - median.view(-1, 1, 1, 1)) / mad.clamp_min(eps).view(-1, 1, 1, 1)


class SILogLoss(nn.Module):
    """Scale-invariant log loss (Eigen et al. 2014), as in Depth Anything V2's metric fine-tuning.

    Per image, with ``d = log(s + eps) - log(t + eps)`` over valid pixels:
    ``L = sqrt(mean(d^2) - lam * mean(d)^2)`` (or without the sqrt), averaged over images that
    have a valid pixel. ``lam=1`` is fully scale-invariant; ``lam<1`` also penalises a global scale
    error. Inputs must be positive-ish disparities: negatives are clamped to 0 before the log.
    """

    def __init__(self, lam: float = 0.85, eps: float = 1e-6, use_sqrt: bool = True) -> None:
        super().__init__()
        self.lam = lam
        self.eps = eps
        self.use_sqrt = use_sqrt

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
        log_diff = torch.log(student.clamp_min(0) + self.eps) - torch.log(
            teacher.clamp_min(0) + self.eps
        )
        d, valid = _flatten(log_diff, mask)  # (B, N)
        mean_d = _masked_mean(d, valid)  # (B,)
        # mean(d^2) - lam*mean(d)^2 == var(d) + (1-lam)*mean(d)^2: the right side is a sum of
        # non-negatives, so float cancellation can never push it below zero.
        variance = _masked_mean((d - mean_d[:, None]) ** 2, valid)
        radicand = variance + (1 - self.lam) * mean_d**2
        per_image = radicand.clamp_min(_MIN_RADICAND).sqrt() if self.use_sqrt else radicand
        return _mean_over_valid_images(per_image, valid)


class SSILoss(nn.Module):
    """Scale-and-shift-invariant loss (MiDaS, Ranftl et al. 2020).

    Per image, fit ``a * student + b`` to the teacher by least squares over valid pixels
    (closed-form 2x2 normal equations), then take the mean L1 (or squared) residual, averaged over
    images with a valid pixel. ``a, b`` are not detached, as in MiDaS, so backward gives the exact
    gradient of "error after the best alignment": for ``"mse"`` the envelope theorem makes
    detaching equivalent anyway, for ``"l1"`` detaching would drop a real term.
    """

    def __init__(self, kind: str = "l1", det_eps: float = 1e-6) -> None:
        super().__init__()
        if kind not in ("l1", "mse"):
            raise ValueError(f"SSILoss kind must be 'l1' or 'mse', got {kind!r}")
        self.kind = kind
        self.det_eps = det_eps

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
        s, valid = _flatten(student, mask)  # (B, N)
        t, _ = _flatten(teacher, mask)
        # Normal equations [[a00, a01], [a01, a11]] @ [scale, shift] = [b0, b1].
        a00 = (valid * s * s).sum(1)
        a01 = (valid * s).sum(1)
        a11 = valid.sum(1)
        b0 = (valid * s * t).sum(1)
        b1 = (valid * t).sum(1)
        det = a00 * a11 - a01 * a01  # = n^2 * var(student): ~0 for a constant student
        solvable = det > self.det_eps * a11.clamp_min(1) ** 2
        safe_det = torch.where(solvable, det, 1.0)  # never divide by ~0, even in the unused branch
        # A constant student cannot be scaled usefully: fall back to the teacher's mean as shift.
        scale = torch.where(solvable, (a11 * b0 - a01 * b1) / safe_det, 0.0)
        shift = torch.where(solvable, (a00 * b1 - a01 * b0) / safe_det, b1 / a11.clamp_min(1))
        residual = scale[:, None] * s + shift[:, None] - t
        error = residual.abs() if self.kind == "l1" else residual**2
        return _mean_over_valid_images(_masked_mean(error, valid), valid)


class GradientLoss(nn.Module):
    """Multi-scale gradient-matching loss (MiDaS), sharpening edges the pixel terms blur.

    At each scale: L1 between the student's and teacher's forward differences along x and y,
    pooled over every valid difference in the batch (a difference is valid when both of its pixels
    are). Scales are built by keeping every other pixel (``x[..., ::2, ::2]``); the result is the
    mean over scales that still contain a valid difference, so a map too small for the coarsest
    scale does not drag the average towards zero.
    """

    def __init__(self, scales: int = 4) -> None:
        super().__init__()
        if scales < 1:
            raise ValueError(f"GradientLoss needs scales >= 1, got {scales}")
        self.scales = scales

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
        # |grad(s) - grad(t)| == |grad(s - t)|: differencing the residual once is enough.
        residual = student - teacher  # (B, 1, H, W)
        valid = torch.ones_like(residual, dtype=torch.bool) if mask is None else mask
        per_scale, scale_has_valid = [], []
        for _ in range(self.scales):
            valid_x = valid[..., :, 1:] & valid[..., :, :-1]  # (B, 1, H, W-1)
            valid_y = valid[..., 1:, :] & valid[..., :-1, :]  # (B, 1, H-1, W)
            grad_x = (residual[..., :, 1:] - residual[..., :, :-1]).abs()
            grad_y = (residual[..., 1:, :] - residual[..., :-1, :]).abs()
            count = valid_x.sum() + valid_y.sum()
            total = (grad_x * valid_x).sum() + (grad_y * valid_y).sum()
            per_scale.append(total / count.clamp_min(1))
            scale_has_valid.append(count > 0)
            residual, valid = residual[..., ::2, ::2], valid[..., ::2, ::2]
        losses = torch.stack(per_scale)
        has_valid = torch.stack(scale_has_valid).to(losses.dtype)
        return (losses * has_valid).sum() / has_valid.sum().clamp_min(1)


class PixelLoss(nn.Module):
    """Per-pixel MSE (default) or L1, pooled over every valid pixel in the batch."""

    def __init__(self, kind: str = "mse") -> None:
        super().__init__()
        if kind not in ("mse", "l1"):
            raise ValueError(f"PixelLoss kind must be 'mse' or 'l1', got {kind!r}")
        self.kind = kind

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
        residual = student - teacher
        error = residual.abs() if self.kind == "l1" else residual**2
        values, valid = _flatten(error, mask)
        return (values * valid).sum() / valid.sum().clamp_min(1)
