"""Where a run starts: is its directory writable, does it already hold a run, which checkpoint
(if any) does it resume from, and what would the same command do after an interruption?

A directory that already holds a run (its metrics.jsonl has records) is never appended to
silently: with a checkpoint heft resumes from it, otherwise the run is refused with a message.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from heft.launcher.checkpoint import files
from heft.launcher.config import ConfigError
from heft.launcher.launch.run_lock import RunLock
from heft.launcher.metrics import records


class RunDirError(ConfigError):
    """The run directory cannot be used as asked. The message names the directory and the fix."""


def check_writable(run_dir: str | Path) -> None:
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".heft-write-test-{uuid.uuid4().hex}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise RunDirError(
            f"train.run_dir={run_dir} is not writable ({exc.strerror or exc}); choose a directory "
            f"you can write to"
        ) from None


def last_logged_step(run_dir: str | Path) -> int | None:
    """The last step in the run's metrics.jsonl, or None if it has no records."""
    return records.read(run_dir).last_step


@dataclass
class Start:
    """How a run starts: fresh, or from a checkpoint (with its verified heft state)."""

    checkpoint: str | None = None
    state: dict | None = None

    @property
    def step(self) -> int:
        return self.state["step"] if self.state else 0


def _refuse_earlier_run(run_dir: Path) -> None:
    step = last_logged_step(run_dir)
    if step is not None:
        raise RunDirError(
            f"train.run_dir={run_dir} already holds a run (metrics.jsonl up to step {step}) and no "
            f"checkpoint to resume from; choose a new train.run_dir, or delete {run_dir} to start over"
        )


VERIFIED_START_VAR = "HEFT_VERIFIED_START"
"""Set by the launching ``heft train`` for its workers: the checkpoint it verified, contents included
(empty: none), so rank 0 neither reads it all again nor decides otherwise."""


def decide_start(cfg, warn=print, contents: bool = True, trusted: str | None = None) -> Start:
    """Where this run starts, from train.run_dir and the checkpoint section (see CheckpointConfig.load).
    ``warn`` receives a line for each newer checkpoint that had to be skipped; ``contents``: compare
    the files with their checksums too (files.verify), except for ``trusted``, verified already."""
    run_dir = Path(cfg.train.run_dir)
    ckpt_dir = cfg.checkpoint.directory(cfg.train.run_dir)
    load = cfg.checkpoint.load
    existing = files.complete_checkpoints(ckpt_dir)
    if load == "none":
        if existing:
            raise RunDirError(
                f"{ckpt_dir} already holds checkpoints (newest {existing[-1].name}) and "
                f"checkpoint.load=none would overwrite them; resume with checkpoint.load=auto, or "
                f"choose a new train.run_dir")
        _refuse_earlier_run(run_dir)
        return Start()
    if load == "auto":
        usable = files.newest_usable(ckpt_dir, warn, contents, trusted)
        if usable is None:
            if existing:
                raise RunDirError(
                    f"none of the {len(existing)} checkpoint(s) in {ckpt_dir} can be loaded (see the "
                    f"warnings above); restore them, or start over with a new train.run_dir")
            _refuse_earlier_run(run_dir)
            return Start()
        path, state = usable
        return Start(checkpoint=str(path), state=state)
    path = Path(load)
    try:
        state = files.verify(path, contents and str(path) != trusted)
    except files.CheckpointError as exc:
        raise RunDirError(f"checkpoint.load={load}: {exc}") from None
    newer = [p for p in existing if files.step_of(p) > state["step"]]
    if newer:  # a roll-back in place would interleave two runs' checkpoints and metrics
        raise RunDirError(
            f"checkpoint.load={load} starts at step {state['step']} but {ckpt_dir} already holds "
            f"{newer[-1].name}; start from it in a new train.run_dir")
    if not existing or path.resolve().parent != ckpt_dir.resolve():
        _refuse_earlier_run(run_dir)  # never truncate another run's metrics
    return Start(checkpoint=str(path), state=state)


def rerun_hint(cfg) -> str:
    """What running the same command again would do, as a clause for the line that reports an
    interrupted run ("...; the same command resumes from RUN_DIR/checkpoints/step_40")."""
    try:
        start = decide_start(cfg, warn=lambda line: None, contents=False)
    except RunDirError:
        start = None
    if start is not None and start.checkpoint:
        return f"; the same command resumes from {start.checkpoint}"
    saved = files.complete_checkpoints(cfg.checkpoint.directory(cfg.train.run_dir))
    if saved:  # checkpoint.load=none: this run saved them, but would not load them
        return f"; resume with checkpoint.load=auto (newest: {saved[-1]})"
    if last_logged_step(Path(cfg.train.run_dir)) is None:
        return "; nothing was trained yet"
    return "; no checkpoint was saved yet, so a rerun needs a new train.run_dir (or delete this one)"


def decide_start_on_every_rank(cfg, rank: int, lock: RunLock | None = None) -> Start:
    """Rank 0 inspects the (shared) run directory, takes its ``lock`` (one run per directory) and
    decides; every rank gets the same decision or raises the same error, so no rank goes on into a
    collective alone."""
    import torch.distributed as dist

    from heft.launcher.launch.reporting import REPORT_DIR_VAR, UserError

    verdict: list = [None]
    if rank == 0:
        # Under `heft train` the launching process already verified the checkpoint it starts from
        # (contents too) and printed any skipped-checkpoint warning; started otherwise, this rank does.
        launched = bool(os.environ.get(REPORT_DIR_VAR))
        warn = (lambda line: None) if launched else print
        try:
            check_writable(cfg.train.run_dir)
            if lock is not None:
                lock.acquire(warn=print)
            verdict[0] = decide_start(cfg, warn=warn, trusted=os.environ.get(VERIFIED_START_VAR) if launched else None)
        except UserError as exc:
            verdict[0] = str(exc)
        except Exception as exc:  # whatever it is, the other ranks must hear of it, not wait
            verdict[0] = f"inspecting {cfg.train.run_dir} failed: {type(exc).__name__}: {exc}"
    dist.broadcast_object_list(verdict, src=0)
    if isinstance(verdict[0], str):
        if lock is not None:
            lock.release()
        raise RunDirError(verdict[0])
    return verdict[0]


def already_finished(cfg, start: Start) -> str | None:
    """The line to print when the checkpoint is already at train.steps (or train.stop_at_step)."""
    if start.state and start.step >= cfg.train.steps:
        return (f"heft: {cfg.train.run_dir} already reached step {start.step} of train.steps="
                f"{cfg.train.steps} ({start.checkpoint}); nothing to do. Raise train.steps to "
                f"train further")
    if start.state and cfg.train.stop_at_step and start.step >= cfg.train.stop_at_step:
        return (f"heft: {cfg.train.run_dir} already reached step {start.step} >= train.stop_at_step="
                f"{cfg.train.stop_at_step} ({start.checkpoint}); nothing to do. Raise or remove "
                f"train.stop_at_step to train further")
    return None
