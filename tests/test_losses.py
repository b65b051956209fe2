"""Known-answer tests for losses/: every expected value is worked out by hand in a comment."""

import math

import pytest
import torch
from torch import nn

from losses import (
    LOSS_TERMS,
    NORMALIZATIONS,
    AttentionLoss,
    DistillationLoss,
    FeatureLoss,
    GradientLoss,
    PixelLoss,
    SILogLoss,
    SSILoss,
    normalize_disparity,
)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def as_map(values: list[float]) -> torch.Tensor:
    """Four values -> a (1, 1, 2, 2) map, row-major."""
    return torch.tensor(values, dtype=torch.float32).view(1, 1, 2, 2)


def ramp(height: int = 8, width: int = 8, slope: float = 1.0) -> torch.Tensor:
    """(1, 1, H, W) map equal to slope * column index."""
    return (slope * torch.arange(width, dtype=torch.float32)).expand(1, 1, height, width).clone()


# --- SILog ---------------------------------------------------------------------------------------

# The sqrt variant floors its radicand at 1e-8, so a perfect match reads sqrt(1e-8) = 1e-4.
SQRT_FLOOR = 1e-4


@pytest.mark.parametrize("use_sqrt", [True, False])
def test_silog_is_zero_for_scaled_copy_when_fully_scale_invariant(use_sqrt):
    teacher = torch.rand(2, 1, 8, 8) + 0.5
    loss = SILogLoss(lam=1.0, use_sqrt=use_sqrt)(3.0 * teacher, teacher)
    torch.testing.assert_close(loss, torch.tensor(0.0), atol=SQRT_FLOOR + 1e-6, rtol=0)


@pytest.mark.parametrize("use_sqrt", [True, False])
def test_silog_of_scaled_copy_keeps_one_minus_lambda_of_log_scale(use_sqrt):
    # d = log(c) at every pixel, so mean(d^2) - lam * mean(d)^2 = (1 - lam) * log(c)^2.
    teacher = torch.rand(2, 1, 8, 8) + 0.5
    c = 2.0
    radicand = (1 - 0.85) * math.log(c) ** 2
    expected = math.sqrt(radicand) if use_sqrt else radicand
    loss = SILogLoss(lam=0.85, use_sqrt=use_sqrt)(c * teacher, teacher)
    torch.testing.assert_close(loss, torch.tensor(expected), atol=1e-5, rtol=1e-5)


def test_silog_tiny_map_by_hand():
    # student = [1, e, e^2, e^3], teacher = 1: d = [0, 1, 2, 3] (eps shifts it by ~1e-6).
    # mean(d) = 1.5, mean(d^2) = (0 + 1 + 4 + 9) / 4 = 3.5.
    # radicand = 3.5 - 0.85 * 1.5^2 = 3.5 - 1.9125 = 1.5875; sqrt = 1.259960...
    student = as_map([1.0, math.e, math.e**2, math.e**3])
    teacher = torch.ones(1, 1, 2, 2)
    no_sqrt = SILogLoss(lam=0.85, use_sqrt=False)(student, teacher)
    torch.testing.assert_close(no_sqrt, torch.tensor(1.5875), atol=1e-5, rtol=0)
    with_sqrt = SILogLoss(lam=0.85)(student, teacher)
    torch.testing.assert_close(with_sqrt, torch.tensor(math.sqrt(1.5875)), atol=1e-5, rtol=0)


