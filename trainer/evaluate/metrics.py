"""Per-image depth metrics for comparing the student with the teacher (or ground truth).

Both networks predict relative disparity, so callers convert to depth with `disparity_to_depth`
and mask the teacher's sky with `depth_valid_mask_from_disparity` before calling `depth_metrics`.
Pure torch functions: no ranks, files or logging.
"""

import math

import torch
from torch import Tensor

from core.choices import ALIGN_MODES


def disparity_to_depth(disparity: Tensor, eps: float = 1e-6) -> Tensor:
    """Depth = 1 / disparity; the clamp keeps zero (sky) disparity finite instead of inf."""
    return 1.0 / disparity.clamp(min=eps)


def depth_valid_mask_from_disparity(teacher_disparity: Tensor, rel_threshold: float = 0.01) -> Tensor:
    """Bool mask of pixels whose disparity exceeds `rel_threshold` times the image's maximum.

    Sky has ~0 disparity (infinitely far), so its depth is meaningless as a reference. The
    threshold is relative because the teacher's disparity has an arbitrary per-image scale.
    """
    broadcast_shape = (-1,) + (1,) * (teacher_disparity.dim() - 1)
    per_image_max = teacher_disparity.flatten(1).amax(dim=1).view(broadcast_shape)  # (B, 1, ..., 1)
    return teacher_disparity > rel_threshold * per_image_max


def _masked_mean(values: Tensor, valid: Tensor, count: Tensor) -> Tensor:
    """Mean over valid entries of each row; NaN for a row without any (0 / 0)."""
    # `where` rather than multiplying by the mask, so inf/NaN at invalid entries cannot leak in.
    return torch.where(valid, values, 0.0).sum(dim=1) / count  # (B,)


def depth_to_disparity(depth: Tensor) -> Tensor:
    """1 / depth, with 0 where depth is 0, negative or non-finite (no usable disparity there: the
    sky of a depth map that marks it 0 gets the disparity Depth Anything gives it)."""
    usable = torch.isfinite(depth) & (depth > 0)
    return torch.where(usable, 1.0 / torch.where(usable, depth, 1.0), 0.0)


