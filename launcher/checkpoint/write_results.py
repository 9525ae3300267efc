"""A synchronous save's write results stay in the saving process (a megatron-core compatibility shim).

megatron-core's torch_dist save collects what its writer processes wrote through one module-level
queue, ``filesystem_async._results_queue``, created on first use as a queue of a *spawned*
``multiprocessing`` manager, so that an asynchronous save running in another process can hand its
results back. The manager is a fresh interpreter, and unpickling the results imports torch there:
every process's first save waited 2.9 s for it (profiled on the tiny model, 2026-12-07,
megatron-core 0.14), every rank of every run, though a synchronous save puts and takes the results
in the same process.

During a synchronous save this swaps in a plain in-process queue and restores whatever was there
afterwards, so asynchronous saves (``checkpoint.async_save``) keep megatron-core's manager queue.
If megatron-core renames the global, nothing is swapped and saves take the upstream path.
"""

from __future__ import annotations

import contextlib
import queue


@contextlib.contextmanager
def kept_in_process():
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not hasattr(filesystem_async, "_results_queue"):
        yield
        return
    upstream = filesystem_async._results_queue
    filesystem_async._results_queue = queue.Queue()
    try:
        yield
    finally:
        filesystem_async._results_queue = upstream
