"""Training batches from every domain of a prepared dataset, mixed by weights that may change.

Streaming cannot change a live dataset's proportions, so heft owns the global sample order:

* Each domain is one stream of a mosaicml-streaming ``StreamingDataset``, read by sample id. Its
  order in each epoch is streaming's own shard-aware ``py1e`` shuffle of the domain's shards, seeded
  by (data.shuffle_seed, domain, epoch) with a fixed number of canonical nodes, so the order does not
  depend on the layout. A cursor (epoch, position) walks it.
* Step s draws its per-domain counts from the current weights with a generator seeded by
  (train.seed, s), takes that many samples from each domain's cursor and permutes the global batch
  with the same generator. Every rank computes the same global batch; replica r reads its
  contiguous share, so the TP/CP/PP ranks of a replica get identical samples, replicas disjoint
  ones, and the global batch is the same under every layout.
* While step s computes, a background thread reads step s+1's samples. Step s+1 is planned when
  step s's batch is handed out, with the weights known then: an online controller's update from
  step s's losses takes effect at step s+2. Scheduled weights are computed for the step itself.
* The state (next step, its plan, the cursors, the controller's state) is plain JSON in the
  checkpoint. A resumed run, under any layout, plans exactly the steps the uninterrupted run would.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from heft.data.config import DataConfig, DataConfigError, MixtureConfig
from heft.data.controllers import apply_floor, build_controller
from heft.data.loader import Batch, collate, domain_proportions
from heft.data.prepare import load_manifest
from heft.data.shm import mark_in_use, one_job_registers_at_a_time

STATE_VERSION = 1
DOMAIN_SEED_STRIDE = 100_003  # keeps the domains' (seed + epoch) shuffle seeds apart


class DomainExhausted(DataConfigError):
    """A domain ran out of unseen samples and mixture.on_exhausted=stop."""


def draw_step(seed: int, step: int, weights: np.ndarray, global_batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(per-domain counts, permutation of the global batch) for a step: the same on every rank."""
    rng = np.random.default_rng([seed, step])
    counts = rng.multinomial(global_batch_size, weights)
    return counts, rng.permutation(global_batch_size)


def open_domain_sources(path: str, manifest: dict, shuffle_seed: int, num_canonical_nodes: int) -> list["DomainSource"]:
    """Every domain's training split as a :class:`DomainSource`, all reading one ``StreamingDataset``
    with one stream per domain that has training samples (streaming refuses an empty stream).

    One dataset, not one per domain: to find a free shared-memory prefix, streaming opens every
    segment of every dataset registered before, and keeps each open until the process exits. With
    one dataset per domain a worker held about 5 N^2 descriptors for N domains (9,160 at 40 domains,
    past the common limit of 1,024 from 14 domains on) and ran streaming's two start-up barriers N
    times. Call inside :func:`one_job_registers_at_a_time` (collective)."""
    from heft.data.streaming_lib import Stream, StreamingDataset

    root = Path(path).resolve()
    names = [d["name"] for d in manifest["domains"]]
    with_samples = [d["name"] for d in manifest["domains"] if d["train"]["samples"] > 0]
    dataset = None
    if with_samples:
        dataset = StreamingDataset(streams=[Stream(local=str(root / name / "train")) for name in with_samples],
                                   shuffle=False, batch_size=1)
        mark_in_use(dataset._shm_prefix_int)  # lets a later run tell our segments live from stale
    stream_of = {name: i for i, name in enumerate(with_samples)}
    return [DomainSource(name, i, root / name / "train", dataset, stream_of.get(name), shuffle_seed,
                         num_canonical_nodes) for i, name in enumerate(names)]


class DomainSource:
    """One domain's training split: stream ``stream`` of the shared dataset (None: no samples),
    read by the domain's own sample ids 0..size-1."""

    def __init__(self, name: str, index: int, local: Path, dataset, stream: int | None, shuffle_seed: int,
                 num_canonical_nodes: int):
        self.name, self.local, self.dataset = name, local, dataset
        if stream is None:
            self.size, self.offset, self.shards = 0, 0, slice(0, 0)
        else:
            first_shard = int(dataset.shard_offset_per_stream[stream])
            self.shards = slice(first_shard, first_shard + int(dataset.shards_per_stream[stream]))
            self.offset = int(dataset.sample_offset_per_stream[stream])  # of sample 0 in the dataset
            self.size = int(dataset.samples_per_stream[stream])
        self.seed = shuffle_seed + DOMAIN_SEED_STRIDE * index
        self.num_canonical_nodes = num_canonical_nodes
        self._order_epoch, self._order = None, None

    def order(self, epoch: int) -> np.ndarray:
        """Sample ids in this epoch's order (streaming's py1e shuffle over this domain's shards; the
        last epoch's is cached)."""
        from heft.data.streaming_lib import get_shuffle

        if self._order_epoch != epoch:
            self._order = get_shuffle("py1e", self.dataset.samples_per_shard[self.shards],
                                      self.num_canonical_nodes, self.seed, epoch)
            self._order_epoch = epoch
        return self._order

    def read(self, sample_id: int) -> dict:
        try:
            return self.dataset[self.offset + sample_id]
        except Exception as exc:  # a shard that vanished or was truncated after the checks
            shard_id, _ = self.dataset.spanner[self.offset + sample_id]
            shard_file = self.local / self.dataset.shards[shard_id].raw_data.basename
            raise DataConfigError(
                f"domain {self.name!r}: reading sample {sample_id} from {shard_file} failed "
                f"({str(exc).splitlines()[0][:200]}); re-run heft prepare for this domain") from None


