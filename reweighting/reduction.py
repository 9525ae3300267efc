"""The loss reduction: per-token losses in, the (re)weighted loss for the pipeline schedule out.

It plugs into the two places megatron-core already reduces the loss, so reweighting costs no second
forward pass and no all-gather of losses:

1. ``loss_func`` is the schedule's loss function, called on the last pipeline stage for every
   microbatch. It turns megatron's per-token loss [b, s] into per-sample losses l_i (mean over the
   sample's unmasked tokens), computes detached weights, and returns (sum_i a_i * l_i, count) for
   backward. With ``reweight.strategy=none`` it returns the plain token sum instead.
2. ``finalize_model_grads`` wraps megatron's: megatron broadcasts the loss denominator over the
   pipeline group, all-reduces it over DP x CP and divides the gradients once. heft hands it the
   float sum of weights instead of the integer token count, so in the ``global`` scope the step
   optimises sum_i a_i l_i / sum_i a_i over the whole global batch, however the batch is split into
   replicas and microbatches.

Statistics (min/max of losses, the softmax normaliser in the microbatch scope, telemetry) are
all-reduced over the data-parallel group of the last stage only; CP ranks, which hold parts of the
same samples, first sum their per-sample token losses. Nothing is reduced over TP or PP ranks.

Scopes
------
* ``global``: a sample's weight depends only on its own loss and on the *previous* step's global
  min/max (and, for infobatch, a running mean), so it is the same under every layout; the normaliser
  is the sum over the global batch. The first step has no previous statistics and uses uniform
  weights.
* ``microbatch``: min/max and normaliser of the current microbatch across DP ranks (the paper's
  recipe). Layout-invariant only between layouts with equal DP size and microbatch size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from heft.reweighting.schedule import temperature_at
from heft.reweighting.strategies import Strategy, get_strategy, minmax_normalise

HISTOGRAM_BIN = 0.1  # relative weight units (uniform weight = 1)
HISTOGRAM_BINS = 41  # [0, 0.1), ..., [3.9, 4.0), [4.0, inf)


@dataclass
class Roles:
    """This rank's process groups and what it contributes to reports (built by the launcher)."""

    dp_group: object
    cp_group: object | None
    cp_size: int
    is_last_stage: bool
    tensor_rank0: bool
    cp_rank0: bool
    dp_rank0: bool
    device: torch.device


@dataclass
class StepReport:
    loss: float
    """Unweighted token-mean loss over the global batch (comparable across strategies)."""
    tokens: int
    nonfinite_samples: int
    metrics: dict = field(default_factory=dict)
    histogram: dict | None = None
    sample_records: list = field(default_factory=list)
    """This rank's (domain, index, loss, weight) rows when requested (sample-reporting ranks only)."""
    domain_counts: list = field(default_factory=list)
    """Finite samples per domain in the global batch (the same on every rank)."""
    domain_loss_sums: list = field(default_factory=list)
    """Sum of those samples' unweighted mean losses per domain: what online mixture controllers read."""


