"""The learning-rate schedule of both trainers: a linear warm-up, then a cosine from the peak down to a floor.

A cosine that ends at 0 stops learning in its last fifth or so (review 2026-12-07, third part, F1: the shipped
draft's validation agreement rose about 0.01 every 150 steps until the rate fell below a quarter of its peak, then
stood still). With a floor the last updates still learn, and a run extended by ``--resume`` starts from the floor.
"""

from __future__ import annotations

import math

DEFAULT_FLOOR = 0.1  # the floor as a share of the peak where none is given


def floor_of(peak: float, min_lr: float | None) -> float:
    """The floor: ``min_lr``, or ``DEFAULT_FLOOR`` times the peak where it is None."""
    return peak * DEFAULT_FLOOR if min_lr is None else min_lr


def warmup_cosine(step: int, total: int, peak: float, floor: float, warmup: int = 0) -> float:
    """The learning rate of update ``step`` (counted from 0) of ``total``.

    The first ``warmup`` updates rise linearly to ``peak``; then a cosine falls from ``peak`` to ``floor``, reached
    at the last update (``total - 1``) and kept beyond it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(total - 1 - warmup, 1))
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
