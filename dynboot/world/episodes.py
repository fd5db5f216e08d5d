"""Episodes: a sequence of actions applied to a scene, rendered frame by frame with motion.

Each key state is held for `hold` frames; between two key states `transition` frames show the action
happening (objects slide, fade out, fade in). The ground truth of an episode is its key states, the
frame range each is held for, and the actions between them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dynboot.world.actions import Action, apply_action, random_action
from dynboot.world.render import render_sprites
from dynboot.world.scene import WorldSpec, objects, random_scene


@dataclass
class Episode:
    scenes: list[np.ndarray]  # key states, len = len(actions) + 1
    actions: list[Action]
    frames: np.ndarray  # [T, H, W, 3] uint8
    segments: list[tuple[int, int]]  # [start, end) frame range of each key state


def _sprites(spec: WorldSpec, scene: np.ndarray, skip: set[int] = frozenset()) -> list[tuple[int, float, float, float]]:
    return [(k, *map(float, spec.rc(c)), 1.0) for k, c in objects(scene).items() if k not in skip]


def transition_frames(spec: WorldSpec, before: np.ndarray, after: np.ndarray, action: Action, n: int) -> list[np.ndarray]:
    """`n` in-between frames showing `action` (excluding both key states)."""
    moving = {action.obj} | ({action.other} if action.other else set())
    static = _sprites(spec, before, skip=moving)
    src, dst = objects(before), objects(after)
    frames = []
    for i in range(1, n + 1):
        t = i / (n + 1)
        sprites = list(static)
        for k in moving:
            if k in src and k in dst:  # slides (move, swap)
                (r0, c0), (r1, c1) = spec.rc(src[k]), spec.rc(dst[k])
                sprites.append((k, r0 + t * (r1 - r0), c0 + t * (c1 - c0), 1.0))
            elif k in src:  # vanishes (remove)
                sprites.append((k, *map(float, spec.rc(src[k])), 1.0 - t))
            else:  # appears (add)
                sprites.append((k, *map(float, spec.rc(dst[k])), t))
        frames.append(render_sprites(spec, sprites))
    return frames


def make_episode(
    spec: WorldSpec, rng: np.random.Generator, n_actions: int, hold: int = 4, transition: int = 4,
    avoid: set[bytes] | None = None,
) -> Episode:
    """A random episode; transitions whose (before, after) key is in `avoid` are resampled."""
    scene = random_scene(spec, rng)
    scenes, actions = [scene], []
    while len(actions) < n_actions:
        for _ in range(50):
            action = random_action(spec, scene, rng)
            if action is None:
                break
            nxt = apply_action(spec, scene, action)
            if avoid is None or pair_key(scene, nxt) not in avoid:
                break
        else:
            action = None
        if action is None:  # dead end (or only held-out transitions): start the episode over
            return make_episode(spec, rng, n_actions, hold, transition, avoid)
        scenes.append(nxt)
        actions.append(action)
        scene = nxt
    frames, segments = [], []
    for i, s in enumerate(scenes):
        key = render_sprites(spec, _sprites(spec, s))
        segments.append((len(frames), len(frames) + hold))
        frames.extend([key] * hold)
        if i < len(actions):
            frames.extend(transition_frames(spec, s, scenes[i + 1], actions[i], transition))
    return Episode(scenes, actions, np.stack(frames), segments)


def pair_key(before: np.ndarray, after: np.ndarray) -> bytes:
    """Identity of a transition, for keeping splits disjoint."""
    return np.asarray(before, dtype=np.int8).tobytes() + b"|" + np.asarray(after, dtype=np.int8).tobytes()
