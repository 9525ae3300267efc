"""Running out of memory, said once and clearly.

A CUDA OOM surfaces in several disguises: ``torch.OutOfMemoryError`` where torch's caching
allocator fails, a cuBLAS/cuDNN "ALLOC_FAILED" when a library allocates its workspace, and NCCL's
"unhandled cuda error" when the collective after the failure, or NCCL's own buffer allocation,
runs on a full device. On CPU it is the allocator's "can't allocate memory". Each becomes one
``OutOfMemory`` line with the phase (step N), this rank's peak and total memory, and what to
change; ``heft plan`` estimates what fits before a run.
"""

from __future__ import annotations

import os
import resource

import torch

GIB = 1024 ** 3

# Messages that mean an allocation failed, whatever raised them.
_ALLOCATION_FAILURES = ("out of memory", "can't allocate memory", "alloc_failed", "cannot allocate memory")
# NCCL reports a failed device allocation (its own, or the one before it) only as this.
_NCCL_CUDA_ERROR = "unhandled cuda error"
# A device this full when NCCL fails is taken to be out of memory.
_FULL_DEVICE_FRACTION = 0.9


class OutOfMemory(RuntimeError):
    """A step, an evaluation or a checkpoint save ran out of (GPU or host) memory."""


def is_out_of_memory(exc: BaseException) -> bool:
    """Did ``exc`` come from a failed allocation (directly, or NCCL's report of one on a full GPU)?"""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    if isinstance(exc, RuntimeError) and any(marker in text for marker in _ALLOCATION_FAILURES):
        return True
    return _NCCL_CUDA_ERROR in text and _device_was_full()


def _device_was_full() -> bool:
    if not torch.cuda.is_available():
        return False
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return torch.cuda.max_memory_reserved() >= _FULL_DEVICE_FRACTION * total


def memory_summary() -> str:
    """This rank's peak and total memory: the GPU's under CUDA, the host's otherwise."""
    if torch.cuda.is_available():
        device = torch.cuda.current_device()
        total = torch.cuda.get_device_properties(device).total_memory
        return (f"GPU {device}: peak {torch.cuda.max_memory_allocated() / GIB:.1f} GiB allocated, "
                f"{torch.cuda.max_memory_reserved() / GIB:.1f} GiB reserved, of {total / GIB:.1f} GiB")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return f"host: peak {peak / GIB:.1f} GiB resident, of {total / GIB:.1f} GiB"


def explain(exc: BaseException, phase: str, rank: int, micro_batch_size: int, recompute: str,
            tensor: int, pipeline: int, config_path: str = "CONFIG") -> OutOfMemory:
    """The one-line error for an out-of-memory ``exc`` raised during ``phase`` (e.g. "step 3")."""
    fixes = [f"lower train.micro_batch_size (now {micro_batch_size})"]
    if recompute != "full":
        fixes.append(f"set train.recompute={'selective' if recompute == 'none' else 'full'}")
    fixes.append(f"raise parallel.tensor or parallel.pipeline (now TP{tensor} PP{pipeline})")
    return OutOfMemory(
        f"{phase}: out of memory on rank {rank} ({memory_summary()}); " + ", or ".join(fixes)
        + f"; `heft plan {config_path} --gpu-memory GB` estimates what fits"
    )
