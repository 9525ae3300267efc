"""What a training worker builds before its first step, in order: process groups, the model
chunks (megatron-core GPTModel in DDP), optimizer and LR schedule, the loss reduction (plain mean
or reweighting), the evaluator, the checkpoint it resumes from, and the mixed batches.

The pieces are also what ``heft eval`` and in-process inference (``evaluate/``) build a model from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from heft.launcher.config import ConfigError, HeftConfig, validate
from heft.launcher.train import console
from heft.launcher.train.optim import build_optimizer
from heft.launcher.train.step import StepResult, device, train_step

if TYPE_CHECKING:
    from collections.abc import Callable

    from megatron.core.optimizer import MegatronOptimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from heft.data.mixer import DomainMixer
    from heft.launcher.checkpoint.start import Start
    from heft.launcher.launch.run_lock import RunLock
    from heft.launcher.train.checkpointing import Progress
    from heft.launcher.train.evaluator import Evaluator
    from heft.model.build import Backends
    from heft.model.parallel import Layout
    from heft.reweighting.config import ReweightConfig
    from heft.reweighting.reduction import LossReduction


@dataclass
class Trainer:
    """Everything a worker builds once; ``step`` runs one optimizer step."""

    cfg: HeftConfig
    layout: Layout
    domain_names: list[str]
    vocab_size: int
    chunks: list[torch.nn.Module]
    """This rank's model chunks (one, or one per virtual pipeline stage), each in megatron-core DDP."""
    optimizer: MegatronOptimizer
    """Its concrete class depends on precision and sharding (the distributed optimizer, or not)."""
    scheduler: OptimizerParamScheduler
    reduction: LossReduction
    forward_backward: Callable[..., list]
    """megatron-core's pipeline schedule function for this layout."""
    batches: DomainMixer | None
    """This replica's batches and the mixture's state (None until the checkpoint is loaded)."""
    evaluator: Evaluator | None
    flops_per_token: float
    peak_flops: float | None
    start: Start
    """Where the run started: fresh, or a checkpoint."""
    progress: Progress
    """The step reached and the skip counters, saved with every checkpoint."""
    run_lock: RunLock | None = None
    """RUN_DIR/heft.lock, held by global rank 0 until the run ends."""

    def step(self, step: int) -> StepResult:
        result = train_step(self.forward_backward, self.chunks, self.optimizer, self.scheduler,
                            self.reduction, step, next(self.batches), self.cfg.train.micro_batch_size,
                            self.cfg.model.seq_length)
        if not result.report.nonfinite_samples:  # online mixture controllers learn from the step
            self.batches.observe(step, result.report.domain_counts, result.report.domain_loss_sums)
        return result

    def release(self) -> None:
        """Close the data (streaming's shared memory) and let go of the run directory."""
        if self.batches is not None:
            self.batches.close()
        if self.run_lock is not None:
            self.run_lock.release()


def start_processes(cfg: HeftConfig) -> Layout:
    """Validate the config for this world, then create the process groups. Returns the Layout."""
    import os

    from heft.model.parallel import initialize

    validate(cfg, int(os.environ["WORLD_SIZE"]))  # before any group exists: fails here, not in a hang
    return initialize(cfg.parallel, cfg.train.seed, cfg.train.collective_timeout_s)


def build_model(cfg: HeftConfig, vocab_size: int, backends: Backends) -> list[torch.nn.Module]:
    """This rank's model chunks (megatron-core GPTModel in DDP), from the model and parallel sections."""
    from heft.model.build import Execution, build_model_chunks

    run = Execution(precision=cfg.train.precision, recompute=cfg.train.recompute, seed=cfg.train.seed,
                    attention=cfg.train.attention, rope=cfg.train.rope)
    return build_model_chunks(cfg.model, cfg.parallel, run, vocab_size, backends)


def replica_batches(cfg: HeftConfig, layout: Layout, state: dict | None = None, reference=None) -> DomainMixer:
    """This replica's per-step batches, mixed from one streaming dataset per domain by the
    configured controller (from ``state``, a checkpoint's data state, when resuming)."""
    from heft.data.mixer import DomainMixer

    return DomainMixer(
        cfg.data, cfg.mixture, global_batch_size=cfg.train.global_batch_size, replica=layout.dp_rank,
        replicas=layout.data_parallel, seed=cfg.train.seed, total_steps=cfg.train.steps,
        seq_length=cfg.model.seq_length, reference=reference, state=state,
    )


