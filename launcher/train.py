"""The training loop. Runs in every worker process (under torchrun or srun).

    set up (build_trainer):  process groups -> data -> model chunks (DDP) -> optimizer + LR
                             schedule -> loss reduction (plain mean or reweighting) -> evaluator
    loop (train):            next batch -> train_step (the mixture controller observes it) ->
                             non-finite policy -> log -> stop requests -> evaluate -> checkpoint
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from heft.launcher.config import HeftConfig, ConfigError, validate
from heft.launcher.metrics import MetricsWriter
from heft.launcher.optim import build_optimizer, current_lr
from heft.launcher.step import StepResult, device, train_step


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm is NaN/inf and the policy says stop."""


@dataclass
class Trainer:
    """Everything a worker builds once; ``step`` runs one optimizer step."""

    cfg: HeftConfig
    layout: object
    domain_names: list
    vocab_size: int
    chunks: list
    optimizer: object
    scheduler: object
    reduction: object
    forward_backward: object
    batches: object
    """data.mixer.DomainMixer: this replica's batches, and the mixture's state."""
    evaluator: object
    flops_per_token: float
    peak_flops: float | None
    start: object
    """Where the run started (rundir.Start: fresh, or a checkpoint)."""
    progress: object
    """checkpoint.Progress: the step reached and the skip counters, saved with every checkpoint."""

    def step(self, step: int) -> StepResult:
        result = train_step(self.forward_backward, self.chunks, self.optimizer, self.scheduler,
                            self.reduction, step, next(self.batches), self.cfg.train.micro_batch_size,
                            self.cfg.model.seq_length)
        if not result.report.nonfinite_samples:  # online mixture controllers learn from the step
            self.batches.observe(step, result.report.domain_counts, result.report.domain_loss_sums)
        return result


def start_processes(cfg: HeftConfig):
    """Validate the config for this world, then create the process groups. Returns the Layout."""
    import os

    from heft.model.parallel import initialize

    validate(cfg, int(os.environ["WORLD_SIZE"]))  # before any group exists: fails here, not in a hang
    return initialize(cfg.parallel, cfg.train.seed, cfg.train.collective_timeout_s)


def build_model(cfg: HeftConfig, vocab_size: int, backends):
    """This rank's model chunks (megatron-core GPTModel in DDP), from the model and parallel sections."""
    from heft.model.build import Execution, build_model_chunks

    run = Execution(precision=cfg.train.precision, recompute=cfg.train.recompute, seed=cfg.train.seed,
                    attention=cfg.train.attention, rope=cfg.train.rope)
    return build_model_chunks(cfg.model, cfg.parallel, run, vocab_size, backends)


def check_backends(cfg: HeftConfig, backends) -> None:
    from heft.model.build import check_backend_support

    try:
        check_backend_support(cfg.parallel, backends, cfg.train.attention)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def replica_batches(cfg: HeftConfig, layout, state: dict | None = None, reference=None):
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