@dataclass
class Cursor:
    """Where a domain's reading stands: the epoch and the position in its order."""

    epoch: int = 0
    position: int = 0


STEERING_FIELDS = ("controller", "schedule", "update_interval", "step_size", "smoothing", "reference")
"""The mixture settings a controller's state depends on (min_weight, prefetch and on_exhausted act
outside it)."""


class DomainMixer:
    """Endless iterator of this replica's per-step batches; see the module docstring."""

    def __init__(self, data: DataConfig, mixture: MixtureConfig, global_batch_size: int, replica: int,
                 replicas: int, seed: int, total_steps: int, seq_length: int,
                 reference: np.ndarray | None = None, state: dict | None = None):
        path = data.path
        manifest = load_manifest(path)
        self.names = [d["name"] for d in manifest["domains"]]
        initial_weights = domain_proportions(manifest, data.proportions)  # the starting mixture
        self.mixture = mixture
        self.global_batch_size, self.seed = global_batch_size, seed
        share = global_batch_size // replicas
        self.share = slice(replica * share, (replica + 1) * share)
        with one_job_registers_at_a_time():
            self.sources = open_domain_sources(path, manifest, data.shuffle_seed, data.num_canonical_nodes or 1)
        initial = np.array([initial_weights.get(n, 0.0) for n in self.names])
        self.controller = build_controller(mixture, self.names, initial, total_steps,
                                           global_batch_size * seq_length, reference)
        # What the controller was built from; a checkpoint records it, and a resume whose config
        # differs starts the controller afresh from this run's (the config wins, as documented).
        self.controller_config = {"data.proportions": initial.tolist(),
                                  **{f"mixture.{k}": getattr(mixture, k) for k in STEERING_FIELDS}}
        self.cursors = [Cursor() for _ in self.names]
        self.next_step, self.plan, self.plan_weights = 1, None, None
        if state is not None:
            self._load(state)
        self._prefetch = ThreadPoolExecutor(1, thread_name_prefix="heft-prefetch") if mixture.prefetch else None
        self._pending = None
        # Telemetry of the steps handed out since the last take_telemetry()
        self._window_counts = np.zeros(len(self.names))
        self._window_wait, self._window_steps = 0.0, 0
        self.current_weights = None
        self._announced = self.weights()  # the banner shows these

    # --- planning --------------------------------------------------------------------------------
    def _take(self, domain: int, count: int) -> list[int]:
        source, cursor, taken = self.sources[domain], self.cursors[domain], []
        if count and source.size == 0:
            raise DataConfigError(f"domain {source.name!r} has no training samples but the mixture draws "
                                  f"from it at step {self.next_step}; give it weight 0 or add data")
        while len(taken) < count:
            if cursor.position >= source.size:
                if self.mixture.on_exhausted == "stop":
                    raise DomainExhausted(
                        f"domain {source.name!r} ran out of samples at step {self.next_step} (all "
                        f"{source.size} seen {cursor.epoch + 1} time(s)); set mixture.on_exhausted=new_epoch "
                        f"to reshuffle and go on, lower its weight, or add data")
                cursor.epoch, cursor.position = cursor.epoch + 1, 0
            order = source.order(cursor.epoch)
            n = min(count - len(taken), source.size - cursor.position)
            taken.extend(int(i) for i in order[cursor.position:cursor.position + n])
            cursor.position += n
        return taken

    def _plan_step(self, step: int) -> tuple[list[list[int]], list[float]]:
        """The global batch of ``step`` as [domain, sample id] pairs, and the weights it was drawn from."""
        weights = apply_floor(self.controller.weights_for(step), self.mixture.min_weight)
        counts, permutation = draw_step(self.seed, step, weights, self.global_batch_size)
        picks = [[d, i] for d, n in enumerate(counts) for i in self._take(d, int(n))]
        return [picks[p] for p in permutation], weights.tolist()

    def _read(self, plan: list[list[int]]) -> Batch:
        return Batch(**collate([self.sources[d].read(i) for d, i in plan[self.share]]))

    def _submit(self, plan):
        return self._prefetch.submit(self._read, plan) if self._prefetch else None

    # --- iteration --------------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        if self.plan is None:  # the first step of a fresh run
            self.plan, self.plan_weights = self._plan_step(self.next_step)
        waited = time.perf_counter()
        batch = self._pending.result() if self._pending is not None else self._read(self.plan)
        waited = time.perf_counter() - waited
        step_plan, self.current_weights = self.plan, self.plan_weights
        self._count(step_plan, waited)
        self.next_step += 1
        self.plan, self.plan_weights = self._plan_step(self.next_step)
        self._pending = self._submit(self.plan)
        return batch

    def observe(self, step: int, counts, loss_sums) -> None:
        """A finished step's per-domain sample counts and loss sums (from the loss reduction)."""
        self.controller.observe(step, np.asarray(counts, dtype=np.float64), np.asarray(loss_sums, dtype=np.float64))

    def _count(self, plan, waited: float) -> None:
        domains = np.fromiter((d for d, _ in plan), dtype=np.int64, count=len(plan))
        self._window_counts += np.bincount(domains, minlength=len(self.names))
        self._window_wait += waited
        self._window_steps += 1

    def take_telemetry(self) -> dict:
        """Target weight and realised fraction per domain, and the mean data wait, over the steps
        handed out since the last call."""
        total = max(self._window_counts.sum(), 1)
        record = {"data_wait_s": self._window_wait / max(self._window_steps, 1)}
        for d, name in enumerate(self.names):
            record[f"mixture_{name}_target"] = self.current_weights[d] if self.current_weights else None
            record[f"mixture_{name}_realised"] = float(self._window_counts[d] / total)
        self._window_counts[:] = 0
        self._window_wait, self._window_steps = 0.0, 0
        return record

    def weights(self) -> dict[str, float]:
        """The weights of the step handed out last (the initial ones before any)."""
        weights = self.current_weights or self.plan_weights
        if weights is None:
            weights = apply_floor(self.controller.weights_for(self.next_step), self.mixture.min_weight).tolist()
        return dict(zip(self.names, weights))

    def weight_change(self, step: int, tolerance: float = 0.01) -> str | None:
        """A line describing how the weights moved since the last such line, once some weight has
        moved by ``tolerance`` (None before that): slow drifts add up, small jitter stays quiet."""
        now, before = self.weights(), self._announced
        if max(abs(now[n] - before[n]) for n in self.names) < tolerance:
            return None
        self._announced = now
        moves = ", ".join(f"{n} {before[n]:.3f}->{now[n]:.3f}" for n in self.names
                          if abs(now[n] - before[n]) >= tolerance / 10)
        return f"heft: mixture ({self.controller.name}) at step {step}: {moves}"

    def close(self) -> None:
        if self._prefetch:
            self._prefetch.shutdown(wait=True, cancel_futures=True)

    # --- checkpoint -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain JSON, the same on every rank: with it a new mixer plans exactly what this one would."""
        return {
            "version": STATE_VERSION,
            "next_step": self.next_step,
            "plan": self.plan,
            "plan_weights": self.plan_weights,
            "domains": {s.name: {"samples": s.size, "epoch": c.epoch, "position": c.position}
                        for s, c in zip(self.sources, self.cursors)},
            "controller": {"name": self.controller.name, "state": self.controller.state_dict(),
                           "config": self.controller_config},
        }

    def _load(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataConfigError(
                "the checkpoint's data position was written by an older heft data loader; resume it "
                "with that version, or start from its weights with checkpoint.load=none")
        saved = state["domains"]
        if sorted(saved) != sorted(self.names):
            raise DataConfigError(f"the checkpoint was trained on domains {sorted(saved)}, the data has "
                                  f"{self.names}; point data.path at the data it was trained on")
        for source, cursor in zip(self.sources, self.cursors):
            entry = saved[source.name]
            if entry["samples"] != source.size:
                raise DataConfigError(
                    f"domain {source.name!r} had {entry['samples']} training samples when the checkpoint "
                    f"was written and has {source.size} now; resuming would misplace the data order. "
                    f"Point data.path at the data it was trained on")
            cursor.epoch, cursor.position = entry["epoch"], entry["position"]
        self.next_step, self.plan, self.plan_weights = state["next_step"], state["plan"], state["plan_weights"]
        controller = state["controller"]
        changed = self._changed_since(controller)
        if controller["name"] == self.controller.name and not changed:
            self.controller.load_state_dict(controller["state"])
            return
        if os.environ.get("RANK", "0") != "0":  # one line per run, not per rank
            return
        if controller["name"] != self.controller.name:  # a new controller starts afresh; the data position is kept
            print(f"heft: the checkpoint's mixture controller was {controller['name']}, this run uses "
                  f"{self.controller.name}: it starts fresh from data.proportions", flush=True)
        else:
            print(f"heft: {', '.join(changed)} changed since the checkpoint: the {self.controller.name} "
                  f"mixture starts from this run's config (the data position is kept)", flush=True)

    def _changed_since(self, saved: dict) -> list[str]:
        """The steering settings that differ from the checkpoint's controller's."""
        if "config" not in saved:  # written before heft recorded it: a static mixture's weights tell
            if saved["name"] == "static" and saved["name"] == self.controller.name and not np.allclose(
                    saved["state"]["weights"], self.controller.weights, rtol=0, atol=1e-12):
                return ["data.proportions"]
            return []
        return [key for key, value in self.controller_config.items()
                if json.dumps(saved["config"].get(key), sort_keys=True) != json.dumps(value, sort_keys=True)]
