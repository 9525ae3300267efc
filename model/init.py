"""Layout-invariant weight initialisation.

megatron-core initialises weights from RNG streams that depend on the pipeline stage and on the
order modules are built in, so the same seed gives a different model under PP=1 and PP=2. heft
instead derives every parameter from (seed, its *global* name), generating the full, unsharded
tensor and keeping this rank's tensor-parallel slice. The same seed therefore gives the same model
under any TP/PP/VPP/DP layout, which is what makes layout-parity tests (and layout changes between
experiments) meaningful.

Sharding rules (megatron-core's Llama block):
* column-parallel (split along dim 0): word embeddings, output layer, linear_qkv, linear_fc1;
* row-parallel (split along dim 1): linear_proj, linear_fc2;
* linear_qkv is stored grouped by query group, so a contiguous dim-0 slice is exactly a TP
  rank's groups; linear_fc1 under SwiGLU holds [gate slice; up slice] per rank, so gate and up are
  generated as two global tensors and sliced separately;
* norms start at one; output projections of each block (linear_proj, linear_fc2) use
  std / sqrt(2 * num_layers) as in GPT-2 / Megatron.
"""

from __future__ import annotations

import hashlib
import math
import re

import torch

_COLUMN_PARALLEL = ("word_embeddings.weight", "output_layer.weight", "linear_qkv.weight", "linear_fc1.weight")
_ROW_PARALLEL = ("linear_proj.weight", "linear_fc2.weight")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def _generator(seed: int, key: str, device: torch.device) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()
    gen = torch.Generator(device=device)
    gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return gen


def _normal_slice(seed, key, global_shape, dim, tp_rank, tp_size, std, dtype, device):
    full = torch.empty(global_shape, dtype=torch.float32, device=device)
    full.normal_(0.0, std, generator=_generator(seed, key, device))
    return full.chunk(tp_size, dim=dim)[tp_rank].to(dtype)


def global_parameter_name(gpt, local_name: str) -> str:
    """Name a parameter by its global layer number, so it means the same thing on every stage."""
    match = _LAYER.match(local_name)
    if not match:
        return local_name
    layer = gpt.decoder.layers[int(match.group(1))]
    return f"decoder.layers.{layer.layer_number - 1}." + local_name[match.end():]


@torch.no_grad()
def initialize_weights(gpt, model, seed: int, tconfig) -> None:
    """Overwrite every parameter of one GPTModel chunk from (seed, global name); ``model`` is the
    ModelConfig."""
    from megatron.core import parallel_state as ps

    tp_rank = ps.get_tensor_model_parallel_rank()
    tp_size = ps.get_tensor_model_parallel_world_size()
    std = model.init_std
    for local_name, param in gpt.named_parameters():
        name = global_parameter_name(gpt, local_name)
        if name == "output_layer.weight" and model.tie_embeddings:
            # The last stage's copy of the tied embedding (PP > 1) must start equal to it.
            name = "embedding.word_embeddings.weight"
        if param.dim() == 1:
            if "norm" not in name:
                raise RuntimeError(f"heft init has no rule for 1-d parameter {local_name}")
            param.fill_(1.0)
            continue
        if name.endswith("layer_norm_weight"):  # Transformer Engine fuses the norm into the linear
            param.fill_(1.0)
            continue
        scaled = name.endswith(_ROW_PARALLEL)
        p_std = std / math.sqrt(2.0 * model.num_layers) if scaled else std
        dim = 1 if scaled else 0 if name.endswith(_COLUMN_PARALLEL) else None
        if dim is None:
            raise RuntimeError(f"heft init has no sharding rule for parameter {local_name}")
        if tp_size > 1 and not (getattr(param, "tensor_model_parallel", False)
                                and param.partition_dim == dim):
            raise RuntimeError(f"megatron-core shards {local_name} differently than heft's init assumes")
        global_shape = list(param.shape)
        global_shape[dim] *= tp_size
        if name.endswith("linear_fc1.weight") and tconfig.gated_linear_unit:
            half = global_shape[0] // 2
            gate, up = (
                _normal_slice(seed, f"{name}/{part}", [half, global_shape[1]], 0, tp_rank, tp_size,
                              p_std, param.dtype, param.device)
                for part in ("gate", "up")
            )
            param.copy_(torch.cat([gate, up], dim=0))
        else:
            param.copy_(_normal_slice(seed, name, global_shape, dim, tp_rank, tp_size, p_std,
                                      param.dtype, param.device))
