"""Telling what kind of failure an exception inside training is."""

from __future__ import annotations


def is_collective_failure(exc: BaseException) -> bool:
    import torch.distributed as dist

    text = str(exc).lower()
    return isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and (
        "gloo" in text or "nccl" in text or "connection closed by peer" in text))


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
