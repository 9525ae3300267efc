"""Build heft's Llama-style GPT from megatron-core: TransformerConfig, layer spec, model chunks, DDP.

Llama block = RMSNorm pre-norm, SwiGLU MLP, rotary position embeddings, no linear biases,
optional grouped-query attention, tied or untied embeddings. The layer spec follows the core
attention (``train.attention``, model/attention.py): Transformer Engine's spec when TE is importable
on CUDA, megatron-core's local spec with torch SDPA attention on CUDA without TE, and the local
spec as it is on CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from heft.model.config import ModelConfig, ParallelConfig


@dataclass(frozen=True)
class Backends:
    """Optional GPU accelerations that are present in this process."""

    cuda: bool
    transformer_engine: bool
    apex: bool

    @classmethod
    def detect(cls) -> "Backends":
        cuda = torch.cuda.is_available()
        return cls(cuda=cuda, transformer_engine=cuda and _importable("transformer_engine"),
                   apex=cuda and _importable("apex.normalization"))


def _importable(module: str) -> bool:
    try:
        __import__(module)
        return True
    except Exception:  # an unrelated PyPI 'apex' or a broken TE install both count as absent
        return False


def check_backend_support(parallel: ParallelConfig, backends: Backends, attention: str = "auto") -> None:
    """Reject parallel features this process's backends cannot run, before any process starts."""
    if attention == "te" and not backends.transformer_engine:
        raise ValueError(
            "train.attention=te needs Transformer Engine on CUDA, which this machine does not have; "
            "set train.attention=auto (SDPA on CUDA) or install transformer_engine"
        )
    if parallel.context > 1 and attention in ("local", "sdpa"):
        raise ValueError(
            f"parallel.context={parallel.context} needs Transformer Engine attention, not "
            f"train.attention={attention}; set train.attention=auto or parallel.context=1"
        )
    if parallel.context > 1 and not backends.transformer_engine:
        raise ValueError(
            f"parallel.context={parallel.context} needs Transformer Engine on CUDA (megatron-core's "
            f"local attention has no context parallelism); set parallel.context=1 or install "
            f"transformer_engine on a GPU machine"
        )


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int) -> int:
    """Round the vocabulary up so that every TP rank gets an equal slice.

    heft pads to a multiple of lcm(divisible_by, TP), not divisible_by*TP as Megatron-LM does, so
    the padded size (and with it the softmax over logits) does not change with the TP size.
    """
    multiple = math.lcm(divisible_by, tensor_parallel)
    return int(math.ceil(vocab_size / multiple) * multiple)


def resolve_dtype(precision: str, backends: Backends) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if backends.cuda else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


@dataclass(frozen=True)
class Execution:
    """How the model runs, as opposed to its shape: number format, activation recompute, init seed."""

    precision: str = "auto"
    """fp32, bf16, or auto (bf16 on CUDA, fp32 on CPU)."""
    recompute: str = "none"
    """none, selective (attention core) or full (whole layers)."""
    seed: int = 1234
    """Weight init seed (layout-invariant, model/init.py)."""
    attention: str = "auto"
    """Core attention: auto, local, sdpa or te (model/attention.py)."""
    rope: str = "auto"
    """Rotary embedding kernel: auto, fused or unfused (model/rope.py)."""


