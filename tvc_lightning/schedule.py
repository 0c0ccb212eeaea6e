"""Learning-rate schedule of :class:`tvc_lightning.module.TVCModule`."""

from __future__ import annotations

import math
from collections.abc import Callable


def cosine_with_warmup(total_steps: int, warmup_ratio: float,
                       min_ratio: float = 0.0) -> Callable[[int], float]:
    """LR multiplier per step: linear warmup over ``warmup_ratio * total``, then cosine decay."""
    # Rounded before ceil: 0.07 * 100 is 7.000000000000001 in floating point, not 8 steps' worth.
    warmup = math.ceil(round(warmup_ratio * total_steps, 9))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
