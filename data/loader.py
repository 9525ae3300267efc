"""Batches, the domain weights a config asks for, and the held-out batches, through mosaicml-streaming.

Training batches come from ``data/mixer.py``. The validation split is read here as one streaming
dataset: every rank of one data-parallel replica (its TP, CP and PP ranks) must see the same batch
and different replicas disjoint samples, and streaming's ``replication=TP*CP*PP`` gives each block of
that many *consecutive* global ranks identical samples, which is why heft orders ranks
data-parallel-outermost (``model/parallel.py``). Streaming reads RANK / WORLD_SIZE /
LOCAL_WORLD_SIZE from the environment torchrun (or heft's Slurm mapping) sets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


import numpy as np
import torch

from heft.data.config import DataConfigError
from heft.data.prepare import load_manifest
from heft.data.shm import mark_in_use, one_job_registers_at_a_time

__all__ = ["Batch", "DataConfigError", "validation_batches"]


@dataclass
class Batch:
    """One replica's share of a global batch: ``tokens`` [B, S+1], ``domain`` [B], ``index`` [B]."""

    tokens: torch.Tensor
    domain: torch.Tensor
    index: torch.Tensor

    def microbatches(self, micro_batch_size: int) -> list["Batch"]:
        n = self.tokens.shape[0] // micro_batch_size
        return [
            Batch(*(t[i * micro_batch_size:(i + 1) * micro_batch_size] for t in
                    (self.tokens, self.domain, self.index)))
            for i in range(n)
        ]


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


def validation_batches(path: str, micro_batch_size: int, replication: int,
                       max_microbatches: int | None = None) -> list[Batch]:
    """This replica's share of every domain's held-out split, in fixed order, as microbatches.

    Read once and kept: validation splits are small, and every evaluation then sees the same samples.
    """
    from heft.data.streaming_lib import Stream, StreamingDataLoader, StreamingDataset

    manifest = load_manifest(path)
    streams = [Stream(local=str(Path(path) / d["name"] / "val")) for d in manifest["domains"]
               if d["val"]["samples"] > 0]
    with one_job_registers_at_a_time():
        dataset = StreamingDataset(streams=streams, shuffle=False, batch_size=micro_batch_size,
                                   replication=replication if replication > 1 else None)
    mark_in_use(dataset._shm_prefix_int)
    loader = StreamingDataLoader(dataset, batch_size=micro_batch_size, collate_fn=collate,
                                 num_workers=0, drop_last=True)
    batches = []
    for collated in loader:
        if max_microbatches is not None and len(batches) >= max_microbatches:
            break
        batches.append(Batch(**collated))
    return batches
