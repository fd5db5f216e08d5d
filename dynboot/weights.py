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

And one that keeps the paper's weights but removes their bias by the end of training:
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
    from dynboot.models.base import Example, UnifiedModel

Strategy = Literal["none", "relative", "floor", "relative_annealed", "predicted_change", "entropy"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)
DATA_STRATEGIES = ("relative", "floor", "relative_annealed")  # from the ground-truth pair (label-dependent)
MODEL_STRATEGIES = ("predicted_change", "entropy")  # from the model's stop-gradient prediction


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
    mean = d.mean(-1, keepdim=True)
    rel = torch.where(mean > 0, d / mean.clamp(min=1e-12), torch.zeros_like(d))
    if strategy == "floor":
        return torch.where(mean > 0, rel + floor, torch.ones_like(d))
    return 1.0 + scale * rel


def recognition_weights(tokenizer: ImageTokenizer, before: np.ndarray, after: np.ndarray,
                        strategy: Strategy = "relative", floor: float = 0.05, scale: float = 1.0) -> torch.Tensor:
    """[B, L] weights for the FDP target tokens of each (before, after) pair (the paper's strategies)."""
    if strategy == "none" or (strategy == "relative_annealed" and scale == 0):
        return torch.ones((len(before), tokenizer.tokens_per_image))
    return weights_from_distance(change_distance(tokenizer, before, after), strategy, floor, scale)


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
                  alpha: float = 4.0, progress: float = 0.0, anneal: float = 0.5) -> torch.Tensor | None:
    """[B, L] FDP target-token weights of one training batch, or None for plain CE.

    What the training core calls once per FDP step, before `model.collate(examples, "fdp", weights)`.
    `progress` = step / steps (for `relative_annealed`). A model-based strategy costs one no-grad forward
    of the batch (`model.image_logprobs`); the loss's own forward could give the same numbers for free
    (its logits, detached, at the target positions) if the core computed the weights inside the loss.
    """
    _check(strategy)
    if strategy == "none":
        return None
    before = np.stack([e.before for e in examples])
    after = np.stack([e.after for e in examples])
    if strategy in DATA_STRATEGIES:
        scale = anneal_scale(progress, anneal) if strategy == "relative_annealed" else 1.0
        return recognition_weights(model.tokenizer, before, after, strategy, floor, scale)
    logprobs = model.image_logprobs(before, [e.action for e in examples], after)
    return model_weights(logprobs, model.tokenizer.encode(before), strategy, alpha)
