"""The model room's configuration: the transformer's shape and the parallel layout.

Checks here raise ``ValueError`` naming the field and the fix; the launcher turns them into its
one-line configuration errors. Cross-section checks (batch sizes against the layout) live with the
launcher, which composes the sections.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelConfig:
    """The transformer. ``preset`` fills every field left as None (see ``model/presets.py``)."""

    preset: str = "tiny"
    """Shape preset: tiny, 125m, 1b, 1.4b or 7b."""
    num_layers: int | None = None
    hidden_size: int | None = None
    num_attention_heads: int | None = None
    num_query_groups: int | None = None
    """Key/value heads for grouped-query attention; equal to num_attention_heads for plain MHA."""
    ffn_hidden_size: int | None = None
    """Width of the SwiGLU MLP (per branch)."""
    seq_length: int | None = None
    """Tokens per training sequence. Must equal the prepared data's sequence length."""
    tie_embeddings: bool | None = None
    """Share the input embedding and the output projection."""
    rotary_base: int | None = None
    init_std: float | None = None
    """Std of the normal weight init; output projections of each block use std/sqrt(2*layers)."""
    norm_epsilon: float | None = None
    make_vocab_size_divisible_by: int = 128
    """The embedding is padded to a multiple of lcm(this, tensor-parallel size)."""

    def check(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                     "ffn_hidden_size", "seq_length", "make_vocab_size_divisible_by"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_query_groups != 0:
            raise ValueError(
                f"model.num_attention_heads={self.num_attention_heads} is not divisible by "
                f"model.num_query_groups={self.num_query_groups}"
            )
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}"
            )
        if not self.init_std > 0 or not self.norm_epsilon > 0:
            raise ValueError("model.init_std and model.norm_epsilon must be > 0")


@dataclass
class ParallelConfig:
    """How the model and the batch are split over processes (Megatron-style)."""

    tensor: int = 1
    """Tensor-parallel size (TP): attention heads and MLP columns split over TP ranks."""
    pipeline: int = 1
    """Pipeline-parallel size (PP): layers split into PP stages."""
    virtual_pipeline: int | None = None
    """Model chunks per pipeline stage for the interleaved schedule (None: not interleaved)."""
    context: int = 1
    """Context-parallel size (CP): each sequence split over CP ranks (needs Transformer Engine)."""
    data: int | None = None
    """Data-parallel size (DP). None derives it as world_size / (TP*PP*CP)."""
    distributed_optimizer: bool = False
    """Shard optimizer state and the gradient reduction over DP ranks (ZeRO-1 style)."""
    overlap_grad_reduce: bool = True
    """Start each gradient bucket's DP reduction while backward is still running."""
    overlap_param_gather: bool = True
    """With the distributed optimizer: all-gather the updated weights bucket by bucket during the
    next forward pass, as each layer needs them, instead of all at once at the end of the step
    (megatron-core's forward pre-hooks; a checkpoint save gathers them first)."""
    batch_p2p_comm: bool = False
    """Batch pipeline send/recv into one call. Never with interleaving at PP=2 (wrong grads upstream)."""

    def model_parallel_size(self) -> int:
        return self.tensor * self.pipeline * self.context

    def data_parallel_size(self, world_size: int | None) -> int:
        """The data-parallel size for a world, checking world = TP*PP*CP*DP."""
        mp = self.model_parallel_size()
        if world_size is None:
            return self.data or 1
        if world_size % mp != 0:
            raise ValueError(
                f"world size {world_size} is not divisible by TP*PP*CP = {self.tensor}*"
                f"{self.pipeline}*{self.context} = {mp}; launch a multiple of {mp} processes"
            )
        dp = world_size // mp
        if self.data is not None and self.data != dp:
            raise ValueError(
                f"world size {world_size} != TP*PP*CP*DP = {self.tensor}*{self.pipeline}*"
                f"{self.context}*{self.data} = {mp * self.data}; launch "
                f"{mp * self.data} processes or set parallel.data={dp}"
            )
        return dp

    def check(self) -> None:
        for name in ("tensor", "pipeline", "context"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.data is not None and self.data < 1:
            raise ValueError(f"parallel.data must be >= 1, got {self.data}")
        if self.virtual_pipeline is not None:
            if self.virtual_pipeline < 1:
                raise ValueError(f"parallel.virtual_pipeline must be >= 1, got {self.virtual_pipeline}")
            if self.pipeline < 2:
                raise ValueError(
                    f"parallel.virtual_pipeline={self.virtual_pipeline} needs parallel.pipeline >= 2 "
                    f"(got {self.pipeline}); unset virtual_pipeline or raise pipeline"
                )
            if self.batch_p2p_comm and self.pipeline == 2:
                raise ValueError(
                    "parallel.batch_p2p_comm=true with interleaved pipeline (virtual_pipeline) and "
                    "parallel.pipeline=2 silently computes wrong gradients in megatron-core "
                    "(send/recv with the same peer are mis-paired); set parallel.batch_p2p_comm=false"
                )

    def check_model(self, m: ModelConfig) -> None:
        """Does the model split evenly under this layout?"""
        if m.num_attention_heads % self.tensor != 0:
            raise ValueError(
                f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
                f"parallel.tensor={self.tensor}; pick a TP size that divides the head count"
            )
        if m.num_query_groups % self.tensor != 0:
            raise ValueError(
                f"model.num_query_groups={m.num_query_groups} is not divisible by "
                f"parallel.tensor={self.tensor}; each TP rank needs whole key/value heads"
            )
        if m.ffn_hidden_size % self.tensor != 0:
            raise ValueError(
                f"model.ffn_hidden_size={m.ffn_hidden_size} is not divisible by parallel.tensor={self.tensor}"
            )
        vpp = self.virtual_pipeline or 1
        if m.num_layers % (self.pipeline * vpp) != 0:
            raise ValueError(
                f"model.num_layers={m.num_layers} is not divisible by PP*VPP = {self.pipeline}*{vpp} = "
                f"{self.pipeline * vpp}; every pipeline chunk needs the same number of layers"
            )
        if self.context > 1 and m.seq_length % (2 * self.context) != 0:
            raise ValueError(
                f"model.seq_length={m.seq_length} must be divisible by 2*parallel.context="
                f"{2 * self.context} (load-balanced context parallelism)"
            )
