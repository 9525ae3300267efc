"""One training step: megatron-core's pipeline schedule over microbatches, then the optimizer.

The provider contract is Megatron-LM's: ``forward_step(data_iterator, model)`` returns the model's
output and a loss function; the schedule calls the loss function on the last pipeline stage only.
With ``calculate_per_token_loss`` the loss function returns (sum of token losses, token count), and
megatron-core divides the gradients once by the token count all-reduced over the data-parallel
group, so the step optimises the exact token mean of the global batch whatever the layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from data.loader import Batch


@dataclass
class StepResult:
    loss: float
    """Token-mean training loss over the global batch."""
    tokens: int
    grad_norm: float
    skipped: bool
    """The optimizer skipped the update (megatron-core found inf/NaN gradients)."""


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def token_loss_sum(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Loss function for the schedule: (sum of masked token losses, token count, values to report)."""
    losses = per_token_loss.float()
    mask = loss_mask.to(losses.dtype)
    loss_sum = (losses * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"loss_sum": loss_sum.detach(), "tokens": num_tokens.detach().float()}


def forward_step(data_iterator, model):
    micro: Batch = next(data_iterator)
    device = _device()
    tokens = micro.tokens[:, :-1].contiguous().to(device, non_blocking=True)
    labels = micro.tokens[:, 1:].contiguous().to(device, non_blocking=True)
    position_ids = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
    # With labels, GPTModel returns the per-token cross-entropy [b, s] on the last stage.
    output = model(tokens, position_ids, None, labels=labels)
    loss_mask = torch.ones_like(labels, dtype=torch.float32)
    return output, partial(token_loss_sum, loss_mask)


def _global_loss(reported: list[dict], counts_for_report: bool) -> tuple[float, int]:
    """Token-mean loss over the global batch, on every rank.

    Only last-stage ranks have losses, and every TP rank holds the same ones, so one rank per
    (DP, CP) position contributes to a world all-reduce of two numbers.
    """
    totals = torch.zeros(2, dtype=torch.float64, device=_device())
    if counts_for_report:
        for item in reported:
            totals[0] += item["loss_sum"].double()
            totals[1] += item["tokens"].double()
    dist.all_reduce(totals)
    tokens = int(totals[1].item())
    return (totals[0].item() / max(tokens, 1)), tokens


def train_step(forward_backward, chunks, optimizer, scheduler, batch: Batch, micro_batch_size: int,
               seq_length: int) -> StepResult:
    from megatron.core import parallel_state as ps

    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    microbatches = batch.microbatches(micro_batch_size)
    iterators = [iter(microbatches) for _ in chunks]  # each virtual chunk walks the same list
    reported = forward_backward(
        forward_step_func=forward_step,
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    updated, grad_norm, _ = optimizer.step()
    if updated:
        scheduler.step(increment=1)
    reports = ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
    loss, tokens = _global_loss(reported, reports)
    return StepResult(loss=loss, tokens=tokens,
                      grad_norm=float(grad_norm) if grad_norm is not None else math.nan,
                      skipped=not updated)
