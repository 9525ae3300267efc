"""Held-out loss per domain: a forward-only pass of megatron-core's schedule over the val splits."""

from __future__ import annotations

import torch

from data.loader import Batch
from launcher.step import run_schedule
from reweighting.reduction import LossReduction


class Evaluator:
    def __init__(self, batches: list[Batch], reduction: LossReduction, chunks, forward_backward,
                 micro_batch_size: int, seq_length: int):
        self.batches = batches
        self.reduction = reduction  # a plain-mean reduction: evaluation is never reweighted
        self.chunks = chunks
        self.forward_backward = forward_backward
        self.micro_batch_size = micro_batch_size
        self.seq_length = seq_length

    def run(self, step: int) -> dict:
        """{'eval_loss': token mean, 'eval_<domain>_loss': per-domain mean} on every rank."""
        for chunk in self.chunks:
            chunk.eval()
        self.reduction.begin_step(step)
        with torch.no_grad():
            run_schedule(self.forward_backward, self.chunks, self.reduction, self.batches,
                         self.micro_batch_size, self.seq_length, forward_only=True)
        report = self.reduction.finish_step()
        for chunk in self.chunks:
            chunk.train()
        metrics = {"eval_loss": report.loss}
        for key, value in report.metrics.items():
            if key.startswith("domain_") and key.endswith("_loss"):
                metrics["eval_" + key[len("domain_"):]] = value
        return metrics
