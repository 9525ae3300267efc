"""What heft asks of Slurm and keeps about a submitted job: ``scontrol show job``, the job record
``heft submit`` writes (``RUN_DIR/slurm/job.json``), and what Slurm's job states mean for a run.
Shared by ``heft submit`` (is the run directory's job still active?) and ``heft status``."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

JOB_RECORD = "job.json"

# Slurm job states -> what they mean for the run (scontrol's JobState).
SLURM_STATE_VERDICT = {
    "PENDING": "queued", "CONFIGURING": "starting", "RUNNING": "running", "COMPLETING": "ending",
    "REQUEUED": "queued", "REQUEUE_HOLD": "held", "REQUEUE_FED": "queued", "SUSPENDED": "suspended",
    "PREEMPTED": "preempted", "COMPLETED": "done", "CANCELLED": "cancelled", "FAILED": "failed",
    "TIMEOUT": "timed out", "NODE_FAIL": "failed", "OUT_OF_MEMORY": "failed", "BOOT_FAIL": "failed",
    "DEADLINE": "timed out",
}


ACTIVE_STATES = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD",
                 "REQUEUE_FED", "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT")


def scontrol_job(job_id: str) -> dict | None:
    """``scontrol show job -o`` as a dict; None when there is no scontrol or it forgot the job."""
    try:
        done = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                              text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0 or not done.stdout.strip():
        return None
    line = done.stdout.strip().splitlines()[0]
    return dict(re.findall(r"(\w+)=(\S*)", line))


def read_job_record(run_dir: str | Path) -> dict | None:
    try:
        return json.loads((Path(run_dir) / "slurm" / JOB_RECORD).read_text())
    except (OSError, ValueError):
        return None
