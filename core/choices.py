"""The choices a configuration picks from and the size rules it obeys: defined here, once, for the
modules that act on them (data.transforms, data.datasets, losses.depth, modeling.decoder,
trainer.evaluate.metrics) and for trainer.config, which checks a whole configuration before any of
those (and torch) is imported."""

from __future__ import annotations

# Depth Anything V2's ViT uses 14-pixel patches; MobileViT downsamples by 32.
TEACHER_MULTIPLE = 14
STUDENT_MULTIPLE = 32

# Standard evaluation crops as (top, bottom, left, right) fractions of the depth map's height and
# width. Eigen's NYU crop is rows 45:471, cols 41:601 of the 480x640 frame; the KITTI ones are the
# fractions used by Garg et al. and Eigen et al., truncated to pixels as in the usual eval code.
CROPS: dict[str, tuple[float, float, float, float]] = {
    "eigen_nyu": (45 / 480, 471 / 480, 41 / 640, 601 / 640),
    "garg_kitti": (0.40810811, 0.99189189, 0.03594771, 0.96405229),
    "eigen_kitti": (0.3324324, 0.91351351, 0.0359477, 0.96405229),
}

# How disparity maps are brought to a common scale before a loss compares them (losses.depth).
NORMALIZATIONS = ("none", "max", "median_mad", "minmax")

# The student's decoder presets (modeling.decoder).
DECODERS = ("lean", "dpt")

METRIC_NAMES = ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "delta1", "delta2", "delta3", "silog")
ALIGN_MODES = ("none", "median", "scale_shift", "depth_scale_shift")
# For picking the best checkpoint: the delta accuracies grow as the prediction improves.
LOWER_IS_BETTER: dict[str, bool] = {name: not name.startswith("delta") for name in METRIC_NAMES}


def check_multiple(name: str, value: int, multiple: int) -> None:
    """ValueError naming `name` and the nearest valid sizes unless `value` is a positive multiple."""
    if value > 0 and value % multiple == 0:
        return
    below = value // multiple * multiple
    nearest = [str(size) for size in (below, below + multiple) if size > 0]
    raise ValueError(
        f"{name}={value} must be a positive multiple of {multiple}; "
        f"nearest valid: {' or '.join(nearest)}"
    )


def check_normalization(mode: str) -> None:
    """The one check of a normalisation name (the loss, losses.depth and the config use it)."""
    if mode not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {mode!r}; expected one of {', '.join(NORMALIZATIONS)}")
