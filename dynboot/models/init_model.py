"""`dynboot init-model`: a random checkpoint of a real backend, with its real tokenizer layout and image-code
ranges, so every real-model path (relabel, train, serve, eval) runs before any weights are downloaded.

    dynboot init-model backend=liquid out=/tmp/liquid-tiny                 # seconds: a 2-layer model for tests
    dynboot init-model backend=anole out=/tmp/anole-shapes size=shapes     # the real vocabulary and image codes
    dynboot init-model backend=janus out=/ckpt/janus-7b size=full device=cuda dtype=bfloat16   # the real shapes

Sizes: `tiny` (32 px images, 16 codes of 64, a word-level vocabulary: for tests); `shapes` (the real vocabulary
-- Liquid 256000 + 8192 codes, Anole 65536 with 8192 image tokens, Janus 102400 with 16384 codes -- the real
image size and codes per image, 1024 at 512 px / 576 at 384 px, with a 2-layer, 64-wide transformer and a
narrow VQ: for CPU memory benchmarks); `full` (the released architecture: Liquid-7B, Chameleon-7B,
Janus-Pro-7B; `full-1b` = Janus-Pro-1B), random weights, for GPU smoke runs. `out` may be a URI.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

from pydantic import Field

from dynboot.io import storage
from dynboot.config import Config
from dynboot.models.registry import backend_class


class InitModelConfig(Config):
    """A random checkpoint of a real backend (dynboot init-model)."""

    backend: Literal["anole", "liquid", "janus"] = Field(..., description="Model family.")
    out: str = Field(..., description="Checkpoint directory to write (local or URI).")
    size: Literal["tiny", "shapes", "full", "full-1b"] = Field(
        "tiny", description="tiny (tests) | shapes (real vocabulary and image codes, tiny transformer) | full "
        "(released architecture) | full-1b (Janus-Pro-1B, janus only).")
    seed: int = Field(0, description="Seed of the random weights.")
    device: str = Field("cpu", description="Where the weights are built (cuda for size=full).")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="Weights dtype; auto = float32 on CPU, "
                                                          "bfloat16 on a GPU.")


def init_model(cfg: InitModelConfig) -> str:
    if cfg.size == "full-1b" and cfg.backend != "janus":
        raise ValueError("size=full-1b is Janus-Pro-1B: janus only")
    model = backend_class(cfg.backend).create(cfg.size, seed=cfg.seed, device=cfg.device,
                                              dtype=None if cfg.dtype == "auto" else cfg.dtype)
    if not storage.is_uri(cfg.out):
        model.save(Path(cfg.out))
        return cfg.out
    with tempfile.TemporaryDirectory(prefix="dynboot-init-") as tmp:
        model.save(Path(tmp))
        return storage.copy_dir(tmp, cfg.out)


def main(cfg: InitModelConfig) -> None:
    out = init_model(cfg)
    print(f"wrote a random {cfg.backend} checkpoint (size={cfg.size}) to {out}; load it with load_model({out!r}) "
          f"or model_path={out} backend={cfg.backend}")
