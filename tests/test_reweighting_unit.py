"""Strategy weights against NumPy implementations of the spec's formulas; schedules; config errors.

The global scope needs no collective to compute weights (its statistics are lagged), so
LossReduction's weight computation is exercised here directly, one process, no process group.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from heft.launcher.config import ConfigError, ReweightConfig, load_config
from heft.reweighting.reduction import LossReduction, Roles, _uniform_hash
from heft.reweighting.schedule import temperature_at

RNG = np.random.default_rng(0)


def np_h(l, lo, hi, d):
    span = max(hi - lo, 1e-6)
    return np.clip(2 * d * l / span - d * (hi + lo) / span, -d, d)


NUMPY_SCORES = {
    "linupper": lambda l, lo, hi, d: np.minimum(np_h(l, lo, hi, d) + d, d),
    "quadratic": lambda l, lo, hi, d: 1 - np_h(l, lo, hi, d) ** 2 / d**2,
    "extremes": lambda l, lo, hi, d: np.abs(np_h(l, lo, hi, d)),
    "softmax": lambda l, lo, hi, d: l,
}


def reduction(strategy, **overrides) -> LossReduction:
    cfg = ReweightConfig(strategy=strategy, scope="global", **overrides)
    roles = Roles(dp_group=None, cp_group=None, cp_size=1, is_last_stage=True, tensor_rank0=True,
                  cp_rank0=True, dp_rank0=True, device=torch.device("cpu"))
    return LossReduction(cfg, roles, ["a", "b"], global_batch_size=64, seed=7)


def weights_of(red, losses, step=5, domain=None, index=None):
    red.begin_step(step)
    domain = torch.zeros(len(losses), dtype=torch.long) if domain is None else domain
    index = torch.arange(len(losses)) if index is None else index
    a, b = red._sample_weights(torch.tensor(losses, dtype=torch.float64), domain, index)
    return (a / b.sum()).numpy()


@pytest.mark.parametrize("strategy", list(NUMPY_SCORES))
@pytest.mark.parametrize("r, d", [(0.4, 1.0), (1.0, 1.0), (0.7, 2.5)])
def test_softmax_strategies_match_numpy(strategy, r, d):
    losses = RNG.uniform(1.0, 6.0, size=64)
    lo, hi = 1.5, 5.5  # lagged statistics of a previous batch: some losses fall outside
    red = reduction(strategy, temperature=r, delta=d)
    red.lagged_minmax = (lo, hi)
    f = NUMPY_SCORES[strategy](losses, lo, hi, d)
    expected = np.exp(f / r) / np.exp(f / r).sum()
    np.testing.assert_allclose(weights_of(red, losses), expected, rtol=1e-12)


def test_infobatch_matches_numpy():
    losses = RNG.uniform(1.0, 6.0, size=256)
    red = reduction("infobatch", keep_ratio=0.3)
    red.running_mean = 3.5
    domain, index = torch.randint(0, 2, (256,)), torch.arange(1000, 1256)
    u = _uniform_hash(7, 5, domain, index).numpy()
    raw = np.where(losses < 3.5, np.where(u < 0.3, 1 / 0.3, 0.0), 1.0)
    np.testing.assert_allclose(weights_of(red, losses, 5, domain, index), raw / len(losses), rtol=1e-12)
    kept = (u[losses < 3.5] < 0.3).mean()
    assert abs(kept - 0.3) < 0.12  # the hash draws are uniform enough to be unbiased in practice


def test_large_temperature_is_the_plain_mean():
    losses = RNG.uniform(1.0, 6.0, size=32)
    for strategy in NUMPY_SCORES:
        red = reduction(strategy, temperature=1e9)
        red.lagged_minmax = (1.0, 6.0)
        np.testing.assert_allclose(weights_of(red, losses), np.full(32, 1 / 32), rtol=1e-8)


def test_linupper_downweights_low_losses_and_caps_the_rest():
    red = reduction("linupper", temperature=0.4)
    red.lagged_minmax = (1.0, 5.0)
    w = weights_of(red, [1.0, 2.0, 3.0, 4.0, 5.0])
    assert w[0] < w[1] < w[2] and w[2] == pytest.approx(w[3]) == pytest.approx(w[4])


def test_first_global_step_and_warmup_are_uniform():
    red = reduction("linupper", warmup_steps=10)
    red.lagged_minmax = (1.0, 5.0)
    np.testing.assert_allclose(weights_of(red, [1.0, 3.0, 5.0], step=10), [1 / 3] * 3)
    assert not red.active
    fresh = reduction("linupper")
    np.testing.assert_allclose(weights_of(fresh, [1.0, 3.0, 5.0], step=1), [1 / 3] * 3)


def test_nonfinite_samples_get_no_weight():
    red = reduction("linupper", temperature=0.4)
    red.lagged_minmax = (1.0, 5.0)
    w = weights_of(red, [1.0, math.nan, 3.0, math.inf])
    assert w[1] == 0 and w[3] == 0 and np.isfinite(w).all() and w.sum() == pytest.approx(1)


def test_temperature_schedules():
    kw = dict(target=0.4, start=100.0, warmup_steps=10, anneal_steps=100)
    assert temperature_at(50, schedule="constant", **kw) == 0.4
    assert temperature_at(10, schedule="linear", **kw) == 100.0
    assert temperature_at(60, schedule="linear", **kw) == pytest.approx(50.2)
    assert temperature_at(60, schedule="cosine", **kw) == pytest.approx(50.2)
    assert temperature_at(35, schedule="cosine", **kw) > temperature_at(35, schedule="linear", **kw)
    assert temperature_at(500, schedule="cosine", **kw) == pytest.approx(0.4)
    red = reduction("linupper", warmup_steps=5, warmup_mode="hold", temperature_start=100.0)
    red.begin_step(3)
    assert red.active and red.temperature == 100.0


@pytest.mark.parametrize("override, message", [
    ("reweight.strategy=upper", "known: none, extremes, infobatch, linupper, quadratic, softmax"),
    ("reweight.temperature=0", "reweight.temperature must be a positive finite number, got 0.0"),
    ("reweight.temperature=-1", "reweight.temperature must be a positive finite number"),
    ("reweight.delta=0", "reweight.delta must be a positive finite number"),
    ("reweight.scope=rank", "reweight.scope must be global or microbatch"),
    ("reweight.keep_ratio=0", "reweight.keep_ratio must be in (0, 1]"),
    ("train.on_nonfinite_loss=ignore", "train.on_nonfinite_loss must be error or skip"),
])
def test_reweight_config_errors(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)
