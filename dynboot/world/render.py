"""Pixels of the embedded world: renderer, exact parser, and the exact grid image tokenizer.

Every cell is `cell_px` pixels square on a flat beige background. The parser matches each cell to the
nearest of the 1 + n_kinds cell templates (L2), so it is exact on rendered frames and tolerant of
video-codec noise; the tokenizer is the parser (one token per cell) and round-trips through the renderer.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from dynboot.world.scene import WorldSpec

BACKGROUND = (235, 225, 200)
PALETTE = {  # colour name order matches scene.COLOURS
    0: (220, 40, 40), 1: (40, 170, 60), 2: (40, 80, 220), 3: (240, 200, 20), 4: (150, 50, 190), 5: (250, 130, 20),
}


def _shape_mask(shape: int, px: int) -> np.ndarray:
    """Boolean px x px mask of a shape (square, circle, triangle, cross), with a 1-px margin."""
    yy, xx = np.mgrid[0:px, 0:px] + 0.5
    m, c = 1, px / 2
    if shape == 0:
        return (yy >= m) & (yy <= px - m) & (xx >= m) & (xx <= px - m)
    if shape == 1:
        return (yy - c) ** 2 + (xx - c) ** 2 <= (c - m) ** 2
    if shape == 2:
        return (yy >= m) & (yy <= px - m) & (np.abs(xx - c) <= (yy - m) / 2 + 0.5)
    w = max(1.0, px / 8)  # arm half-width: thin enough that a cross never looks like a circle
    return ((np.abs(yy - c) <= w) | (np.abs(xx - c) <= w)) & (yy >= m) & (yy <= px - m) & (xx >= m) & (xx <= px - m)


@lru_cache(maxsize=16)
def _templates(grid: int, n_shapes: int, n_colours: int, px: int) -> np.ndarray:
    """[1 + n_kinds, px, px, 3] float32: cell appearance of empty, then each kind."""
    out = np.empty((1 + n_shapes * n_colours, px, px, 3), dtype=np.float32)
    out[:] = BACKGROUND
    for s in range(n_shapes):
        mask = _shape_mask(s, px)
        for c in range(n_colours):
            out[1 + s * n_colours + c][mask] = PALETTE[c]
    flat = out.reshape(len(out), -1)
    if len({row.tobytes() for row in flat}) != len(out):
        raise ValueError(f"cell_px={px} is too small to draw {n_shapes} distinct shapes")
    return out


def templates(spec: WorldSpec) -> np.ndarray:
    return _templates(spec.grid, spec.n_shapes, spec.n_colours, spec.cell_px)


def render(spec: WorldSpec, scene: np.ndarray) -> np.ndarray:
    """Scene -> RGB uint8 image [H, W, 3]."""
    g, px = spec.grid, spec.cell_px
    cells = templates(spec)[np.asarray(scene, dtype=np.int64)]  # [G*G, px, px, 3]
    img = cells.reshape(g, g, px, px, 3).transpose(0, 2, 1, 3, 4).reshape(g * px, g * px, 3)
    return img.astype(np.uint8)


def render_sprites(spec: WorldSpec, sprites: list[tuple[int, float, float, float]]) -> np.ndarray:
    """Frame with objects at fractional cell positions: sprites are (kind, row, col, alpha).

    Used for motion between key states (slides, fades); at integer positions with alpha 1 it equals
    `render` of the corresponding scene.
    """
    px = spec.cell_px
    img = np.empty((spec.image_px, spec.image_px, 3), dtype=np.float32)
    img[:] = BACKGROUND
    tmpl = templates(spec)
    for kind, r, c, alpha in sprites:
        y, x = int(round(r * px)), int(round(c * px))
        mask = np.any(tmpl[kind] != tmpl[0], axis=-1)
        ys, xs = np.nonzero(mask)
        ys, xs = ys + y, xs + x
        ok = (ys >= 0) & (ys < spec.image_px) & (xs >= 0) & (xs < spec.image_px)
        src = tmpl[kind][mask][ok]
        img[ys[ok], xs[ok]] = alpha * src + (1 - alpha) * img[ys[ok], xs[ok]]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def cell_pixels(spec: WorldSpec, images: np.ndarray) -> np.ndarray:
    """[B, H, W, 3] images -> [B, G*G, px*px*3] float32 per-cell pixels."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    b, g, px = images.shape[0], spec.grid, spec.cell_px
    if images.shape[1:] != (spec.image_px, spec.image_px, 3):
        raise ValueError(f"expected images of shape [B, {spec.image_px}, {spec.image_px}, 3], got {list(images.shape)}")
    x = images.astype(np.float32).reshape(b, g, px, g, px, 3).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, g * g, px * px * 3)


def parse(spec: WorldSpec, images: np.ndarray) -> np.ndarray:
    """Images -> scenes [B, G*G] (exact on renders; nearest template per cell on noisy frames)."""
    cells = cell_pixels(spec, images)  # [B, L, D]
    tmpl = templates(spec).reshape(1 + spec.n_kinds, -1)  # [K, D]
    d = (cells**2).sum(-1, keepdims=True) - 2 * cells @ tmpl.T + (tmpl**2).sum(-1)[None, None]
    return d.argmin(-1).astype(np.int64)


class GridTokenizer:
    """The exact image tokenizer of the embedded world: one code per cell, codebook = 1 + n_kinds.

    Same interface as the VQ tokenizers of real backends: encode / decode / features.
    """

    def __init__(self, spec: WorldSpec):
        self.spec = spec
        self.codebook_size = 1 + spec.n_kinds
        self.tokens_per_image = spec.cells
        self.image_size = spec.image_px

    def encode(self, images: np.ndarray) -> torch.Tensor:
        """[B, H, W, 3] uint8 -> codes [B, L] int64."""
        return torch.from_numpy(parse(self.spec, images))

    def decode(self, codes: torch.Tensor | np.ndarray) -> np.ndarray:
        """codes [B, L] -> [B, H, W, 3] uint8."""
        codes = np.asarray(codes.cpu() if isinstance(codes, torch.Tensor) else codes)
        return np.stack([render(self.spec, c) for c in codes.reshape(-1, self.tokens_per_image)])

    def features(self, images: np.ndarray) -> torch.Tensor:
        """Pre-quantisation features [B, L, D]: the raw cell pixels scaled to [0, 1]."""
        return torch.from_numpy(cell_pixels(self.spec, images) / 255.0)
