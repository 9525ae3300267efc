"""The training loop, run by every worker (under torchrun or srun): the story of a run.

    build (train/build.py) -> for each step: train_step -> non-finite policy -> log -> stop
    requests -> evaluate if due -> save if due -> stop if asked -> ... -> final save -> summary

Each part decides for itself when it is due (``Evaluator.due``, ``Saver.due``); checkpointing,
stop requests, the watchdog and the console live in their own modules behind small calls.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from heft.launcher.config import HeftConfig
from heft.launcher.metrics.writer import MetricsWriter
from heft.launcher.train.console import announce, say
from heft.launcher.train.failures import first_line, is_collective_failure
from heft.launcher.train.step import StepResult, device

if TYPE_CHECKING:
    from heft.launcher.launch.stop import StopRequests
    from heft.launcher.train.build import Trainer
    from heft.launcher.train.checkpointing import Progress, Saver
    from heft.launcher.train.watchdog import Watchdog


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm is NaN/inf and the policy says stop."""


def train(cfg: HeftConfig) -> list[dict]:
    """Train until ``cfg.train.steps``, from a checkpoint if the run directory has one. Returns the
    records logged by this run (identical on every rank)."""
    from heft.launcher.checkpoint.start import already_finished
    from heft.launcher.launch.stop import StopRequests, ctrl_c_raises, orphan_grace
    from heft.launcher.train import console, out_of_memory
    from heft.launcher.train.build import build_trainer
    from heft.launcher.train.checkpointing import Saver
    from heft.launcher.train.watchdog import Watchdog
    from heft.model.parallel import shutdown

    started = time.perf_counter()
    trainer = build_trainer(cfg)
    ctrl_c_raises()  # built: from now on Ctrl-C stops this worker cleanly
    t, layout, progress = cfg.train, trainer.layout, trainer.progress
    finished = already_finished(cfg, trainer.start)
    if finished:
        say(finished)
        trainer.release()
        shutdown()
        return []
    stops = StopRequests(device())
    orphan_grace(t.step_timeout_s)  # a worker that lost its launcher gets a step (and a save) to stop
    watchdog = Watchdog(layout.rank, layout.world_size, t.step_timeout_s, on_timeout=stalled)
    records, throughput = [], Throughput()
    try:
        writer = MetricsWriter(t.run_dir, enabled=layout.rank == 0, tensorboard=t.tensorboard,
                               resume_step=progress.step)
        saver = Saver(trainer, cfg.checkpoint.directory(t.run_dir), cfg.checkpoint.keep, cfg.checkpoint.async_save)
        say(console.banner(cfg, trainer, resumed_from=trainer.start.checkpoint))
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
            if not stop and trainer.evaluator and trainer.evaluator.due(step):
                watchdog.begin(f"evaluation at step {step}")
                stop = run_evaluation(trainer, step, stops, writer, records)
            save_or_stop(cfg, saver, progress, stops, stop, writer, watchdog)
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
        trainer.release()
    writer.close()
    say(console.summary(cfg, progress.step, records, time.perf_counter() - started,
                        checkpoint=str(saver.last_saved) if saver.last_saved else None))
    shutdown()
    return records


def save_or_stop(cfg: HeftConfig, saver: Saver, progress: Progress, stops: StopRequests, stop: int,
                 writer: MetricsWriter, watchdog: Watchdog) -> None:
    """The end of a step: save when due or asked to stop (``stop``: the agreed signal, 0 for none);
    then, when asked, end the worker for a requeue, unless this is the step the run ends on anyway."""
    step = progress.step
    if stop or saver.due(step):
        watchdog.begin(f"checkpoint save at step {step}")
        saver.save(progress)
    if not stop:
        return
    if cfg.train.is_last_step(step):
        # Asked to stop at the step this run ends on anyway: it is complete, and a requeue would
        # only start a job that finds nothing to do.
        say(f"heft: {stops.name(stop)} received at step {step}, where this run ends anyway; "
            f"not asking for a requeue")
        return
    saver.finish()
    writer.close()
    say(f"heft: {stops.name(stop)} received: saved {saver.last_saved} at step {step}; exiting with "
        f"status 75 so the job can be requeued and resume from it")
    raise StopForRequeue(stops.name(stop))


def run_evaluation(trainer: Trainer, step: int, stops: StopRequests, writer: MetricsWriter, records: list) -> int:
    """Held-out loss per domain, logged; a stop request cuts it short. Returns the agreed stop
    signal (0: none)."""
    evaluation = trainer.evaluator.run(step, stop_requested=lambda: bool(stops.agreed()))
    if evaluation is None:
        return stops.agreed()
    records.append({"step": step, **evaluation})
    writer.log_eval(records[-1])
    return 0


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
        "lr": result.lr,  # the LR this step used
        "grad_norm": result.grad_norm,
        "step_time_s": step_time,
        "tokens_per_s": tokens_per_s,
        "mfu": (tokens_per_s * trainer.flops_per_token / (layout.world_size * trainer.peak_flops)
                if trainer.peak_flops else None),
        "skipped_steps": skipped,
        **result.report.metrics,
        **trainer.batches.take_telemetry(),
    }


class StopForRequeue(Exception):
    """A stop signal was honoured: the checkpoint is saved and the worker exits with status 75."""


class CollectiveFailure(RuntimeError):
    """A collective failed or timed out: another rank died or stopped responding."""


def stalled(message: str) -> None:
    """The watchdog's verdict: report it and end this process (the others reach the same one)."""
    import os

    from heft.launcher.launch import reporting

    reporting.report(reporting.EXIT_FAILED, message)
    os._exit(reporting.EXIT_FAILED)