def test_silog_averages_images_and_ignores_masked_pixels():
    # Image 0 only sees pixels [1, e] vs 1: d = [0, 1], mean 0.5, mean d^2 0.5,
    # radicand = 0.5 - 0.85 * 0.25 = 0.2875. Image 1 sees all of [e, e, e, e] vs 1: d = 1,
    # radicand = 1 - 0.85 = 0.15. Average over images: (0.2875 + 0.15) / 2 = 0.21875.
    student = torch.cat([as_map([1.0, math.e, 50.0, 0.0]), as_map([math.e] * 4)])
    teacher = torch.ones(2, 1, 2, 2)
    mask = torch.tensor([[True, True, False, False], [True] * 4]).view(2, 1, 2, 2)
    loss_fn = SILogLoss(use_sqrt=False)
    loss = loss_fn(student, teacher, mask)
    torch.testing.assert_close(loss, torch.tensor(0.21875), atol=1e-5, rtol=0)

    changed = student.clone()
    changed[0, 0, 1] = torch.tensor([7.0, 123.0])  # only masked-out pixels move
    assert loss_fn(changed, teacher, mask) == loss


def test_silog_skips_empty_images_in_the_average():
    # Image 1 has no valid pixel: the loss is image 0's alone, 0.15 (d = 1 everywhere), not 0.075.
    student = torch.full((2, 1, 2, 2), math.e)
    mask = torch.zeros(2, 1, 2, 2, dtype=torch.bool)
    mask[0] = True
    loss = SILogLoss(use_sqrt=False)(student, torch.ones(2, 1, 2, 2), mask)
    torch.testing.assert_close(loss, torch.tensor(0.15), atol=1e-5, rtol=0)


@pytest.mark.parametrize("use_sqrt", [True, False])
def test_silog_empty_mask_is_exactly_zero_with_finite_grad(use_sqrt):
    student = torch.rand(2, 1, 4, 4, requires_grad=True)
    mask = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    loss = SILogLoss(use_sqrt=use_sqrt)(student, torch.rand(2, 1, 4, 4), mask)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(student.grad).all()


def test_silog_zero_and_negative_maps_stay_finite():
    # Equal zero maps hit both hazards at once: log(0) and sqrt(0).
    student = torch.zeros(2, 1, 4, 4, requires_grad=True)
    loss = SILogLoss()(student, torch.zeros(2, 1, 4, 4))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    assert loss.item() <= SQRT_FLOOR + 1e-6
    # An unconstrained student head can go negative; it is clamped to 0, so it matches a zero map.
    negative = torch.full((2, 1, 4, 4), -0.5)
    assert SILogLoss()(negative, torch.zeros(2, 1, 4, 4)).item() <= SQRT_FLOOR + 1e-6


# --- Gradient -----------------------------------------------------------------------------------


def test_gradient_loss_ignores_identical_maps_and_constant_shifts():
    loss_fn = GradientLoss(scales=4)
    assert loss_fn(ramp(), ramp()).item() == 0.0
    assert loss_fn(ramp() + 5.0, ramp()).item() == 0.0


def test_gradient_loss_doubled_slope_single_scale():
    # On 8x8, student = 2j, teacher = j: every x-difference differs by 1 (56 of them), every
    # y-difference by 0 (56 of them). Pooled mean = 56 / (56 + 56) = 0.5.
    loss = GradientLoss(scales=1)(ramp(slope=2.0), ramp())
    torch.testing.assert_close(loss, torch.tensor(0.5))


def test_gradient_loss_doubled_slope_multi_scale():
    # Scale 0 (8x8): 0.5 as above. Scale 1 (4x4, columns 0,2,4,6): x-differences differ by 2,
    # 12 x + 12 y differences -> 24 / 24 = 1. Scale 2 (2x2, columns 0,4): x-difference differs by 4,
    # 2 x + 2 y differences -> 8 / 4 = 2. Mean = (0.5 + 1 + 2) / 3 = 7/6.
    # Scale 3 would be 1x1 with no differences at all, so it is left out of the mean.
    expected = torch.tensor(7 / 6)
    torch.testing.assert_close(GradientLoss(scales=3)(ramp(slope=2.0), ramp()), expected)
    torch.testing.assert_close(GradientLoss(scales=4)(ramp(slope=2.0), ramp()), expected)


