"""Domain mixture controllers: what each domain's sampling weight is at a step.

A controller is a small registered class. ``weights_for(step)`` gives the target weights of a step
(the mixer applies the floor and draws the step's per-domain counts from them); online controllers
also ``observe`` each step's per-domain training-loss statistics, which the loss reduction has
already all-reduced for its report, so they cost no extra pass and no extra collective. Everything
a controller knows is in ``state_dict()`` (plain JSON), saved with every checkpoint.

Formulas (``../shared/notes/reweighting-spec.md``):

* ``odm`` (online data mixing, an EXP3 bandit): reward_d = mean training loss of domain d's samples;
  R_d += reward_d / pi_d; eps_t = min(1/K, sqrt(ln K / (K t))); pi = (1 - K eps_t) softmax(eps_{t-1} R)
  + eps_t. Domains whose loss stays high get more weight.
* ``doremi``: lambda_d = max(loss_d - reference_d, 0); alpha = softmax(log alpha + eta lambda);
  alpha = (1 - c) alpha + c / K. Domains with the largest excess loss get more weight.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from heft.data.config import DataConfigError, MixtureConfig

CONTROLLERS: dict[str, type] = {}


def register(name: str):
    def wrap(cls):
        cls.name = name
        CONTROLLERS[name] = cls
        return cls
    return wrap


def apply_floor(weights: np.ndarray, floor: float) -> np.ndarray:
    """Normalised weights, each at least ``floor``: mixing with the floor keeps their order."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    return floor + (1.0 - len(w) * floor) * w if floor > 0 else w


