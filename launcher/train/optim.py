"""AdamW and the LR schedule, both megatron-core's (distributed optimizer when configured).

Without Transformer Engine or apex, megatron-core's Adam is ``torch.optim.AdamW`` with torch's
default multi-tensor ("foreach") kernels. On a GPU that is a few kernels per parameter group and a
temporary copy of all second moments (4 bytes per parameter; it is what ran a 7b-width model out
of memory on an H100), so heft switches it to torch's fused kernel on CUDA (``optim.adam_impl``).
The kernel is a property of each param group; loading a checkpoint overwrites the groups with the
saved ones, so :func:`settle_adam_state` runs again after every load.
"""

from __future__ import annotations

import torch

from heft.launcher.config import HeftConfig, adam_impl


def build_optimizer(cfg: HeftConfig, chunks, bf16: bool):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

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
    settle_adam_state(optimizer, adam_impl(cfg.optim))
    return optimizer, build_scheduler(cfg, optimizer)


def decay_steps(cfg: HeftConfig) -> int:
    """Steps of cosine decay after warm-up: optim.decay_steps, or until train.steps."""
    o = cfg.optim
    return o.decay_steps if o.decay_steps is not None else max(cfg.train.steps - o.warmup_steps, 1)


def build_scheduler(cfg: HeftConfig, optimizer):
    """megatron-core's scheduler: linear warm-up from 0 (the first step runs at LR 0, as in
    Megatron-LM), then cosine decay to optim.min_lr over decay_steps(cfg), then min_lr."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o = cfg.optim
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if o.warmup_steps else o.lr,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=o.warmup_steps + decay_steps(cfg),
        lr_decay_style="cosine",
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=cfg.train.steps,
        wd_incr_style="constant",
        # On resume the schedule is this run's config (optim.*, train.steps) at the checkpoint's
        # step: extending train.steps stretches the decay (the resume says so, see
        # schedule_change). megatron-core's default would keep the checkpoint's schedule and
        # silently ignore the new config.
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )


def lr_after(cfg: HeftConfig, scheduler_steps: int) -> float:
    """The LR the schedule of ``cfg`` gives after ``scheduler_steps`` updates (the LR of the next
    training step; skipped steps do not advance it), without a model."""
    from types import SimpleNamespace

    holder = SimpleNamespace(param_groups=[{}])
    scheduler = build_scheduler(cfg, holder)
    scheduler.step(increment=scheduler_steps)
    return float(holder.param_groups[0]["lr"])


def schedule_change(saved: HeftConfig, now: HeftConfig, step: int, scheduler_steps: int) -> str | None:
    """A line for a resume whose LR schedule differs from the checkpoint's at ``step`` (the first
    step it trains, after ``scheduler_steps`` updates), or None."""
    import math

    before, after = lr_after(saved, scheduler_steps), lr_after(now, scheduler_steps)
    if math.isclose(before, after, rel_tol=1e-9, abs_tol=1e-15):
        return None
    what = [f"{key} {a} -> {b}" for key, a, b in (
        ("train.steps", saved.train.steps, now.train.steps), ("optim.lr", saved.optim.lr, now.optim.lr),
        ("optim.min_lr", saved.optim.min_lr, now.optim.min_lr),
        ("optim.warmup_steps", saved.optim.warmup_steps, now.optim.warmup_steps),
        ("optim.decay_steps", saved.optim.decay_steps, now.optim.decay_steps)) if a != b]
    return (f"heft: the LR schedule differs from the checkpoint's ({', '.join(what)}): step {step} runs at "
            f"lr {after:.3e}, where the checkpoint's schedule had {before:.3e}. To extend the run on "
            f"the checkpoint's decay instead, set optim.decay_steps={decay_steps(saved)}")




def torch_adams(optimizer) -> list[torch.optim.Adam]:
    """The torch Adam(W) optimizers inside megatron-core's wrappers (none when megatron-core uses
    Transformer Engine's or apex's FusedAdam, which are fused already)."""
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return [part.optimizer for part in parts if isinstance(getattr(part, "optimizer", None), torch.optim.Adam)]


def settle_adam_state(optimizer, impl: str) -> None:
    """Select torch's AdamW kernel (``fused`` or ``foreach``) and put each parameter's ``step`` counter
    where that kernel reads it: its own tensor (torch increments it in place, so a counter shared by
    many parameters would advance many times per step and corrupt the bias correction), on the
    parameter's device as float32 for the fused kernel, on the CPU for foreach (which reads it on the
    host). Called once the optimizer is built and again after a checkpoint is loaded."""
    fused = impl == "fused"
    for inner in torch_adams(optimizer):
        for group in [*inner.param_groups, inner.defaults]:
            group["fused"], group["foreach"] = fused, not fused
        seen = set()
        for param, state in inner.state.items():
            step = state.get("step")
            if not isinstance(step, torch.Tensor):
                continue
            device = param.device if fused else torch.device("cpu")
            if id(step) in seen or step.device != device or step.dtype != torch.float32:
                state["step"] = step.to(device=device, dtype=torch.float32, copy=True)
            seen.add(id(state["step"]))
