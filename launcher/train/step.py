"""One training step: megatron-core's pipeline schedule over microbatches, then the optimizer.

The provider contract is Megatron-LM's: ``forward_step(data_iterator, model)`` returns the model's
output and a loss function, which the schedule calls on the last pipeline stage only. The loss
function and the gradient normalisation belong to the step's ``LossReduction`` (reweighting/):
the plain token mean, or loss-based per-sample weights normalised over the global batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch

from heft.data.loader import Batch
from heft.reweighting.reduction import LossReduction, StepReport


@dataclass
class StepResult:
    report: StepReport
    grad_norm: float
    updated: bool
    """False when the optimizer did not update (megatron-core found inf/NaN grads, or the step was
    skipped for a non-finite loss)."""
    lr: float = math.nan
    """The learning rate this step ran at (the scheduler moves on to the next step's after it)."""


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def make_forward_step(reduction: LossReduction):
    def forward_step(data_iterator, model):
        micro: Batch = next(data_iterator)
        dev = device()
        tokens = micro.tokens[:, :-1].contiguous().to(dev, non_blocking=True)
        labels = micro.tokens[:, 1:].contiguous().to(dev, non_blocking=True)
        position_ids = torch.arange(tokens.shape[1], device=dev).unsqueeze(0).expand_as(tokens)
        # With labels, GPTModel returns the per-token cross-entropy [b, s] on the last stage.
        output = model(tokens, position_ids, None, labels=labels)
        loss_mask = torch.ones_like(labels, dtype=torch.float32)
        if micro.valid is not None:  # a padded validation microbatch: its copies count for nothing
            loss_mask *= micro.valid.to(dev, dtype=torch.float32).unsqueeze(1)
        return output, partial(reduction.loss_func, loss_mask, micro.domain, micro.index)
    return forward_step


def run_schedule(forward_backward, chunks, reduction: LossReduction, microbatches: list[Batch],
                 micro_batch_size: int, seq_length: int, forward_only: bool) -> None:
    """megatron-core's schedule over ``microbatches``; losses go to ``reduction``."""
    iterators = [iter(microbatches) for _ in chunks]  # each virtual chunk walks the same list
    forward_backward(
        forward_step_func=make_forward_step(reduction),
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )


def train_step(forward_backward, chunks, optimizer, scheduler, reduction: LossReduction, step: int,
               batch: Batch, micro_batch_size: int, seq_length: int) -> StepResult:
    lr = float(optimizer.param_groups[0]["lr"])
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    reduction.begin_step(step)
    run_schedule(forward_backward, chunks, reduction, batch.microbatches(micro_batch_size),
                 micro_batch_size, seq_length, forward_only=False)
    # Every rank learns the step's loss, and whether any sample loss was non-finite, before the
    # update, so the non-finite policy is applied consistently everywhere.
    report = reduction.finish_step()
    if report.nonfinite_samples:
        return StepResult(report=report, grad_norm=math.nan, updated=False, lr=lr)
    updated, grad_norm = apply_update(optimizer)
    if updated:
        scheduler.step(increment=1)
    return StepResult(report=report, grad_norm=grad_norm, updated=updated, lr=lr)


def apply_update(optimizer) -> tuple[bool, float]:
    """megatron-core's ``optimizer.step()``, in its own public pieces, with one check added: a
    non-finite gradient norm (a NaN gradient from a finite loss) is never applied. megatron-core
    only checks for inf/NaN under fp16 loss scaling, and skips the norm entirely with clipping off.

    The norm is reduced over the model-parallel (and, with the distributed optimizer, the
    data-parallel) group, so every rank makes the same decision. Returns (updated, grad norm)."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    if optimizer.prepare_grads():  # fp16 loss scaler found inf/NaN
        return False, math.nan
    grad_norm = float(optimizer.get_grad_norm())
    if not math.isfinite(grad_norm):
        return False, grad_norm
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = part.get_parameters()
        if part.config.clip_grad > 0 and params:
            clip_grad_by_total_norm_fp32(params, part.config.clip_grad, grad_norm,
                                         part.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    return optimizer.step_with_ready_grads(), grad_norm