def clean_stale_data_state(cfg: HeftConfig) -> None:
    """One rank per machine removes what killed runs left of streaming's shared state for this
    data (``data/shm.py``); every rank waits for it before building a dataset."""
    import os

    import torch.distributed as dist

    from heft.data.shm import align_local_world_with_machine, clean_stale_streaming_state

    align_local_world_with_machine()
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        removed = clean_stale_streaming_state(cfg.data.path)
        if removed:
            print(f"heft: removed the shared memory {len(removed)} killed dataset(s) of "
                  f"{cfg.data.path} left behind", flush=True)
    dist.barrier()


def build_loss_reduction(cfg: HeftConfig, layout: Layout, domain_names: list[str],
                         reweight: ReweightConfig | None = None) -> LossReduction:
    from megatron.core import parallel_state as ps

    from heft.reweighting.reduction import LossReduction, Roles

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

    from heft.data.loader import validation_batches
    from heft.launcher.checkpoint.start import decide_start_on_every_rank
    from heft.launcher.launch.run_lock import RunLock
    from heft.launcher.preflight.checks import check_backends, check_data
    from heft.launcher.train import checkpointing
    from heft.launcher.train.evaluator import Evaluator
    from heft.model import cpu_compat
    from heft.model.build import Backends, resolve_dtype
    from heft.model.flops import flops_per_token, peak_flops_per_device
    from heft.reweighting.config import ReweightConfig

    cpu_compat.enable_if_no_cuda()
    backends = Backends.detect()
    check_backends(cfg, backends)
    layout = start_processes(cfg)
    run_lock = RunLock(cfg.train.run_dir) if layout.rank == 0 else None  # one run per directory
    start = decide_start_on_every_rank(cfg, layout.rank, run_lock)
    try:
        data = check_data(cfg)  # again (heft train checked before launch): under srun or bare torchrun nobody has
        vocab_size = data.manifest["tokenizer"]["vocab_size"]
        clean_stale_data_state(cfg)

        t, m = cfg.train, cfg.model
        chunks = build_model(cfg, vocab_size, backends)
        if cfg.checkpoint.init_hf and not start.checkpoint:
            start_from_hf(cfg, chunks, data.manifest)
        optimizer, scheduler = build_optimizer(cfg, chunks, resolve_dtype(t.precision, backends) == torch.bfloat16)
        reduction = build_loss_reduction(cfg, layout, data.domain_names)
        reduction.install(get_model_config(chunks[0]))
        forward_backward = get_forward_backward_func()
        evaluator = None
        if t.eval_interval or t.eval_at_end:
            evaluator = Evaluator(
                validation_batches(cfg.data.path, t.micro_batch_size, layout.dp_rank, layout.data_parallel,
                                   t.eval_max_microbatches),
                build_loss_reduction(cfg, layout, data.domain_names, ReweightConfig(strategy="none")),
                chunks, forward_backward, t.micro_batch_size, m.seq_length,
                interval=t.eval_interval, final_step=t.steps if t.eval_at_end else None)
        trainer = Trainer(
            cfg=cfg, layout=layout, domain_names=data.domain_names, vocab_size=vocab_size,
            chunks=chunks, optimizer=optimizer, scheduler=scheduler, reduction=reduction,
            forward_backward=forward_backward, batches=None, evaluator=evaluator,
            flops_per_token=flops_per_token(m.num_layers, m.hidden_size, m.ffn_hidden_size,
                                            m.num_attention_heads, m.num_query_groups, m.seq_length,
                                            vocab_size),
            peak_flops=peak_flops_per_device(), start=start, progress=checkpointing.Progress(), run_lock=run_lock,
        )
        if start.checkpoint:
            trainer.progress = checkpointing.load(trainer, Path(start.checkpoint), start.state)
        # Built after the checkpoint is known: streaming takes a resume state only before iterating.
        trainer.batches = replica_batches(cfg, layout, start.state["data"] if start.state else None,
                                          data.mixture_reference)
        return trainer
    except BaseException:  # whatever stops the build, the run directory is free again
        if run_lock is not None:
            run_lock.release()
        raise


def start_from_hf(cfg: HeftConfig, chunks: list[torch.nn.Module], manifest: dict) -> None:
    """Overwrite the fresh model's weights with a Hugging Face Llama's (checkpoint.init_hf)."""
    from heft.data.tokenizer import load_tokenizer
    from heft.model.hf_import import HFImportError, check_fits, load_into

    try:
        check_fits(cfg.checkpoint.init_hf, cfg.model, load_tokenizer(cfg.data.path, manifest["tokenizer"]))
        load_into(chunks, cfg.checkpoint.init_hf, cfg.model)
    except HFImportError as exc:
        raise ConfigError(str(exc)) from None
    console.say(f"heft: model initialised from the Hugging Face checkpoint {cfg.checkpoint.init_hf}")
