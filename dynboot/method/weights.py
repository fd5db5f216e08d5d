"""Recognition weights: per FDP target image token, how much learning signal that position gets.

The paper's Eq. 2 (label-dependent, computed from the ground-truth pair):

    d_l = ||z_before(l) - z_after(l)||^2      z = the tokenizer's pre-quantisation features
    relative:  w_l = 1 + d_l / mean(d)        floor:  w_l = d_l / mean(d) + floor        none: w_l = 1

The weight of such a token depends on its own label (changed or not), so the weighted CE at a position is
minimised by q(y) proportional to p(y) * w(y), not by p(y): where the model is unsure whether a cell changes,
it is pushed towards changing it (over-editing). That pays off when a model over-copies (real images, where
"unchanged" is never exact); a model that copies well only over-edits (the tiny world model, which has a
copy feature: quickstart row 3, relative 0.12 vs plain 0.54 exact).

Label-independent weights keep the per-position minimiser at q = p: if w_l is a function of what the
model is given at position l (before image, action, the earlier target codes under teacher forcing) and
not of y_l, then E_y[w_l * -log q(y_l)] = w_l * CE(p, q). They still move learning signal between positions,
which is what helps a model that is far from converged. The ones here read the model's own stop-gradient
teacher-forced prediction q_l (`UnifiedModel.image_logprobs`, one no-grad forward per step):

- `predicted_change`: w_l = 1 + alpha * (1 - q_l(before code at l)), the model's probability that cell l
  changes. Cells the model is sure to copy keep weight ~1; cells it thinks may change (rightly: the edit;
  wrongly: an over-edit site) get up to 1 + alpha, so both "change here" and "leave this alone" are learnt
  where they are in question.
- `entropy`: w_l = 1 + alpha * H(q_l) / log K, the model's uncertainty at l whatever the before code.

And two that keep the paper's weights but remove or weaken their bias:
- `relative_spread`: w = 1 + D / mean(D), D = the 3x3 max of d over the token grid: a change lends its
  weight to its neighbours, so around a change the weight no longer says which cell changed (it still
  says that something near it did).
- `causal_spread`: w_l = 1 + alpha * max over the 3x3 neighbours j of l that come before it in raster order of
  W'[b_j, y_j] (W' = D / mean(D), a fixed scale): the labels it reads are the earlier codes, which teacher
  forcing gives the model as input, so it is label-independent at l. After a change, the cells around it
  that follow get the signal: the second cell of a move (the object must arrive / leave there, decided
  given the first), and the unchanged neighbours of an edit that must stay.
- `relative_annealed`: w = 1 + s(t) * d / mean(d), s falling linearly from 1 to 0 over the first
  `anneal` fraction of the steps, plain CE after. Biased while s > 0.

When each helps (measured on the embedded world; `python -m jobs.bench_weighting`, README table):
see the README's "Recognition weighting" section; in short, the label-independent ones never make the model
over-edit, and help while a model is undertrained on the edited cells; `relative` helps only an
over-copying model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, get_args

import numpy as np
import torch

from dynboot.models.base import ImageTokenizer

if TYPE_CHECKING:
    from dynboot.data.example import Example
    from dynboot.models.base import UnifiedModel

Strategy = Literal["none", "relative", "floor", "relative_spread", "relative_annealed", "causal_spread",
                   "predicted_change", "entropy"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)
DATA_STRATEGIES = ("relative", "floor", "relative_spread", "relative_annealed")  # from the ground-truth pair (label-dependent)
MODEL_STRATEGIES = ("predicted_change", "entropy")  # from the model's stop-gradient prediction
CODE_STRATEGIES = ("causal_spread",)  # from code distances (a fixed scale, no image mean)
LABEL_INDEPENDENT = ("none", "causal_spread", *MODEL_STRATEGIES)  # w_l never reads the label at l


def _check(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown weighting strategy {strategy!r}; choose one of {STRATEGIES}")


def change_distance(tokenizer: ImageTokenizer, before: np.ndarray, after: np.ndarray) -> torch.Tensor:
    """[B, L] squared L2 distance between the pre-quantisation features of before and after."""
    fa, fb = tokenizer.features(before).float(), tokenizer.features(after).float()
    return ((fa - fb) ** 2).sum(-1)


def weights_from_distance(d: torch.Tensor, strategy: Strategy = "relative", floor: float = 0.05,
                          scale: float = 1.0) -> torch.Tensor:
    """[B, L] token weights from [B, L] distances (the paper's strategies). A pair with no change gets weight
    1 everywhere. `scale` multiplies the relative part (`relative_annealed`'s schedule)."""
    _check(strategy)
    d = d.float()
    if strategy == "none":
        return torch.ones_like(d)
    if strategy not in DATA_STRATEGIES:
        raise ValueError(f"{strategy!r} weights come from the model's prediction (model_weights), not from a distance")
    if strategy == "relative_spread":
        d = spread(d)
    mean = d.mean(-1, keepdim=True)
    rel = torch.where(mean > 0, d / mean.clamp(min=1e-12), torch.zeros_like(d))
    if strategy == "floor":
        return torch.where(mean > 0, rel + floor, torch.ones_like(d))
    return 1.0 + scale * rel


def spread(d: torch.Tensor) -> torch.Tensor:
    """[B, L] -> [B, L]: the max over each token's 3x3 neighbourhood on the square token grid."""
    side = int(round(d.shape[-1] ** 0.5))
    if side * side != d.shape[-1]:
        raise ValueError(f"relative_spread needs a square token grid, got {d.shape[-1]} tokens per image")
    grid = d.reshape(-1, 1, side, side)
    return torch.nn.functional.max_pool2d(grid, 3, stride=1, padding=1).reshape(d.shape)


def causal_neighbour_max(d: torch.Tensor) -> torch.Tensor:
    """[B, L] -> [B, L]: at each token the max of d over its 3x3 neighbours that precede it in raster order
    (up-left, up, up-right, left; 0 where there are none). Never reads d at the token itself or after it."""
    side = int(round(d.shape[-1] ** 0.5))
    if side * side != d.shape[-1]:
        raise ValueError(f"causal_spread needs a square token grid, got {d.shape[-1]} tokens per image")
    g = torch.nn.functional.pad(d.reshape(-1, side, side), (1, 1, 1, 0))  # one row above, one column each side
    up_left, up, up_right = g[:, :-1, :-2], g[:, :-1, 1:-1], g[:, :-1, 2:]
    left = g[:, 1:, :-2]
    return torch.stack([up_left, up, up_right, left]).amax(0).reshape(d.shape)


def recognition_weights(tokenizer: ImageTokenizer, before: np.ndarray, after: np.ndarray,
                        strategy: Strategy = "relative", floor: float = 0.05, scale: float = 1.0) -> torch.Tensor:
    """[B, L] weights for the FDP target tokens of each (before, after) pair (the paper's strategies)."""
    if strategy == "none" or (strategy == "relative_annealed" and scale == 0):
        return torch.ones((len(before), tokenizer.tokens_per_image))
    return weights_from_distance(change_distance(tokenizer, before, after), strategy, floor, scale)


_CODE_DISTANCES: dict[int, torch.Tensor] = {}


def code_distances(tokenizer: ImageTokenizer) -> torch.Tensor:
    """[K, K] squared distance between the pre-quantisation features of every two codes: the features of an
    image made of code k alone, averaged over its tokens (exact for the world's grid tokenizer; a VQ tokenizer
    may provide `code_features()` [K, D], e.g. its codebook, instead of K decodes). Cached per tokenizer."""
    key = id(tokenizer)
    if key not in _CODE_DISTANCES:
        if hasattr(tokenizer, "code_features"):
            feats = tokenizer.code_features().float()
        else:
            K, L = tokenizer.codebook_size, tokenizer.tokens_per_image
            feats = tokenizer.features(tokenizer.decode(torch.arange(K)[:, None].expand(K, L))).float().mean(1)
        _CODE_DISTANCES[key] = torch.cdist(feats, feats) ** 2
    return _CODE_DISTANCES[key]


def code_change_table(tokenizer: ImageTokenizer) -> torch.Tensor:
    """[K, K] D[b, y] / mean of D over b != y: how far code y is from code b, on a fixed scale (`causal_spread`)."""
    d = code_distances(tokenizer)
    off_diag = d[~torch.eye(len(d), dtype=torch.bool)]
    return d / off_diag.mean().clamp(min=1e-12)


def anneal_scale(progress: float, anneal: float) -> float:
    """`relative_annealed`'s s(t): 1 at the start, 0 from `anneal` (a fraction of training) on."""
    return max(0.0, 1.0 - progress / anneal) if anneal > 0 else 0.0


def model_weights(logprobs: torch.Tensor, before_codes: torch.Tensor, strategy: Strategy, alpha: float) -> torch.Tensor:
    """[B, L] weights from the model's teacher-forced log-probs [B, L, K] and the before codes [B, L].

    Nothing here reads the target code at l, so the weight of a position cannot depend on its label.
    """
    _check(strategy)
    q = logprobs.detach().float().exp()
    if strategy == "predicted_change":
        keep = torch.gather(q, 2, before_codes.long().to(q.device)[..., None])[..., 0]
        return 1.0 + alpha * (1.0 - keep).clamp(0.0, 1.0)
    if strategy == "entropy":
        h = -(q * logprobs.detach().float().clamp(min=-1e4)).sum(-1)
        return 1.0 + alpha * h / float(np.log(q.shape[-1]))
    raise ValueError(f"{strategy!r} is not a model-based weighting; use recognition_weights")


def token_weights(model: "UnifiedModel", examples: list["Example"], strategy: Strategy, floor: float = 0.05,
                  alpha: float = 4.0, progress: float = 0.0, anneal: float = 0.5, scale: float = 1.0) -> torch.Tensor | None:
    """[B, L] FDP target-token weights of one training batch, or None for plain CE.

    What the training core calls once per FDP step, before `model.collate(examples, "fdp", weights)`.
    `progress` = step / steps (for `relative_annealed`); `scale` multiplies d / mean(d) in the relative
    strategies (1 = the paper-literal 1 + d / mean(d)). A model-based strategy costs one no-grad forward
    of the batch (`model.image_logprobs`); the loss's own forward could give the same numbers for free
    (its logits, detached, at the target positions) if the core computed the weights inside the loss.
    """
    _check(strategy)
    if strategy == "none":
        return None
    before = np.stack([e.before for e in examples])
    after = np.stack([e.after for e in examples])
    if strategy in DATA_STRATEGIES:
        scale *= anneal_scale(progress, anneal) if strategy == "relative_annealed" else 1.0
        return recognition_weights(model.tokenizer, before, after, strategy, floor, scale)
    if strategy == "causal_spread":
        change = code_change_table(model.tokenizer)[model.tokenizer.encode(before), model.tokenizer.encode(after)]
        return 1.0 + alpha * causal_neighbour_max(change)
    logprobs = model.image_logprobs(before, [e.action for e in examples], after)
    return model_weights(logprobs, model.tokenizer.encode(before), strategy, alpha)