def test_gradient_loss_needs_both_pixels_valid():
    # Masking pixel (3, 3) drops the 2 x- and 2 y-differences that touch it, from either side:
    # 54 x-differences of 1 and 54 y-differences of 0 remain, so 54 / 108 = 0.5.
    mask = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    mask[..., 3, 3] = False
    student = ramp(slope=2.0)
    student[..., 3, 3] = 1000.0  # would dominate if any difference touching it counted
    loss = GradientLoss(scales=1)(student, ramp(), mask)
    torch.testing.assert_close(loss, torch.tensor(0.5))


# --- SSI ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["l1", "mse"])
def test_ssi_is_zero_for_affine_copy(kind):
    teacher = torch.rand(2, 1, 8, 8)
    loss = SSILoss(kind=kind)(3.0 * teacher - 2.0, teacher)
    torch.testing.assert_close(loss, torch.tensor(0.0), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("kind", "expected"), [("l1", 0.5), ("mse", 0.25)])
def test_ssi_known_residual(kind, expected):
    # student p = [0, 1, 2, 3]; teacher = 2p + 1 + e with e = 0.5 * [1, -1, -1, 1]. e is
    # orthogonal to both 1 (sums to 0) and p (0 - 1 - 2 + 3 = 0), so the fit recovers scale 2,
    # shift 1 and leaves residual |e| = 0.5 everywhere: L1 0.5, MSE 0.25.
    student = as_map([0.0, 1.0, 2.0, 3.0])
    teacher = 2 * student + 1 + as_map([0.5, -0.5, -0.5, 0.5])
    torch.testing.assert_close(SSILoss(kind=kind)(student, teacher), torch.tensor(expected))


def test_ssi_constant_student_and_empty_mask_stay_finite():
    # A constant student has no scale to fit: the best shift is the teacher's mean.
    # Teacher [0, 1, 2, 3], mean 1.5, L1 residual mean (1.5 + 0.5 + 0.5 + 1.5) / 4 = 1.
    student = torch.ones(1, 1, 2, 2, requires_grad=True)
    loss = SSILoss()(student, as_map([0.0, 1.0, 2.0, 3.0]))
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(1.0))
    assert torch.isfinite(student.grad).all()

    empty = torch.zeros(1, 1, 2, 2, dtype=torch.bool)
    assert SSILoss()(student, as_map([0.0, 1.0, 2.0, 3.0]), empty).item() == 0.0


# --- Pixel --------------------------------------------------------------------------------------


def test_pixel_loss_by_hand_and_mask():
    # errors [0, 1, 2, 3]: MSE (0 + 1 + 4 + 9) / 4 = 3.5, L1 6 / 4 = 1.5.
    # Masking the last pixel: MSE 5 / 3, L1 3 / 3 = 1.
    student = as_map([1.0, 2.0, 3.0, 4.0])
    teacher = torch.ones(1, 1, 2, 2)
    mask = as_map([1, 1, 1, 0]).bool()
    torch.testing.assert_close(PixelLoss()(student, teacher), torch.tensor(3.5))
    torch.testing.assert_close(PixelLoss(kind="l1")(student, teacher), torch.tensor(1.5))
    torch.testing.assert_close(PixelLoss()(student, teacher, mask), torch.tensor(5 / 3))
    torch.testing.assert_close(PixelLoss(kind="l1")(student, teacher, mask), torch.tensor(1.0))


# --- normalize_disparity ------------------------------------------------------------------------


def test_median_mad_is_affine_invariant_with_and_without_mask():
    x = torch.rand(2, 1, 6, 6)
    mask = torch.rand(2, 1, 6, 6) > 0.3
    for m in (None, mask):
        torch.testing.assert_close(
            normalize_disparity(3.0 * x + 2.0, "median_mad", m),
            normalize_disparity(x, "median_mad", m),
            atol=1e-5,
            rtol=1e-5,
        )


def test_median_mad_by_hand():
    # [0, 1, 2, 7]: lower median 1, |x - 1| = [1, 0, 1, 6], MAD 2 -> [-0.5, 0, 0.5, 3].
    out = normalize_disparity(as_map([0.0, 1.0, 2.0, 7.0]), "median_mad")
    torch.testing.assert_close(out, as_map([-0.5, 0.0, 0.5, 3.0]))


