"""The Slurm job's own bookkeeping: ``RUN_DIR/slurm/events.jsonl`` and the requeue decision.

The batch script ``heft submit`` renders calls ``heft job-event start RUN_DIR`` before training and
``heft job-event end RUN_DIR --status S`` after it; the second exits 0 when the job should requeue
itself. Requeue only what a requeue can fix:

* status 75 (a stop signal: preemption or the coming time limit; the run saved a checkpoint):
  requeue, unless the job was already requeued ``--max-requeues`` times, or the last
  ``NO_PROGRESS_LIMIT`` requeues all resumed from the same checkpoint step (a loop that never
  trains a step would otherwise hold a place in the queue forever);
* 0 (finished), every failure (bad config or data, NaN, a crash) and a job that got SIGTERM
  (``scancel``, or the cluster ending it): never.

The events file is what ``heft status`` reads for the requeue count: Slurm forgets a job's restart
count soon after it ends, and ``sacct`` needs a database many clusters do not give users.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from heft.launcher.checkpoint import files
from heft.launcher.launch import runstate

NO_PROGRESS_LIMIT = 3
EVENTS = Path("slurm") / "events.jsonl"


def events_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / EVENTS


def read_events(run_dir: str | Path) -> list[dict]:
    path = events_path(run_dir)
    if not path.is_file():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a killed job; the others still count
    return events


def _append(run_dir: str | Path, event: dict) -> None:
    path = events_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(event) + "\n")


def latest_checkpoint_step(run_dir: str | Path) -> int | None:
    """The newest complete checkpoint's step, from the directory the run's launcher recorded."""
    state = runstate.read(run_dir) or {}
    ckpt_dir = Path(state.get("checkpoint_dir") or Path(run_dir) / "checkpoints")
    complete = files.complete_checkpoints(ckpt_dir) if ckpt_dir.is_dir() else []
    return files.step_of(complete[-1]) if complete else None


def _job_fields(env=os.environ) -> dict:
    array_job, array_task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    return {
        "job_id": env.get("SLURM_JOB_ID"),
        "array": f"{array_job}_{array_task}" if array_job and array_task else None,
        "restart": int(env.get("SLURM_RESTART_COUNT") or 0),
        "time": time.time(),
        "host": socket.gethostname(),
    }


def record_start(run_dir: str | Path) -> None:
    _append(run_dir, {"event": "start", **_job_fields(),
                      "nodes": os.environ.get("SLURM_JOB_NODELIST"),
                      "checkpoint_step": latest_checkpoint_step(run_dir)})


def decide_requeue(status: int, restarts: int, max_requeues: int, step: int | None,
                   earlier_requeue_steps: list[int | None], terminated: bool = False) -> tuple[bool, str]:
    """(requeue?, the line that says why). ``terminated``: the batch script got SIGTERM."""
    if status == 0:
        return False, "heft: the run finished; not requeueing"
    if terminated:
        return False, ("heft: the job got SIGTERM (scancel, or the cluster ending it); not "
                       "requeueing: a cancelled job stays cancelled, and Slurm requeues a job it "
                       "preempts itself. Submit again to go on from the last checkpoint")
    if status != 75:
        return False, (f"heft: the run failed (status {status}); not requeueing: a requeue cannot "
                       f"fix it. The error is above and in `heft status`")
    if restarts >= max_requeues:
        return False, (f"heft: the job was already requeued {restarts} time(s) "
                       f"(--max-requeues {max_requeues}); not requeueing. Submit again to go on")
    recent = earlier_requeue_steps[-(NO_PROGRESS_LIMIT - 1):] if NO_PROGRESS_LIMIT > 1 else []
    if len(recent) == NO_PROGRESS_LIMIT - 1 and all(s == step for s in recent):
        return False, (f"heft: the last {NO_PROGRESS_LIMIT} requeues all stopped at checkpoint step "
                       f"{step} without training further; not requeueing. Look at the job's log "
                       f"(a grace period too short to train a step?) and submit again")
    where = f"checkpoint step {step}" if step is not None else "the start (no checkpoint yet)"
    return True, f"heft: saved and stopped; requeueing the job to resume from {where}"


def record_end(run_dir: str | Path, status: int, max_requeues: int,
               terminated: bool = False) -> tuple[bool, str]:
    fields = _job_fields()
    step = latest_checkpoint_step(run_dir)
    earlier = [e.get("checkpoint_step") for e in read_events(run_dir)
               if e.get("event") == "end" and e.get("action") == "requeue"
               and (e.get("array") or e.get("job_id")) == (fields["array"] or fields["job_id"])]
    requeue, line = decide_requeue(status, fields["restart"], max_requeues, step, earlier, terminated)
    _append(run_dir, {"event": "end", **fields, "status": status, "checkpoint_step": step,
                      "action": "requeue" if requeue else "stop", "reason": line})
    return requeue, line
