"""``heft plan CONFIG [--gpus N] [--gpu-memory GB] [key=value ...]``: will this layout fit, and how
fast can it be? Per-GPU memory by part (model/memory.py), FLOPs per step, the largest micro batch
that fits. Nothing is launched and no GPU is needed.
"""

from __future__ import annotations

import json
from pathlib import Path

from heft.launcher.config import ConfigError, HeftConfig, adam_impl, load_config, validate
from heft.model.build import Backends, padded_vocab_size
from heft.model.memory import (GIB, Workload, estimate, flops_per_step, largest_fitting_micro_batch,
                               usable_gpu_bytes)

DEFAULT_VOCAB = 32000
"""The vocabulary assumed when the config's data is not prepared yet (Llama-2's)."""
MFU_FOR_TIME = 0.45
"""The MFU heft's time-per-step line assumes (the target on one H100)."""


def workload_for(cfg: HeftConfig, padded_vocab: int, data_parallel: int, cuda: bool) -> Workload:
    """The estimate's inputs from a config, for a GPU (``cuda``) or this CPU machine."""
    from heft.model.attention import resolve_attention

    t = cfg.train
    bf16 = t.precision == "bf16" or (t.precision == "auto" and cuda)
    backends = Backends.detect()
    te = cuda and backends.transformer_engine
    # With TE or apex, megatron-core's FusedAdam is fused whatever optim.adam_impl says.
    fused_adam_installed = cuda and (backends.transformer_engine or backends.apex)
    adam = "fused" if fused_adam_installed else adam_impl(cfg.optim, cuda)
    return Workload(micro_batch_size=t.micro_batch_size, global_batch_size=t.global_batch_size,
                    data_parallel=data_parallel, vocab_size=padded_vocab, bf16=bf16,
                    recompute=t.recompute, attention=resolve_attention(t.attention, cuda, te), adam_impl=adam)


def data_vocab(cfg: HeftConfig) -> tuple[int, str]:
    """The tokenizer's vocabulary from the prepared data, or the default with a note saying so."""
    manifest = Path(cfg.data.path) / "manifest.json"
    if manifest.is_file():
        return json.loads(manifest.read_text())["tokenizer"]["vocab_size"], f"from {manifest}"
    return DEFAULT_VOCAB, f"assumed: {cfg.data.path} is not prepared yet"


