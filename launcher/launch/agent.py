"""``heft train`` on a machine: start the workers with torchrun's elastic agent, in this process.

Running the agent in-process (rather than exec'ing ``torchrun``) lets heft own what the user sees
and what signals do:

* workers write failures to a report directory instead of printing them; when the agent reports
  failed workers, each distinct message is printed once (``launcher/launch/reporting.py``), and
  ``heft train`` exits with the workers' status;
* Ctrl-C (SIGINT) is the agent's: it stops the workers, and heft prints one line;
* SIGTERM and SIGUSR1 are heft's: they are forwarded to the workers, which save a checkpoint at
  the next step boundary and exit with status 75 ("requeue me"); the agent is told not to handle
  SIGTERM itself, since it would kill the workers 30 s later, possibly in the middle of a save;
* a stop file (``RUN_DIR/heft-stop``) asks the same as SIGUSR1. It is how a Slurm batch script
  asks (slurm/heft.sbatch.j2): a signal sent through ``srun`` reaches every process of the step,
  including the helper processes the workers need to write a checkpoint, which die of it.
  One rank hearing of it is enough: the ranks agree on stopping with an all-reduce.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from heft.launcher.launch import known_warnings, rendezvous_names, reporting

WORKER_MODULE = "heft.launcher.worker"
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# Once a worker has reported a failure, the workers still running this many seconds later are
# SIGKILLed. torch's agent waits 30 s after its SIGTERM (a fixed default of its process context),
# but a rank still running then is stuck: in a collective with the failed rank, or stopped. A
# failure leaves nothing the ranks could save together, and a checkpoint is committed before any
# rank exits (the save's last barrier), so a longer wait only delays the error line.
WORKER_STOP_GRACE_S = 10


def _watch_stop_file(path: Path, finished: threading.Event, poll_s: float = 1.0) -> None:
    """Until ``finished``: when ``path`` appears, send SIGUSR1 to this node's workers, once."""
    while not finished.wait(poll_s):
        if path.exists() and _forward(signal.SIGUSR1, None):  # none yet: they are starting
            print(f"heft: {path} found: asking the run to save and stop", file=sys.stderr, flush=True)
            return


def _end_stuck_workers(report_dir: str, finished: threading.Event, poll_s: float = 0.5) -> None:
    """Until ``finished``: once a worker has written a failure report, SIGKILL this node's workers
    still running WORKER_STOP_GRACE_S later (see the constant). The report names the cause; the
    ranks killed here come after it, so the failure summary leaves them out."""
    while not finished.wait(poll_s):
        if reporting.read_reports(report_dir):
            if not finished.wait(WORKER_STOP_GRACE_S):
                for worker in _worker_processes():
                    try:
                        worker.kill()
                    except Exception:
                        pass
            return


def torchrun_arguments(nproc_per_node: int, nnodes: int, rdzv_endpoint: str | None, rdzv_id: str,
                       node_rank: int | None, worker_args: list[str]) -> list[str]:
    """The torchrun command line that starts ``nproc_per_node`` heft workers on this node."""
    args = [f"--nproc-per-node={nproc_per_node}"]
    if nnodes > 1:
        args += [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}",
                 f"--rdzv-id={rdzv_id}"]
        if node_rank is not None:
            # Node 0 hosts the c10d store. Left to torch's guess (does the endpoint name this
            # machine?), two launchers on one machine both claim it, and the loser retries.
            args += [f"--node-rank={node_rank}", f"--rdzv-conf=is_host={int(node_rank == 0)}"]
    else:
        args.append("--standalone")
    return args + ["-m", WORKER_MODULE, *worker_args]


