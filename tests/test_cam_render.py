"""Overlay colour order and figure-grid geometry, read back from the saved PNGs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cam.render import GridLayout, overlay, read_png, save_grid, save_npy, save_png


def test_high_activation_is_red_and_low_is_blue_in_the_saved_png(tmp_path) -> None:
    pixels = torch.full((1, 3, 32, 32), 0.5)
    maps = torch.zeros(1, 32, 32)
    maps[0, 4:8, 20:24] = 1.0
    save_png(tmp_path / "o.png", overlay(pixels, maps)[0])
    rgb = read_png(tmp_path / "o.png").astype(int)
    hot, cold = rgb[5, 21], rgb[20, 5]
    assert hot[0] > hot[1] + 40 and hot[0] > hot[2] + 40  # red dominates where the map is high
    assert cold[2] > cold[0] + 40 and cold[2] > cold[1] + 40  # blue where it is low
    # exact value: 0.5·grey + 0.5·jet(1) with jet(1) = (0.5, 0, 0)
    assert hot.tolist() == [128, 64, 64]


def test_overlay_is_batched_and_does_not_touch_inputs() -> None:
    pixels = torch.rand(3, 3, 8, 8)
    maps = torch.rand(3, 8, 8)
    before = pixels.clone(), maps.clone()
    out = overlay(pixels, maps)
    assert out.shape == (3, 8, 8, 3) and out.dtype == np.uint8
    assert np.array_equal(out[1], overlay(pixels[1:2], maps[1:2])[0])
    assert torch.equal(pixels, before[0]) and torch.equal(maps, before[1])


def test_npy_round_trip_keeps_the_name(tmp_path) -> None:
    arr = np.random.default_rng(0).random((5, 7)).astype(np.float32)
    save_npy(tmp_path / "m.npy", arr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.npy"]  # no stray temp or .npy.npy
    assert np.array_equal(np.load(tmp_path / "m.npy"), arr)


@pytest.mark.parametrize("rows, cols", [(3, 4), (1, 1)])
def test_grid_size_and_cell_positions(tmp_path, rows, cols) -> None:
    rng = np.random.default_rng(rows * 10 + cols)
    colours = rng.integers(0, 256, size=(rows, cols, 3)).astype(np.uint8)
    cells = [[np.broadcast_to(colours[r, c], (20, 20, 3)).copy() for c in range(cols)]
             for r in range(rows)]
    layout = save_grid(tmp_path / "g.png", cells, [f"row {r}" for r in range(rows)],
                       [f"col {c}" for c in range(cols)])
    assert (layout.rows, layout.cols) == (rows, cols)
    img = read_png(tmp_path / "g.png")
    width, height = GridLayout(rows, cols).size_px
    assert img.shape == (height, width, 3)
    for r in range(rows):
        for c in range(cols):
            left, bottom, w, h = layout.cell_rect(r, c)
            x = int((left + w / 2) * width)
            y = int((1 - bottom - h / 2) * height)
            assert img[y, x].tolist() == colours[r, c].tolist(), (r, c)


def test_grid_cells_do_not_overlap() -> None:
    lay = GridLayout(2, 3)
    rects = [lay.cell_rect(r, c) for r in range(2) for c in range(3)]
    for i, (l1, b1, w1, h1) in enumerate(rects):
        assert 0 <= l1 and l1 + w1 <= 1 and 0 <= b1 and b1 + h1 <= 1
        for l2, b2, w2, h2 in rects[i + 1:]:
            assert l1 + w1 <= l2 or l2 + w2 <= l1 or b1 + h1 <= b2 or b2 + h2 <= b1
