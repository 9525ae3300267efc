"""Worker entry point: ``python -m heft.launcher.worker CONFIG [key=value ...]`` under torchrun or srun.

Every way a worker can end is turned into an exit status and, for failures, one report
(``launch/reporting.py``); the launching ``heft train`` prints each distinct one once.

Importing this module changes nothing in the process: what a worker sets process-wide (the
Ctrl-C policy, stop-signal handlers, warning filters) happens first thing in :func:`main`.
"""

from __future__ import annotations

import os
import sys
import threading


def _exit_within(seconds: float, status: int) -> None:
    """Let the exit hooks run (streaming frees its shared memory at exit), but never let them hang
    a worker: a daemon timer ends the process regardless."""
    timer = threading.Timer(seconds, os._exit, args=(status,))
    timer.daemon = True
    timer.start()


def main(argv: list[str] | None = None) -> int:
    from heft.launcher.launch import known_warnings, stop

    stop.die_on_ctrl_c()  # until training starts (train/loop.py): nothing to lose yet
    known_warnings.filter_known_warnings()  # before megatron-core and streaming are imported
    stop.listen()  # a stop signal during start-up is honoured at the first step, not fatal
    stop.stop_when_orphaned()  # a worker never trains on without its launcher
    from heft.model.megatron_import import import_megatron

    import_megatron()  # before anything imports megatron-core: its fusions then cost no start-up
    from heft.launcher.config import load_config
    from heft.launcher.evaluate.heldout import EVAL_FLAG
    from heft.launcher.launch import reporting
    from heft.launcher.launch.environment import prepare_worker_environment
    from heft.launcher.train.checkpointing import CheckpointSaveFailed
    from heft.launcher.train.loop import CollectiveFailure, NonFiniteLossError, StopForRequeue, train
    from heft.launcher.train.out_of_memory import OutOfMemory
    from torch.distributed.checkpoint.api import CheckpointException

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("usage: python -m heft.launcher.worker CONFIG [key=value ...]", file=sys.stderr)
        return reporting.EXIT_USAGE
    if not prepare_worker_environment():
        print("heft.launcher.worker must run under torchrun or srun; use `heft train` instead",
              file=sys.stderr)
        return reporting.EXIT_USAGE
    if argv[0] == EVAL_FLAG:  # heft eval: held-out loss of a checkpoint under this layout
        from heft.launcher.evaluate.heldout import evaluate_checkpoint

        def job():
            evaluate_checkpoint(argv[1], argv[2:])
    else:
        def job():
            train(load_config(argv[0], argv[1:]))
    try:
        job()
        status = reporting.EXIT_OK
    except StopForRequeue:
        status = reporting.EXIT_REQUEUE  # rank 0 said where it saved
    except KeyboardInterrupt:
        status = reporting.EXIT_INTERRUPTED  # the launcher says so once
    except reporting.USER_ERRORS as exc:
        status = reporting.EXIT_USAGE
        reporting.report(status, str(exc))
    except (NonFiniteLossError, CollectiveFailure, OutOfMemory, CheckpointSaveFailed) as exc:
        status = reporting.EXIT_FAILED
        reporting.report(status, str(exc))
    except (Exception, CheckpointException) as exc:  # a bug or an upstream failure: keep the traceback, once
        status = reporting.EXIT_FAILED  # (torch's CheckpointException is a BaseException)
        reporting.report_exception(exc)
    reporting.record_exit(status)
    sys.stdout.flush()
    sys.stderr.flush()
    _exit_within(10.0, status)  # an exit hook that hangs cannot keep the worker
    return status


# The guard matters: dist_checkpointing and streaming spawn helpers that re-import __main__.
if __name__ == "__main__":
    from heft.launcher.launch.process_exit import end_process

    code = main()
    end_process(code)
    sys.exit(code)