def _adopt_orphans() -> None:
    """Become the Linux "child subreaper" of this process tree: helper processes that workers spawn
    (the multiprocessing manager and resource tracker that checkpoint saves and streaming start) are
    re-parented here, not to init, when their worker is killed, so they can be cleaned up below.
    Elsewhere this is a no-op."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def _end_leftover_processes() -> None:
    """After the agent returns every worker has ended; anything still below us is an orphaned
    helper of a killed worker (it would hold the terminal's pipes open and leak memory)."""
    import psutil

    leftovers = psutil.Process().children(recursive=True)
    for process in leftovers:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(leftovers, timeout=5)


def _worker_processes():
    import psutil

    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return []
    found = []
    for child in children:
        try:
            if WORKER_MODULE in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return found


class StoppedBeforeWorkers(Exception):
    """SIGTERM while no worker runs yet (waiting for the other nodes): nothing to save, stop."""


def _forward(signum, frame) -> int:
    """Send ``signum`` to this node's workers; returns how many got it. SIGTERM before there are
    any (the agent waits for the other nodes to join) ends the launch instead of vanishing."""
    sent = 0
    for worker in _worker_processes():
        try:
            worker.send_signal(signum)
            sent += 1
        except Exception:
            pass
    if not sent and frame is not None and signum == signal.SIGTERM:
        raise StoppedBeforeWorkers()
    return sent


def _quiet_agent(verbose: bool) -> None:
    """The agent logs every worker start and stop as warnings; heft reports the outcome itself.
    Its module loggers set their own levels, so each one is quieted, not just the parent."""
    if verbose:
        return
    prefixes = ("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher")
    for name in [*logging.root.manager.loggerDict, *prefixes]:
        if name.startswith(prefixes):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def run_workers(torchrun_args: list[str], world_size: int, verbose: bool = False,
                printed: list[str] | None = None, stop_path: Path | None = None,
                after_ctrl_c: Callable[[], str] | None = None) -> int:
    """Run torchrun's agent here; returns the exit status for ``heft train``. The failure lines it
    prints are also appended to ``printed`` (for the run's state file). ``stop_path``: a stop file
    to watch (see the module doc). ``after_ctrl_c``: the end of the line that reports Ctrl-C (what
    to do next), asked once the workers are gone."""
    printed = [] if printed is None else printed
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    report_dir = tempfile.mkdtemp(prefix="heft-report-")
    os.environ[reporting.REPORT_DIR_VAR] = report_dir
    # SIGTERM stays heft's (forwarded, see the module doc); SIGINT etc. stay the agent's.
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGINT,SIGHUP,SIGQUIT"
    if "OMP_NUM_THREADS" not in os.environ:  # torchrun would set 1 and warn about it
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _nproc(torchrun_args)))
    _quiet_agent(verbose)
    rendezvous_names.install()
    child_filters = known_warnings.child_process_warning_filters()
    if child_filters:
        os.environ["PYTHONWARNINGS"] = child_filters
    parser = get_args_parser()
    if "--signals-to-handle" in parser._option_string_actions:  # torch >= 2.13; older read the variable
        torchrun_args = ["--signals-to-handle=SIGINT,SIGHUP,SIGQUIT", *torchrun_args]
    previous = {sig: signal.signal(sig, _forward) for sig in FORWARDED_SIGNALS}
    _adopt_orphans()
    finished = threading.Event()
    if stop_path is not None:
        threading.Thread(target=_watch_stop_file, args=(stop_path, finished), daemon=True).start()
    threading.Thread(target=_end_stuck_workers, args=(report_dir, finished), daemon=True).start()
    try:
        run(parser.parse_args(torchrun_args))
        return reporting.EXIT_OK
    except ChildFailedError as failed:
        status, lines = _explain_failure(failed, report_dir, world_size)
        printed.extend(lines)
        return status
    except SignalException as stopped:
        if stopped.sigval == signal.SIGINT:
            printed.append("heft: interrupted (Ctrl-C); the workers were stopped"
                           + (after_ctrl_c() if after_ctrl_c else ""))
            print(printed[-1], file=sys.stderr, flush=True)
            return reporting.EXIT_INTERRUPTED
        printed.append(f"heft: stopped by {stopped.sigval.name}")
        print(printed[-1], file=sys.stderr, flush=True)
        return 128 + int(stopped.sigval)
    except StoppedBeforeWorkers:
        printed.append("heft: SIGTERM before the workers started (waiting for the other nodes); "
                       "stopped, nothing to save")
        print(printed[-1], file=sys.stderr, flush=True)
        return 128 + int(signal.SIGTERM)
    except Exception as exc:  # the agent's own failure: rendezvous, the store, ...
        status, lines = _after_agent_error(exc, report_dir, _nproc(torchrun_args))
        printed.extend(lines)
        for line in lines:
            print(line, file=sys.stderr, flush=True)
        return status
    finally:
        finished.set()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _end_leftover_processes()
        shutil.rmtree(report_dir, ignore_errors=True)


