"""Process groups: torch.distributed from the launcher's environment, then megatron-core's groups."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from heft.model.config import ParallelConfig

# Data-parallel outermost: the ranks of one data-parallel replica (its TP, CP and PP ranks) are
# consecutive, which is what mosaicml-streaming's `replication` needs to hand them identical samples.
RANK_ORDER = "tp-cp-ep-pp-dp"


@dataclass(frozen=True)
class Layout:
    """This rank's place in the parallel layout."""

    rank: int
    world_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    cp_rank: int
    data_parallel: int
    is_first_stage: bool
    is_last_stage: bool


def initialize(p: ParallelConfig, seed: int, timeout_s: float = 600.0) -> Layout:
    """Create the default process group (gloo on CPU, nccl on CUDA) and megatron-core's groups.

    The caller has validated the whole config for this world size. ``timeout_s`` bounds every
    collective: a rank that stops responding becomes an error instead of a hang."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    world_size = int(os.environ["WORLD_SIZE"])
    data_parallel = p.data_parallel_size(world_size)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if torch.cuda.is_available() else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    ps.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor,
        pipeline_model_parallel_size=p.pipeline,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline,
        context_parallel_size=p.context,
        order=RANK_ORDER,
    )
    # Dropout streams (heft's Llama block has no dropout, but recompute and future configs do).
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    return Layout(
        rank=dist.get_rank(),
        world_size=world_size,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        cp_rank=ps.get_context_parallel_rank(),
        data_parallel=data_parallel,
        is_first_stage=ps.is_pipeline_first_stage(ignore_virtual=True),
        is_last_stage=ps.is_pipeline_last_stage(ignore_virtual=True),
    )


def shutdown() -> None:
    from megatron.core import parallel_state as ps

    if dist.is_initialized():
        dist.barrier()
        ps.destroy_model_parallel()
        dist.destroy_process_group()