def build_loss_reduction(cfg: HeftConfig, layout, domain_names: list[str], reweight=None):
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

    from heft.data.controllers import check_mixture
    from heft.data.loader import (check_has_validation, check_sequence_length, domain_proportions,
                                  validation_batches)
    from heft.data.verify import check_enough_samples, verify_dataset
    from heft.launcher.evaluate import Evaluator
    from heft.launcher import checkpoint
    from heft.launcher.rundir import decide_start_on_every_rank
    from heft.model import cpu_compat
    from heft.model.build import Backends, resolve_dtype
    from heft.model.flops import flops_per_token, peak_flops_per_device
    from heft.reweighting.config import ReweightConfig

    cpu_compat.enable_if_no_cuda()
    backends = Backends.detect()
    check_backends(cfg, backends)
    layout = start_processes(cfg)
    start = decide_start_on_every_rank(cfg, layout.rank)
    # Again here (heft train checked before launch): under srun or bare torchrun nobody else has.
    manifest = verify_dataset(cfg.data.path)
    check_sequence_length(manifest, cfg.model.seq_length, cfg.data.path)
    check_enough_samples(manifest, domain_proportions(manifest, cfg.data.proportions),
                         cfg.train.global_batch_size, cfg.data.path)
    vocab_size = manifest["tokenizer"]["vocab_size"]
    domain_names = [d["name"] for d in manifest["domains"]]
    reference = check_mixture(cfg.mixture, domain_names, cfg.data.path)
    clean_stale_data_state(cfg)

    t, m = cfg.train, cfg.model
    chunks = build_model(cfg, vocab_size, backends)
    if cfg.checkpoint.init_hf and not start.checkpoint:
        start_from_hf(cfg, chunks, manifest)
    optimizer, scheduler = build_optimizer(cfg, chunks, resolve_dtype(t.precision, backends) == torch.bfloat16)
    reduction = build_loss_reduction(cfg, layout, domain_names)
    reduction.install(get_model_config(chunks[0]))
    forward_backward = get_forward_backward_func()
    evaluator = None
    if t.eval_interval or t.eval_at_end:
        check_has_validation(manifest, cfg.data.path)
        evaluator = Evaluator(
            validation_batches(cfg.data.path, t.micro_batch_size, cfg.parallel.model_parallel_size(),
                               t.eval_max_microbatches),
            build_loss_reduction(cfg, layout, domain_names, ReweightConfig(strategy="none")),
            chunks, forward_backward, t.micro_batch_size, m.seq_length)
    trainer = Trainer(
        cfg=cfg, layout=layout, domain_names=domain_names, vocab_size=vocab_size,
        chunks=chunks, optimizer=optimizer, scheduler=scheduler, reduction=reduction,
        forward_backward=forward_backward, batches=None, evaluator=evaluator,
        flops_per_token=flops_per_token(m.num_layers, m.hidden_size, m.ffn_hidden_size,
                                        m.num_attention_heads, m.num_query_groups, m.seq_length,
                                        vocab_size),
        peak_flops=peak_flops_per_device(), start=start, progress=checkpoint.Progress(),
    )
    if start.checkpoint:
        trainer.progress = checkpoint.load(trainer, Path(start.checkpoint), start.state)
    # Built after the checkpoint is known: streaming takes a resume state only before iterating.
    trainer.batches = replica_batches(cfg, layout, start.state["data"] if start.state else None, reference)
    return trainer


def start_from_hf(cfg: HeftConfig, chunks, manifest: dict) -> None:
    """Overwrite the fresh model's weights with a Hugging Face Llama's (checkpoint.init_hf)."""
    from heft.data.tokenizer import load_tokenizer
    from heft.model.hf_import import HFImportError, check_fits, load_into

    try:
        check_fits(cfg.checkpoint.init_hf, cfg.model, load_tokenizer(cfg.data.path, manifest["tokenizer"]))
        load_into(chunks, cfg.checkpoint.init_hf, cfg.model)
    except HFImportError as exc:
        raise ConfigError(str(exc)) from None
    say(f"heft: model initialised from the Hugging Face checkpoint {cfg.checkpoint.init_hf}")


def check_nonfinite(cfg: HeftConfig, step: int, result: StepResult, consecutive_skips: int) -> int:
    """Apply train.on_nonfinite_loss to a non-finite loss or gradient norm (the update was not
    applied either way); returns the new count of consecutive skipped steps."""
    bad = result.report.nonfinite_samples
    if bad:
        what = "training loss is non-finite"
        message = (f"{bad} sample loss(es) are NaN/inf at step {step} (global batch loss "
                   f"{result.report.loss:.4g}); the step was not applied")
    elif not math.isfinite(result.grad_norm):
        what = "gradient is non-finite"
        message = (f"the gradient norm is {result.grad_norm} at step {step} although the loss "
                   f"({result.report.loss:.4g}) is finite; the step was not applied")
    else:
        return 0
    message += f". Lower optim.lr (now {cfg.optim.lr}) or check the data for corrupt samples"
    if cfg.train.on_nonfinite_loss == "error":
        raise NonFiniteLossError(f"{what}: {message}")
    if consecutive_skips + 1 >= cfg.train.max_consecutive_skips:
        raise NonFiniteLossError(f"{consecutive_skips + 1} consecutive steps skipped: {message}")
    if cfg.train.on_nonfinite_loss == "skip":
        say(f"heft: skipping step {step}: {message}")
    return consecutive_skips + 1


