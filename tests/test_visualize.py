"""The TensorBoard comparison grid: titled columns, tiles a person can see, a legend for the colours."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.evaluate.visualize import BAR_HEIGHT, MIN_TILE_HEIGHT, TEXT_HEIGHT, comparison_grid, lut


def test_grid_has_titles_enlarged_tiles_and_a_near_far_bar():
    ramp = torch.linspace(0, 1, 64).view(1, 1, 1, 64).expand(2, 1, 48, 64)  # near on the right
    grid = comparison_grid(torch.zeros(2, 3, 48, 64), ramp, ramp)
    factor = -(-MIN_TILE_HEIGHT // 48)  # whole enlargement: 48 px tiles become 192
    assert grid.shape == (3, TEXT_HEIGHT + 2 * 48 * factor + BAR_HEIGHT + TEXT_HEIGHT, 4 * 64 * factor)
    header = grid[:, :TEXT_HEIGHT]
    assert (header < 0.5).any() and (header.mean() > 0.8)  # dark title text on white
    bar = grid[:, TEXT_HEIGHT + 2 * 48 * factor + BAR_HEIGHT // 2]  # (3, W): one row of the colour bars
    tile = 64 * factor
    spectral = lut("Spectral_r")
    torch.testing.assert_close(bar[:, tile], spectral[0], atol=0.02, rtol=0)  # far end
    torch.testing.assert_close(bar[:, 3 * tile - 1], spectral[-1], atol=0.02, rtol=0)  # near end
    # The teacher tile uses the same colours as the bar: its right edge (near) is the bar's near end.
    torch.testing.assert_close(grid[:, TEXT_HEIGHT + 5, 2 * tile - 1], spectral[-1], atol=0.02, rtol=0)


def test_predicts_legend_and_an_unknown_colormap_come_from_the_same_table():
    from trainer.ship.predict import colour_bar

    legend = np.asarray(colour_bar(120, "magma"))  # near at the top row, far at the bottom
    table = (lut("magma") * 255).round().to(torch.uint8).numpy()
    column = legend[:, legend.shape[1] // 8]  # inside the bar, left of the words
    assert (column[0] == table[-1]).all() and (column[-1] == table[0]).all()
    with pytest.raises(ValueError, match="no colormap 'magmaa'"):
        lut("magmaa")
