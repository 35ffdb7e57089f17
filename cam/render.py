"""Overlays, PNG/.npy writing and figure grids.

The overlay is computed here in RGB with matplotlib's jet colour map (high = red, low = blue):
grad-cam's `show_cam_on_image` defaults to OpenCV's BGR order, which turns red into blue when
saved with an RGB writer. Grid cells are placed at computed positions (no tight bbox), so a
grid's pixel size and cell positions are known in advance and tests can check them.
"""

from __future__ import annotations

import dataclasses
import io
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from smix.io import atomic_save


def overlay(pixels: torch.Tensor, maps: torch.Tensor, image_weight: float = 0.5) -> np.ndarray:
    """uint8 [B,H,W,3] RGB: `image_weight`·image + (1-image_weight)·jet(map), batched."""
    import matplotlib

    heat = matplotlib.colormaps["jet"](maps.clamp(0, 1).numpy())[..., :3]  # [B,H,W,3] RGB
    img = pixels.clamp(0, 1).permute(0, 2, 3, 1).numpy()
    out = image_weight * img + (1.0 - image_weight) * heat
    return np.round(out * 255).astype(np.uint8)


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """[B,3,H,W] in [0,1] -> uint8 [B,H,W,3]."""
    return np.round(pixels.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)


def save_png(path: str | os.PathLike, rgb: np.ndarray) -> None:
    """Write an RGB uint8 array as PNG, atomically (fast zlib level: these are many files)."""
    atomic_save(path, lambda tmp: Image.fromarray(rgb, "RGB").save(tmp, format="PNG",
                                                                   compress_level=1))


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """np.save through a file handle, since np.save(name) appends `.npy` to a temp name."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    atomic_save(path, write)


def read_png(path: str | os.PathLike) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@dataclasses.dataclass(frozen=True)
class GridLayout:
    """Sizes in inches at `dpi`; rows top to bottom, columns left to right."""

    rows: int
    cols: int
    cell: float = 1.6
    label_width: float = 1.5
    title_height: float = 0.4
    caption_height: float = 0.22
    gap: float = 0.06
    dpi: int = 100

    @property
    def size_in(self) -> tuple[float, float]:
        width = self.label_width + self.cols * (self.cell + self.gap) + self.gap
        height = self.title_height + self.rows * (self.cell + self.caption_height + self.gap)
        return width, height

    @property
    def size_px(self) -> tuple[int, int]:
        """(width, height) of the saved PNG in pixels."""
        w, h = self.size_in
        return int(round(w * self.dpi)), int(round(h * self.dpi))

    def cell_rect(self, row: int, col: int) -> tuple[float, float, float, float]:
        """(left, bottom, width, height) of a cell in figure fractions."""
        w, h = self.size_in
        left = self.label_width + col * (self.cell + self.gap) + self.gap
        top = self.title_height + row * (self.cell + self.caption_height + self.gap)
        return left / w, 1 - (top + self.cell) / h, self.cell / w, self.cell / h


def render_grid(cells: Sequence[Sequence[np.ndarray | None]], row_labels: Sequence[str],
                col_labels: Sequence[str], captions: Sequence[Sequence[str]] | None = None,
                layout: GridLayout | None = None) -> bytes:
    """PNG bytes of a grid: one RGB image per cell (None leaves it blank), labelled rows and
    columns, an optional caption under each cell."""
    from matplotlib.figure import Figure  # no pyplot: renders with Agg, no global state

    rows, cols = len(cells), max((len(r) for r in cells), default=0)
    lay = layout or GridLayout(rows, cols)
    fig = Figure(figsize=lay.size_in, dpi=lay.dpi)
    w, h = lay.size_in
    for r in range(rows):
        left, bottom, _, ch = lay.cell_rect(r, 0)
        fig.text(0.08 / w, bottom + ch / 2, row_labels[r], ha="left", va="center", fontsize=8,
                 wrap=True)
        for c in range(cols):
            image = cells[r][c] if c < len(cells[r]) else None
            if image is None:
                continue
            ax = fig.add_axes(lay.cell_rect(r, c))
            ax.imshow(image, interpolation="nearest", aspect="auto")
            ax.set_axis_off()
            if captions is not None and captions[r][c]:
                ax.text(0.5, -0.02, captions[r][c], transform=ax.transAxes, ha="center",
                        va="top", fontsize=6.5)
    for c, label in enumerate(col_labels):
        left, bottom, cw, ch = lay.cell_rect(0, c)
        fig.text(left + cw / 2, 1 - 0.05 / h, label, ha="center", va="top", fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=lay.dpi)
    return buf.getvalue()


def save_grid(path: str | os.PathLike, cells: Sequence[Sequence[np.ndarray | None]],
              row_labels: Sequence[str], col_labels: Sequence[str],
              captions: Sequence[Sequence[str]] | None = None) -> GridLayout:
    """Render and write a grid PNG atomically; returns the layout used."""
    layout = GridLayout(len(cells), max((len(r) for r in cells), default=0))
    data = render_grid(cells, row_labels, col_labels, captions, layout)
    atomic_save(path, lambda tmp: tmp.write_bytes(data))
    return layout
