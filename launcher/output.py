"""What a run prints: a start banner, the step lines (metrics.py), an end summary; and the list of
upstream warnings heft hides on purpose.

Known-harmless warnings are filtered by exact message pattern, in this one list, so that a new or
unexpected warning still shows. ``heft --verbose`` (environment ``HEFT_VERBOSE=1``, which workers
inherit) turns the filter off.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

VERBOSE_VAR = "HEFT_VERBOSE"

# (where it comes from, message regex, why it is harmless), for warnings.filterwarnings: the regex
# must match from the message's first character.
KNOWN_HARMLESS_WARNINGS = [
    (r"megatron\.core", r"Transformer Engine and Apex are not installed",
     "CPU or a GPU without TE/apex: megatron-core falls back to its local kernels, as heft intends"),
    (r"megatron\.core", r"Apex is not installed",
     "as above, for the fused layer norm and fused Adam"),
    (r"megatron\.core", r".*(TransformerEngine|Transformer Engine|transformer_engine).*not (installed|found)",
     "as above"),
    (r"megatron\.core", r".*CUDA_DEVICE_MAX_CONNECTIONS",
     "megatron-core's hint for overlapping TP communication on GPUs; irrelevant on CPU, and heft "
     "does not overlap TP communication"),
    (r"megatron.core.transformer.transformer_config", r"full scope is deprecated",
     "megatron-core 0.16 warns about its own CUDA-graph default when a config is built; heft uses no "
     "CUDA graphs"),
    (r"streaming", r".*`replication`",
     "streaming's notice that the ranks of one model-parallel group share samples: heft's design"),
    (r"torch", r"TypedStorage is deprecated", "inside torch's own checkpoint helpers"),
    (r"megatron.core.dist_checkpointing", r"`load_state_dict` is deprecated",
     "megatron-core 0.16 calls torch.distributed.checkpoint's older entry point; nothing to act on"),
    (r"torch.distributed", r"Please use DTensor instead and we are deprecating ShardedTensor",
     "torch's note to megatron-core's checkpoint code, raised on every load"),
    (r"torch.distributed", r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
     "torch 2.14 renamed the collectives megatron-core 0.16's distributed optimizer calls; once per rank"),
    (r"megatron.core.optimizer", r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed",
     "megatron-core's zero_grad reads .grad of the distributed optimizer's fp32 shard views (fp32 runs, "
     "as on CPU); they never hold one"),
]

# (logger, why): loggers whose warnings repeat on every rank and say nothing a heft user can act on.
KNOWN_HARMLESS_LOGGERS = [
    ("torch.utils.cpp_extension", "'No CUDA runtime is found' on CPU machines: heft builds no extensions"),
    ("streaming", "the replication notice above, and per-rank shared-memory bookkeeping"),
    ("megatron.core", "INFO-level layout and bucket summaries, once per rank"),
    ("torch.distributed.checkpoint", "per-rank planner notes during checkpoint saves"),
]


# (PYTHONWARNINGS entry, why): for helper processes the workers start, which run none of heft's code
# and so take their filters from the environment.
KNOWN_HARMLESS_CHILD_WARNINGS = [
    ("ignore::UserWarning:multiprocessing.resource_tracker",
     "a killed worker's resource tracker announces that it freed the worker's shared memory (the "
     "streaming datasets'): cleanup working as intended, printed in the middle of the failure report"),
]


def child_process_warning_filters() -> str | None:
    """PYTHONWARNINGS for the workers' environment: the user's own, then the list above (unless verbose)."""
    ours = [] if verbose() else [entry for entry, _why in KNOWN_HARMLESS_CHILD_WARNINGS]
    return ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), *ours])) or None


def verbose() -> bool:
    return os.environ.get(VERBOSE_VAR, "") not in ("", "0")


def filter_known_warnings() -> None:
    """Hide the warnings listed above (not all warnings), unless verbose. Call before imports."""
    if verbose():
        return
    # torch's C++ warnings (c10d's "TCPStore ... Connection was likely closed" with a stack of
    # frames) follow a failure or a finished peer, which heft reports itself in one line; C++
    # errors still print. Read when torch loads, so set before any torch import (workers inherit it).
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    for _source, message, _why in KNOWN_HARMLESS_WARNINGS:
        # By message alone: some are attributed to the caller's frame (stacklevel), not their module.
        warnings.filterwarnings("ignore", message=message)
    for name, _why in KNOWN_HARMLESS_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def banner(cfg, trainer, resumed_from: str | None = None) -> str:
    """The start banner: what is trained, how it is split, on what data, where results go."""
    from heft.model.build import padded_vocab_size
    from heft.model.flops import parameter_count

    m, p, t = cfg.model, cfg.parallel, cfg.train
    layout = trainer.layout
    padded = padded_vocab_size(trainer.vocab_size, m.make_vocab_size_divisible_by, p.tensor)
    params = parameter_count(m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads,
                             m.num_query_groups, padded, m.tie_embeddings)
    device = "CUDA/NCCL" if trainer.peak_flops is not None or _cuda() else "CPU/gloo"
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


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def summary(cfg, step: int, records: list[dict], seconds: float, checkpoint: str | None = None) -> str:
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