def _nproc(torchrun_args: list[str]) -> int:
    return int(next(a for a in torchrun_args if a.startswith("--nproc-per-node=")).split("=")[1])


def _after_agent_error(exc: Exception, report_dir: str, nproc: int) -> tuple[int, list[str]]:
    """The agent failed rather than a worker. With several nodes the usual cause is benign: every
    worker here already exited (saved and stopped: 75), and the node hosting the rendezvous store
    finished first and took the store with it. Then this node's status is its workers'. Otherwise
    the rendezvous itself failed: one line, not the agent's traceback."""
    exits = reporting.read_exits(report_dir)
    if len(exits) == nproc and set(exits.values()) <= {reporting.EXIT_OK, reporting.EXIT_REQUEUE}:
        return max(exits.values()), []
    text = str(exc).strip().splitlines()
    if type(exc).__name__ == "RendezvousTimeoutError":
        return reporting.EXIT_FAILED, [
            "heft: failed: not every node joined the rendezvous in time; start `heft train ... "
            "--nnodes N --node-rank R --rdzv-endpoint HOST:PORT` on each of the N nodes, with the "
            "same endpoint and --rdzv-id"]
    return reporting.EXIT_FAILED, [
        f"heft: failed: torchrun's agent on this node failed ({type(exc).__name__}: "
        f"{text[0][:300] if text else ''}); if another node's heft train ended first, its error "
        f"is the cause; else check --rdzv-endpoint (reachable from every node, the same everywhere)"]


def _explain_failure(failed, report_dir: str, world_size: int) -> tuple[int, list[str]]:
    failures = failed.failures  # global rank -> ProcessFailure
    reports = reporting.read_reports(report_dir)
    if not reports and any(f.exitcode == reporting.EXIT_REQUEUE for f in failures.values()):
        # Saved and stopped on a signal; ranks still exiting when the agent noticed the first one
        # were terminated by it, which changes nothing. Rank 0 already said where it saved.
        return reporting.EXIT_REQUEUE, []
    status, lines = reporting.summarise(reports, world_size)
    # Ranks that died by a signal without a word (SIGKILL, out of memory, a segfault) are the likely
    # cause of what the others report; SIGTERM is how the agent stops the rest, so it is left out.
    # Only deaths before the first report: ranks the agent killed afterwards (stuck in a collective
    # with a dead peer, or stopped) are consequences, not causes.
    reported = {r["rank"] for r in reports}
    first_report = min((r["time"] for r in reports), default=float("inf"))
    killed = sorted((rank, f) for rank, f in failures.items()
                    if rank not in reported and f.exitcode < 0 and f.exitcode != -signal.SIGTERM
                    and f.timestamp <= first_report)
    lines = [f"heft: failed: rank {rank} was killed by {f.signal_name()}"
             + (" (out of memory, kill -9, or it would not stop when asked)" if f.exitcode == -signal.SIGKILL else "")
             for rank, f in killed] + lines
    if not lines:
        rank, first = min(failures.items(), key=lambda item: item[1].timestamp)
        lines = [f"heft: failed: rank {rank} exited with status {first.exitcode} without reporting an error"]
    if killed or not reports:
        status = reporting.EXIT_FAILED
    for line in lines:
        print(line, file=sys.stderr)
    sys.stderr.flush()
    return status, lines
