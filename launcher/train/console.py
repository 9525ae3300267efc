"""What a training run prints besides its step lines (``metrics/writer.py``): the start banner,
the end summary, and notes from rank 0 (``say``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from heft.launcher.config import HeftConfig
    from heft.launcher.train.build import Trainer


def say(line: str) -> None:
    """Print from global rank 0 only: every rank knows the same, one copy is enough."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(line, flush=True)


def announce(line: str | None) -> None:
    if line:
        say(line)


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def banner(cfg: HeftConfig, trainer: Trainer, resumed_from: str | None = None) -> str:
    """The start banner: what is trained, how it is split, on what data, where results go."""
    from heft.launcher.train.step import device
    from heft.model.build import padded_vocab_size
    from heft.model.flops import parameter_count

    m, p, t = cfg.model, cfg.parallel, cfg.train
    layout = trainer.layout
    padded = padded_vocab_size(trainer.vocab_size, m.make_vocab_size_divisible_by, p.tensor)
    params = parameter_count(m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads,
                             m.num_query_groups, padded, m.tie_embeddings)
    device = "CUDA/NCCL" if trainer.peak_flops is not None or device().type == "cuda" else "CPU/gloo"
    tokens_per_step = t.global_batch_size * m.seq_length
    mixture = ", ".join(f"{name} {w:.2f}" for name, w in trainer.batches.weights().items() if w > 0)
    if cfg.mixture.controller != "static":
        mixture += f" (mixture.controller {cfg.mixture.controller}, every {cfg.mixture.update_interval} step(s))"
    reweight = cfg.reweight.strategy if cfg.reweight.strategy == "none" else (
        f"{cfg.reweight.strategy} ({cfg.reweight.scope} scope, r={cfg.reweight.temperature:g}, "
        f"after {cfg.reweight.warmup_steps} warm-up steps)")
    vpp = f" VPP{p.virtual_pipeline}" if p.virtual_pipeline else ""
    return "\n".join([
        f"heft | model {m.preset}: {_count(params)} parameters, {m.num_layers} layers, hidden "
        f"{m.hidden_size}, vocab {trainer.vocab_size}",
        f"     | layout TP{p.tensor} PP{p.pipeline}{vpp} CP{p.context} DP{layout.data_parallel} = "
        f"{layout.world_size} processes on {device}"
        + (", distributed optimizer" if p.distributed_optimizer else ""),
        f"     | {t.steps} steps x {t.global_batch_size} sequences x {m.seq_length} tokens = "
        f"{_count(tokens_per_step)} tokens/step; reweighting {reweight}",
        f"     | data {cfg.data.path}: {mixture}",
        f"     | run dir {t.run_dir}: " + (f"resuming from {resumed_from}" if resumed_from else "new run"),
    ])


def summary(cfg: HeftConfig, step: int, records: list[dict], seconds: float, checkpoint: str | None = None) -> str:
    """The end summary: steps, tokens, time, final losses, where everything was written."""
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    run_dir = Path(cfg.train.run_dir)
    if step < cfg.train.steps:
        parts = [f"heft | stopped at step {step} of {cfg.train.steps} (train.stop_at_step); the same "
                 f"command without it resumes"]
    else:
        parts = [f"heft | done: {cfg.train.steps} steps"]
    if train:
        last = train[-1]
        parts[0] += (f", {_count(last['consumed_tokens'])} tokens in {seconds:.0f} s; final loss "
                     f"{last['loss']:.4f}")
        if last.get("skipped_steps"):
            parts[0] += f" ({last['skipped_steps']} steps skipped)"
    if evals:
        parts[0] += f", eval loss {evals[-1]['eval_loss']:.4f}"
    parts.append(f"     | metrics {run_dir / 'metrics.jsonl'}; plots: heft plot {run_dir}")
    if cfg.train.tensorboard:
        parts.append(f"     | tensorboard --logdir {run_dir / 'tensorboard'}")
    if checkpoint:
        parts.append(f"     | checkpoint {checkpoint}")
    return "\n".join(parts)
