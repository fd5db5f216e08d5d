"""Exact scores of predictions on the embedded world (library code: `dynboot eval`, the train-time evaluator, the
quickstart and the benchmarks score through here, on predictions from `dynboot.method.predict`).

    preds = predict(fdp, idp, items, settings)
    world_scores(spec, fdp, items, preds, ns=[1, 2, 4, 8])   # {"fdp": best-of-N + greedy, "idp": captions}
    idp_eval(idp, examples, spec); fdp_eval(fdp, examples, spec); best_of_n_eval(fdp, idp, examples, spec, ns)

Candidates and greedy samples are scored from their codes, decoded by the FDP's own tokenizer and read back by the
world's exact parser: the same path for every backend and every caller.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from dynboot.eval.metrics import best_of_n_world, fdp_world_metrics, idp_world_metrics
from dynboot.data.example import Example
from dynboot.models.base import UnifiedModel
from dynboot.method.predict import Item, Prediction, PredictSettings, predict
from dynboot.world.actions import parse_action
from dynboot.world.render import parse
from dynboot.world.scene import WorldSpec

__all__ = ["items_of", "scenes_of_codes", "world_scores", "idp_eval", "fdp_eval", "best_of_n_eval"]


def items_of(examples: Sequence[Example]) -> list[Item]:
    """Evaluation items of examples, indexed by position (the index seeds the item's samples)."""
    return [Item(i, e.before, e.action, e.after) for i, e in enumerate(examples)]


def scenes_of_codes(spec: WorldSpec, fdp: UnifiedModel, codes: np.ndarray) -> np.ndarray:
    """[..., L] codes -> [..., cells] world scenes through the FDP's decoder and the exact parser."""
    codes = np.asarray(codes)
    flat = torch.as_tensor(codes.reshape(-1, codes.shape[-1]), dtype=torch.int64)
    return parse(spec, fdp.tokenizer.decode(flat)).reshape(*codes.shape[:-1], -1)


def _scenes(spec: WorldSpec, fdp: UnifiedModel | None, codes: np.ndarray | None, images: np.ndarray | None):
    if images is not None:
        return parse(spec, np.stack([spec_frame(spec, im) for im in images]))
    if fdp is None or codes is None:
        raise ValueError("world scores need decoded images or the FDP that decodes the codes")
    return scenes_of_codes(spec, fdp, codes)


def world_scores(spec: WorldSpec, fdp: UnifiedModel | None, items: Sequence[Item], preds: Sequence[Prediction],
                 ns: Sequence[int] = ()) -> dict:
    """World metrics of predictions: "fdp" (best-of-N for `ns` over the candidates, "greedy", and
    "greedy_exact_per_item" 0/1 for paired comparisons), "idp" (captions), "errors" (items that failed).
    Candidates are read from their decoded images when the predictions carry them, else decoded by `fdp`."""
    by_index = {it.index: it for it in items}
    ok = [p for p in preds if not p.error]
    out: dict = {"items": len(items), "errors": len(preds) - len(ok)}
    with_after = [p for p in ok if by_index[p.index].after is not None]
    has_cand = lambda p: p.candidates is not None or p.candidate_images is not None  # noqa: E731
    has_greedy = lambda p: p.greedy is not None or p.greedy_image is not None  # noqa: E731
    has_fdp = any(has_cand(p) or has_greedy(p) for p in with_after)
    if has_fdp:
        its = [by_index[p.index] for p in with_after]
        before = parse(spec, np.stack([spec_frame(spec, it.before) for it in its]))
        target = parse(spec, np.stack([spec_frame(spec, it.after) for it in its]))
        types = [parse_action(spec, it.action).type for it in its]
        fdp_out: dict = {}
        if ns and all(has_cand(p) for p in with_after):
            cand = np.stack([_scenes(spec, fdp, p.candidates, p.candidate_images) for p in with_after])
            fdp_out = best_of_n_world(cand, np.stack([p.scores for p in with_after]), before, target, types, ns)
            for p, c, t in zip(with_after, cand, target):
                p.correct = (c == t).all(-1)  # per candidate, for the caller's tables and grids
        if all(has_greedy(p) for p in with_after):
            greedy = np.concatenate([_scenes(spec, fdp, None if p.greedy is None else p.greedy[None],
                                             None if p.greedy_image is None else p.greedy_image[None])
                                     for p in with_after])
            fdp_out["greedy"] = fdp_world_metrics(greedy, before, target, types)
            fdp_out["greedy_exact_per_item"] = (greedy == target).all(-1).astype(int).tolist()
        out["fdp"] = fdp_out
    captioned = [p for p in ok if p.caption is not None]
    if captioned:
        out["idp"] = idp_world_metrics(spec, [p.caption for p in captioned], [by_index[p.index].action for p in captioned])
    return out


def spec_frame(spec: WorldSpec, image: np.ndarray) -> np.ndarray:
    """A frame at the world's own size (the parser reads world frames; other sizes are resized by nearest)."""
    px = spec.image_px
    if image.shape[:2] == (px, px):
        return image
    from dynboot.io.images import ImagePolicy

    return ImagePolicy(kind="squash", size=px, resample="nearest").apply(image)


def idp_eval(idp: UnifiedModel, examples: list[Example], spec: WorldSpec) -> dict:
    items = items_of(examples)
    preds = predict(None, idp, items, PredictSettings(n=0, greedy=False))
    return world_scores(spec, None, items, preds)["idp"]


def fdp_eval(fdp: UnifiedModel, examples: list[Example], spec: WorldSpec, per_pair: bool = False) -> dict:
    """Greedy FDP predictions scored on the parsed scenes; `per_pair` adds "exact_per_pair" (0/1 per example)."""
    items = items_of(examples)
    scores = world_scores(spec, fdp, items, predict(fdp, None, items, PredictSettings(n=0, captions=False)))["fdp"]
    out = scores["greedy"]
    if per_pair:
        out["exact_per_pair"] = scores["greedy_exact_per_item"]
    return out


def best_of_n_eval(fdp: UnifiedModel, idp: UnifiedModel, examples: list[Example], spec: WorldSpec,
                   ns: Sequence[int] = (1, 2, 4, 8), temperature: float = 1.0, top_k: int = 0, seed: int = 0) -> dict:
    """Best-of-N world metrics for every N in `ns` from one set of max(ns) samples per pair."""
    items = items_of(examples)
    s = PredictSettings(n=max(ns), temperature=temperature, top_k=top_k, seed=seed, greedy=False, captions=False)
    out = world_scores(spec, fdp, items, predict(fdp, idp, items, s), ns)["fdp"]
    out.pop("greedy_exact_per_item", None)
    return out