def _uniform_hash(seed: int, step: int, domain: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """A uniform [0, 1) draw per sample from (seed, step, domain, index): identical on every rank
    and layout, unlike a generator whose stream depends on how samples are split."""
    mask = (1 << 61) - 1
    x = (domain.long() * 1_000_003 + index.long() + (seed * 7_919 + step) * 2_654_435_761) & mask
    for _ in range(3):  # xorshift-multiply rounds
        x = (x ^ (x >> 29)) & mask
        x = (x * 0x5851F42D4C957F2D) & mask
    return (x >> 37).double() / float(1 << 24)


class LossReduction:
    def __init__(self, cfg, roles: Roles, domain_names: list[str], global_batch_size: int, seed: int):
        self.cfg = cfg  # a ReweightConfig
        self.roles = roles
        self.domain_names = domain_names
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.strategy: Strategy | None = None if cfg.strategy == "none" else get_strategy(cfg.strategy)
        self.lagged_minmax: tuple[float, float] | None = None
        self.running_mean: float | None = None
        self._megatron_finalize = None
        self.step = 0

    # --- wiring ------------------------------------------------------------------------------------
    def install(self, model_config) -> None:
        """Make this reduction the one the schedule finalises gradients with. Another reduction
        can be installed later on the same model (the overhead benchmark alternates two)."""
        from megatron.core.distributed import finalize_model_grads

        self._megatron_finalize = finalize_model_grads
        model_config.finalize_model_grads_func = self.finalize_model_grads

    # --- checkpoint ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What the next step's weights depend on. Collective over the world: the lagged min/max
        live on the last pipeline stage, and every rank returns the same dict."""
        minmax = torch.full((2,), -math.inf, dtype=torch.float64, device=self.roles.device)
        if self.lagged_minmax is not None:
            minmax = torch.tensor([-self.lagged_minmax[0], self.lagged_minmax[1]], dtype=torch.float64,
                                  device=self.roles.device)
        dist.all_reduce(minmax, op=dist.ReduceOp.MAX)
        known = bool(torch.isfinite(minmax).all())
        return {"lagged_minmax": [-minmax[0].item(), minmax[1].item()] if known else None,
                "running_mean": self.running_mean}

    def load_state_dict(self, state: dict) -> None:
        minmax = state.get("lagged_minmax")
        self.lagged_minmax = (float(minmax[0]), float(minmax[1])) if minmax else None
        self.running_mean = state.get("running_mean")

    # --- per step ----------------------------------------------------------------------------------
    def begin_step(self, step: int) -> None:
        self.step = step
        self.active, self.temperature = self._schedule(step)
        self._weight_sum = torch.zeros((), dtype=torch.float64, device=self.roles.device)
        self._token_loss = torch.zeros((), dtype=torch.float64, device=self.roles.device)
        self._tokens = torch.zeros((), dtype=torch.float64, device=self.roles.device)
        self._losses, self._weights, self._domains, self._indices = [], [], [], []

    def _schedule(self, step: int) -> tuple[bool, float]:
        c = self.cfg
        if self.strategy is None:
            return False, math.inf
        if step <= c.warmup_steps:
            return (c.warmup_mode == "hold"), c.temperature_start
        return True, temperature_at(step, target=c.temperature, start=c.temperature_start,
                                    warmup_steps=c.warmup_steps, anneal_steps=c.anneal_steps,
                                    schedule=c.temperature_schedule)

    def loss_func(self, loss_mask, domain, index, per_token_loss):
        """The schedule's loss function (last pipeline stage, once per microbatch)."""
        losses = per_token_loss.float()
        mask = loss_mask.to(losses.dtype)
        local_sums = (losses * mask).sum(dim=1)          # this CP rank's share of each sample
        local_counts = mask.sum(dim=1)
        with torch.no_grad():
            totals = torch.stack([local_sums.detach(), local_counts]).double()
            if self.roles.cp_size > 1:
                dist.all_reduce(totals, group=self.roles.cp_group)
            sample_loss = totals[0] / totals[1].clamp(min=1)
            self._token_loss += local_sums.detach().double().sum()
            self._tokens += local_counts.double().sum()
        num_tokens = local_counts.sum().to(torch.int)
        if self.strategy is None:
            # A sample without loss tokens (a masked copy padding a validation microbatch) is no
            # sample: it is left out of the per-domain statistics, as it is of the token mean.
            real = totals[1] > 0
            self._record(sample_loss[real], torch.ones_like(sample_loss[real]), domain[real.to(domain.device)],
                         index[real.to(index.device)])
            return local_sums.sum(), num_tokens, {}
        with torch.no_grad():
            weights, denominators = self._sample_weights(sample_loss, domain, index)
            self._weight_sum += denominators.sum() / self.roles.cp_size
        self._record(sample_loss, weights, domain, index)
        per_sample = local_sums / totals[1].clamp(min=1).to(local_sums.dtype)
        numerator = (weights.to(per_sample.dtype) * per_sample).sum()
        return numerator, num_tokens, {}

    def finalize_model_grads(self, model, num_tokens=None, **kwargs):
        """megatron's finalize; when reweighting, dividing by the global sum of weights instead of
        the token count."""
        if self.strategy is None:
            return self._megatron_finalize(model, num_tokens, **kwargs)
        weight_sum = self._weight_sum.clone()
        self._megatron_finalize(model, weight_sum, **kwargs)
        self._global_weight_sum = weight_sum  # broadcast over PP and all-reduced over DP x CP

    # --- weights -----------------------------------------------------------------------------------
    def _sample_weights(self, loss, domain, index):
        """(numerator weights a_i, denominator contributions b_i), both detached float64."""
        finite = torch.isfinite(loss)
        safe = torch.where(finite, loss, torch.zeros_like(loss))
        zero = torch.zeros_like(loss)
        if not self.active:
            ones = torch.where(finite, torch.ones_like(loss), zero)
            return self._normalise_microbatch(ones, ones)
        s = self.strategy
        if s.kind == "direct":
            if self.running_mean is None:  # no history yet: plain mean
                raw = torch.ones_like(loss)
            else:
                uniform = _uniform_hash(self.seed, self.step, domain.to(loss.device), index.to(loss.device))
                raw = s.score(safe, self.running_mean, self.cfg.keep_ratio, uniform)
            ones = torch.where(finite, torch.ones_like(loss), zero)
            return self._normalise_microbatch(torch.where(finite, raw, zero), ones)

        if self.cfg.scope == "microbatch":
            lo, hi = self._microbatch_minmax(safe, finite)
        elif self.lagged_minmax is not None:
            lo, hi = self.lagged_minmax
        else:  # global scope, first step: no previous statistics -> uniform
            ones = torch.where(finite, torch.ones_like(loss), zero)
            return ones, ones
        h = minmax_normalise(safe, lo, hi, self.cfg.delta) if s.uses_minmax else None
        score = s.score(h, safe, self.cfg.delta)
        shift = s.upper_bound(self.cfg.delta) if s.upper_bound else hi
        e = torch.where(finite, torch.exp((score - shift) / self.temperature), zero)
        return self._normalise_microbatch(e, e)

    def _microbatch_minmax(self, loss, finite) -> tuple[float, float]:
        extrema = torch.stack([
            torch.where(finite, loss, torch.full_like(loss, -math.inf)).max(),
            torch.where(finite, -loss, torch.full_like(loss, -math.inf)).max(),
        ])
        dist.all_reduce(extrema, op=dist.ReduceOp.MAX, group=self.roles.dp_group)
        return -extrema[1].item(), extrema[0].item()

    def _normalise_microbatch(self, weights, denominators):
        """Microbatch scope: divide by the denominator summed over this microbatch across DP."""
        if self.cfg.scope != "microbatch":
            return weights, denominators
        total = denominators.sum().reshape(1)
        dist.all_reduce(total, group=self.roles.dp_group)
        total = total.clamp(min=1e-300)
        return weights / total, denominators / total

    def _record(self, loss, weights, domain, index):
        self._losses.append(loss.detach().double())
        self._weights.append(weights.detach().double())
        self._domains.append(domain.to(loss.device))
        self._indices.append(index.to(loss.device))

    # --- end of step -------------------------------------------------------------------------------
    def finish_step(self) -> StepReport:
        """Reduce this step's statistics (collective on every rank) and update lagged state."""
        r = self.roles
        k = len(self.domain_names)
        loss = torch.cat(self._losses) if self._losses else torch.zeros(0, dtype=torch.float64, device=r.device)
        weights = torch.cat(self._weights) if self._weights else torch.zeros_like(loss)
        domains = torch.cat(self._domains) if self._domains else torch.zeros(0, dtype=torch.long, device=r.device)
        finite = torch.isfinite(loss)
        if self.strategy is None:
            relative = torch.ones_like(loss)
        else:
            relative = weights * self.global_batch_size / self._global_weight_sum.double().clamp(min=1e-300)

        extrema = torch.full((4,), -math.inf, dtype=torch.float64, device=r.device)
        if r.is_last_stage and finite.any():
            fl, fw = loss[finite], relative[finite]
            extrema = torch.stack([fl.max(), -fl.min(), fw.max(), -fw.min()])
        if r.is_last_stage:
            dist.all_reduce(extrema, op=dist.ReduceOp.MAX, group=r.dp_group)

        # One world all-reduce carries the report; each quantity from the ranks that own it once.
        vector = self._statistics_vector(loss, relative, domains, finite, extrema, k)
        dist.all_reduce(vector)

        nonfinite = int(vector[2].item())
        if nonfinite == 0 and r.is_last_stage and torch.isfinite(extrema[:2]).all():
            self.lagged_minmax = (-extrema[1].item(), extrema[0].item())
        if nonfinite == 0 and vector[3] > 0:
            mean = (vector[4] / vector[3]).item()
            m = self.cfg.running_mean_momentum
            self.running_mean = mean if self.running_mean is None else m * self.running_mean + (1 - m) * mean
        records = []
        if self.cfg.log_sample_weights and r.is_last_stage and r.tensor_rank0 and r.cp_rank0:
            records = [(int(d), int(i), float(l), float(w)) for d, i, l, w in
                       zip(domains.tolist(), torch.cat(self._indices).tolist(), loss.tolist(), relative.tolist())]
        return self._report(vector, k, nonfinite, records)

    def _statistics_vector(self, loss, relative, domains, finite, extrema, k):
        """This rank's contribution to the step report (zeros where another rank reports)."""
        r = self.roles
        vector = torch.zeros(10 + 3 * k + HISTOGRAM_BINS, dtype=torch.float64, device=r.device)
        if r.is_last_stage and r.tensor_rank0:
            vector[0], vector[1] = self._token_loss, self._tokens
            if r.cp_rank0:
                fl, fw, fd = loss[finite], relative[finite], domains[finite]
                vector[2] = (~finite).sum()
                vector[3] = finite.sum()
                vector[4], vector[5] = fl.sum(), (fw * fl).sum()
                vector[6], vector[7] = fw.sum(), (fw * fw).sum()
                vector[10:10 + k] = torch.bincount(fd, minlength=k)[:k].double()
                vector[10 + k:10 + 2 * k] = torch.zeros(k, dtype=torch.float64, device=r.device).index_add_(0, fd, fl)
                vector[10 + 2 * k:10 + 3 * k] = torch.zeros(k, dtype=torch.float64, device=r.device).index_add_(0, fd, fw)
                bins = (fw / HISTOGRAM_BIN).floor().clamp(0, HISTOGRAM_BINS - 1).long()
                vector[10 + 3 * k:] = torch.bincount(bins, minlength=HISTOGRAM_BINS).double()
                if r.dp_rank0:
                    vector[8], vector[9] = extrema[2], -extrema[3]
        return vector

    def _report(self, v, k, nonfinite, records) -> StepReport:
        tokens = int(v[1].item())
        report = StepReport(loss=(v[0] / max(v[1].item(), 1)).item(), tokens=tokens,
                            nonfinite_samples=nonfinite, sample_records=records)
        counts, loss_sums, weight_sums = v[10:10 + k], v[10 + k:10 + 2 * k], v[10 + 2 * k:10 + 3 * k]
        report.domain_counts, report.domain_loss_sums = counts.tolist(), loss_sums.tolist()
        n = v[3].item()
        if n == 0:
            return report
        for d, name in enumerate(self.domain_names):
            if counts[d] > 0:
                report.metrics[f"domain_{name}_loss"] = (loss_sums[d] / counts[d]).item()
                report.metrics[f"domain_{name}_fraction"] = (counts[d] / n).item()
                if self.strategy is not None:
                    report.metrics[f"domain_{name}_weight"] = (weight_sums[d] / counts[d]).item()
        if self.strategy is None:
            return report
        report.metrics.update({
            "weighted_loss": (v[5] / v[6]).item() if v[6] > 0 else math.nan,
            "weight_mean": (v[6] / n).item(),
            "weight_min": v[9].item(),
            "weight_max": v[8].item(),
            "ess_fraction": (v[6] ** 2 / (n * v[7])).item() if v[7] > 0 else math.nan,
            "temperature": self.temperature if math.isfinite(self.temperature) else None,
            "reweighting_active": int(self.active),
        })
        counts_hist = v[10 + 3 * k:].tolist()
        limits = [HISTOGRAM_BIN * (i + 1) for i in range(HISTOGRAM_BINS - 1)] + [max(v[8].item(), 4.0) + 1e-6]
        report.histogram = {"min": v[9].item(), "max": v[8].item(), "num": n, "sum": v[6].item(),
                            "sum_squares": v[7].item(), "bucket_limits": limits, "bucket_counts": counts_hist}
        return report