def test_max_and_minmax_ranges_use_valid_pixels():
    x = torch.rand(2, 1, 5, 5) * 4
    torch.testing.assert_close(normalize_disparity(x, "max").flatten(1).amax(1), torch.ones(2))
    minmax = normalize_disparity(x, "minmax")
    torch.testing.assert_close(minmax.flatten(1).amin(1), torch.zeros(2))
    torch.testing.assert_close(minmax.flatten(1).amax(1), torch.ones(2))
    # A masked-out 100 must not set the max.
    mask = as_map([1, 1, 1, 0]).bool()
    normalized = normalize_disparity(as_map([1.0, 2.0, 4.0, 100.0]), "max", mask)
    torch.testing.assert_close(normalized[mask], torch.tensor([0.25, 0.5, 1.0]))


@pytest.mark.parametrize("mode", NORMALIZATIONS)
def test_normalizations_of_constant_zero_and_empty_maps_are_finite(mode):
    empty = torch.zeros(2, 1, 3, 3, dtype=torch.bool)
    for x, mask in [(torch.full((2, 1, 3, 3), 0.7), None), (torch.zeros(2, 1, 3, 3), None),
                    (torch.rand(2, 1, 3, 3), empty)]:
        x.requires_grad_(True)
        out = normalize_disparity(x, mode, mask)
        out.sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()


def test_normalize_rejects_unknown_mode():
    with pytest.raises(ValueError, match="median_mad"):
        normalize_disparity(torch.rand(1, 1, 2, 2), "zscore")


# --- FeatureLoss --------------------------------------------------------------------------------


def set_identity(loss_fn: FeatureLoss) -> None:
    for adapter in loss_fn.adapters:
        nn.init.zeros_(adapter.bias)
        nn.init.eye_(adapter.weight.view(adapter.out_channels, adapter.in_channels))


@pytest.mark.parametrize("layer_norm", [True, False])
def test_feature_loss_identity_adapter_gives_zero(layer_norm):
    loss_fn = FeatureLoss([4, 6], [4, 6], kind="l1", layer_norm=layer_norm)
    set_identity(loss_fn)
    features = [torch.randn(2, 4, 5, 5), torch.randn(2, 6, 3, 3)]
    assert loss_fn(features, features).item() == pytest.approx(0.0, abs=1e-6)
    # ... and a real difference is seen.
    assert loss_fn(features, [f + torch.randn_like(f) for f in features]).item() > 0.1


def test_feature_loss_layer_norm_is_per_position_over_channels():
    # Rescaling and shifting each position's channel vector (by a different amount per position)
    # is undone by a per-position channel norm, but not by a norm pooled over C, H and W.
    student = torch.randn(2, 16, 3, 3)
    teacher = student * (1 + torch.rand(2, 1, 3, 3)) + torch.randn(2, 1, 3, 3)
    loss_fn = FeatureLoss([16], [16])
    set_identity(loss_fn)
    assert loss_fn([student], [teacher]).item() == pytest.approx(0.0, abs=1e-3)


def test_feature_loss_resizes_student_to_teacher_grid():
    # Bilinear, align_corners=False, 2 -> 4 columns samples source x = (i + 0.5) / 2 - 0.5 =
    # [-0.25, 0.25, 0.75, 1.25], clamped at the border: [0, 1] becomes [0, 0.25, 0.75, 1].
    # (Nearest would give [0, 0, 1, 1]; align_corners=True [0, 1/3, 2/3, 1].)
    loss_fn = FeatureLoss([1], [1], layer_norm=False)
    set_identity(loss_fn)
    student = torch.tensor([0.0, 1.0]).view(1, 1, 1, 2)
    teacher = torch.tensor([0.0, 0.25, 0.75, 1.0]).view(1, 1, 1, 4)
    assert loss_fn([student], [teacher]).item() == pytest.approx(0.0, abs=1e-6)
    # Different channel counts and grids just work.
    mixed = FeatureLoss([3, 5], [8, 2], kind="cosine")
    value = mixed([torch.randn(2, 3, 4, 4), torch.randn(2, 5, 2, 3)],
                  [torch.randn(2, 8, 8, 8), torch.randn(2, 2, 5, 5)])
    assert value.shape == () and torch.isfinite(value)


