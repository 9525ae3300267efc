"""A heft checkpoint as a model in this process: logits for token ids, for generation and lm-eval.

The model is heft's own megatron-core GPTModel, built unsplit (TP1, PP1) in a one-rank process
group and loaded from the checkpoint whatever layout trained it. Multi-process evaluation under a
parallel layout is ``heft eval`` (``evaluate/heldout.py``).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch

from heft.launcher.checkpoint import files

# The layout of the in-process model, whatever the checkpoint was trained with.
UNSPLIT = ["parallel.tensor=1", "parallel.pipeline=1", "parallel.virtual_pipeline=null",
           "parallel.context=1", "parallel.data=null", "parallel.distributed_optimizer=false"]


def _one_rank_world() -> None:
    """A one-process gloo/NCCL group, unless this process already belongs to one."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        os.environ[key] = value


class LoadedModel:
    """``logits(tokens)`` of a heft checkpoint, with its tokenizer and sequence length."""

    def __init__(self, checkpoint: str | Path, precision: str = "auto"):
        from heft.launcher.checkpoint.contents import checkpoint_tokenizer, load_weights
        from heft.launcher.config import config_from_dict
        from heft.launcher.train.build import build_model, start_processes
        from heft.launcher.train.step import device
        from heft.model import cpu_compat
        from heft.model.build import Backends

        self.path = files.resolve_checkpoint(checkpoint)
        state = files.verify(self.path)
        self.state = state
        self.cfg = config_from_dict(state["config"], [*UNSPLIT, f"train.precision={precision}"])
        self.tokenizer = checkpoint_tokenizer(self.path, state)
        self.seq_length = self.cfg.model.seq_length
        self.vocab_size = state["model"]["vocab_size"]
        cpu_compat.enable_if_no_cuda()
        _one_rank_world()
        start_processes(self.cfg)
        self.chunks = build_model(self.cfg, self.vocab_size, Backends.detect())
        load_weights(self.chunks, self.path, state, self.cfg.model, self.vocab_size, tensor_parallel=1)
        for chunk in self.chunks:
            chunk.eval()
        self.device = device()

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, S] token ids (S <= seq_length) -> [B, S, padded vocab] float32 logits."""
        if tokens.shape[1] > self.seq_length:
            raise ValueError(f"{tokens.shape[1]} tokens exceed the model's seq_length {self.seq_length}")
        tokens = tokens.to(self.device)
        positions = torch.arange(tokens.shape[1], device=self.device).unsqueeze(0).expand_as(tokens)
        return self.chunks[0](tokens, positions, None).float()

    def close(self) -> None:
        """Leave the process group and free the model. The model's modules hold the process groups
        in reference cycles: without the collection their sockets and pipes (about 75 descriptors)
        stay open until the garbage collector happens to run, which in a process opening model after
        model (lm-eval over several checkpoints, a notebook) can be never."""
        import gc

        from heft.model.parallel import shutdown

        shutdown()
        self.chunks = None
        gc.collect()