def plan(config: str | None, overrides: list[str], gpus: int | None, gpu_memory_gb: float | None) -> tuple[str, bool]:
    """The report and whether the layout fits."""
    import torch

    cfg = load_config(config, overrides)
    world = gpus if gpus is not None else cfg.parallel.data and cfg.parallel.data * cfg.parallel.model_parallel_size()
    validate(cfg, world_size=world or None)
    p, m, t = cfg.parallel, cfg.model, cfg.train
    dp = p.data_parallel_size(world or None)
    cuda = gpu_memory_gb is not None or torch.cuda.is_available()
    if gpu_memory_gb is not None:
        # GiB: "80 GB" cards hold about 79.6 GiB; read as 80e9 bytes the plan lost 5 GiB of them.
        device, capacity = f"{gpu_memory_gb:g} GiB GPU", gpu_memory_gb * GIB
    elif torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        device, capacity = props.name, float(props.total_memory)
    else:
        import os

        device, capacity = "this host (CPU)", float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    budget = usable_gpu_bytes(capacity) if cuda else capacity
    vocab, vocab_note = data_vocab(cfg)
    padded = padded_vocab_size(vocab, m.make_vocab_size_divisible_by, p.tensor)
    work = workload_for(cfg, padded, dp, cuda)
    est = estimate(m, p, work)
    fits = est.total <= budget
    foreach_step_dominates = work.adam_impl == "foreach" and est.optimizer_step > est.activations
    best = largest_fitting_micro_batch(m, p, work, budget)
    flops = flops_per_step(m, t.global_batch_size, padded)
    ranks = dp * p.model_parallel_size()

    vpp = f" VPP{p.virtual_pipeline}" if p.virtual_pipeline else ""
    step_note = ("foreach AdamW's copy of the second moments; held once the activations are freed, "
                 "so the larger of the two counts" if est.optimizer_step else f"{work.adam_impl} AdamW: no temporary")
    units, plural = ("GPU", "s") if cuda else ("process", "es")
    lines = [
        f"heft plan: {m.preset} ({m.num_layers} layers, hidden {m.hidden_size}, seq {m.seq_length}), "
        f"TP{p.tensor} PP{p.pipeline}{vpp} DP{dp} on {ranks} {units if ranks == 1 else units + plural}",
        f"  micro batch {t.micro_batch_size}, global batch {t.global_batch_size}, "
        f"{'bf16' if work.bf16 else 'fp32'}, {work.attention} attention, recompute {t.recompute}, "
        f"distributed optimizer {'on' if p.distributed_optimizer else 'off'}, vocab {vocab} ({vocab_note})",
        f"memory per {units} (busiest pipeline stage: {est.stage}):",
        f"  weights       {_size(est.weights)}",
        f"  gradients     {_size(est.gradients)}  (fp32 reduction buffer)",
        f"  optimizer     {_size(est.optimizer)}  (Adam moments{' + fp32 main weights' if work.bf16 else ''}"
        f"{f', sharded over DP{dp}' if p.distributed_optimizer else ''})",
        f"  activations   {_size(est.activations)}  ({est.microbatches_in_flight} microbatch(es) in flight)",
        f"  optimizer step{_size(est.optimizer_step)}  ({step_note})",
        f"  total         {_size(est.total)}  of {budget / GIB:.1f} GiB usable on {device}"
        + (f" (after {int(100 * 0.10)}% + 1 GiB for CUDA, NCCL and fragmentation)" if cuda else ""),
    ]
    if fits:
        lines.append(f"fits. Largest micro batch that fits: {best}")
    else:
        lines.append(f"does not fit: {_advice(cfg, est, budget, best, foreach_step_dominates, ranks)}")
    per_rank = flops / ranks
    lines.append(f"FLOPs per step: {flops:.3g} ({flops / (t.global_batch_size * m.seq_length):.3g} per token, "
                 f"matmuls x3 for backward); {per_rank:.3g} per {units}")
    if cuda:
        lines.append(f"  at {MFU_FOR_TIME:.0%} MFU of an H100's 989 TFLOP/s (bf16 dense): "
                     f"{per_rank / (MFU_FOR_TIME * 989e12):.2f} s per step")
    return "\n".join(lines), fits


def _size(n: float) -> str:
    return f"{n / GIB:8.2f} GiB" if n >= GIB / 10 or n == 0 else f"{n / 2 ** 20:8.1f} MiB"


def _advice(cfg: HeftConfig, est, budget: float, best: int | None, foreach_step_dominates: bool,
            ranks: int) -> str:
    t, p = cfg.train, cfg.parallel
    if best is not None:
        return f"set train.micro_batch_size={best} (the largest that fits)"
    more_gpus = f"--gpus {ranks * 2} with parallel.tensor={p.tensor * 2} or parallel.pipeline={p.pipeline * 2}"
    state = est.weights + est.gradients + est.optimizer
    if state > budget:  # no micro batch or recompute setting can help
        shard = "" if p.distributed_optimizer else "; or parallel.distributed_optimizer=true with more data-parallel GPUs"
        return (f"the model state alone (weights, gradients, optimizer: {state / GIB:.1f} GiB) exceeds the "
                f"{budget / GIB:.1f} GiB usable per GPU; split it over more GPUs: {more_gpus}{shard}")
    # The foreach temporary outweighs the activations: recompute would not lower the peak.
    options = ["optim.adam_impl=fused (no optimizer-step temporary)"] if foreach_step_dominates else []
    if t.recompute != "full" and not foreach_step_dominates:
        options.append(f"train.recompute={'selective' if t.recompute == 'none' else 'full'}")
    if not p.distributed_optimizer:
        options.append("parallel.distributed_optimizer=true")
    options.append(more_gpus)
    return "even micro batch 1 does not fit; try " + ", ".join(options)


def main(config: str | None, overrides: list[str], gpus: int | None, gpu_memory_gb: float | None) -> int:
    if gpu_memory_gb is not None and not gpu_memory_gb > 0:
        raise ConfigError(f"--gpu-memory must be > 0 GB, got {gpu_memory_gb}")
    if gpus is not None and gpus < 1:
        raise ConfigError(f"--gpus must be >= 1, got {gpus}")
    report, fits = plan(config, overrides, gpus, gpu_memory_gb)
    print(report)
    return 0 if fits else 1