def test_feature_loss_cosine_by_hand():
    # Student channel vector [1, 0] vs teacher [1, 1] at one position: cos = 1/sqrt(2).
    loss_fn = FeatureLoss([2], [2], kind="cosine", layer_norm=False)
    set_identity(loss_fn)
    student = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    teacher = torch.tensor([1.0, 1.0]).view(1, 2, 1, 1)
    assert loss_fn([student], [teacher]).item() == pytest.approx(1 - 1 / math.sqrt(2), abs=1e-6)


def test_feature_loss_adapters_train():
    loss_fn = FeatureLoss([3, 4], [5, 6])
    optimizer = torch.optim.AdamW(loss_fn.parameters())
    optimizer_params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    adapter_params = [p for adapter in loss_fn.adapters for p in adapter.parameters()]
    assert len(adapter_params) == 4 and {id(p) for p in adapter_params} <= optimizer_params

    loss_fn([torch.randn(2, 3, 4, 4), torch.randn(2, 4, 2, 2)],
            [torch.randn(2, 5, 8, 8), torch.randn(2, 6, 4, 4)]).backward()
    for p in adapter_params:
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_feature_loss_rejects_wrong_pair_count():
    loss_fn = FeatureLoss([3, 4], [5, 6])
    with pytest.raises(ValueError, match="2 adapters"):
        loss_fn([torch.randn(1, 3, 2, 2)], [torch.randn(1, 5, 2, 2)])


# --- AttentionLoss ------------------------------------------------------------------------------


def test_attention_loss_same_features_is_zero():
    features = [torch.randn(2, 4, 5, 5), torch.randn(2, 3, 2, 2)]
    assert AttentionLoss()(features, features).item() == pytest.approx(0.0, abs=1e-7)


def test_attention_loss_two_positions_by_hand():
    # Teacher attention over 2 positions: [1, 0] -> normalised [1, 0]. Student (2 channels, values
    # 1 and -1 at both positions): mean_c |F|^2 = [1, 1] -> [1/sqrt2, 1/sqrt2].
    # MSE = ((1 - 1/sqrt2)^2 + (1/sqrt2)^2) / 2 = (2 - sqrt2) / 2 = 1 - 1/sqrt2.
    teacher = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    student = torch.tensor([[1.0, 1.0], [-1.0, -1.0]]).view(1, 2, 1, 2)
    loss = AttentionLoss()([student], [teacher])
    assert loss.item() == pytest.approx(1 - 1 / math.sqrt(2), abs=1e-6)
    assert list(AttentionLoss().parameters()) == []


# --- DistillationLoss ---------------------------------------------------------------------------

STUDENT_CHANNELS = [4, 8]
TEACHER_CHANNELS = [6, 10]


def random_batch(requires_grad: bool = False, dtype: torch.dtype = torch.float32):
    """Disparities with exact zeros (DA-V2 outputs them) and two feature pairs, different grids."""
    torch.manual_seed(0)
    student = torch.relu(torch.randn(2, 1, 16, 16)).to(dtype).requires_grad_(requires_grad)
    teacher = torch.relu(torch.randn(2, 1, 16, 16)).to(dtype)
    student_features = [torch.randn(2, c, s, s).to(dtype).requires_grad_(requires_grad)
                        for c, s in zip(STUDENT_CHANNELS, [8, 4])]
    teacher_features = [torch.randn(2, c, s, s).to(dtype) for c, s in zip(TEACHER_CHANNELS, [4, 4])]
    return student, teacher, student_features, teacher_features


