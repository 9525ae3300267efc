"""Clean what killed runs left of mosaicml-streaming's shared state, and nothing else.

Every ``StreamingDataset`` registers a prefix ``NNNNNN`` and creates ``/dev/shm/NNNNNN_<name>``
segments (``NNNNNN_locals`` lists the dataset's local directories) and two file locks
``$TMPDIR/NNNNNN_{barrier,cache}_filelock``. A run killed with SIGKILL never removes its segments, and
streaming never removes its file locks at all; new datasets skip every prefix that has either, so
both pile up. Streaming's own ``clean_stale_shared_memory()`` removes every prefix, including those
of other jobs still running on the node.

Whether a prefix is live cannot be read from the segments (a new dataset maps every older prefix
it scans, live or not), so heft marks the prefixes its datasets use: ``/dev/shm/heft-NNNNNN-PID``
(:func:`mark_in_use`). A prefix is removed only if it is stale and heft's own:

* it carries heft markers and every process they name has exited, and
* its ``locals`` names only directories inside this run's ``data.path`` (or it has no ``locals``
  segment left at all: a dataset torn down midway, which the markers alone prove was heft's),

plus the file locks, owned by this user, of prefixes that have no segments left at all (no running
dataset uses them: streaming creates the locals segment before the locks). Another program's
datasets carry no marker and are never touched.

Two jobs starting on one machine at the same moment (array tasks of a sweep on a shared node)
race in streaming's registration, which every rank runs on its own: each scans /dev/shm for the
first free prefix, then the local leader registers it. Both leaders can take the same number
("File exists: /000000_locals"), or a rank can scan after the other job registered and look for a
different number than its leader. heft's jobs register their datasets one job at a time per
machine (:func:`one_job_registers_at_a_time`).
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from pathlib import Path
from tempfile import gettempdir

SHM_DIR = Path("/dev/shm")
PREFIX = re.compile(r"^(\d{6})_")
MARKER = re.compile(r"^heft-(\d{6})-\d+$")
LOCK_SUFFIXES = ("barrier_filelock", "cache_filelock")
REGISTRATION_LOCK = SHM_DIR / "heft-registration.lock"
REGISTRATION_WAIT_S = 300.0
"""How long a job waits for another to finish registering before it goes ahead regardless (a
registration takes seconds; only jobs spanning the same machines in crossed order can wait on
each other for good). Below the collective timeout, so the waiting ranks' barrier never fails first."""


def machine_id() -> str:
    """Processes with the same id share /dev/shm: same host name and same kernel boot."""
    import socket

    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def align_local_world_with_machine() -> None:
    """Collective. Make LOCAL_RANK/LOCAL_WORLD_SIZE count the ranks that share this machine's
    /dev/shm, which is what streaming means by "local": one rank per machine (the local leader)
    registers each dataset's shared memory, the others attach to it.

    On a real cluster every node is its own machine and nothing changes. Two launchers on one
    machine (``heft train --nnodes 2`` twice, or emulated Slurm nodes) would otherwise elect two
    local leaders for the same local directories: both claim the same free prefix ("File exists:
    /000000_locals") or the second finds the directory registered ("Reused local directory")."""
    import torch.distributed as dist

    ids: list = [None] * dist.get_world_size()
    dist.all_gather_object(ids, machine_id())
    mine = ids[dist.get_rank()]
    same_machine = [rank for rank, other in enumerate(ids) if other == mine]
    os.environ["LOCAL_RANK"] = str(same_machine.index(dist.get_rank()))
    os.environ["LOCAL_WORLD_SIZE"] = str(len(same_machine))


