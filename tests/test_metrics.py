"""Known-answer tests for trainer/evaluate/metrics.py."""

import math

import numpy as np
import pytest
import torch

from core.choices import ALIGN_MODES, LOWER_IS_BETTER, METRIC_NAMES
from trainer.evaluate.metrics import (
    average_metrics,
    depth_metrics,
    depth_valid_mask_from_disparity,
    disparity_to_depth,
)


def image(values: list[float]) -> torch.Tensor:
    """One (1, 1, 2, N/2) image from a flat list of pixel values."""
    return torch.tensor(values, dtype=torch.float32).view(1, 1, 2, -1)


def all_valid(tensor: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(tensor, dtype=torch.bool)


def scalars(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """Metric values of a single-image result as python floats."""
    assert all(value.shape == (1,) and value.dtype == torch.float32 for value in metrics.values())
    return {name: value.item() for name, value in metrics.items()}


def test_exports():
    assert METRIC_NAMES == (
        "abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "delta1", "delta2", "delta3", "silog"
    )
    assert ALIGN_MODES == ("none", "median", "scale_shift", "depth_scale_shift")
    assert {name for name, lower in LOWER_IS_BETTER.items() if not lower} == {"delta1", "delta2", "delta3"}
    assert set(LOWER_IS_BETTER) == set(METRIC_NAMES)


@pytest.mark.parametrize("align", ALIGN_MODES)
def test_perfect_prediction(align):
    target = image([1.0, 2.0, 3.0, 7.0, 0.5, 9.0])
    metrics = scalars(depth_metrics(target.clone(), target, all_valid(target), align=align))
    assert list(metrics) == list(METRIC_NAMES)
    for name in ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog"):
        assert metrics[name] == pytest.approx(0.0, abs=1e-4), name
    for name in ("delta1", "delta2", "delta3"):
        assert metrics[name] == 1.0, name


def test_hand_computed_case():
    p = [1.0, 2.5, 3.0, 4.0]
    g = [1.0, 1.5, 2.5, 5.0]
    n = 4
    # Errors p - g: [0, 1, 0.5, -1]; ratios max(p/g, g/p): [1, 1.667, 1.2, 1.25].
    log_diff = [math.log(pi) - math.log(gi) for pi, gi in zip(p, g)]
    expected = {
        "abs_rel": (0 + 1 / 1.5 + 0.5 / 2.5 + 1 / 5) / n,
        "sq_rel": (0 + 1 / 1.5 + 0.25 / 2.5 + 1 / 5) / n,
        "rmse": math.sqrt((0 + 1 + 0.25 + 1) / n),
        "rmse_log": math.sqrt(sum(d * d for d in log_diff) / n),
        "log10": sum(abs(math.log10(pi) - math.log10(gi)) for pi, gi in zip(p, g)) / n,
        # 1.25 itself is not < 1.25, so only ratios 1 and 1.2 pass delta1.
        "delta1": 2 / 4,
        "delta2": 3 / 4,  # bound 1.5625: 1.667 fails
        "delta3": 4 / 4,  # bound 1.953
        "silog": 100 * math.sqrt(sum(d * d for d in log_diff) / n - (sum(log_diff) / n) ** 2),
    }
    metrics = scalars(depth_metrics(image(p), image(g), all_valid(image(g))))
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, abs=1e-5), name


def test_constant_factor_two():
    target = image([1.0, 2.0, 3.0, 4.0])
    # max_depth above 2 * max(g), so the clamp leaves the doubled prediction alone.
    metrics = scalars(depth_metrics(2 * target, target, all_valid(target), max_depth=100.0))
    assert metrics["abs_rel"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["delta1"] == 0.0  # 2 > 1.25
    assert metrics["delta3"] == 0.0  # 2 > 1.25 ** 3 = 1.953
    assert metrics["silog"] == pytest.approx(0.0, abs=1e-4)  # the log ratio is constant
    assert metrics["rmse_log"] == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["log10"] == pytest.approx(math.log10(2), abs=1e-6)


def test_max_depth_clamps_prediction_without_alignment():
    target = image([1.0, 2.0, 3.0, 4.0])
    # Default max_depth is max(g) = 4: the doubled prediction becomes [2, 4, 4, 4].
    metrics = scalars(depth_metrics(2 * target, target, all_valid(target)))
    assert metrics["abs_rel"] == pytest.approx((1 + 1 + 1 / 3 + 0) / 4, abs=1e-6)


def test_median_alignment_removes_scale():
    target = image([1.0, 2.0, 3.0, 4.0, 8.0, 0.25])
    unaligned = scalars(depth_metrics(3 * target, target, all_valid(target)))
    aligned = scalars(depth_metrics(3 * target, target, all_valid(target), align="median"))
    assert unaligned["abs_rel"] > 0.5
    assert aligned["abs_rel"] == pytest.approx(0.0, abs=1e-6)
    assert aligned["delta1"] == 1.0


def test_scale_shift_alignment_removes_affine_disparity():
    target = image([1.0, 2.0, 3.0, 4.0, 8.0, 1.5])
    # The prediction's disparity is an affine map of the target's: 1/p = 2 * (1/g) + 0.3.
    pred = 1.0 / (2.0 / target + 0.3)
    assert scalars(depth_metrics(pred, target, all_valid(target), align="median"))["abs_rel"] > 0.05
    metrics = scalars(depth_metrics(pred, target, all_valid(target), align="scale_shift"))
    for name in ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog"):
        assert metrics[name] == pytest.approx(0.0, abs=1e-4), name
    assert metrics["delta1"] == 1.0


def test_scale_shift_clips_disparity_at_inverse_max_depth():
    pred_disparity = np.array([1.0, 2.0, 3.0, 4.0])
    target = np.array([10.0, 10.0, 10.0, 1.0])
    # Independent least-squares fit of [x, 1] [s, t] = 1 / g.
    design = np.stack([pred_disparity, np.ones(4)], axis=1)
    (s, t), *_ = np.linalg.lstsq(design, 1.0 / target, rcond=None)
    fitted_disparity = s * pred_disparity + t
    assert fitted_disparity[0] < 0  # the case only tests the clip if the fit goes negative
    # Clipped at 1 / max_depth with max_depth = max(g) = 10, so pixel 0 becomes exactly 10.
    aligned_depth = 1.0 / np.maximum(fitted_disparity, 1.0 / 10.0)
    assert aligned_depth[0] == pytest.approx(10.0)
    expected_abs_rel = np.mean(np.abs(aligned_depth - target) / target)

    pred = image((1.0 / pred_disparity).tolist())
    metrics = scalars(depth_metrics(pred, image(target.tolist()), all_valid(pred), align="scale_shift"))
    assert metrics["abs_rel"] == pytest.approx(expected_abs_rel, abs=1e-5)

    # An explicit max_depth moves the clip: pixel 0 becomes 20 against a target of 10.
    aligned_depth = 1.0 / np.maximum(fitted_disparity, 1.0 / 20.0)
    assert aligned_depth[0] == pytest.approx(20.0)
    metrics = scalars(
        depth_metrics(pred, image(target.tolist()), all_valid(pred), align="scale_shift", max_depth=20.0)
    )
    assert metrics["abs_rel"] == pytest.approx(np.mean(np.abs(aligned_depth - target) / target), abs=1e-5)


def test_depth_scale_shift_matches_an_independent_least_squares_fit_clipped_to_the_range():
    """Marigold's protocol: fit [p, 1] [s, t] = g in depth space over the valid pixels, clip the
    aligned depth to [min_depth, max_depth], score the valid pixels."""
    rng = np.random.default_rng(0)
    pred = rng.uniform(0.5, 20.0, 40)
    target = np.abs(0.3 * pred + rng.normal(0.0, 1.5, 40) + 2.0) + 0.1  # positive, so every pixel counts
    valid = np.ones(40, dtype=bool)
    valid[5:9] = False  # wrong values here must not move the fit
    pred[5:9] = 1e4
    design = np.stack([pred[valid], np.ones(valid.sum())], axis=1)
    (s, t), *_ = np.linalg.lstsq(design, target[valid], rcond=None)
    aligned = np.clip(s * pred + t, 2.5, 7.0)[valid]
    assert (s * pred + t)[valid].min() < 2.5 and (s * pred + t)[valid].max() > 7.0  # the clip is exercised
    expected = np.mean(np.abs(aligned - target[valid]) / target[valid])

    metrics = scalars(depth_metrics(image(pred.tolist()), image(target.tolist()), image(valid.tolist()).bool(),
                                    align="depth_scale_shift", min_depth=2.5, max_depth=7.0))
    assert metrics["abs_rel"] == pytest.approx(expected, rel=1e-5)
    # An affine map of depth is removed exactly.
    depth = image([1.0, 2.0, 3.0, 4.0, 8.0, 1.5])
    metrics = scalars(depth_metrics(2.0 * depth + 1.0, depth, all_valid(depth), align="depth_scale_shift"))
    assert metrics["abs_rel"] == pytest.approx(0, abs=1e-6) and metrics["delta1"] == 1.0


def test_scale_shift_constant_prediction_falls_back_to_mean_disparity():
    target = image([1.0, 2.0, 4.0, 4.0])
    aligned_depth = 1.0 / np.mean([1.0, 0.5, 0.25, 0.25])  # s = 0, t = mean(1 / g)
    expected_abs_rel = np.mean([abs(aligned_depth - g) / g for g in (1.0, 2.0, 4.0, 4.0)])
    for constant in (5.0, 0.0, math.inf):
        pred = torch.full_like(target, constant)
        metrics = scalars(depth_metrics(pred, target, all_valid(target), align="scale_shift"))
        assert metrics["abs_rel"] == pytest.approx(expected_abs_rel, abs=1e-5), constant


@pytest.mark.parametrize("align", ALIGN_MODES)
def test_masked_out_pixels_are_ignored(align):
    pred = image([1.0, 2.5, 3.0, 4.0, 2.0, 6.0])
    target = image([1.5, 2.0, 3.5, 4.0, 2.2, 5.0])
    valid = image([1, 1, 1, 0, 1, 0]).bool()
    reference = depth_metrics(pred, target, valid, align=align)
    garbage_pred, garbage_target = pred.clone(), target.clone()
    garbage_pred[~valid] = torch.tensor([math.nan, -3.0])
    garbage_target[~valid] = torch.tensor([1e6, math.nan])
    garbage = depth_metrics(garbage_pred, garbage_target, valid, align=align)
    # The same as the valid pixels alone, as one image of their own.
    subset_pred, subset_target = pred[valid].view(1, 1, 1, -1), target[valid].view(1, 1, 1, -1)
    subset = depth_metrics(subset_pred, subset_target, all_valid(subset_pred), align=align)
    for name in METRIC_NAMES:
        torch.testing.assert_close(garbage[name], reference[name], msg=name)
        torch.testing.assert_close(subset[name], reference[name], msg=name)


def test_invalid_targets_are_not_valid_pixels():
    pred = image([1.0, 2.0, 3.0, 4.0])
    # Zero, negative and non-finite targets drop out even where the caller's mask is true.
    target = image([1.0, 0.0, -2.0, math.inf])
    metrics = scalars(depth_metrics(pred, target, all_valid(pred)))
    assert metrics["abs_rel"] == pytest.approx(0.0, abs=1e-6)


def test_empty_mask_gives_nan_row_and_average_ignores_it():
    target = torch.tensor([1.0, 2.0, 4.0, 8.0]).view(1, 1, 2, 2).repeat(3, 1, 1, 1)  # (3, 1, 2, 2)
    pred = target * torch.tensor([1.0, 1.0, 2.0]).view(3, 1, 1, 1)
    valid = torch.ones_like(target, dtype=torch.bool)
    valid[1] = False
    metrics = depth_metrics(pred, target, valid, max_depth=100.0)
    for name in METRIC_NAMES:
        assert metrics[name].shape == (3,)
        assert metrics[name][1].isnan(), name
        assert not metrics[name][[0, 2]].isnan().any(), name
    averages = average_metrics(metrics)
    assert averages["num_images"] == 2
    assert set(averages) == {*METRIC_NAMES, "num_images"}
    assert averages["abs_rel"] == pytest.approx((0.0 + 1.0) / 2, abs=1e-6)
    assert averages["delta1"] == pytest.approx((1.0 + 0.0) / 2)


def test_average_metrics_known_answer():
    averages = average_metrics(
        {"abs_rel": torch.tensor([0.1, math.nan, 0.3, 0.5]), "delta1": torch.tensor([1.0, math.nan, 0.5, 0.0])}
    )
    assert averages == pytest.approx({"abs_rel": 0.3, "delta1": 0.5, "num_images": 3})
    empty = average_metrics({"abs_rel": torch.tensor([math.nan])})
    assert empty["num_images"] == 0 and math.isnan(empty["abs_rel"])


@pytest.mark.parametrize("align", ALIGN_MODES)
def test_zero_and_inf_predictions_stay_finite(align):
    pred = image([0.0, math.inf, 3.0, 4.0, 1.0, 2.0])
    target = image([1.0, 2.0, 3.0, 4.0, 1.5, 2.0])
    metrics = scalars(depth_metrics(pred, target, all_valid(pred), align=align))
    for name, value in metrics.items():
        assert math.isfinite(value), name


@pytest.mark.parametrize("align", ALIGN_MODES)
def test_batch_matches_images_alone(align):
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(3, 1, 5, 7, generator=generator) * 9 + 1  # (3, 1, 5, 7) depths in [1, 10)
    pred = target * (torch.rand(3, 1, 5, 7, generator=generator) + 0.5)
    valid = torch.rand(3, 1, 5, 7, generator=generator) > 0.3
    batched = depth_metrics(pred, target, valid, align=align)
    for index in range(3):
        one = slice(index, index + 1)
        alone = depth_metrics(pred[one], target[one], valid[one], align=align)
        for name in METRIC_NAMES:
            torch.testing.assert_close(batched[name][one], alone[name], msg=name)
    # The images differ, so a batch computed as one pooled image would not pass.
    assert len(set(batched["abs_rel"].tolist())) == 3


def test_bad_align_names_the_choices():
    target = image([1.0, 2.0])
    with pytest.raises(ValueError, match="scale_shift"):
        depth_metrics(target, target, all_valid(target), align="affine")


def test_disparity_to_depth():
    depth = disparity_to_depth(torch.tensor([2.0, 0.5, 0.0, -1.0]), eps=1e-3)
    torch.testing.assert_close(depth, torch.tensor([0.5, 2.0, 1000.0, 1000.0]))


def test_depth_valid_mask_from_disparity():
    disparity = torch.tensor([[10.0, 0.05, 0.2, 0.0], [1.0, 0.02, 0.005, 0.5]]).view(2, 1, 2, 2)
    mask = depth_valid_mask_from_disparity(disparity, rel_threshold=0.01)
    # Thresholds are per image: 0.1 for the first (max 10), 0.01 for the second (max 1).
    expected = torch.tensor([[True, False, True, False], [True, True, False, True]]).view(2, 1, 2, 2)
    assert mask.dtype == torch.bool
    assert torch.equal(mask, expected)
