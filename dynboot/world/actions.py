"""Actions of the embedded world, in words and as structures, both ways.

Templates (one per type; each leaves a different change signature, so the action is a function of
(before, after) and the after a function of (before, action)):

    move the <colour> <shape> <up|down|left|right>         one cell; the target is in the grid and empty
    remove the <colour> <shape>
    add a <colour> <shape> <left of|right of|above|below> the <colour> <shape>
        the new kind is not in the scene; the target cell is empty and its only occupied neighbour is
        the reference, so the relation is unique
    swap the <colour> <shape> and the <colour> <shape>      the first in reading order comes first
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dynboot.world.scene import COLOURS, DIRECTIONS, SHAPES, WorldSpec, objects

ACTION_TYPES = ("move", "remove", "add", "swap")
RELATIONS = {"left of": "left", "right of": "right", "above": "up", "below": "down"}
_RELATION_OF_DIRECTION = {d: r for r, d in RELATIONS.items()}
WORDS = ("move", "remove", "add", "swap", "the", "a", "and", "of", "above", "below", *DIRECTIONS, *SHAPES, *COLOURS)


class ActionError(ValueError):
    """Text that is not an action of this world, or an action whose preconditions fail."""


@dataclass(frozen=True)
class Action:
    type: str
    obj: int  # object kind acted on (the new kind for add, the first in reading order for swap)
    direction: str | None = None  # move: where to; add: where the new object is relative to `ref`
    ref: int | None = None  # add: the reference object
    other: int | None = None  # swap: the second object

    def text(self, spec: WorldSpec) -> str:
        o = spec.name(self.obj)
        if self.type == "move":
            return f"move the {o} {self.direction}"
        if self.type == "remove":
            return f"remove the {o}"
        if self.type == "add":
            return f"add a {o} {_RELATION_OF_DIRECTION[self.direction]} the {spec.name(self.ref)}"
        return f"swap the {o} and the {spec.name(self.other)}"

    def fields(self, spec: WorldSpec) -> dict[str, str | None]:
        """Named fields for structured matching (evaluation)."""
        name = lambda k: spec.name(k) if k is not None else None  # noqa: E731
        return {"type": self.type, "obj": name(self.obj), "direction": self.direction,
                "ref": name(self.ref), "other": name(self.other)}


def _kind(spec: WorldSpec, colour: str, shape: str) -> int:
    if colour not in COLOURS[: spec.n_colours] or shape not in SHAPES[: spec.n_shapes]:
        raise ActionError(f"unknown object {colour!r} {shape!r}")
    return spec.kind(SHAPES.index(shape), COLOURS.index(colour))


def parse_action(spec: WorldSpec, text: str) -> Action:
    """Exact inverse of `Action.text`; raises ActionError for anything else."""
    w = text.strip().lower().split()
    try:
        if len(w) == 5 and w[:2] == ["move", "the"] and w[4] in DIRECTIONS:
            return Action("move", _kind(spec, w[2], w[3]), direction=w[4])
        if len(w) == 4 and w[:2] == ["remove", "the"]:
            return Action("remove", _kind(spec, w[2], w[3]))
        if w[:2] == ["add", "a"] and len(w) in (8, 9) and w[-3] == "the":
            rel = " ".join(w[4:-3])
            if rel in RELATIONS:
                return Action("add", _kind(spec, w[2], w[3]), direction=RELATIONS[rel], ref=_kind(spec, w[-2], w[-1]))
        if len(w) == 8 and w[:2] == ["swap", "the"] and w[4:6] == ["and", "the"]:
            return Action("swap", _kind(spec, w[2], w[3]), other=_kind(spec, w[6], w[7]))
    except ActionError as err:
        raise ActionError(f"{text!r}: {err}") from None
    raise ActionError(f"{text!r} is not an action of this world")


def _step(spec: WorldSpec, cell: int, direction: str) -> int | None:
    r, c = spec.rc(cell)
    dr, dc = DIRECTIONS[direction]
    return spec.cell(r + dr, c + dc)


def apply_action(spec: WorldSpec, scene: np.ndarray, action: Action) -> np.ndarray:
    """The scene after `action`; raises ActionError if a precondition fails."""
    objs = objects(scene)
    out = scene.copy()
    if action.type in ("move", "remove", "swap") and action.obj not in objs:
        raise ActionError(f"{spec.name(action.obj)} is not in the scene")
    if action.type == "move":
        src = objs[action.obj]
        dst = _step(spec, src, action.direction)
        if dst is None or scene[dst]:
            raise ActionError(f"cannot move the {spec.name(action.obj)} {action.direction}")
        out[src], out[dst] = 0, action.obj
    elif action.type == "remove":
        out[objs[action.obj]] = 0
    elif action.type == "add":
        if action.obj in objs or action.ref not in objs:
            raise ActionError("add needs a new object and a present reference")
        dst = _step(spec, objs[action.ref], action.direction)
        if dst is None or scene[dst] or [n for n in spec.neighbours(dst) if scene[n]] != [objs[action.ref]]:
            raise ActionError("add needs an empty target whose only occupied neighbour is the reference")
        out[dst] = action.obj
    elif action.type == "swap":
        if action.other not in objs or objs[action.obj] >= objs[action.other]:
            raise ActionError("swap needs two present objects, the first in reading order first")
        a, b = objs[action.obj], objs[action.other]
        out[a], out[b] = scene[b], scene[a]
    else:
        raise ActionError(f"unknown action type {action.type!r}")
    return out


def valid_actions(spec: WorldSpec, scene: np.ndarray) -> list[Action]:
    """Every action whose preconditions hold in `scene` (the candidate set for constrained decoding)."""
    objs = objects(scene)
    kinds = sorted(objs, key=objs.get)  # reading order
    out = []
    for k in kinds:
        for d in DIRECTIONS:
            dst = _step(spec, objs[k], d)
            if dst is not None and not scene[dst]:
                out.append(Action("move", k, direction=d))
        out.append(Action("remove", k))
    absent = [k for k in range(1, spec.n_kinds + 1) if k not in objs]
    for ref in kinds:
        for d in DIRECTIONS:
            dst = _step(spec, objs[ref], d)
            if dst is None or scene[dst] or [n for n in spec.neighbours(dst) if scene[n]] != [objs[ref]]:
                continue
            out.extend(Action("add", k, direction=d, ref=ref) for k in absent)
    for i, a in enumerate(kinds):
        out.extend(Action("swap", a, other=b) for b in kinds[i + 1:])
    return out


def infer_action(spec: WorldSpec, before: np.ndarray, after: np.ndarray) -> Action | None:
    """The unique action taking `before` to `after`, or None if no single action does."""
    changed = np.flatnonzero(before != after)
    cand: Action | None = None
    if len(changed) == 1:
        c = int(changed[0])
        if before[c] and not after[c]:
            cand = Action("remove", int(before[c]))
        elif after[c] and not before[c]:
            occupied = [n for n in spec.neighbours(c) if before[n]]
            if len(occupied) == 1:
                ref = occupied[0]
                direction = next(d for d in DIRECTIONS if _step(spec, ref, d) == c)
                cand = Action("add", int(after[c]), direction=direction, ref=int(before[ref]))
    elif len(changed) == 2:
        a, b = (int(x) for x in changed)
        if before[a] and before[b] and after[a] == before[b] and after[b] == before[a]:
            cand = Action("swap", int(before[a]), other=int(before[b]))
        else:
            src, dst = (a, b) if before[a] else (b, a)
            direction = next((d for d in DIRECTIONS if _step(spec, src, d) == dst), None)
            if direction is not None:
                cand = Action("move", int(before[src]), direction=direction)
    if cand is None:
        return None
    try:
        return cand if np.array_equal(apply_action(spec, before, cand), after) else None
    except ActionError:
        return None


def random_action(spec: WorldSpec, scene: np.ndarray, rng: np.random.Generator) -> Action | None:
    """A uniformly random action type, then a uniformly random valid action of that type."""
    n = int((scene > 0).sum())
    by_type: dict[str, list[Action]] = {}
    for a in valid_actions(spec, scene):
        if (a.type == "add" and n >= spec.max_objects) or (a.type == "remove" and n <= spec.min_objects):
            continue  # keep episodes within the spec's object counts
        by_type.setdefault(a.type, []).append(a)
    types = [t for t in ACTION_TYPES if t in by_type]
    if not types:
        return None
    options = by_type[types[int(rng.integers(len(types)))]]
    return options[int(rng.integers(len(options)))]
