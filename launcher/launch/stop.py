"""Stop requests: every way to ask a run to save and stop, and the Ctrl-C policy of a worker.

SIGTERM or SIGUSR1 on any rank asks the whole job to save and exit; so does a stop file
(``RUN_DIR/heft-stop``, :func:`stop_file`), which the launching ``heft train`` watches and turns into
SIGUSR1 for its workers (``launch/agent.py``).

The handler only records the signal. At each step boundary (and between blocks of evaluation
microbatches) every rank joins one small all-reduce, so all ranks agree to stop at the same step
even if the signal reached only one of them; then every rank saves and the worker exits with
status 75 ("saved, requeue me"). A second signal during the save changes nothing: the handler stays
installed, and the checkpoint being written becomes complete only after every rank finished.

The worker calls :func:`listen` first thing, before megatron-core is imported: a signal that arrives
while the model is still being built (a preemption right after a requeue, or ``heft submit``'s
time-limit signal) would otherwise end the worker with Python's default action for SIGUSR1, as a
failure rather than a stop. It is remembered instead and honoured at the first step boundary.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
STOP_FILE = "heft-stop"


def stop_file(run_dir: str | Path) -> Path:
    """The file whose appearance asks the run in ``run_dir`` to save and stop (as SIGUSR1 does)."""
    return Path(run_dir) / STOP_FILE

_received = 0  # the last stop signal this process received (0: none)


def _record(signum, frame) -> None:
    global _received
    _received = signum


def listen() -> None:
    """From now on a stop signal is recorded, not fatal. Idempotent."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _record)


_orphan_grace_s = 300.0  # until the run sets it from train.step_timeout_s


def orphan_grace(seconds: float) -> None:
    """How long a worker that lost its launcher may take to reach a step boundary and save."""
    global _orphan_grace_s
    _orphan_grace_s = max(seconds, 60.0)


def stop_when_orphaned(poll_s: float = 1.0) -> None:
    """A worker whose launcher is gone (``kill -9`` of ``heft train``, of torchrun, of srun's step)
    would train on alone, writing into a run directory a rerun then shares. From now on a thread
    checks the parent process every ``poll_s``: once it changes, the run is asked to save and stop
    as SIGTERM asks (every rank agrees at the next step boundary; the other nodes' workers too),
    and the process ends regardless when :func:`orphan_grace` has passed (train.step_timeout_s)."""
    import os
    import sys
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        try:
            print(f"heft: [rank {os.environ.get('RANK', '?')}] the process that launched this worker "
                  f"({parent}) is gone; saving and stopping", file=sys.stderr, flush=True)
        except OSError:  # nobody is reading any more
            pass
        _record(signal.SIGTERM, None)
        time.sleep(_orphan_grace_s)
        os._exit(1)

    threading.Thread(target=watch, name="heft-launcher-watch", daemon=True).start()


def hold_stop_signals() -> list:
    """In the launching ``heft train``, until the workers start: a stop signal (SIGUSR1/SIGTERM:
    preemption, the time limit) is remembered rather than fatal; the returned list holds it.
    launch/agent.run_workers then forwards them to the workers."""
    received: list = []
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, frame: received.append(signal.Signals(signum)))
    return received


def die_on_ctrl_c() -> None:
    """Until :func:`ctrl_c_raises`: SIGINT ends the process at once (the default action). During
    start-up a worker spends long stretches inside C++ (torch's rendezvous and process-group
    set-up, store waits) that never return to Python while a peer that Ctrl-C already ended is
    missing, so KeyboardInterrupt would never be raised: torchrun's agent waited 30 s, then killed
    it. Before the first step nothing is lost, and what a killed start-up leaves in /dev/shm the
    next run cleans (data/shm.py)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def ctrl_c_raises() -> None:
    """From here on SIGINT raises KeyboardInterrupt (Python's default): a training worker stops
    cleanly, closing its data and writing its exit status. Its peers end too, and gloo and NCCL
    collectives fail when a peer's connection closes, so none waits long."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


class StopRequests:
    def __init__(self, device: torch.device):
        self.device = device
        listen()

    @property
    def received(self) -> int:
        return _received

    def agreed(self) -> int:
        """Collective: the signal number any rank received (0: none). Same answer on every rank."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([self.received], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    @staticmethod
    def name(signum: int) -> str:
        return signal.Signals(signum).name
