"""Held-out loss per domain: a forward-only pass of megatron-core's schedule over the val splits."""

from __future__ import annotations

import torch

from heft.data.loader import Batch
from heft.launcher.train.step import run_schedule
from heft.reweighting.reduction import LossReduction


class Evaluator:
    BLOCK = 32
    """Validation microbatches per schedule call; a stop request is honoured between blocks."""

    def __init__(self, batches: list[Batch], reduction: LossReduction, chunks, forward_backward,
                 micro_batch_size: int, seq_length: int, interval: int = 0, final_step: int | None = None):
        """``interval``: evaluate every that many steps (0: never); ``final_step``: also at that step
        (the last of the run, with train.eval_at_end). Both only matter to :meth:`due`."""
        self.batches = batches
        self.reduction = reduction  # a plain-mean reduction: evaluation is never reweighted
        self.chunks = chunks
        self.forward_backward = forward_backward
        self.micro_batch_size = micro_batch_size
        self.seq_length = seq_length
        self.interval, self.final_step = interval, final_step

    def due(self, step: int) -> bool:
        return bool((self.interval and step % self.interval == 0) or step == self.final_step)

    def run(self, step: int, stop_requested=lambda: False, progress=lambda microbatches: None) -> dict | None:
        """{'eval_loss': token mean, 'eval_<domain>_loss': per-domain mean} on every rank, or None
        if ``stop_requested()`` (a collective, checked between blocks of microbatches) said stop.
        ``progress(n)`` is told of each block of ``n`` microbatches done."""
        for chunk in self.chunks:
            chunk.eval()
        self.reduction.begin_step(step)
        stopped = False
        with torch.no_grad():
            for start in range(0, len(self.batches), self.BLOCK):
                run_schedule(self.forward_backward, self.chunks, self.reduction,
                             self.batches[start:start + self.BLOCK], self.micro_batch_size,
                             self.seq_length, forward_only=True)
                progress(len(self.batches[start:start + self.BLOCK]))
                if stop_requested():
                    stopped = True
                    break
        for chunk in self.chunks:
            chunk.train()
        if stopped:
            return None
        report = self.reduction.finish_step()
        self.last_report = report  # per-domain sample counts, for heft eval's table
        metrics = {"eval_loss": report.loss}
        for key, value in report.metrics.items():
            if key.startswith("domain_") and key.endswith("_loss"):
                metrics["eval_" + key[len("domain_"):]] = value
        return metrics
