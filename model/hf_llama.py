"""heft's weights <-> Hugging Face Llama weights: names, layouts and the model's shape.

heft's weights are named by megatron-core's checkpoint keys (the names ``dist_checkpointing``
writes, the same under every TP / PP layout), with the layers stacked on a leading axis:

    embedding.word_embeddings.weight                          [V_padded, h]
    decoder.layers.self_attention.linear_qkv.layer_norm_weight [L, h]        input RMSNorm
    decoder.layers.self_attention.linear_qkv.weight           [L, (nq + 2 nkv) d, h]
    decoder.layers.self_attention.linear_proj.weight          [L, h, nq d]
    decoder.layers.mlp.linear_fc1.layer_norm_weight           [L, h]        post-attention RMSNorm
    decoder.layers.mlp.linear_fc1.weight                      [L, 2 f, h]   gate rows, then up rows
    decoder.layers.mlp.linear_fc2.weight                      [L, h, f]
    decoder.final_layernorm.weight                            [h]
    output_layer.weight                                       [V_padded, h] untied only

Two layouts differ from Hugging Face's: the fused QKV keeps, per key/value group, that group's
query heads, then its key head, then its value head; the fused SwiGLU input projection is the gate
projection stacked on the up projection. Both use rotate-half rotary embeddings (megatron-core's
``rotary_interleaved=False``, HF Llama's ``rotate_half``), so no head permutation is involved.

The vocabulary keeps heft's padding (a multiple of ``make_vocab_size_divisible_by``): the padded
rows take part in the softmax, so an exported model keeps them to give identical log-probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
LAYER_PREFIX = "decoder.layers."
QKV = "self_attention.linear_qkv.weight"
PROJ = "self_attention.linear_proj.weight"
INPUT_NORM = "self_attention.linear_qkv.layer_norm_weight"
FC1 = "mlp.linear_fc1.weight"
FC2 = "mlp.linear_fc2.weight"
MLP_NORM = "mlp.linear_fc1.layer_norm_weight"
# megatron-core specs without fused norms name the RMSNorm weights after the norm module.
ALIASES = {"input_layernorm.weight": INPUT_NORM, "pre_mlp_layernorm.weight": MLP_NORM}


@dataclass(frozen=True)
class Shape:
    """What the mapping needs to know of the model."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    tie_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    @classmethod
    def of(cls, model) -> "Shape":
        """From a ModelConfig or a checkpoint's model signature (dict)."""
        get = model.get if isinstance(model, dict) else lambda k: getattr(model, k)
        return cls(*(get(f) for f in ("num_layers", "hidden_size", "num_attention_heads",
                                      "num_query_groups", "ffn_hidden_size", "tie_embeddings")))


def layer_key(key: str) -> str | None:
    """The per-layer part of a stacked layer key (``self_attention.linear_qkv.weight``), or None."""
    if not key.startswith(LAYER_PREFIX):
        return None
    name = key[len(LAYER_PREFIX):]
    return ALIASES.get(name, name)


def hf_names(i: int) -> dict[str, str]:
    p = f"model.layers.{i}."
    return {INPUT_NORM: p + "input_layernorm.weight", MLP_NORM: p + "post_attention_layernorm.weight",
            PROJ: p + "self_attn.o_proj.weight", FC2: p + "mlp.down_proj.weight",
            "q": p + "self_attn.q_proj.weight", "k": p + "self_attn.k_proj.weight",
            "v": p + "self_attn.v_proj.weight", "gate": p + "mlp.gate_proj.weight",
            "up": p + "mlp.up_proj.weight"}


