"""One training pair as every stage hands it around: a plain record (numpy only), below the model layer so
that data loaders, the world and the models all share it without importing torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Example:
    """One training pair, as the data loaders hand it to `collate`."""

    before: np.ndarray  # [H, W, 3] uint8 (any size: the tokenizer's policy applies)
    after: np.ndarray  # [H, W, 3] uint8
    action: str
    meta: dict[str, Any] = field(default_factory=dict)  # source, id, provenance tag...
