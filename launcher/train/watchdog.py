"""The watchdog: a stalled step becomes an error naming the step and the ranks that stopped.

Two things run in a daemon thread of every worker:

* a **heartbeat**: every ``HEARTBEAT_S`` the thread increments this rank's counter in the job's
  rendezvous store (the TCP store torchrun or rank 0 already serves). A process that is stopped,
  swapped out or wedged in the kernel stops counting; one that waits in a collective keeps counting.
* a **deadline**: the training loop marks the start and end of each phase (a step, an evaluation, a
  checkpoint save). A phase that runs longer than ``train.step_timeout_s`` ends the job: the thread
  compares every rank's counter over a few heartbeats to name the ranks that stopped responding,
  reports one line and exits the process (status 1). The other ranks reach the same verdict.

A collective that times out first (``train.collective_timeout_s``) raises in the main thread; the
worker then asks :meth:`Watchdog.diagnosis` for the same names.
"""

from __future__ import annotations

import datetime
import os
import threading
import time

HEARTBEAT_S = 1.0


class Watchdog:
    def __init__(self, rank: int, world_size: int, timeout_s: float, on_timeout):
        """``on_timeout(message)`` must end the process; it is called from the watchdog thread."""
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.on_timeout = on_timeout
        self.phase: str | None = None
        self._phase_start = 0.0
        self._stop = threading.Event()
        self._store = _connect_store()
        self._thread = threading.Thread(target=self._run, name="heft-watchdog", daemon=True)
        self._thread.start()

    def begin(self, phase: str) -> None:
        """Start the clock for ``phase`` (e.g. 'step 12'); it must end within the timeout."""
        self._phase_start = time.monotonic()
        self.phase = phase

    def end(self) -> None:
        self.phase = None

    def close(self) -> None:
        self._stop.set()

    # --- the thread --------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self._beat()
            phase = self.phase
            if phase and self.timeout_s and time.monotonic() - self._phase_start > self.timeout_s:
                self.on_timeout(f"{phase} did not finish within train.step_timeout_s={self.timeout_s:g} s; "
                                f"{self.diagnosis()}")
                return

    def _beat(self) -> None:
        if self._store is None:
            return
        try:
            self._store.add(f"heft/heartbeat/{self.rank}", 1)
        except Exception:  # the store's host went away: nothing to report to any more
            self._store = None

    def _counters(self) -> list[int] | None:
        try:
            return [self._store.add(f"heft/heartbeat/{r}", 0) for r in range(self.world_size)]
        except Exception:
            return None

    def diagnosis(self) -> str:
        """Which ranks stopped responding: those whose heartbeat did not move over a few beats."""
        if self._store is None:
            return "the job's store is unreachable, so the stalled rank is unknown (rank 0 may have stopped)"
        before = self._counters()
        for _ in range(3):  # keep beating meanwhile: the other ranks may be diagnosing too
            self._beat()
            time.sleep(HEARTBEAT_S)
        self._beat()
        after = self._counters()
        if before is None or after is None:
            return "the job's store is unreachable, so the stalled rank is unknown (rank 0 may have stopped)"
        stalled = [r for r, (a, b) in enumerate(zip(before, after)) if b <= a]
        if stalled:
            return (f"rank(s) {', '.join(map(str, stalled))} stopped responding (no heartbeat for "
                    f"{3 * HEARTBEAT_S:g} s); check that host, or raise the timeout if it is only slow")
        return "every rank is alive but waiting: a collective is stuck (mismatched calls, or a slow rank)"


def _connect_store():
    """A client of the job's rendezvous store, or None where there is none (one process)."""
    import torch.distributed as dist

    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        return None
    try:
        store = dist.TCPStore(host, int(port), is_master=False,
                              timeout=datetime.timedelta(seconds=10), wait_for_workers=False)
        return store
    except Exception:
        return None
