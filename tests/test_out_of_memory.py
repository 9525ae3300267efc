"""Out of memory is one line naming the step, the memory and the fix (launcher/train/out_of_memory.py)."""

from __future__ import annotations

import pytest
import torch

from heft.launcher.train.out_of_memory import OutOfMemory, explain, is_out_of_memory


def _real_cpu_allocation_failure() -> RuntimeError:
    # 4 EiB: beyond any address space, so the CPU allocator really fails, at once, harmlessly.
    with pytest.raises(RuntimeError) as failure:
        torch.empty(2 ** 62, dtype=torch.uint8)
    return failure.value


def test_a_failed_host_allocation_becomes_one_line_with_the_step_memory_and_fix():
    exc = _real_cpu_allocation_failure()
    assert is_out_of_memory(exc)
    error = explain(exc, "step 7", rank=3, micro_batch_size=4, recompute="none", tensor=1, pipeline=2)
    message = str(error)
    assert isinstance(error, OutOfMemory) and "\n" not in message
    assert message.startswith("step 7: out of memory on rank 3 (host: peak ")
    assert "GiB resident, of " in message
    for fix in ("train.micro_batch_size (now 4)", "train.recompute=selective", "TP1 PP2", "heft plan"):
        assert fix in message


def test_cuda_out_of_memory_is_recognised_and_full_recompute_is_not_suggested_twice():
    exc = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert is_out_of_memory(exc)
    message = str(explain(exc, "step 1", 0, 2, "full", 2, 1))
    assert "train.recompute" not in message and "(now 2)" in message


def test_other_errors_are_not_taken_for_out_of_memory():
    assert not is_out_of_memory(ValueError("model.hidden_size must be >= 1"))
    assert not is_out_of_memory(RuntimeError("Connection closed by peer"))
    # NCCL's "unhandled cuda error" means out of memory only on a GPU that was full.
    assert not is_out_of_memory(RuntimeError("NCCL error: unhandled cuda error"))