class Controller:
    """Static weights; the base of the others."""

    name = "static"
    online = False

    def __init__(self, cfg: MixtureConfig, names: list[str], initial: np.ndarray, **_):
        self.cfg, self.names = cfg, names
        initial = np.asarray(initial, dtype=np.float64)
        # A schedule brings its own weights; without starting weights every domain starts equal.
        self.weights = initial / initial.sum() if initial.sum() > 0 else np.full(len(names), 1.0 / len(names))

    def weights_for(self, step: int) -> np.ndarray:
        return self.weights

    def observe(self, step: int, counts: np.ndarray, loss_sums: np.ndarray) -> None:
        """One step's per-domain sample counts and loss sums (global, finite samples only)."""

    def state_dict(self) -> dict:
        return {"weights": self.weights.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.weights = np.asarray(state["weights"], dtype=np.float64)


register("static")(Controller)


@register("schedule")
class Schedule(Controller):
    """Piecewise-linear weights over steps, consumed tokens or the fraction of training, held
    constant within each update interval."""

    def __init__(self, cfg: MixtureConfig, names: list[str], initial: np.ndarray, total_steps: int = 1,
                 tokens_per_step: int = 1, **_):
        super().__init__(cfg, names, initial)
        key = next(k for k in cfg.schedule[0] if k in ("step", "tokens", "fraction"))
        # Every point's position in steps: the weights of step s are those at (s - 1) steps done.
        scale = {"step": 1.0, "tokens": 1.0 / tokens_per_step, "fraction": float(total_steps)}[key]
        self.positions = np.array([point[key] * scale for point in cfg.schedule])
        self.table = np.array([[point.get(n, 0.0) for n in names] for point in cfg.schedule], dtype=np.float64)
        self.table /= self.table.sum(axis=1, keepdims=True)
        self.key = key

    def weights_for(self, step: int) -> np.ndarray:
        interval = self.cfg.update_interval
        done = ((step - 1) // interval) * interval  # steps completed when this interval began
        if self.key == "step":
            done += 1  # step positions name the step itself
        w = np.array([np.interp(done, self.positions, self.table[:, d]) for d in range(len(self.names))])
        return w / w.sum()

    def state_dict(self) -> dict:
        return {}  # a function of the step alone

    def load_state_dict(self, state: dict) -> None:
        pass


class OnlineController(Controller):
    """Averages each domain's training loss over an update interval, then updates the weights."""

    online = True

    def __init__(self, cfg: MixtureConfig, names: list[str], initial: np.ndarray, **kwargs):
        super().__init__(cfg, names, initial)
        self.counts = np.zeros(len(names))
        self.loss_sums = np.zeros(len(names))

    def observe(self, step: int, counts: np.ndarray, loss_sums: np.ndarray) -> None:
        self.counts += counts
        self.loss_sums += loss_sums
        if step % self.cfg.update_interval == 0:
            seen = self.counts > 0
            mean_loss = np.where(seen, self.loss_sums / np.maximum(self.counts, 1), np.nan)
            self.update(mean_loss)
            self.counts[:] = 0
            self.loss_sums[:] = 0

    def update(self, mean_loss: np.ndarray) -> None:
        """New weights from each domain's mean loss over the interval (NaN: not sampled)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"weights": self.weights.tolist(), "counts": self.counts.tolist(),
                "loss_sums": self.loss_sums.tolist()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.counts = np.asarray(state["counts"], dtype=np.float64)
        self.loss_sums = np.asarray(state["loss_sums"], dtype=np.float64)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


@register("odm")
class OnlineDataMixing(OnlineController):
    def __init__(self, cfg: MixtureConfig, names: list[str], initial: np.ndarray, **kwargs):
        super().__init__(cfg, names, initial)
        k = len(names)
        self.rewards = np.zeros(k)           # R: importance-weighted cumulative rewards
        self.updates = 0                     # t
        self.previous_epsilon = 1.0 / k      # eps_{t-1}; eps_0 = 1/K

    def update(self, mean_loss: np.ndarray) -> None:
        k = len(self.names)
        seen = np.isfinite(mean_loss)
        self.rewards[seen] += mean_loss[seen] / self.weights[seen]
        self.updates += 1
        epsilon = min(1.0 / k, math.sqrt(math.log(k) / (k * self.updates))) if k > 1 else 1.0
        self.weights = (1 - k * epsilon) * softmax(self.previous_epsilon * self.rewards) + epsilon
        self.previous_epsilon = epsilon

    def state_dict(self) -> dict:
        return {**super().state_dict(), "rewards": self.rewards.tolist(), "updates": self.updates,
                "previous_epsilon": self.previous_epsilon}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.rewards = np.asarray(state["rewards"], dtype=np.float64)
        self.updates, self.previous_epsilon = int(state["updates"]), float(state["previous_epsilon"])


@register("doremi")
class DoReMi(OnlineController):
    def __init__(self, cfg: MixtureConfig, names: list[str], initial: np.ndarray, reference=None, **kwargs):
        super().__init__(cfg, names, initial)
        self.reference = np.asarray(reference, dtype=np.float64)

    def update(self, mean_loss: np.ndarray) -> None:
        # A domain not sampled this interval has no evidence of excess loss: lambda = 0.
        excess = np.where(np.isfinite(mean_loss), np.maximum(mean_loss - self.reference, 0.0), 0.0)
        alpha = softmax(np.log(np.maximum(self.weights, 1e-300)) + self.cfg.step_size * excess)
        c = self.cfg.smoothing
        self.weights = (1 - c) * alpha + c / len(self.names)


def build_controller(cfg: MixtureConfig, names: list[str], initial: np.ndarray, total_steps: int,
                     tokens_per_step: int, reference: np.ndarray | None = None) -> Controller:
    return CONTROLLERS[cfg.controller](cfg, names, initial, total_steps=total_steps,
                                       tokens_per_step=tokens_per_step, reference=reference)


def check_mixture(cfg: MixtureConfig, names: list[str], data_path: str) -> np.ndarray | None:
    """What the mixture needs from the data, checked before launch: schedule domains exist, the
    floor fits, doremi's reference covers every domain. Returns the reference losses (doremi)."""
    if cfg.min_weight * len(names) > 1:
        raise DataConfigError(f"mixture.min_weight={cfg.min_weight} times {len(names)} domains exceeds 1; "
                              f"use at most {1 / len(names):.4g}")
    if cfg.controller == "schedule":
        for point in cfg.schedule:
            unknown = sorted(set(point) - set(names) - {"step", "tokens", "fraction"})
            if unknown:
                raise DataConfigError(f"mixture.schedule names unknown domain(s) {unknown}; {data_path} has {names}")
    if cfg.controller == "doremi":
        return load_reference(cfg.reference, names)
    return None


def load_reference(spec: str, names: list[str]) -> np.ndarray:
    """Per-domain reference losses from a {domain: loss} YAML/JSON file or an earlier heft run."""
    import yaml

    path = Path(spec)
    if path.is_dir():
        losses = _losses_from_run(path, names)
    elif path.is_file():
        try:
            losses = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise DataConfigError(f"mixture.reference {path} is not YAML/JSON ({exc})") from None
        if not isinstance(losses, dict):
            raise DataConfigError(f"mixture.reference {path} must map domain names to losses")
    else:
        raise DataConfigError(f"mixture.reference {path} does not exist; give a file {{domain: loss}} "
                              f"or a heft run directory")
    missing = [n for n in names if n not in losses]
    if missing:
        raise DataConfigError(f"mixture.reference {path} has no loss for domain(s) {missing}; it has "
                              f"{sorted(losses)}")
    values = np.array([float(losses[n]) for n in names])
    if not np.isfinite(values).all():
        raise DataConfigError(f"mixture.reference {path} has non-finite losses: {dict(zip(names, values))}")
    return values


def _losses_from_run(run_dir: Path, names: list[str], window: int = 10) -> dict[str, float]:
    """The run's last evaluation's per-domain held-out losses, else the mean of its last ``window``
    training records' per-domain losses."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise DataConfigError(f"mixture.reference {run_dir} is a directory without metrics.jsonl; "
                              f"give a heft run directory or a {{domain: loss}} file")
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    evaluations = [r for r in records if any(f"eval_{n}_loss" in r for n in names)]
    if evaluations:
        return {n: evaluations[-1][f"eval_{n}_loss"] for n in names if f"eval_{n}_loss" in evaluations[-1]}
    losses = {}
    for n in names:
        values = [r[f"domain_{n}_loss"] for r in records if f"domain_{n}_loss" in r][-window:]
        if values:
            losses[n] = float(np.mean(values))
    return losses
