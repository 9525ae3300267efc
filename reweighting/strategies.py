"""Per-sample weighting strategies, registered by name (``reweight.strategy``).

Two kinds:
* **softmax** strategies map losses to a score f and weight samples by exp(f / r), normalised over
  the batch (Sow et al.'s linupper / quadratic / extremes on min-max normalised losses h; IR-DRO's
  softmax on raw losses). ``upper_bound`` is the largest score the strategy can give; heft subtracts
  it before exponentiating so exp never overflows (normalisation cancels the shift).
* **direct** strategies return unnormalised weights whose expectation is 1 and the batch is
  normalised by its sample count (InfoBatch's unbiased pruning).

Adding a strategy takes one function and one decorator line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # the strategies work on the tensors they are given; importing this registry (the
    import torch   # config check does, in `heft train` before launch) does not import torch


@dataclass(frozen=True)
class Strategy:
    name: str
    kind: str
    """'softmax' (exp(f/r), self-normalised) or 'direct' (weights normalised by sample count)."""
    score: Callable
    uses_minmax: bool = False
    """Scores minmax-normalised losses h in [-delta, delta] rather than raw losses."""
    upper_bound: Callable[[float], float] | None = None
    """Largest possible score given delta; None means: shift by the batch's largest loss."""


STRATEGIES: dict[str, Strategy] = {}


def softmax_strategy(name: str, *, uses_minmax: bool, upper_bound=None):
    def register(fn):
        STRATEGIES[name] = Strategy(name, "softmax", fn, uses_minmax, upper_bound)
        return fn
    return register


def direct_strategy(name: str):
    def register(fn):
        STRATEGIES[name] = Strategy(name, "direct", fn)
        return fn
    return register


def minmax_normalise(losses: torch.Tensor, lo: float, hi: float, delta: float) -> torch.Tensor:
    """h = 2d*l/(max-min) - d*(max+min)/(max-min), denominator floored at 1e-6, clamped to [-d, d]
    (the clamp only acts when min/max come from another batch, as in the global scope)."""
    span = max(hi - lo, 1e-6)
    h = 2 * delta * losses / span - delta * (hi + lo) / span
    return h.clamp(-delta, delta)


# Sow et al. (ICLR 2025) ---------------------------------------------------------------------------
@softmax_strategy("linupper", uses_minmax=True, upper_bound=lambda d: d)
def linupper(h, losses, delta):
    """Down-weights low-loss (redundant) samples; the paper's preferred strategy."""
    return (h + delta).clamp(max=delta)


@softmax_strategy("quadratic", uses_minmax=True, upper_bound=lambda d: 1.0)
def quadratic(h, losses, delta):
    """Favours mid losses ("mid" in the authors' code)."""
    return 1 - h**2 / delta**2


@softmax_strategy("extremes", uses_minmax=True, upper_bound=lambda d: d)
def extremes(h, losses, delta):
    """Favours both tails."""
    return h.abs()


# IR-DRO --------------------------------------------------------------------------------------------
@softmax_strategy("softmax", uses_minmax=False)
def softmax(h, losses, delta):
    """w = softmax(l / tau) with tau the temperature r."""
    return losses


# InfoBatch -----------------------------------------------------------------------------------------
@direct_strategy("infobatch")
def infobatch(losses, running_mean, keep_ratio, uniform):
    """Samples below the running mean loss are kept with probability keep_ratio and rescaled by
    1/keep_ratio (pruned ones weigh 0); the rest weigh 1. ``uniform`` holds each sample's
    layout-independent random draw in [0, 1)."""
    below = losses < running_mean
    kept = uniform < keep_ratio
    weights = losses.new_ones(losses.shape)
    weights[below & kept] = 1.0 / keep_ratio
    weights[below & ~kept] = 0.0
    return weights


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise KeyError(f"unknown reweight.strategy {name!r}; known: none, {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name]
