"""Label-preserving augmentation of world pairs: grid symmetries (D4) x colour and shape permutations.

The same transform is applied to both scenes, and the action is re-derived from the transformed pair
with `infer_action` (exact and unique), so the rewritten action text can never disagree with the images:
move directions and add relations rotate with the grid, swap order follows the new reading order.
"""

from __future__ import annotations

import numpy as np

from dynboot.world.actions import Action, infer_action
from dynboot.world.scene import WorldSpec


def transform_scene(spec: WorldSpec, scene: np.ndarray, d4: int, colour_perm: np.ndarray, shape_perm: np.ndarray) -> np.ndarray:
    """Apply one of the 8 grid symmetries (rotations 0-3, with a flip for 4-7) and the permutations."""
    g = np.asarray(scene).reshape(spec.grid, spec.grid)
    g = np.rot90(g, k=d4 % 4)
    if d4 >= 4:
        g = np.fliplr(g)
    flat = g.reshape(-1).copy()
    occupied = flat > 0
    shape, colour = np.divmod(flat[occupied] - 1, spec.n_colours)
    flat[occupied] = 1 + shape_perm[shape] * spec.n_colours + colour_perm[colour]
    return flat


def augment_pair(
    spec: WorldSpec, before: np.ndarray, after: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, Action]:
    """A random label-preserving variant of (before, after) and its action."""
    d4 = int(rng.integers(8))
    cp, sp = rng.permutation(spec.n_colours), rng.permutation(spec.n_shapes)
    a, b = transform_scene(spec, before, d4, cp, sp), transform_scene(spec, after, d4, cp, sp)
    action = infer_action(spec, a, b)
    if action is None:
        raise ValueError("augmented pair has no single action; the input pair was not a world transition")
    return a, b, action


def world_augmenter(spec: WorldSpec):
    """An augmenter for training batches of world image pairs: parse, transform, re-render, re-label.

    An inductive bias of the embedded world's data (real videos have no exact parser), so the train job
    turns it on only for world data.
    """
    from dynboot.data.example import Example
    from dynboot.world.render import parse, render

    def augment(examples: list[Example], rng: np.random.Generator) -> list[Example]:
        before = parse(spec, np.stack([e.before for e in examples]))
        after = parse(spec, np.stack([e.after for e in examples]))
        out = []
        for e, a0, b0 in zip(examples, before, after):
            a, b, action = augment_pair(spec, a0, b0, rng)
            out.append(Example(render(spec, a), render(spec, b), action.text(spec), e.meta))
        return out

    return augment
