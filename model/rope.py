"""Rotary position embeddings in one compiled kernel where Transformer Engine is absent.

megatron-core rotates the query and the key of every layer. Its unfused version is a handful of
elementwise kernels per tensor (the half rotation's slices and concatenation, two products, a sum,
and a final concatenation), each a full pass over q or k in memory, and as many again in backward.
With ``apply_rope_fusion`` it calls ``rope_utils.fused_apply_rotary_pos_emb`` instead, a slot that
only Transformer Engine fills. heft fills the empty slot with the same formula compiled by
``torch.compile`` (one kernel forward, one backward); TE's own kernel is kept where TE is installed.

``train.rope`` chooses: ``auto`` is fused on CUDA and megatron-core's unfused code on CPU (where
heft's parity tests pin down the results), ``fused`` or ``unfused``.
"""

from __future__ import annotations

import torch

ROPE_CHOICES = ("auto", "fused", "unfused")


def resolve_rope(requested: str, cuda: bool) -> str:
    if requested != "auto":
        return requested
    return "fused" if cuda else "unfused"


def rotate(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``t`` [s, b, heads, d] by the angles ``freqs`` [s, 1, 1, d]: Llama's
    rotate-half form, the formula of megatron-core's unfused ``_apply_rotary_pos_emb_bshd``."""
    cos, sin = torch.cos(freqs).to(t.dtype), torch.sin(freqs).to(t.dtype)
    first, second = t.chunk(2, dim=-1)
    return t * cos + torch.cat((-second, first), dim=-1) * sin


_compiled_rotate = None


def fused_apply_rotary_pos_emb(t: torch.Tensor, freqs: torch.Tensor, transpose_output_memory: bool = False,
                               interleaved: bool = False) -> torch.Tensor:
    """Transformer Engine's call signature, which megatron-core uses for the fused slot."""
    global _compiled_rotate
    if interleaved or freqs.shape[-1] != t.shape[-1]:
        raise ValueError("heft's fused RoPE rotates halves over the whole head dimension; set "
                         "train.rope=unfused for interleaved or partial rotary embeddings")
    if _compiled_rotate is None:  # compiled on first use: importing heft costs nothing
        _compiled_rotate = torch.compile(rotate, fullgraph=True)
    return _compiled_rotate(t, freqs)


def provide_fused_rope() -> None:
    """Compatibility shim: put heft's compiled kernel into megatron-core's fused-RoPE slot unless
    Transformer Engine already filled it. ``TransformerConfig(apply_rope_fusion=True)`` checks the
    slot when it is built, and megatron-core looks it up on every call."""
    from megatron.core.models.common.embeddings import rope_utils

    if rope_utils.fused_apply_rotary_pos_emb is None:
        rope_utils.fused_apply_rotary_pos_emb = fused_apply_rotary_pos_emb
