"""The training loop. Runs in every worker process (under torchrun or srun).

    set up:  process groups -> data -> model chunks (DDP) -> optimizer + LR schedule -> metrics
    loop:    next batch -> train_step (pipeline schedule, grad reduction, optimizer) -> log
"""

from __future__ import annotations

import math
import time

import torch

from launcher.config import HeftConfig, num_microbatches
from launcher.metrics import MetricsWriter
from launcher.optim import build_optimizer, current_lr
from launcher.step import train_step


class NonFiniteLossError(RuntimeError):
    pass


def replica_batches(cfg: HeftConfig, data_parallel: int):
    """This rank's per-step batches: its replica's share of each global batch."""
    from data.loader import train_batches

    return train_batches(
        cfg.data.path,
        cfg.data.proportions,
        batch_per_replica=cfg.train.micro_batch_size * num_microbatches(cfg, data_parallel),
        replication=cfg.parallel.model_parallel_size(),
        shuffle_seed=cfg.data.shuffle_seed,
        num_canonical_nodes=cfg.data.num_canonical_nodes,
    )


def train(cfg: HeftConfig) -> list[dict]:
    """Train for ``cfg.train.steps`` steps. Returns the logged records (identical on every rank)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from data.loader import check_sequence_length
    from data.prepare import load_manifest
    from model import cpu_compat
    from model.build import Backends, build_model_chunks, resolve_dtype
    from model.flops import flops_per_token, peak_flops_per_device
    from model.parallel import initialize, shutdown

    cpu_compat.enable_if_no_cuda()
    layout = initialize(cfg)
    backends = Backends.detect()
    manifest = load_manifest(cfg.data.path)
    check_sequence_length(manifest, cfg.model.seq_length, cfg.data.path)
    vocab_size = manifest["tokenizer"]["vocab_size"]

    t, m = cfg.train, cfg.model
    batches = replica_batches(cfg, layout.data_parallel)
    chunks = build_model_chunks(cfg, vocab_size, backends)
    bf16 = resolve_dtype(t.precision, backends) == torch.bfloat16
    optimizer, scheduler = build_optimizer(cfg, chunks, bf16)
    forward_backward = get_forward_backward_func()

    writer = MetricsWriter(t.run_dir, enabled=layout.rank == 0, tensorboard=t.tensorboard)
    flops_token = flops_per_token(m.num_layers, m.hidden_size, m.ffn_hidden_size,
                                  m.num_attention_heads, m.num_query_groups, m.seq_length, vocab_size)
    peak = peak_flops_per_device()
    records, window_time, window_tokens, skipped = [], 0.0, 0, 0
    tokens_per_step = t.global_batch_size * m.seq_length
    for step in range(1, t.steps + 1):
        start = time.perf_counter()
        result = train_step(forward_backward, chunks, optimizer, scheduler, next(batches),
                            t.micro_batch_size, m.seq_length)
        window_time += time.perf_counter() - start
        window_tokens += result.tokens
        skipped += int(result.skipped)
        if not math.isfinite(result.loss):
            raise NonFiniteLossError(
                f"training loss is {result.loss} at step {step} (grad norm {result.grad_norm}); "
                f"lower optim.lr (now {cfg.optim.lr}) or check the data for corrupt samples"
            )
        if step % t.log_interval == 0 or step == t.steps:
            steps_in_window = t.log_interval if step % t.log_interval == 0 else step % t.log_interval
            tokens_per_s = window_tokens / window_time
            record = {
                "step": step,
                "consumed_tokens": step * tokens_per_step,
                "loss": result.loss,
                "lr": current_lr(optimizer),
                "grad_norm": result.grad_norm,
                "step_time_s": window_time / steps_in_window,
                "tokens_per_s": tokens_per_s,
                "mfu": tokens_per_s * flops_token / (layout.world_size * peak) if peak else None,
                "skipped_steps": skipped,
            }
            records.append(record)
            writer.log(record)
            window_time, window_tokens = 0.0, 0
    writer.close()
    shutdown()
    return records
