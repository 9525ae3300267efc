"""The upstream warnings heft hides on purpose, and the switch that shows them again.

Known-harmless warnings are filtered by exact message pattern, in this one list, so that a new or
unexpected warning still shows. ``heft --verbose`` (environment ``HEFT_VERBOSE=1``, which workers
inherit) turns the filter off.
"""

from __future__ import annotations

import logging
import os
import warnings

VERBOSE_VAR = "HEFT_VERBOSE"

# (where it comes from, message regex, why it is harmless), for warnings.filterwarnings: the regex
# must match from the message's first character.
KNOWN_HARMLESS_WARNINGS = [
    (r"megatron\.core", r"Transformer Engine and Apex are not installed",
     "CPU or a GPU without TE/apex: megatron-core falls back to its local kernels, as heft intends"),
    (r"megatron\.core", r"Apex is not installed",
     "as above, for the fused layer norm and fused Adam"),
    (r"megatron\.core", r".*(TransformerEngine|Transformer Engine|transformer_engine).*not (installed|found)",
     "as above"),
    (r"megatron\.core", r".*CUDA_DEVICE_MAX_CONNECTIONS",
     "megatron-core's hint for overlapping TP communication on GPUs; irrelevant on CPU, and heft "
     "does not overlap TP communication"),
    (r"megatron.core.transformer.transformer_config", r"full scope is deprecated",
     "megatron-core 0.16 warns about its own CUDA-graph default when a config is built; heft uses no "
     "CUDA graphs"),
    (r"streaming", r".*`replication`",
     "streaming's notice that the ranks of one model-parallel group share samples: heft's design"),
    (r"torch", r"TypedStorage is deprecated", "inside torch's own checkpoint helpers"),
    (r"megatron.core.dist_checkpointing", r"`load_state_dict` is deprecated",
     "megatron-core 0.16 calls torch.distributed.checkpoint's older entry point; nothing to act on"),
    (r"torch.distributed", r"Please use DTensor instead and we are deprecating ShardedTensor",
     "torch's note to megatron-core's checkpoint code, raised on every load"),
    (r"torch.distributed", r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
     "torch 2.14 renamed the collectives megatron-core 0.16's distributed optimizer calls; once per rank"),
    (r"megatron.core.optimizer", r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed",
     "megatron-core's zero_grad reads .grad of the distributed optimizer's fp32 shard views (fp32 runs, "
     "as on CPU); they never hold one"),
]

# (logger, why): loggers whose warnings repeat on every rank and say nothing a heft user can act on.
KNOWN_HARMLESS_LOGGERS = [
    ("torch.utils.cpp_extension", "'No CUDA runtime is found' on CPU machines: heft builds no extensions"),
    ("streaming", "the replication notice above, and per-rank shared-memory bookkeeping"),
    ("megatron.core", "INFO-level layout and bucket summaries, once per rank"),
    ("torch.distributed.checkpoint", "per-rank planner notes during checkpoint saves"),
]


# (logger, why): loggers whose *errors* repeat what heft reports itself, in one line, with more context.
REPORTED_BY_HEFT_LOGGERS = [
    ("megatron.core.dist_checkpointing.strategies.filesystem_async",
     "a failed checkpoint write ('Local process 0 encountered an error'), which the worker reports as "
     "one line naming the checkpoint, the cause, the free space and the file size limit"),
]


# (PYTHONWARNINGS entry, why): for helper processes the workers start, which run none of heft's code
# and so take their filters from the environment.
KNOWN_HARMLESS_CHILD_WARNINGS = [
    ("ignore::UserWarning:multiprocessing.resource_tracker",
     "a killed worker's resource tracker announces that it freed the worker's shared memory (the "
     "streaming datasets'): cleanup working as intended, printed in the middle of the failure report"),
]


def child_process_warning_filters() -> str | None:
    """PYTHONWARNINGS for the workers' environment: the user's own, then the list above (unless verbose)."""
    ours = [] if verbose() else [entry for entry, _why in KNOWN_HARMLESS_CHILD_WARNINGS]
    return ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), *ours])) or None


def verbose() -> bool:
    return os.environ.get(VERBOSE_VAR, "") not in ("", "0")


def filter_known_warnings() -> None:
    """Hide the warnings listed above (not all warnings), unless verbose. Call before imports."""
    if verbose():
        return
    # torch's C++ warnings (c10d's "TCPStore ... Connection was likely closed" with a stack of
    # frames) follow a failure or a finished peer, which heft reports itself in one line; C++
    # errors still print. Read when torch loads, so set before any torch import (workers inherit it).
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    for _source, message, _why in KNOWN_HARMLESS_WARNINGS:
        # By message alone: some are attributed to the caller's frame (stacklevel), not their module.
        warnings.filterwarnings("ignore", message=message)
    for name, _why in KNOWN_HARMLESS_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for name, _why in REPORTED_BY_HEFT_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