def announce(line: str | None) -> None:
    if line:
        say(line)


def say(line: str) -> None:
    """Print from global rank 0 only: every rank knows the same, one copy is enough."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(line, flush=True)


class Throughput:
    """Step time and tokens per second over the current logging window."""

    def __init__(self):
        self.seconds, self.tokens, self.steps = 0.0, 0, 0

    def add(self, seconds: float, tokens: int) -> None:
        self.seconds, self.tokens, self.steps = self.seconds + seconds, self.tokens + tokens, self.steps + 1

    def take(self) -> tuple[float, float]:
        """(seconds per step, tokens per second) of the window, which then starts anew."""
        result = (self.seconds / max(self.steps, 1), self.tokens / max(self.seconds, 1e-9))
        self.seconds, self.tokens, self.steps = 0.0, 0, 0
        return result


def step_record(trainer: Trainer, step: int, result: StepResult, throughput: Throughput, skipped: int) -> dict:
    cfg, layout = trainer.cfg, trainer.layout
    step_time, tokens_per_s = throughput.take()
    return {
        "step": step,
        "consumed_tokens": step * cfg.train.global_batch_size * cfg.model.seq_length,
        "loss": result.report.loss,
        "lr": current_lr(trainer.optimizer),
        "grad_norm": result.grad_norm,
        "step_time_s": step_time,
        "tokens_per_s": tokens_per_s,
        "mfu": (tokens_per_s * trainer.flops_per_token / (layout.world_size * trainer.peak_flops)
                if trainer.peak_flops else None),
        "skipped_steps": skipped,
        **result.report.metrics,
        **trainer.batches.take_telemetry(),
    }


def train(cfg: HeftConfig) -> list[dict]:
    """Train until ``cfg.train.steps``, from a checkpoint if the run directory has one. Returns the
    records logged by this run (identical on every rank)."""
    from heft.launcher import checkpoint, out_of_memory, output
    from heft.launcher.preemption import StopRequests, ctrl_c_raises
    from heft.launcher.rundir import already_finished
    from heft.launcher.watchdog import Watchdog
    from heft.model.parallel import shutdown

    started = time.perf_counter()
    trainer = build_trainer(cfg)
    ctrl_c_raises()  # built: from now on Ctrl-C stops this worker cleanly
    t, layout, progress = cfg.train, trainer.layout, trainer.progress
    finished = already_finished(cfg, trainer.start)
    if finished:
        say(finished)
        shutdown()
        return []
    writer = MetricsWriter(t.run_dir, enabled=layout.rank == 0, tensorboard=t.tensorboard,
                           resume_step=progress.step)
    stops = StopRequests(device())
    watchdog = Watchdog(layout.rank, layout.world_size, t.step_timeout_s, on_timeout=stalled)
    saver = checkpoint.Saver(trainer, cfg.checkpoint.directory(t.run_dir), cfg.checkpoint.keep,
                             cfg.checkpoint.async_save)
    say(output.banner(cfg, trainer, resumed_from=trainer.start.checkpoint))
    records, throughput, saved = [], Throughput(), None
    try:
        for step in range(progress.step + 1, t.steps + 1):
            watchdog.begin(f"step {step}")
            step_start = time.perf_counter()
            result = trainer.step(step)
            throughput.add(time.perf_counter() - step_start, result.report.tokens)
            progress.step = step
            progress.skipped_steps += int(not result.updated)
            progress.consecutive_skips = check_nonfinite(cfg, step, result, progress.consecutive_skips)
            if cfg.reweight.log_sample_weights and result.report.sample_records:
                writer.write_sample_weights(step, layout.rank, result.report.sample_records)
            if step % t.log_interval == 0 or step == t.steps:
                records.append(step_record(trainer, step, result, throughput, progress.skipped_steps))
                writer.log(records[-1], histogram=result.report.histogram)
                announce(trainer.batches.weight_change(step))
            saver.poll()
            stop = stops.agreed()
            if not stop and evaluation_due(cfg, step) and trainer.evaluator:
                watchdog.begin(f"evaluation at step {step}")
                stop = evaluate(trainer, step, stops, writer, records)
            if stop or checkpoint_due(cfg, step):
                watchdog.begin(f"checkpoint save at step {step}")
                saved = saver.save(progress)
            if stop and is_last_step(cfg, step):
                # Asked to stop at the step this run ends on anyway: it is complete, and a requeue
                # would only start a job that finds nothing to do.
                say(f"heft: {stops.name(stop)} received at step {step}, where this run ends anyway; "
                    f"not asking for a requeue")
            elif stop:
                saver.finish()
                writer.close()
                say(f"heft: {stops.name(stop)} received: saved {saved} at step {step}; exiting with "
                    f"status 75 so the job can be requeued and resume from it")
                raise StopForRequeue(stops.name(stop))
            watchdog.end()
            if step == t.stop_at_step:
                break
        watchdog.begin("the final checkpoint save")
        saver.finish()
    except Exception as exc:
        if out_of_memory.is_out_of_memory(exc):
            raise out_of_memory.explain(exc, watchdog.phase or "the run", layout.rank, t.micro_batch_size,
                                        t.recompute, cfg.parallel.tensor, cfg.parallel.pipeline) from exc
        if is_collective_failure(exc):
            raise CollectiveFailure(f"{watchdog.phase or 'the run'}: a collective failed "
                                    f"({first_line(exc)}); {watchdog.diagnosis()}") from exc
        raise
    finally:
        watchdog.close()
        trainer.batches.close()
    writer.close()
    say(output.summary(cfg, progress.step, records, time.perf_counter() - started,
                       checkpoint=str(saved) if saved else None))
    shutdown()
    return records


def evaluation_due(cfg: HeftConfig, step: int) -> bool:
    t = cfg.train
    return bool((t.eval_interval and step % t.eval_interval == 0) or (t.eval_at_end and step == t.steps))


def is_last_step(cfg: HeftConfig, step: int) -> bool:
    """The step this run ends on: train.steps, or train.stop_at_step."""
    return step in (cfg.train.steps, cfg.train.stop_at_step)


def checkpoint_due(cfg: HeftConfig, step: int) -> bool:
    """At every checkpoint.interval steps, and always at the last step (or train.stop_at_step)."""
    return is_last_step(cfg, step) or bool(cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0)


def evaluate(trainer: Trainer, step: int, stops, writer: MetricsWriter, records: list) -> int:
    """Held-out loss per domain, logged; a stop request cuts it short. Returns the agreed stop
    signal (0: none)."""
    evaluation = trainer.evaluator.run(step, stop_requested=lambda: bool(stops.agreed()))
    if evaluation is None:
        return stops.agreed()
    records.append({"step": step, **evaluation})
    writer.log_eval(records[-1])
    return 0


class StopForRequeue(Exception):
    """A stop signal was honoured: the checkpoint is saved and the worker exits with status 75."""


class CollectiveFailure(RuntimeError):
    """A collective failed or timed out: another rank died or stopped responding."""


def is_collective_failure(exc: BaseException) -> bool:
    import torch.distributed as dist

    text = str(exc).lower()
    return isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and (
        "gloo" in text or "nccl" in text or "connection closed by peer" in text))


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def stalled(message: str) -> None:
    """The watchdog's verdict: report it and end this process (the others reach the same one)."""
    import os

    from heft.launcher import reporting

    reporting.report(reporting.EXIT_FAILED, message)
    os._exit(reporting.EXIT_FAILED)
