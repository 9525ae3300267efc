"""Core attention through ``torch.nn.functional.scaled_dot_product_attention``, and the layer spec
that uses it.

megatron-core's local spec (``DotProductAttention``) materialises every score matrix, [b, heads,
s, s] per layer, and runs an unfused softmax: at seq 2048 that is most of a 1B model's activation
memory and a large share of its step time. SDPA picks flash, cuDNN or memory-efficient kernels on
CUDA (causal, grouped-query) and never stores the scores. It is a drop-in ``core_attention``
submodule: same inputs, same output layout, no parameters, so checkpoints move freely between the
local, SDPA and Transformer Engine specs.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

ATTENTION_CHOICES = ("auto", "local", "sdpa", "te")


def resolve_attention(requested: str, cuda: bool, transformer_engine: bool) -> str:
    """The core attention a run uses: ``auto`` is Transformer Engine when importable on CUDA, SDPA
    on CUDA without it, and megatron-core's local attention on CPU (whose results heft's CPU
    parity tests pin down)."""
    if requested != "auto":
        return requested
    if transformer_engine:
        return "te"
    return "sdpa" if cuda else "local"


class SDPAttention(MegatronModule):
    """``core_attention`` for megatron-core's ``SelfAttention``, computed by torch's SDPA.

    Takes query [sq, b, heads, d] and key/value [sk, b, groups, d] of this tensor-parallel rank and
    returns the context [sq, b, heads * d], as ``DotProductAttention`` does.
    """

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        super().__init__(config=config)
        # What heft's Llama block never uses is refused here rather than silently computed
        # differently from the local spec.
        if config.context_parallel_size != 1:
            raise ValueError("SDPA attention has no context parallelism; use train.attention=te")
        if getattr(config, "softmax_type", "vanilla") != "vanilla" or config.window_size is not None:
            raise ValueError("SDPA attention supports only the vanilla softmax over the full causal window")
        if config.apply_query_key_layer_scaling:
            raise ValueError("SDPA attention does not apply query-key layer scaling")
        self.attn_mask_type = attn_mask_type
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else head_dim ** -0.5
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type: AttnMaskType | None = None,
                attention_bias=None, packed_seq_params=None) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPA attention takes neither packed sequences nor an attention bias")
        mask_type = attn_mask_type or self.attn_mask_type
        sq, batch, heads, head_dim = query.shape
        # [s, b, n, d] -> [b, n, s, d], SDPA's layout.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        causal = mask_type == AttnMaskType.causal and attention_mask is None
        # megatron-core masks are True where attention is *not* allowed; SDPA's boolean masks are
        # True where it is.
        sdpa_mask = None if attention_mask is None else ~attention_mask
        dropout = self.dropout_p if self.training else 0.0
        with tensor_parallel.get_cuda_rng_tracker().fork() if dropout > 0 else nullcontext():
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=sdpa_mask, dropout_p=dropout, is_causal=causal,
                scale=self.softmax_scale, enable_gqa=k.shape[1] != heads,
            )
        # [b, n, s, d] -> [s, b, n * d]
        return context.permute(2, 0, 1, 3).reshape(sq, batch, heads * head_dim)


def sdpa_layer_spec():
    """megatron-core's local Llama layer spec with ``SDPAttention`` as its core attention."""
    from megatron.core.models.gpt import gpt_layer_specs

    spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec
