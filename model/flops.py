"""Model FLOPs per token and MFU, for the Llama block heft builds."""

from __future__ import annotations

import torch

# Dense bf16 tensor-core peak, FLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def flops_per_token(num_layers: int, hidden: int, ffn: int, heads: int, query_groups: int,
                    seq_length: int, vocab: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), counting matmuls only.

    Per layer forward, per token: QKV 2*h*(h + 2*h*g/n), attention scores and values
    2*2*s*h (causal masking not discounted, as in Megatron/PaLM MFU), output projection 2*h*h,
    SwiGLU 3 matmuls 2*3*h*ffn. Plus the logits 2*h*V.
    """
    kv = hidden * query_groups / heads
    per_layer = 2 * hidden * (hidden + 2 * kv) + 4 * seq_length * hidden + 2 * hidden * hidden
    per_layer += 6 * hidden * ffn
    return 3.0 * (num_layers * per_layer + 2 * hidden * vocab)


def peak_flops_per_device() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peak in PEAK_BF16_FLOPS.items():
        if key in name:
            return peak
    return None


def parameter_count(num_layers: int, hidden: int, ffn: int, heads: int, query_groups: int,
                    padded_vocab: int, tied_embeddings: bool) -> int:
    """Parameters of heft's Llama block model (RMSNorm weights included, no biases)."""
    kv = hidden * query_groups // heads
    per_layer = hidden * (hidden + 2 * kv) + hidden * hidden + 3 * hidden * ffn + 2 * hidden
    embeddings = padded_vocab * hidden * (1 if tied_embeddings else 2)
    return num_layers * per_layer + embeddings + hidden