def _median_align(pred: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """Scale each image's prediction so its valid-pixel median matches the target's."""
    # nanmedian over NaN-filled invalid pixels gives per-image medians without a loop over B.
    pred_median = torch.where(valid, pred, math.nan).nanmedian(dim=1, keepdim=True).values  # (B, 1)
    target_median = torch.where(valid, target, math.nan).nanmedian(dim=1, keepdim=True).values  # (B, 1)
    # A zero or infinite prediction median has no usable scale; leaving the image unscaled
    # avoids 0 * inf = NaN (the later clamp still bounds it).
    usable = torch.isfinite(pred_median) & (pred_median > 0)
    scale = torch.where(usable, target_median / torch.where(usable, pred_median, 1.0), 1.0)
    return pred * scale


def least_squares_fit(x: Tensor, y: Tensor, valid: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image scale s and shift t minimising sum over valid pixels of (s * x + t - y)^2; (B, 1) each."""
    def mean(values: Tensor) -> Tensor:
        return _masked_mean(values, valid, count).unsqueeze(1)  # (B, 1)

    # Closed-form solution of the 2x2 normal equations [[Sxx, Sx], [Sx, n]] [s, t] = [Sxy, Sy],
    # written in centred form (s = cov / var, t = mean_y - s * mean_x): same answer, less cancellation.
    x_mean, y_mean = mean(x), mean(y)
    x_centred = x - x_mean
    variance = mean(x_centred.square())
    covariance = mean(x_centred * (y - y_mean))
    # A constant prediction makes the system singular: it carries no scale, so the best fit is
    # the flat mean target (s = 0, t = mean(y)). `~(>)` is also true for NaN rows.
    singular = ~(variance > 1e-12 * mean(x.square()))
    scale = torch.where(singular, 0.0, covariance / torch.where(singular, 1.0, variance))
    return scale, y_mean - scale * x_mean


def _scale_shift_align(
    pred: Tensor, target: Tensor, valid: Tensor, count: Tensor, max_depth: Tensor
) -> Tensor:
    """Least-squares fit of s / pred + t to 1 / target per image, in disparity space.

    This is the relative-depth protocol of Depth Anything / MiDaS: the networks predict
    disparity up to an unknown scale and shift, so the fit happens where that ambiguity lives.
    """
    pred_disparity = depth_to_disparity(pred)  # (B, N)
    target_disparity = 1.0 / target  # (B, N); target is positive wherever valid
    scale, shift = least_squares_fit(pred_disparity, target_disparity, valid, count)
    # Clipping at 1 / max_depth keeps the aligned disparity positive, so depth is at most max_depth.
    aligned_disparity = torch.maximum(scale * pred_disparity + shift, 1.0 / max_depth)
    return 1.0 / aligned_disparity


def _depth_scale_shift_align(pred: Tensor, target: Tensor, valid: Tensor, count: Tensor) -> Tensor:
    """Least-squares fit of s * pred + t to target per image, in depth space (Marigold's
    `least_square` alignment). The caller's clamp then clips it to the depth range."""
    # An infinite depth (zero disparity) would make the fit NaN: it is left out of the fit and stays
    # infinite, so the clamp turns it into the far end of the range.
    finite = torch.isfinite(pred)
    fitted = valid & finite
    scale, shift = least_squares_fit(torch.where(finite, pred, 0.0), target, fitted, fitted.sum(dim=1))
    return torch.where(finite, scale * pred + shift, pred)


def depth_metrics(
    pred: Tensor,
    target: Tensor,
    valid_mask: Tensor,
    align: str = "none",
    max_depth: float | None = None,
    min_depth: float = 1e-3,
) -> dict[str, Tensor]:
    """Standard depth metrics per image, over valid pixels, after an optional alignment.

    pred, target: (B, 1, H, W) depth (not disparity); valid_mask: (B, 1, H, W) bool.
    align: "none", "median" (scale by the ratio of medians), "scale_shift" (least squares in
    disparity space) or "depth_scale_shift" (least squares in depth space). max_depth: clip value
    for the aligned depth; None means each image's maximum valid target depth. Pixels also need a
    finite, positive target to count as valid.

    Returns {name: (B,) float32} for every name in METRIC_NAMES. An image without any valid pixel
    gets NaN for every metric; `average_metrics` drops such rows.
    """
    if align not in ALIGN_MODES:
        raise ValueError(f"align must be one of {ALIGN_MODES}, got {align!r}")
    if not pred.shape == target.shape == valid_mask.shape:
        raise ValueError(
            f"pred, target and valid_mask shapes differ: {tuple(pred.shape)}, "
            f"{tuple(target.shape)}, {tuple(valid_mask.shape)}"
        )
    # float64 because the alignment sums over whole images and the metrics subtract nearby values.
    pred = pred.flatten(1).double()  # (B, N)
    target = target.flatten(1).double()  # (B, N)
    valid = valid_mask.flatten(1) & torch.isfinite(target) & (target > 0)  # (B, N)
    count = valid.sum(dim=1)  # (B,)
    # Invalid targets become 1 so that divisions and logs there stay finite (they are masked anyway).
    target = torch.where(valid, target, 1.0)

    if max_depth is None:
        image_max_depth = torch.where(valid, target, 0.0).amax(dim=1, keepdim=True)  # (B, 1)
    else:
        image_max_depth = torch.full_like(target[:, :1], max_depth)  # (B, 1)

    if align == "median":
        pred = _median_align(pred, target, valid)
    elif align == "scale_shift":
        pred = _scale_shift_align(pred, target, valid, count, image_max_depth)
    elif align == "depth_scale_shift":
        pred = _depth_scale_shift_align(pred, target, valid, count)
    # The clamp makes zero or infinite predictions safe for the logs and ratios below.
    pred = torch.minimum(pred.clamp(min=min_depth), image_max_depth.clamp(min=min_depth))

    def mean(values: Tensor) -> Tensor:
        return _masked_mean(values, valid, count)

    error = pred - target
    log_diff = pred.log() - target.log()  # (B, N)
    ratio = torch.maximum(pred / target, target / pred)
    metrics = {
        "abs_rel": mean(error.abs() / target),
        "sq_rel": mean(error.square() / target),
        "rmse": mean(error.square()).sqrt(),
        "rmse_log": mean(log_diff.square()).sqrt(),
        "log10": mean(log_diff.abs()) / math.log(10),
        "delta1": mean((ratio < 1.25).double()),
        "delta2": mean((ratio < 1.25**2).double()),
        "delta3": mean((ratio < 1.25**3).double()),
        # Rounding can push the variance of log_diff slightly below zero for a constant ratio.
        "silog": 100 * (mean(log_diff.square()) - mean(log_diff).square()).clamp(min=0).sqrt(),
    }
    return {name: value.float() for name, value in metrics.items()}


def average_metrics(per_image: dict[str, Tensor]) -> dict[str, float]:
    """Average per-image metrics over the images that had valid pixels (non-NaN rows).

    A row with any NaN is dropped from every metric, so all averages cover the same images.
    Adds "num_images", the number of images averaged.
    """
    values = torch.stack([value.double() for value in per_image.values()])  # (M, B)
    kept = ~values.isnan().any(dim=0)  # (B,)
    averages = values[:, kept].mean(dim=1).tolist()  # NaN when no image is kept
    result = dict(zip(per_image.keys(), averages))
    result["num_images"] = int(kept.sum())
    return result
