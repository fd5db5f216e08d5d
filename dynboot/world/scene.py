"""Scenes of the embedded world: objects (shape x colour, all distinct) on a G x G grid.

A scene is a flat int array of length G*G: 0 is an empty cell, else `1 + shape * n_colours + colour`.
That is also its exact image-token sequence (one token per cell, `dynboot.world.render.GridTokenizer`),
so a scene is plain, serialisable data (`scene.tolist()`).
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from dynboot.config import Config

SHAPES = ("square", "circle", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
DIRECTIONS = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}


class WorldSpec(Config):
    """Size of the world. Defaults are the ones tiny CPU models learn in minutes (see README)."""

    grid: int = Field(5, ge=3, le=16, description="Cells per side of the square grid.")
    n_shapes: int = Field(3, ge=1, le=len(SHAPES), description="How many of the shapes (square, circle, triangle, cross) are used.")
    n_colours: int = Field(4, ge=1, le=len(COLOURS), description="How many of the colours (red, green, blue, yellow, purple, orange) are used.")
    min_objects: int = Field(2, ge=2, description="Fewest objects in a scene (swap needs two).")
    max_objects: int = Field(4, ge=2, description="Most objects in a scene.")
    cell_px: int = Field(8, ge=6, le=64, description="Pixels per cell side in rendered images (even, for video codecs).")

    @property
    def cells(self) -> int:
        return self.grid * self.grid

    @property
    def n_kinds(self) -> int:
        """Distinct object kinds (shape, colour)."""
        return self.n_shapes * self.n_colours

    @property
    def image_px(self) -> int:
        return self.grid * self.cell_px

    def kind(self, shape: int, colour: int) -> int:
        return 1 + shape * self.n_colours + colour

    def shape_colour(self, kind: int) -> tuple[int, int]:
        return divmod(kind - 1, self.n_colours)

    def name(self, kind: int) -> str:
        """Words for an object kind, e.g. 'red circle'."""
        shape, colour = self.shape_colour(kind)
        return f"{COLOURS[colour]} {SHAPES[shape]}"

    def rc(self, cell: int) -> tuple[int, int]:
        return divmod(cell, self.grid)

    def cell(self, r: int, c: int) -> int | None:
        """Cell index of (r, c), or None outside the grid."""
        if 0 <= r < self.grid and 0 <= c < self.grid:
            return r * self.grid + c
        return None

    def neighbours(self, cell: int) -> list[int]:
        r, c = self.rc(cell)
        return [n for dr, dc in DIRECTIONS.values() if (n := self.cell(r + dr, c + dc)) is not None]


def random_scene(spec: WorldSpec, rng: np.random.Generator) -> np.ndarray:
    """A scene with min..max distinct objects at distinct cells."""
    n = int(rng.integers(spec.min_objects, min(spec.max_objects, spec.n_kinds, spec.cells) + 1))
    kinds = rng.choice(np.arange(1, spec.n_kinds + 1), size=n, replace=False)
    cells = rng.choice(spec.cells, size=n, replace=False)
    scene = np.zeros(spec.cells, dtype=np.int64)
    scene[cells] = kinds
    return scene


def objects(scene: np.ndarray) -> dict[int, int]:
    """kind -> cell, for every object in the scene."""
    return {int(scene[c]): int(c) for c in np.flatnonzero(scene)}
