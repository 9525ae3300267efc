"""End a heft process whose work is done without tearing every module down.

Normal interpreter shutdown frees each module and object; in a process that imported torch and
megatron-core that took 0.75 s of CPU (profiled 2026-12-07 with strace: the gap after the last
file was closed), paid by every worker at the end of every run and by the `heft` command after
its workers had ended, when nothing else is left to do.

:func:`end_process` does what of that shutdown matters, in its order: non-daemon threads are
joined together with threading's exit hooks (streaming registers one), then the atexit hooks run
(streaming unlinks its shared memory there, multiprocessing joins its children, logging flushes),
then the process exits. Where this Python lacks ``threading._shutdown`` it returns and the
interpreter's own shutdown runs instead.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading


def end_process(status: int) -> None:
    if not callable(getattr(threading, "_shutdown", None)):
        return
    _flush()
    threading._shutdown()
    atexit._run_exitfuncs()
    _flush()
    os._exit(status)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can be said
            pass
