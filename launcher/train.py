"""The training loop. Runs in every worker process (under torchrun or srun).

    set up (build_trainer):  process groups -> data -> model chunks (DDP) -> optimizer + LR
                             schedule -> loss reduction (plain mean or reweighting) -> evaluator
    loop (train):            next batch -> train_step -> non-finite policy -> log -> evaluate
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from launcher.config import HeftConfig, num_microbatches
from launcher.metrics import MetricsWriter
from launcher.optim import build_optimizer, current_lr
from launcher.step import StepResult, device, train_step


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class Trainer:
    """Everything a worker builds once; ``step`` runs one optimizer step."""

    cfg: HeftConfig
    layout: object
    domain_names: list
    chunks: list
    optimizer: object
    scheduler: object
    reduction: object
    forward_backward: object
    batches: object
    evaluator: object
    flops_per_token: float
    peak_flops: float | None

    def step(self, step: int) -> StepResult:
        return train_step(self.forward_backward, self.chunks, self.optimizer, self.scheduler,
                          self.reduction, step, next(self.batches), self.cfg.train.micro_batch_size,
                          self.cfg.model.seq_length)


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


def build_loss_reduction(cfg: HeftConfig, layout, domain_names: list[str], reweight=None):
    from megatron.core import parallel_state as ps

    from reweighting.reduction import LossReduction, Roles

    roles = Roles(
        dp_group=ps.get_data_parallel_group(),
        cp_group=ps.get_context_parallel_group() if cfg.parallel.context > 1 else None,
        cp_size=cfg.parallel.context,
        is_last_stage=layout.is_last_stage,
        tensor_rank0=layout.tp_rank == 0,
        cp_rank0=layout.cp_rank == 0,
        dp_rank0=layout.dp_rank == 0,
        device=device(),
    )
    return LossReduction(reweight or cfg.reweight, roles, domain_names, cfg.train.global_batch_size,
                         cfg.train.seed)


def build_trainer(cfg: HeftConfig) -> Trainer:
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_model_config

    from data.loader import check_sequence_length, validation_batches
    from data.prepare import load_manifest
    from launcher.config import ReweightConfig
    from launcher.evaluate import Evaluator
    from model import cpu_compat
    from model.build import Backends, build_model_chunks, check_backend_support, resolve_dtype
    from model.flops import flops_per_token, peak_flops_per_device
    from model.parallel import initialize

    cpu_compat.enable_if_no_cuda()
    backends = Backends.detect()
    check_backend_support(cfg, backends)
    layout = initialize(cfg)
    manifest = load_manifest(cfg.data.path)
    check_sequence_length(manifest, cfg.model.seq_length, cfg.data.path)
    vocab_size = manifest["tokenizer"]["vocab_size"]
    domain_names = [d["name"] for d in manifest["domains"]]

    t, m = cfg.train, cfg.model
    chunks = build_model_chunks(cfg, vocab_size, backends)
    optimizer, scheduler = build_optimizer(cfg, chunks, resolve_dtype(t.precision, backends) == torch.bfloat16)
    reduction = build_loss_reduction(cfg, layout, domain_names)
    reduction.install(get_model_config(chunks[0]))
    forward_backward = get_forward_backward_func()
    evaluator = None
    if t.eval_interval or t.eval_at_end:
        evaluator = Evaluator(
            validation_batches(cfg.data.path, t.micro_batch_size, cfg.parallel.model_parallel_size(),
                               t.eval_max_microbatches),
            build_loss_reduction(cfg, layout, domain_names, ReweightConfig(strategy="none")),
            chunks, forward_backward, t.micro_batch_size, m.seq_length)
    return Trainer(
        cfg=cfg, layout=layout, domain_names=domain_names, chunks=chunks, optimizer=optimizer,
        scheduler=scheduler, reduction=reduction, forward_backward=forward_backward,
        batches=replica_batches(cfg, layout.data_parallel), evaluator=evaluator,
        flops_per_token=flops_per_token(m.num_layers, m.hidden_size, m.ffn_hidden_size,
                                        m.num_attention_heads, m.num_query_groups, m.seq_length,
                                        vocab_size),
        peak_flops=peak_flops_per_device(),
    )


def check_nonfinite(cfg: HeftConfig, step: int, result: StepResult, consecutive_skips: int) -> int:
    """Apply train.on_nonfinite_loss; returns the new count of consecutive skipped steps."""
    bad = result.report.nonfinite_samples
    if not bad:
        return 0
    message = (f"{bad} sample loss(es) are NaN/inf at step {step} (global batch loss "
               f"{result.report.loss}); the step was not applied. Lower optim.lr (now "
               f"{cfg.optim.lr}) or check the data for corrupt samples")
    if cfg.train.on_nonfinite_loss == "error":
        raise NonFiniteLossError(f"training loss is non-finite: {message}")
    if consecutive_skips + 1 >= cfg.train.max_consecutive_skips:
        raise NonFiniteLossError(f"{consecutive_skips + 1} consecutive steps skipped: {message}")
    print(f"heft: skipping step {step}: {message}", flush=True)
    return consecutive_skips + 1


def train(cfg: HeftConfig) -> list[dict]:
    """Train for ``cfg.train.steps`` steps. Returns the logged records (identical on every rank)."""
    from model.parallel import shutdown

    trainer = build_trainer(cfg)
    t, layout = cfg.train, trainer.layout
    writer = MetricsWriter(t.run_dir, enabled=layout.rank == 0, tensorboard=t.tensorboard)
    records, window_time, window_tokens, skipped, consecutive_skips = [], 0.0, 0, 0, 0
    for step in range(1, t.steps + 1):
        start = time.perf_counter()
        result = trainer.step(step)
        window_time += time.perf_counter() - start
        window_tokens += result.report.tokens
        skipped += int(not result.updated)
        consecutive_skips = check_nonfinite(cfg, step, result, consecutive_skips)
        if cfg.reweight.log_sample_weights and result.report.sample_records:
            writer.write_sample_weights(step, layout.rank, result.report.sample_records)
        if step % t.log_interval == 0 or step == t.steps:
            tokens_per_s = window_tokens / window_time
            record = {
                "step": step,
                "consumed_tokens": step * t.global_batch_size * cfg.model.seq_length,
                "loss": result.report.loss,
                "lr": current_lr(trainer.optimizer),
                "grad_norm": result.grad_norm,
                "step_time_s": window_time / ((step - 1) % t.log_interval + 1),
                "tokens_per_s": tokens_per_s,
                "mfu": (tokens_per_s * trainer.flops_per_token / (layout.world_size * trainer.peak_flops)
                        if trainer.peak_flops else None),
                "skipped_steps": skipped,
                **result.report.metrics,
            }
            records.append(record)
            writer.log(record, histogram=result.report.histogram)
            window_time, window_tokens = 0.0, 0
        if trainer.evaluator and ((t.eval_interval and step % t.eval_interval == 0)
                                  or (t.eval_at_end and step == t.steps)):
            eval_record = {"step": step, **trainer.evaluator.run(step)}
            records.append(eval_record)
            writer.log_eval(eval_record)
    writer.close()
    shutdown()
    return records
