"""``RUN_DIR/heft-run.json``: what the launching ``heft train`` knows about its run, for ``heft status``.

Written by the launcher of node 0 (the only one on a single node) when the workers start, and again
when they end, with the exit status and, for a failure, the error line the launcher printed. Workers
never touch it, so a killed worker cannot leave it half-written; the file is replaced atomically.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from heft.launcher.atomic import write_atomically
from heft.launcher.launch import reporting

FILE_NAME = "heft-run.json"

# Exit status -> the run's state as `heft status` reports it (launcher/launch/reporting.py lists statuses).
ENDED_STATES = {reporting.EXIT_OK: "done", reporting.EXIT_REQUEUE: "preempted",
                reporting.EXIT_INTERRUPTED: "interrupted", reporting.EXIT_USAGE: "failed",
                reporting.EXIT_FAILED: "failed"}


def path_in(run_dir: str | Path) -> Path:
    return Path(run_dir) / FILE_NAME


def read(run_dir: str | Path) -> dict | None:
    try:
        return json.loads(path_in(run_dir).read_text())
    except (OSError, ValueError):
        return None


def _write(run_dir: str | Path, record: dict) -> None:
    """Best effort: a full disk or a file-size limit must not turn the run's outcome into a
    traceback; ``heft status`` then says the launcher left no word."""
    try:
        write_atomically(path_in(run_dir), json.dumps(record, indent=1) + "\n")
    except OSError as exc:
        print(f"heft: warning: could not write {path_in(run_dir)} ({exc.strerror or exc}); `heft status` "
              f"will not know this run's state", file=sys.stderr, flush=True)


class RunStateFile:
    """The launcher's record of one launch; ``enabled=False`` (nodes other than 0) writes nothing."""

    def __init__(self, cfg, world_size: int, nnodes: int, enabled: bool = True):
        self.run_dir = cfg.train.run_dir
        self.enabled = enabled
        self.record = {
            "state": "running",
            "status": None,
            "error": None,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.time(),
            "ended": None,
            "steps": cfg.train.steps,
            "stop_at_step": cfg.train.stop_at_step,
            "checkpoint_dir": str(cfg.checkpoint.directory(cfg.train.run_dir).resolve()),
            "world_size": world_size,
            "nnodes": nnodes,
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        }

    def started(self) -> None:
        if self.enabled:
            _write(self.run_dir, self.record)

    def ended(self, status: int, error_lines: list[str]) -> None:
        if not self.enabled:
            return
        self.record.update(state=ENDED_STATES.get(status, "failed"), status=status,
                           error=error_lines[0] if error_lines and status not in (reporting.EXIT_OK, reporting.EXIT_REQUEUE) else None,
                           ended=time.time())
        _write(self.run_dir, self.record)