def split_qkv(qkv: torch.Tensor, shape: Shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer's fused [(nq + 2 nkv) d, h] QKV weight -> HF's q [nq d, h], k, v [nkv d, h]."""
    d, hpg, groups = shape.head_dim, shape.heads_per_group, shape.num_query_groups
    grouped = qkv.reshape(groups, (hpg + 2) * d, shape.hidden_size)
    q = grouped[:, :hpg * d].reshape(groups * hpg * d, -1)
    k = grouped[:, hpg * d:(hpg + 1) * d].reshape(groups * d, -1)
    v = grouped[:, (hpg + 1) * d:].reshape(groups * d, -1)
    return q, k, v


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: Shape) -> torch.Tensor:
    """The inverse of :func:`split_qkv`."""
    d, hpg, groups = shape.head_dim, shape.heads_per_group, shape.num_query_groups
    grouped = torch.cat([q.reshape(groups, hpg * d, -1), k.reshape(groups, d, -1),
                         v.reshape(groups, d, -1)], dim=1)
    return grouped.reshape(groups * (hpg + 2) * d, -1)


def to_hf(key: str, tensor: torch.Tensor, shape: Shape) -> dict[str, torch.Tensor]:
    """One heft checkpoint tensor (layers stacked) -> the Hugging Face tensors it holds."""
    if key == EMBEDDING:
        return {"model.embed_tokens.weight": tensor}
    if key == OUTPUT:
        return {} if shape.tie_embeddings else {"lm_head.weight": tensor}
    if key == FINAL_NORM:
        return {"model.norm.weight": tensor}
    name = layer_key(key)
    if name is None:
        raise KeyError(f"unknown weight {key}")
    out = {}
    for i in range(tensor.shape[0]):
        names, weight = hf_names(i), tensor[i]
        if name == QKV:
            for part, value in zip("qkv", split_qkv(weight, shape)):
                out[names[part]] = value
        elif name == FC1:
            out[names["gate"]], out[names["up"]] = torch.chunk(weight, 2, dim=0)
        elif name in names:
            out[names[name]] = weight
        else:
            raise KeyError(f"unknown weight {key}")
    return out


def from_hf_layer(name: str, layer: int, read, shape: Shape) -> torch.Tensor:
    """One layer's heft tensor for the per-layer key ``name``; ``read(hf_name)`` gives an HF tensor."""
    names = hf_names(layer)
    if name == QKV:
        return fuse_qkv(read(names["q"]), read(names["k"]), read(names["v"]), shape)
    if name == FC1:
        return torch.cat([read(names["gate"]), read(names["up"])], dim=0)
    if name in names:
        return read(names[name])
    raise KeyError(f"heft has no Hugging Face counterpart for decoder.layers.{name}")


def from_hf_global(key: str, read, shape: Shape) -> torch.Tensor:
    """A non-layer heft tensor (embedding, output layer, final norm) from HF tensors."""
    if key == EMBEDDING:
        return read("model.embed_tokens.weight")
    if key == OUTPUT:
        return read("model.embed_tokens.weight" if shape.tie_embeddings else "lm_head.weight")
    if key == FINAL_NORM:
        return read("model.norm.weight")
    raise KeyError(f"heft has no Hugging Face counterpart for {key}")


def llama_config(model: dict, vocab_rows: int, seq_length: int, dtype: str, eos_id: int | None,
                 bos_id: int | None) -> dict:
    """config.json of the Hugging Face Llama equivalent of a heft model (a checkpoint's model
    signature plus the resolved config's rotary base and norm epsilon)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_rows,
        "hidden_size": model["hidden_size"],
        "intermediate_size": model["ffn_hidden_size"],
        "num_hidden_layers": model["num_layers"],
        "num_attention_heads": model["num_attention_heads"],
        "num_key_value_heads": model["num_query_groups"],
        "head_dim": model["hidden_size"] // model["num_attention_heads"],
        "hidden_act": "silu",
        "max_position_embeddings": seq_length,
        "rms_norm_eps": model["norm_epsilon"],
        "rope_theta": float(model["rotary_base"]),
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": bool(model["tie_embeddings"]),
        "initializer_range": model.get("init_std", 0.02),
        "torch_dtype": dtype,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pretraining_tp": 1,
        "use_cache": True,
    }


# HF config field -> heft model field, for checking an imported checkpoint against the config.
HF_TO_HEFT = {"num_hidden_layers": "num_layers", "hidden_size": "hidden_size",
              "num_attention_heads": "num_attention_heads", "num_key_value_heads": "num_query_groups",
              "intermediate_size": "ffn_hidden_size", "tie_word_embeddings": "tie_embeddings",
              "rope_theta": "rotary_base", "rms_norm_eps": "norm_epsilon"}


def mismatches(hf: dict, model) -> list[str]:
    """The ``model.X=value`` overrides heft's config needs to hold this HF Llama; empty if it fits.
    Architecture features heft's Llama block does not have raise ValueError."""
    if hf.get("model_type") != "llama":
        raise ValueError(f"model_type is {hf.get('model_type')!r}; heft imports Llama-architecture "
                         f"checkpoints (model_type 'llama') only")
    unsupported = []
    if hf.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act={hf['hidden_act']}")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        unsupported.append("linear biases")
    if hf.get("rope_scaling"):
        unsupported.append(f"rope_scaling={hf['rope_scaling']}")
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    if head_dim * hf["num_attention_heads"] != hf["hidden_size"]:
        unsupported.append(f"head_dim={head_dim} (heft needs hidden_size / num_attention_heads)")
    if unsupported:
        raise ValueError(f"heft's Llama block has no {', '.join(unsupported)}")
    hf = {**hf, "num_key_value_heads": hf.get("num_key_value_heads") or hf["num_attention_heads"],
          "tie_word_embeddings": hf.get("tie_word_embeddings", True), "rope_theta": hf.get("rope_theta", 10000.0)}
    wrong = []
    for hf_key, heft_key in HF_TO_HEFT.items():
        ours, theirs = getattr(model, heft_key), hf[hf_key]
        same = abs(float(ours) - float(theirs)) <= 1e-12 * max(1.0, abs(float(theirs))) \
            if isinstance(theirs, float) or isinstance(ours, float) else ours == theirs
        if not same:
            value = int(theirs) if heft_key == "rotary_base" else theirs
            wrong.append(f"model.{heft_key}={str(value).lower() if isinstance(value, bool) else value}")
    return wrong
