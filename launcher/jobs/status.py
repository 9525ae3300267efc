"""``heft status RUN_DIR``: one screen on where a run stands.

It reads only what the run leaves in its directory (metrics.jsonl, checkpoints, heft-run.json,
slurm/job.json and slurm/events.jsonl) plus, when the run was submitted with ``heft submit`` and the
cluster still remembers the job, ``scontrol show job``. Nothing here needs the run's processes.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from heft.launcher.jobs import requeue, slurm
from heft.launcher.launch import runstate
from heft.launcher.metrics import records

@dataclass
class RunStatus:
    run_dir: Path
    state: str = "unknown"
    detail: str | None = None
    job_id: str | None = None
    slurm_state: str | None = None
    slurm_reason: str | None = None
    step: int | None = None
    steps: int | None = None
    loss: float | None = None
    eval_loss: float | None = None
    tokens_per_s: float | None = None
    step_time_s: float | None = None
    checkpoint: str | None = None
    requeues: int = 0
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def eta_s(self) -> float | None:
        if self.step is None or not self.steps or not self.step_time_s or self.state not in (
                "running", "queued", "starting", "preempted"):
            return None
        return max(self.steps - self.step, 0) * self.step_time_s


def read_metrics(run_dir: Path, window: int = 10) -> dict:
    """Last training record, last eval loss, and the mean step time of the last ``window`` records."""
    log = records.read(run_dir)
    train, evals = log.train[-window:], log.evals
    out: dict = {}
    if train:
        last = train[-1]
        times = [r["step_time_s"] for r in train if r.get("step_time_s")]
        out.update(step=last.get("step"), loss=last.get("loss"), tokens_per_s=last.get("tokens_per_s"),
                   step_time_s=sum(times) / len(times) if times else None)
    if evals:
        out["eval_loss"] = evals[-1].get("eval_loss")
    return out


def _alive_here(state: dict) -> bool:
    if state.get("host") != socket.gethostname():
        return True  # another machine's process: trust the file
    try:
        os.kill(int(state["pid"]), 0)
        return True
    except (OSError, KeyError, TypeError, ValueError):
        return False


def collect(run_dir: str | Path) -> RunStatus:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a run directory ("
                                f"{'a file' if run_dir.exists() else 'no such directory'})")
    if not any((run_dir / name).exists() for name in ("metrics.jsonl", runstate.FILE_NAME, "slurm")):
        raise FileNotFoundError(f"{run_dir} is not a run directory (no metrics.jsonl, "
                                f"{runstate.FILE_NAME} or slurm/); give a train.run_dir")
    status = RunStatus(run_dir=run_dir)
    for key, value in read_metrics(run_dir).items():
        setattr(status, key, value)
    launch = runstate.read(run_dir) or {}
    status.steps = launch.get("stop_at_step") or launch.get("steps")
    ckpt_step = requeue.latest_checkpoint_step(run_dir)
    if ckpt_step is not None:
        ckpt_dir = Path(launch.get("checkpoint_dir") or run_dir / "checkpoints")
        status.checkpoint = str(ckpt_dir / f"step_{ckpt_step}")
    events = requeue.read_events(run_dir)
    status.requeues = sum(1 for e in events if e.get("event") == "end" and e.get("action") == "requeue")

    job = slurm.read_job_record(run_dir)
    if job:
        status.job_id = job["job_id"]
    elif launch.get("slurm_job_id"):
        status.job_id = launch["slurm_job_id"]
    job_info = slurm.scontrol_job(status.job_id) if status.job_id else None
    if job_info:
        status.slurm_state = job_info.get("JobState")
        reason = job_info.get("Reason")
        status.slurm_reason = None if reason in (None, "None") else reason

    # The verdict: a live Slurm state wins; else what the launcher wrote when the run ended.
    if launch.get("state") not in (None, "running"):
        status.state = launch["state"]
        status.error = launch.get("error")
    elif launch.get("state") == "running":
        status.state = "running" if _alive_here(launch) else "ended without a word"
        if status.state != "running":
            status.notes.append("the launcher is gone and wrote no outcome: killed (kill -9, out of "
                                "memory, scancel, node failure?); resume with the same heft train "
                                "command or heft submit")
    if status.slurm_state:
        verdict = slurm.SLURM_STATE_VERDICT.get(status.slurm_state, status.slurm_state.lower())
        if verdict == "queued" and status.requeues:
            status.state, status.detail = "preempted", "requeued, waiting to resume"
        elif verdict in ("queued", "starting", "running", "ending", "held", "suspended"):
            status.state = verdict
        elif verdict == "done" and status.state == "preempted":
            status.detail = "saved and stopped; the job ended without requeueing"
        elif verdict in ("timed out", "cancelled") or status.state in ("unknown", "running"):
            status.state = verdict
    if status.state == "failed" and not status.error and events:
        reason = events[-1].get("reason")
        status.error = reason
    if status.state == "unknown" and status.step is not None:
        status.state = "done" if status.steps and status.step >= status.steps else "stopped"
    return status


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def format_status(s: RunStatus) -> str:
    rows = [("run", str(s.run_dir))]
    state = s.state + (f" ({s.detail})" if s.detail else "")
    rows.append(("state", state))
    if s.error:
        rows.append(("error", s.error))
    if s.job_id:
        slurm = s.slurm_state or "not known to scontrol (ended a while ago)"
        rows.append(("slurm job", f"{s.job_id}: {slurm}" + (f", reason {s.slurm_reason}" if s.slurm_reason else "")))
    rows.append(("requeues", str(s.requeues)))
    if s.step is not None:
        of = f" of {s.steps}" if s.steps else ""
        loss = f", loss {s.loss:.4f}" if isinstance(s.loss, (int, float)) else ""
        evl = f", eval loss {s.eval_loss:.4f}" if isinstance(s.eval_loss, (int, float)) else ""
        rows.append(("step", f"{s.step}{of}{loss}{evl}"))
    else:
        rows.append(("step", "no training step logged yet"))
    if s.tokens_per_s:
        rows.append(("speed", f"{s.tokens_per_s:,.0f} tokens/s, {s.step_time_s:.3f} s/step"
                     if s.step_time_s else f"{s.tokens_per_s:,.0f} tokens/s"))
    if s.eta_s is not None:
        rows.append(("eta", f"{_duration(s.eta_s)} to step {s.steps} at the recent step time"))
    rows.append(("checkpoint", s.checkpoint or "none complete yet"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:>{width}}  {v}" for k, v in rows]
    lines += [f"{'note':>{width}}  {n}" for n in s.notes]
    return "\n".join(lines)
