"""AdamW and the LR schedule, both megatron-core's (distributed optimizer when configured)."""

from __future__ import annotations

import torch

from heft.launcher.config import HeftConfig


def build_optimizer(cfg: HeftConfig, chunks, bf16: bool):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o = cfg.optim
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",  # megatron-core's Adam applies decoupled weight decay (AdamW)
            lr=o.lr,
            min_lr=o.min_lr,
            weight_decay=o.weight_decay,
            adam_beta1=o.beta1,
            adam_beta2=o.beta2,
            adam_eps=o.eps,
            clip_grad=o.clip_grad,
            bf16=bf16,
            params_dtype=torch.bfloat16 if bf16 else torch.float32,
            # Must agree with the DDP config: the optimizer then owns a DP shard of the state.
            use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        ),
        chunks,
    )
    decay = o.decay_steps if o.decay_steps is not None else max(cfg.train.steps - o.warmup_steps, 1)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if o.warmup_steps else o.lr,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=o.warmup_steps + decay,
        lr_decay_style="cosine",
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=cfg.train.steps,
        wd_incr_style="constant",
        # On resume the schedule is this run's config (optim.*, train.steps) at the checkpoint's
        # step: extending train.steps stretches the decay. megatron-core's default would keep the
        # checkpoint's schedule and silently ignore the new config.
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )
    return optimizer, scheduler


def current_lr(optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])
