"""One run per run directory: ``RUN_DIR/heft.lock``, held by global rank 0 for the life of a run.

Two runs training into one directory would interleave their checkpoints and metrics.jsonl. The
lock file names its holder (host, pid, Slurm job, when it started) and is touched every
``HEARTBEAT_S`` seconds while held. A lock is stale, and is taken over with a note, when
* its holder ran on this host and that process is gone (a kill -9, a crash), or
* it belongs to an earlier run of this Slurm job (a requeue, perhaps on other nodes), or
* it has not been touched for ``STALE_AFTER_S`` (its host died or is unreachable).
Otherwise a second run is refused in one line naming the holder. ``heft train`` and ``heft submit``
check before launching; rank 0 takes the lock (atomically: O_EXCL) when the workers start.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from heft.launcher.launch.reporting import UserError

FILE_NAME = "heft.lock"
HEARTBEAT_S = 15.0
STALE_AFTER_S = 120.0


class RunDirInUse(UserError):
    """Another live run holds the run directory."""


def path_in(run_dir: str | Path) -> Path:
    return Path(run_dir) / FILE_NAME


def _holder_record() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart": os.environ.get("SLURM_RESTART_COUNT", "0"), "started": time.time()}


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs here: an exited process not yet reaped (a zombie) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: kill(0) said it exists
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def stale_reason(path: Path, holder: dict | None) -> str | None:
    """Why the lock at ``path`` no longer guards a live run (None: it does)."""
    if holder is None:
        return "it is unreadable (a kill while writing it)"
    if holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", 0))):
        return f"its process {holder.get('pid')} on this host is gone"
    job = os.environ.get("SLURM_JOB_ID")
    if job and holder.get("slurm_job_id") == job and holder.get("slurm_restart") != os.environ.get("SLURM_RESTART_COUNT", "0"):
        return f"it belongs to an earlier run of this Slurm job ({job}), requeued"
    try:
        age = time.time() - path.stat().st_mtime
    except OSError:
        return "it was just removed"
    if age > STALE_AFTER_S:
        return f"its holder has not touched it for {age:.0f} s"
    return None


def describe(holder: dict) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    job = f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"host {holder.get('host')}, process {holder.get('pid')}{job}, since {when}"


def _refuse(run_dir: Path, holder: dict) -> RunDirInUse:
    return RunDirInUse(f"train.run_dir={run_dir} is in use by another run ({describe(holder)}); wait for "
                       f"it to end or stop it, or choose another train.run_dir")


def check_free(run_dir: str | Path) -> None:
    """Before launching: refuse a run directory a live run holds."""
    path = path_in(run_dir)
    if path.exists():
        holder = _read(path)
        if stale_reason(path, holder) is None:
            raise _refuse(Path(run_dir), holder)


class RunLock:
    """The lock, held from :meth:`acquire` until :meth:`release` (or the process ends)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = path_in(run_dir)
        self.record = _holder_record()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self, warn=print) -> RunLock:
        for _attempt in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read(self.path)
                reason = stale_reason(self.path, holder)
                if reason is None:
                    raise _refuse(self.run_dir, holder) from None
                warn(f"heft: taking over {self.path}: {reason}")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.record) + "\n")
            self._thread = threading.Thread(target=self._heartbeat, name="heft-run-lock", daemon=True)
            self._thread.start()
            return self
        raise RunDirInUse(f"could not take {self.path}: another run keeps taking it")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        """Remove the lock if it is still this process's."""
        self._stop.set()
        holder = _read(self.path)
        if holder and holder.get("pid") == self.record["pid"] and holder.get("host") == self.record["host"]:
            self.path.unlink(missing_ok=True)