def transformer_config(m: ModelConfig, p: ParallelConfig, run: Execution, backends: Backends):
    from megatron.core.transformer import TransformerConfig

    from heft.model.rope import provide_fused_rope, resolve_rope

    dtype = resolve_dtype(run.precision, backends)
    fused = backends.cuda  # torch-jit fusions: fine on CUDA, pointless overhead on CPU
    fused_rope = resolve_rope(run.rope, backends.cuda) == "fused"
    if fused_rope:
        provide_fused_rope()  # Transformer Engine's kernel where TE is installed, else heft's
    recompute = {}
    if run.recompute == "full":
        recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif run.recompute == "selective":
        recompute = dict(recompute_granularity="selective")
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        ffn_hidden_size=m.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_std,
        # megatron-core initialises too, although heft overwrites every weight layout-invariantly
        # (model/init.py): its initialisers are what mark TP-sharded weights
        # (`tensor_model_parallel`, `partition_dim`); without them the grad norm under TP is wrong.
        perform_initialization=True,
        use_cpu_initialization=not backends.cuda,
        tensor_model_parallel_size=p.tensor,
        pipeline_model_parallel_size=p.pipeline,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline,
        context_parallel_size=p.context,
        sequence_parallel=False,
        batch_p2p_comm=p.batch_p2p_comm,
        overlap_p2p_comm=not p.batch_p2p_comm and p.virtual_pipeline is not None,
        # Exact token-mean over the global batch: the schedule hands the token count to
        # finalize_model_grads, which divides once by the all-reduced total.
        calculate_per_token_loss=True,
        # The fused cross-entropy returns the same per-token losses, but heft keeps the unfused
        # one everywhere: the loss reduction (reweighting) must see every token's loss.
        cross_entropy_loss_fusion=False,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bias_activation_fusion=fused,
        masked_softmax_fusion=backends.transformer_engine or backends.apex,
        persist_layer_norm=backends.apex,
        bias_dropout_fusion=fused,
        apply_rope_fusion=fused_rope,
        gradient_accumulation_fusion=backends.apex,
        **recompute,
    )


def layer_spec(backends: Backends, attention: str = "auto"):
    from megatron.core.models.gpt import gpt_layer_specs

    from heft.model.attention import resolve_attention, sdpa_layer_spec

    chosen = resolve_attention(attention, backends.cuda, backends.transformer_engine)
    if chosen == "te":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    if chosen == "sdpa":
        return sdpa_layer_spec()
    return gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")


def build_model_chunks(model: ModelConfig, parallel: ParallelConfig, run: Execution, vocab_size: int,
                       backends: Backends) -> list[torch.nn.Module]:
    """One GPTModel per virtual pipeline chunk this rank holds, wrapped in megatron-core DDP."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.module import Float16Module

    from heft.model.init import initialize_weights

    tconfig = transformer_config(model, parallel, run, backends)
    spec = layer_spec(backends, run.attention)
    vpp = parallel.virtual_pipeline
    padded_vocab = padded_vocab_size(vocab_size, model.make_vocab_size_divisible_by, parallel.tensor)
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        gpt = GPTModel(
            config=tconfig,
            transformer_layer_spec=spec,
            vocab_size=padded_vocab,
            max_sequence_length=model.seq_length,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            share_embeddings_and_output_weights=model.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=model.rotary_base,
            vp_stage=stage,
        )
        if backends.cuda:
            gpt.cuda(torch.cuda.current_device())
        initialize_weights(gpt, model, run.seed, tconfig)
        module = Float16Module(tconfig, gpt) if tconfig.bf16 else gpt
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=parallel.overlap_grad_reduce,
            use_distributed_optimizer=parallel.distributed_optimizer,
            overlap_param_gather=parallel.distributed_optimizer and parallel.overlap_param_gather,
        )
        chunks.append(
            DistributedDataParallel(
                tconfig, ddp_config, module,
                # Only the first chunk starts reducing early; as in Megatron-LM.
                disable_bucketing=vp_stage > 0,
            )
        )
    _wire_schedule_hooks(tconfig, chunks)
    return chunks


def _wire_schedule_hooks(tconfig, chunks) -> None:
    """Let the pipeline schedules drive DDP: defer grad sync to the last microbatch, then finalize."""
    from megatron.core.distributed import finalize_model_grads

    no_sync = [c.no_sync for c in chunks]
    start_sync = [c.start_grad_sync for c in chunks]
    tconfig.no_sync_func = no_sync[0] if len(chunks) == 1 else no_sync
    tconfig.grad_sync_func = start_sync[0] if len(chunks) == 1 else start_sync
    tconfig.finalize_model_grads_func = finalize_model_grads


def finish_weight_gather(chunks) -> None:
    """Make this rank's copy of every weight current. With ``overlap_param_gather`` the distributed
    optimizer's step updates only this rank's shard and leaves the others' to be all-gathered by
    the next forward pass; whatever reads the weights outside a forward (a checkpoint save) calls
    this first. A no-op otherwise; the next forward then finds nothing left to gather."""
    for chunk in chunks:
        if getattr(chunk, "use_forward_hook", False):
            chunk.start_param_sync(force_sync=True)


def unwrap(chunk: torch.nn.Module):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk
