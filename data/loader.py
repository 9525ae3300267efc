"""Batches, the domain weights a config asks for, and the held-out batches.

Training batches come from ``data/mixer.py``. The validation splits are read here, domain by
domain, straight from their shards (they are small and read once): every rank of one data-parallel
replica (its TP, CP and PP ranks) gets the same microbatches, the replicas disjoint samples, and
every sample is evaluated exactly once whatever the layout. A replica short of a whole microbatch
is padded with *masked* samples (``Batch.valid``), which the loss reduction leaves out, so the
held-out losses are the exact per-domain means under every layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


import numpy as np
import torch

from heft.data.config import DataConfigError
from heft.data.prepare import load_manifest

__all__ = ["Batch", "DataConfigError", "validation_batches"]


@dataclass
class Batch:
    """One replica's share of a global batch: ``tokens`` [B, S+1], ``domain`` [B], ``index`` [B];
    ``valid`` [B] (bool) marks the real samples of a padded validation microbatch (None: all)."""

    tokens: torch.Tensor
    domain: torch.Tensor
    index: torch.Tensor
    valid: torch.Tensor | None = None

    def microbatches(self, micro_batch_size: int) -> list["Batch"]:
        parts = [slice(i, i + micro_batch_size)
                 for i in range(0, self.tokens.shape[0] - micro_batch_size + 1, micro_batch_size)]
        return [Batch(self.tokens[s], self.domain[s], self.index[s],
                      None if self.valid is None else self.valid[s]) for s in parts]


def domain_proportions(manifest: dict, proportions: dict[str, float] | None) -> dict[str, float]:
    """Normalised weights per domain; None weighs domains by their training tokens."""
    names = [d["name"] for d in manifest["domains"]]
    if proportions is None:
        tokens = {d["name"]: d["train"]["tokens"] for d in manifest["domains"]}
        total = sum(tokens.values())
        return {n: tokens[n] / total for n in names}
    unknown = sorted(set(proportions) - set(names))
    if unknown:
        raise DataConfigError(
            f"data.proportions names unknown domain(s) {unknown}; the prepared data has {names}"
        )
    total = sum(proportions.values())
    return {n: proportions[n] / total for n in names if proportions.get(n, 0) > 0}


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    """MDS samples -> the fields of a Batch. A plain dict: StreamingDataLoader counts samples by
    looking into the collated batch."""
    return {
        "tokens": torch.from_numpy(np.stack([s["tokens"] for s in samples]).astype(np.int64)),
        "domain": torch.tensor([int(s["domain"]) for s in samples], dtype=torch.int64),
        "index": torch.tensor([int(s["index"]) for s in samples], dtype=torch.int64),
    }


def check_sequence_length(manifest: dict, seq_length: int, path: str) -> None:
    if manifest["seq_length"] != seq_length:
        raise DataConfigError(
            f"model.seq_length={seq_length} but {path} was prepared with seq_length="
            f"{manifest['seq_length']}; set model.seq_length={manifest['seq_length']} or re-run "
            f"heft prepare with --seq-length {seq_length}"
        )


def check_has_validation(manifest: dict, path: str) -> None:
    """Evaluation needs held-out samples; a dataset prepared with --val-fraction 0 (or of single
    documents, which the document-level split keeps whole) may have none."""
    if not any(d["val"]["samples"] for d in manifest["domains"]):
        raise DataConfigError(
            f"{path} has no validation samples (prepared with --val-fraction 0, or every domain is a "
            f"single document, which is never split), so there is nothing to evaluate on; re-run heft "
            f"prepare with --val-fraction > 0 and more than one document per domain, or (training) set "
            f"train.eval_interval=0 train.eval_at_end=false")


def validation_batches(path: str, micro_batch_size: int, replica: int, replicas: int,
                       max_microbatches: int | None = None) -> list[Batch]:
    """This replica's share of every domain's held-out split, in fixed order, as microbatches.

    Each domain's samples are dealt out in rounds of ``micro_batch_size`` per replica; the last
    round's missing samples are masked copies, so every replica runs as many microbatches (the
    schedule and its collectives need that) and every sample counts once. ``max_microbatches``
    caps each domain (not the whole split) at that many microbatches per replica.
    """
    from heft.data.streaming_lib import LocalDataset

    manifest = load_manifest(path)
    batches = []
    for domain in manifest["domains"]:
        if not domain["val"]["samples"]:
            continue
        split = LocalDataset(local=str(Path(path) / domain["name"] / "val"))
        per_round = micro_batch_size * replicas
        rounds = -(-len(split) // per_round)
        if max_microbatches is not None:
            rounds = min(rounds, max_microbatches)
        for r in range(rounds):
            ids = [r * per_round + replica * micro_batch_size + i for i in range(micro_batch_size)]
            real = [i < len(split) for i in ids]
            samples = [split[i if ok else 0] for i, ok in zip(ids, real)]
            batches.append(Batch(**collate(samples), valid=torch.tensor(real)))
    return batches