@contextlib.contextmanager
def one_job_registers_at_a_time(wait_s: float = REGISTRATION_WAIT_S):
    """Collective when torch.distributed is initialised: build this job's streaming datasets
    inside. Each machine's local leader (after :func:`align_local_world_with_machine`) holds an
    exclusive lock on ``REGISTRATION_LOCK`` from before any of the job's ranks scans for a prefix
    until all have registered; the job's other ranks wait in barriers, so they never scan while
    another heft job on their machine registers. Outside a process group it only takes the lock."""
    import fcntl

    import torch.distributed as dist

    group = dist.is_available() and dist.is_initialized()
    fd = None
    if os.environ.get("LOCAL_RANK", "0") == "0" and SHM_DIR.is_dir():
        try:  # flock needs no write access: another user's lock file (mode 644) serves as well
            fd = os.open(REGISTRATION_LOCK, os.O_RDONLY | os.O_CREAT, 0o666)
        except OSError:  # unreadable (another user's umask): register as streaming alone would
            fd = None
        deadline = time.monotonic() + wait_s
        while fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    print(f"heft: another job on this machine has held {REGISTRATION_LOCK} for {wait_s:.0f} s; "
                          f"registering the datasets without it", flush=True)
                    os.close(fd)
                    fd = None
                else:
                    time.sleep(0.05)
    try:
        if group:
            dist.barrier()  # every machine's leader holds its lock before anyone scans
        yield
        if group:
            dist.barrier()  # every rank has registered or attached
    finally:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def mark_in_use(prefix: int) -> None:
    """Record that this process uses streaming prefix ``prefix`` (call after building a dataset)."""
    (SHM_DIR / f"heft-{prefix:06}-{os.getpid()}").touch()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _locals_of(prefix: str) -> list[str] | None:
    """The local directories a prefix's locals segment registers (streaming's packing)."""
    try:
        data = (SHM_DIR / f"{prefix}_locals").read_bytes()
    except OSError:
        return None
    # [int32 size]["dir\0dir\0...\0prefix"]; a dataset torn down midway can leave the size zeroed,
    # so read the directories (absolute paths) up to the first empty entry.
    directories = []
    for entry in data[4:].split(b"\0"):
        if not entry.startswith(b"/"):
            break
        try:
            directories.append(entry.decode("utf-8"))
        except UnicodeDecodeError:
            return None
    return directories or None


def clean_stale_streaming_state(data_path: str | Path) -> list[str]:
    """Remove stale streaming segments registered for directories under ``data_path`` and orphaned
    file locks. Run on one rank per node before any dataset is built. Returns the prefixes removed."""
    if not SHM_DIR.is_dir():
        return []
    root = os.path.realpath(data_path)
    segments: dict[str, list[Path]] = {}
    markers: dict[str, list[Path]] = {}
    for path in SHM_DIR.iterdir():
        match = PREFIX.match(path.name) or MARKER.match(path.name)
        if match:
            (segments if path.name[0].isdigit() else markers).setdefault(match.group(1), []).append(path)
    removed, torn_down = [], set()
    uid = os.getuid()
    for prefix, paths in segments.items():
        users = [int(marker.name.rsplit("-", 1)[1]) for marker in markers.get(prefix, [])]
        if not users or any(_alive(pid) for pid in users):
            continue  # not heft's, or still in use
        if (SHM_DIR / f"{prefix}_locals").exists():
            local_dirs = _locals_of(prefix)
            if not local_dirs or not all(_inside(d, root) for d in local_dirs):
                continue  # another dataset's (or unreadable): not ours to judge
        else:
            # No locals segment (a dataset torn down midway): heft's markers, all dead, say whose
            # it was. Its file locks stay until a later run: the segments may still be vanishing
            # under a dying process, and while the locks exist every rank's prefix scan skips this
            # prefix alike (streaming's ranks scan independently and must agree).
            torn_down.add(prefix)
        for path in paths + markers.get(prefix, []):
            if _owned_by(path, uid):
                path.unlink(missing_ok=True)
        removed.append(prefix)
    for prefix, paths in markers.items():  # markers of prefixes whose segments are gone
        if prefix not in segments:
            for path in paths:
                if not _alive(int(path.name.rsplit("-", 1)[1])) and _owned_by(path, uid):
                    path.unlink(missing_ok=True)
    live = {p for p in segments if p not in removed} | torn_down
    for lock in Path(gettempdir()).glob("[0-9][0-9][0-9][0-9][0-9][0-9]_*_filelock"):
        prefix = lock.name[:6]
        if prefix not in live and lock.name[7:] in LOCK_SUFFIXES and _owned_by(lock, uid):
            lock.unlink(missing_ok=True)
    return removed


def _inside(directory: str, root: str) -> bool:
    real = os.path.realpath(directory)
    return real == root or real.startswith(root + os.sep)


def _owned_by(path: Path, uid: int) -> bool:
    try:
        return path.stat().st_uid == uid
    except OSError:
        return False