def full_loss(**overrides) -> DistillationLoss:
    weights = dict.fromkeys(LOSS_TERMS, 1.0) | overrides
    return DistillationLoss(
        weights, student_channels=STUDENT_CHANNELS, teacher_channels=TEACHER_CHANNELS
    )


def test_zero_weight_terms_are_not_built_or_reported():
    loss_fn = DistillationLoss({"silog": 1.0, "gradient": 0.0, "feature": 0.0})
    assert set(loss_fn.terms) == {"silog"}
    assert list(loss_fn.parameters()) == []  # no FeatureLoss, so no adapters
    assert not loss_fn.needs_teacher_features
    student, teacher, _, _ = random_batch()
    _, terms = loss_fn(student, teacher)
    assert set(terms) == {"silog", "silog_weighted"}


def test_total_is_sum_of_weighted_terms():
    loss_fn = full_loss(silog=0.5, ssi=2.0, gradient=3.0, pixel=0.25, feature=0.1, attention=4.0)
    total, terms = loss_fn(*random_batch())
    assert set(terms) == set(LOSS_TERMS) | {f"{name}_weighted" for name in LOSS_TERMS}
    for name, weight in loss_fn.weights.items():
        torch.testing.assert_close(terms[f"{name}_weighted"], weight * terms[name])
    torch.testing.assert_close(total, sum(terms[f"{name}_weighted"] for name in LOSS_TERMS))


def test_silog_gets_max_normalised_maps_whatever_the_normalization():
    # Max-normalising makes SILog blind to a global scale: student = 5 * teacher gives d = 0.
    student, teacher, _, _ = random_batch()
    teacher = teacher + 0.1
    loss_fn = DistillationLoss({"silog": 1.0}, normalization="median_mad")
    _, terms = loss_fn(5.0 * teacher, teacher)
    assert terms["silog"].item() <= SQRT_FLOOR + 1e-6


def test_adapters_are_parameters_of_the_combined_loss():
    loss_fn = full_loss()
    assert loss_fn.needs_teacher_features
    optimizer = torch.optim.AdamW(loss_fn.parameters())
    optimizer_params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in loss_fn.terms["feature"].adapters.parameters()} == optimizer_params


def test_bf16_autocast_gives_float32_finite_loss():
    loss_fn = full_loss()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, terms = loss_fn(*random_batch(dtype=torch.bfloat16))
    assert total.dtype == torch.float32 and torch.isfinite(total)
    assert all(value.dtype == torch.float32 for value in terms.values())
    # Autocast must not reach inside: float32 inputs give the very same loss with it on or off
    # (the adapters' conv would otherwise run in bf16).
    batch = random_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, terms_autocast = loss_fn(*batch)
    torch.testing.assert_close(terms_autocast, loss_fn(*batch)[1])


def test_gradients_are_finite_and_teacher_is_detached():
    student, teacher, student_features, teacher_features = random_batch(requires_grad=True)
    teacher.requires_grad_(True)
    loss_fn = full_loss()
    features = (student_features, teacher_features)
    total, _ = loss_fn(student, teacher, *features)
    total.backward()
    assert teacher.grad is None
    for tensor in [student, *student_features, *loss_fn.parameters()]:
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weights": {"silog": 1.0, "depth": 1.0}}, "valid keys are.*silog.*attention"),
        ({"weights": {"silog": -1.0}}, ">= 0"),
        ({"weights": {"feature": 1.0}}, "student_channels"),
        ({"weights": {"silog": 0.0}}, "at least one"),
        ({"weights": {"silog": 1.0}, "normalization": "zscore"}, "median_mad"),
    ],
)
def test_invalid_configuration_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DistillationLoss(**kwargs)


def test_feature_terms_require_features():
    student, teacher, _, _ = random_batch()
    with pytest.raises(ValueError, match="student_features"):
        DistillationLoss({"attention": 1.0})(student, teacher)
