"""The reweighting room's configuration (``reweight:`` in a heft config)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class ReweightConfig:
    """Loss-based per-sample reweighting inside the data-parallel loss reduction."""

    strategy: str = "none"
    """none (plain token mean), linupper, quadratic, extremes, softmax (IR-DRO) or infobatch."""
    scope: str = "global"
    """global: weights normalised over the whole global batch, min/max from the previous step
    (layout-invariant); microbatch: statistics of the current microbatch across DP (the paper)."""
    delta: float = 1.0
    """Half-width d of the min-max normalised loss range [-d, d]."""
    temperature: float = 1.0
    """Softmax temperature r (target value after warm-up/annealing); larger is more uniform."""
    temperature_schedule: str = "constant"
    """constant, linear or cosine from temperature_start to temperature over anneal_steps."""
    temperature_start: float = 100.0
    anneal_steps: int = 0
    warmup_steps: int = 0
    """Steps at the start with reweighting off (uniform weights; statistics are still gathered)."""
    warmup_mode: str = "off"
    """off: uniform weights during warm-up; hold: reweight with r = temperature_start."""
    keep_ratio: float = 0.5
    """infobatch: probability of keeping a below-mean-loss sample (kept ones weigh 1/keep_ratio)."""
    running_mean_momentum: float = 0.9
    """infobatch: EMA momentum of the running mean loss samples are compared with."""
    log_sample_weights: bool = False
    """Write every sample's (domain, index, loss, weight) per step under RUN_DIR/sample_weights/."""

    def check(self) -> None:
        from heft.reweighting.strategies import STRATEGIES

        if self.strategy != "none" and self.strategy not in STRATEGIES:
            raise ValueError(
                f"reweight.strategy={self.strategy!r} is unknown; known: none, {', '.join(sorted(STRATEGIES))}"
            )
        if self.scope not in ("global", "microbatch"):
            raise ValueError(f"reweight.scope must be global or microbatch, got {self.scope!r}")
        for name in ("temperature", "temperature_start", "delta"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"reweight.{name} must be a positive finite number, got {value}")
        if self.temperature_schedule not in ("constant", "linear", "cosine"):
            raise ValueError(
                f"reweight.temperature_schedule must be constant, linear or cosine, got {self.temperature_schedule!r}"
            )
        if self.warmup_mode not in ("off", "hold"):
            raise ValueError(f"reweight.warmup_mode must be off or hold, got {self.warmup_mode!r}")
        if not 0 < self.keep_ratio <= 1:
            raise ValueError(f"reweight.keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if not 0 <= self.running_mean_momentum < 1:
            raise ValueError(f"reweight.running_mean_momentum must be in [0, 1), got {self.running_mean_momentum}")
        if self.warmup_steps < 0 or self.anneal_steps < 0:
            raise ValueError("reweight.warmup_steps and reweight.anneal_steps must be >= 0")
