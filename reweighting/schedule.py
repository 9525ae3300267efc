"""The temperature r over training, and whether reweighting is on at a step."""

from __future__ import annotations

import math


def temperature_at(step: int, *, target: float, start: float, warmup_steps: int, anneal_steps: int,
                   schedule: str) -> float:
    """r at ``step`` (1-based), for steps after the warm-up.

    constant: r = target. linear / cosine: r moves from ``start`` to ``target`` over ``anneal_steps``
    steps after the warm-up, then stays at target.
    """
    if schedule == "constant" or anneal_steps <= 0:
        return target
    progress = min(max(step - warmup_steps, 0) / anneal_steps, 1.0)
    if schedule == "linear":
        return start + (target - start) * progress
    if schedule == "cosine":
        return target + (start - target) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"unknown temperature schedule {schedule!r}")
