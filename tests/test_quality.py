"""bench.quality's parts with known answers: the headline ratio and the picture's single colour scale."""

import pytest
import torch

from bench import quality
from trainer.evaluate.visualize import depth_comparison_picture


def test_share_of_gain():
    assert quality.share_of_gain(prior=0.3, teacher=0.2, student=0.22) == pytest.approx(0.8)
    assert quality.share_of_gain(prior=0.5, teacher=0.7, student=0.5) == pytest.approx(0.0)  # delta1 rises
    assert quality.share_of_gain(prior=0.3, teacher=0.2, student=0.35) < 0


def test_comparison_picture_puts_every_map_on_one_scale():
    """One colour scale for all maps: a map ten times the ground truth looks different from it
    (per-map stretching, as TensorBoard's grids do, would make the two tiles identical)."""
    truth = torch.linspace(0, 2, 256).view(16, 16)

    def tiles(student):
        picture = depth_comparison_picture([torch.rand(3, 16, 16)], {"ground truth": [truth], "student": [student]})
        width = picture.shape[2] // 3
        body = picture[:, 18:18 + 192]  # under the titles: the 16 px row enlarged to 192
        return body[:, :, width:2 * width], body[:, :, 2 * width:]

    same_truth, same_student = tiles(truth.clone())
    assert torch.equal(same_truth, same_student)
    scaled_truth, scaled_student = tiles(truth * 10)
    assert not torch.equal(scaled_truth, scaled_student)
