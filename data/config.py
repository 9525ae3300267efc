"""The data room's configuration (``data:`` in a heft config)."""

from __future__ import annotations

import math
from dataclasses import dataclass


class DataConfigError(ValueError):
    """The data config does not match the prepared dataset, or the dataset is broken."""


@dataclass
class DataConfig:
    """Where the training tokens come from (the output of ``heft prepare``)."""

    path: str = "demo_data"
    """Directory written by ``heft prepare``: one MDS dataset per domain and manifest.json."""
    proportions: dict[str, float] | None = None
    """Static domain mixture, e.g. {code: 0.5, docs: 0.5}; normalised. None: by token count."""
    shuffle_seed: int = 1234
    num_canonical_nodes: int | None = None
    """Canonical node count of streaming's py1e shuffle, which orders each domain's training samples
    (unset: 1); part of the sample order, so a resume must keep it."""

    def check(self) -> None:
        if self.proportions is not None:
            check_weights(self.proportions, "data.proportions")
        if self.num_canonical_nodes is not None and self.num_canonical_nodes < 1:
            raise ValueError(f"data.num_canonical_nodes must be >= 1, got {self.num_canonical_nodes}")


CONTROLLERS = ("static", "schedule", "odm", "doremi")
SCHEDULE_POSITIONS = ("step", "tokens", "fraction")


@dataclass
class MixtureConfig:
    """How the domain mixture changes during training (``mixture:`` in a heft config).

    The starting weights are ``data.proportions`` (or natural, by token count). Each step's
    per-domain sample counts are drawn from the current weights; see ``data/mixer.py``.
    """

    controller: str = "static"
    """static: data.proportions throughout. schedule: piecewise-linear weights from ``schedule``.
    odm: online data mixing (EXP3 bandit on each domain's training loss). doremi: exponentiated-
    gradient steps on each domain's excess loss over ``reference``."""
    schedule: list[dict[str, float]] | None = None
    """Points of a piecewise-linear schedule, each {step|tokens|fraction: where, <domain>: weight, ...};
    fraction is of train.steps. Before the first point its weights hold, after the last the last's."""
    update_interval: int = 1
    """Steps between weight updates (online controllers average the domain losses over them)."""
    min_weight: float = 0.0
    """Floor on every domain's weight (online controllers: keeps every domain observed)."""
    on_exhausted: str = "new_epoch"
    """When a domain has no unseen samples left: new_epoch (reshuffle and go on) or stop (an error
    naming the domain and step)."""
    step_size: float = 1.0
    """doremi: eta, the exponentiated-gradient step on the excess losses."""
    smoothing: float = 1e-3
    """doremi: c, mixing the weights with uniform: w <- (1 - c) w + c / k."""
    reference: str | None = None
    """doremi: each domain's reference loss: a YAML/JSON file {domain: loss}, or an earlier heft run
    directory (its last evaluation's per-domain losses, else its last training records')."""
    prefetch: bool = True
    """Read the next step's samples in a background thread while this step computes."""

    def check(self) -> None:
        if self.controller not in CONTROLLERS:
            raise ValueError(f"mixture.controller must be one of {', '.join(CONTROLLERS)}, got {self.controller!r}")
        if self.update_interval < 1:
            raise ValueError(f"mixture.update_interval must be >= 1, got {self.update_interval}")
        if not 0 <= self.min_weight < 1:
            raise ValueError(f"mixture.min_weight must be in [0, 1), got {self.min_weight}")
        if self.on_exhausted not in ("new_epoch", "stop"):
            raise ValueError(f"mixture.on_exhausted must be new_epoch or stop, got {self.on_exhausted!r}")
        if not (self.step_size > 0 and math.isfinite(self.step_size)):
            raise ValueError(f"mixture.step_size must be > 0, got {self.step_size}")
        if not 0 <= self.smoothing <= 1:
            raise ValueError(f"mixture.smoothing must be in [0, 1], got {self.smoothing}")
        if self.controller == "schedule":
            self._check_schedule()
        elif self.schedule is not None:
            raise ValueError(f"mixture.schedule is set but mixture.controller={self.controller}; "
                             f"set mixture.controller=schedule")
        if self.controller == "doremi" and not self.reference:
            raise ValueError("mixture.controller=doremi needs mixture.reference: a file of per-domain "
                             "reference losses or an earlier heft run directory")

    def _check_schedule(self) -> None:
        if not self.schedule:
            raise ValueError("mixture.controller=schedule needs mixture.schedule: a list of points like "
                             "{step: 0, web: 0.8, code: 0.2}")
        kinds = {tuple(k for k in point if k in SCHEDULE_POSITIONS) for point in self.schedule}
        if len(kinds) != 1 or len(next(iter(kinds))) != 1:
            raise ValueError(f"every mixture.schedule point needs exactly one of {', '.join(SCHEDULE_POSITIONS)}, "
                             f"the same in all points")
        key = next(iter(kinds))[0]
        positions = [point[key] for point in self.schedule]
        if any(b <= a for a, b in zip(positions, positions[1:])):
            raise ValueError(f"mixture.schedule points must have increasing {key}, got {positions}")
        for point in self.schedule:
            check_weights({k: v for k, v in point.items() if k != key}, f"mixture.schedule point at {key}={point[key]}")


def check_weights(weights: dict[str, float], where: str) -> None:
    """Weights must be finite, non-negative and not all zero."""
    if not weights:
        raise ValueError(f"{where} names no domain weights")
    bad = {k: v for k, v in weights.items() if not (math.isfinite(v) and v >= 0)}
    if bad:
        raise ValueError(f"{where}: weights must be finite and >= 0, got {bad}")
    if sum(weights.values()) <= 0:
        raise ValueError(f"{where}: weights are all zero; give at least one domain a positive weight")
