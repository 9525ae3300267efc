"""Llama-style model shapes. A preset fills every ModelConfig field the user left unset."""

from __future__ import annotations

import dataclasses

PRESETS: dict[str, dict] = {
    # CPU demo and tests: seconds per hundred steps on 2 cores.
    "tiny": dict(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                 ffn_hidden_size=128, seq_length=128, tie_embeddings=True, rotary_base=10000,
                 init_std=0.02, norm_epsilon=1e-5),
    # GPT-2-small width, Llama block.
    "125m": dict(num_layers=12, hidden_size=768, num_attention_heads=12, num_query_groups=12,
                 ffn_hidden_size=2048, seq_length=2048, tie_embeddings=True, rotary_base=10000,
                 init_std=0.02, norm_epsilon=1e-5),
    # Llama-3.2-1B shape (GQA 32/8, tied embeddings).
    "1b": dict(num_layers=16, hidden_size=2048, num_attention_heads=32, num_query_groups=8,
               ffn_hidden_size=8192, seq_length=2048, tie_embeddings=True, rotary_base=500000,
               init_std=0.02, norm_epsilon=1e-5),
    # The 1.4B shape of Sow et al. (hidden 2048, 24 layers, 16 heads); SwiGLU width ~8/3 * hidden.
    "1.4b": dict(num_layers=24, hidden_size=2048, num_attention_heads=16, num_query_groups=16,
                 ffn_hidden_size=5504, seq_length=2048, tie_embeddings=False, rotary_base=10000,
                 init_std=0.02, norm_epsilon=1e-5),
    # Llama-2-7B shape.
    "7b": dict(num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=32,
               ffn_hidden_size=11008, seq_length=4096, tie_embeddings=False, rotary_base=10000,
               init_std=0.02, norm_epsilon=1e-5),
}


def apply_preset(model_cfg) -> None:
    """Fill unset (None) fields of a ModelConfig from its preset, in place."""
    if model_cfg.preset not in PRESETS:
        raise ValueError(
            f"model.preset={model_cfg.preset!r} is unknown; known presets: {', '.join(PRESETS)}"
        )
    for key, value in PRESETS[model_cfg.preset].items():
        if getattr(model_cfg, key) is None:
            setattr(model_cfg, key, value)
    if model_cfg.num_query_groups is None:
        model_cfg.num_query_groups = model_cfg.num_attention_heads
    missing = [f.name for f in dataclasses.fields(model_cfg) if getattr(model_cfg, f.name) is None]
    assert not missing, f"preset {model_cfg.preset} leaves {missing} unset"
