"""The weighted sum of distillation terms the trainer optimises."""

import torch
from torch import Tensor, nn

from losses.depth import (
    GradientLoss,
    PixelLoss,
    SILogLoss,
    SSILoss,
    check_normalization,
    normalize_disparity,
)
from losses.features import AttentionLoss, FeatureLoss

LOSS_TERMS = ("silog", "ssi", "gradient", "pixel", "feature", "attention")
# Terms compared on `normalization`-normalised maps, and terms that compare feature lists.
_NORMALIZED_TERMS = ("ssi", "gradient", "pixel")
_FEATURE_TERMS = ("feature", "attention")


class DistillationLoss(nn.Module):
    """Weighted sum of the terms in ``LOSS_TERMS``; zero-weight terms are never built or run.

    Which map each term sees:
    - ``ssi``, ``gradient``, ``pixel``: both disparities normalised per image with
      ``normalization`` (default ``median_mad``, see ``normalize_disparity``: the teacher's scale
      and shift are arbitrary, so neither should be learned).
    - ``silog``: always ``max``-normalised maps, whatever ``normalization`` says. It takes logs, so
      it needs positive inputs, and median/MAD maps are negative below the median; dividing by the
      max keeps them positive and puts both maps on one scale for the ``(1 - lam)`` scale term.
    - ``feature``, ``attention``: the intermediate feature lists.

    The ``feature`` term owns trainable 1x1 adapters, so this module's ``parameters()`` must go to
    the optimiser (and be prepared together with the student) when ``weights["feature"] > 0``.
    """

    def __init__(
        self,
        weights: dict[str, float],
        normalization: str = "median_mad",
        student_channels: list[int] | None = None,
        teacher_channels: list[int] | None = None,
        silog_lam: float = 0.85,
        gradient_scales: int = 4,
        feature_kind: str = "l1",
        ssi_kind: str = "l1",
        pixel_kind: str = "mse",
    ) -> None:
        super().__init__()
        unknown = sorted(set(weights) - set(LOSS_TERMS))
        if unknown:
            raise ValueError(f"unknown loss weight(s) {unknown}; valid keys are {LOSS_TERMS}")
        negative = {name: w for name, w in weights.items() if w < 0}
        if negative:
            raise ValueError(f"loss weights must be >= 0, got {negative}")
        check_normalization(normalization)
        # Ordered as LOSS_TERMS, whatever order the config listed them in.
        self.weights = {
            name: float(weights[name]) for name in LOSS_TERMS if weights.get(name, 0) > 0
        }
        if not self.weights:
            raise ValueError(f"at least one loss weight must be positive, got {weights}")
        if "feature" in self.weights and (student_channels is None or teacher_channels is None):
            raise ValueError("weights['feature'] > 0 needs student_channels and teacher_channels")
        self.normalization = normalization
        # Lambdas so that only the terms in use are constructed (FeatureLoss allocates adapters).
        builders = {
            # SILog sees max-normalised maps, so eps=1e-3 is 0.1% of the nearest point's disparity:
            # the teacher's exact zeros (sky) would otherwise sit at log(1e-6) = -13.8 and dominate.
            "silog": lambda: SILogLoss(lam=silog_lam, eps=1e-3),
            "ssi": lambda: SSILoss(kind=ssi_kind),
            "gradient": lambda: GradientLoss(scales=gradient_scales),
            "pixel": lambda: PixelLoss(kind=pixel_kind),
            "feature": lambda: FeatureLoss(student_channels, teacher_channels, kind=feature_kind),
            "attention": lambda: AttentionLoss(),
        }
        self.terms = nn.ModuleDict({name: builders[name]() for name in self.weights})

    @property
    def needs_teacher_features(self) -> bool:
        return any(name in self.terms for name in _FEATURE_TERMS)

    def forward(
        self,
        student_disparity: Tensor,
        teacher_disparity: Tensor,
        student_features: list[Tensor] | None = None,
        teacher_features: list[Tensor] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Disparities (B, 1, H, W), features lists of (B, C, h, w). Every pixel counts: unreadable
        photos never reach the loss (the trainer fills their slots, see `trainer.train.loop`).

        Returns the total and, per active term, ``name`` (unweighted) and ``name_weighted``.
        """
        if self.needs_teacher_features and (student_features is None or teacher_features is None):
            raise ValueError(
                f"terms {[n for n in _FEATURE_TERMS if n in self.terms]} need student_features "
                "and teacher_features"
            )
        # Logs, eps guards and the 2x2 solve need float32 even when the models run under bf16
        # autocast; the teacher is a fixed target, never trained through.
        with torch.autocast(device_type=student_disparity.device.type, enabled=False):
            student = student_disparity.float()
            teacher = teacher_disparity.detach().float()
            inputs_by_term = {}
            if "silog" in self.terms:
                inputs_by_term["silog"] = (
                    normalize_disparity(student, "max"),
                    normalize_disparity(teacher, "max"),
                )
            if any(name in self.terms for name in _NORMALIZED_TERMS):
                normalized = (
                    normalize_disparity(student, self.normalization),
                    normalize_disparity(teacher, self.normalization),
                )
                inputs_by_term.update(dict.fromkeys(_NORMALIZED_TERMS, normalized))
            if self.needs_teacher_features:
                features = (
                    [f.float() for f in student_features],
                    [f.detach().float() for f in teacher_features],
                )
                inputs_by_term.update(dict.fromkeys(_FEATURE_TERMS, features))

            terms = {}
            for name, term in self.terms.items():
                terms[name] = term(*inputs_by_term[name])
                terms[f"{name}_weighted"] = self.weights[name] * terms[name]
            total = sum(terms[f"{name}_weighted"] for name in self.terms)
        return total, terms
