"""Per-GPU memory and FLOPs of a training layout, estimated before anything is launched.

Memory of the busiest pipeline stage (the first holds the embedding and the most microbatches in
flight; the last holds the output layer and the logits), per rank:

* **weights**: this rank's parameters in the training dtype (bf16: 2 bytes, fp32: 4).
* **gradients**: megatron-core DDP's gradient buffer, always fp32 (heft reduces in fp32).
* **optimizer**: Adam's two moments in fp32, plus fp32 main weights under bf16; all of it
  divided by the data-parallel size with the distributed optimizer.
* **activations**: what autograd saves per token per layer, times the layers of the stage, times
  the microbatches a pipeline stage holds at once, plus the logits and their cross-entropy.
* **optimizer step temporary**: torch's foreach AdamW takes the square root of all second moments
  into a new tensor (4 bytes per parameter of this rank's optimizer shard); the fused kernel needs
  none. The activations are freed by then, so the peak holds the larger of the two.

The per-layer activation counts come from listing the tensors a Llama block saves for backward
(norm inputs, QKV/projection/MLP inputs, SwiGLU's halves, attention's q, k, v and output; the local
spec also keeps the [heads, s, s] probabilities) and were checked against what autograd actually
saves (``torch.autograd.graph.saved_tensors_hooks``) and against measured peaks:
``benchmarks/memory_plan.py``, docs/performance.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from heft.model.config import ModelConfig, ParallelConfig
from heft.model.flops import flops_per_token

GIB = 1024 ** 3

# Elements saved per token per layer by the parts of a block that tensor parallelism does not
# split (the two norms' inputs and the QKV and fc1 inputs they produce) and those it does
# (attention's q and output, the projection input; per hidden unit), and per SwiGLU unit
# (fc1's two halves, silu's output, fc2's input, one more for the product) and per key/value
# unit (k and v, rotated k).
UNSPLIT_PER_HIDDEN = 4
SPLIT_PER_HIDDEN = 6
PER_FFN = 5
PER_KV = 3
# Logits and their softmax in the vocabulary-parallel cross-entropy, fp32, per vocabulary entry.
LOGITS_PER_VOCAB = 1.5
# Reserved on a GPU beyond the estimate: CUDA context and NCCL buffers, and the caching
# allocator's fragmentation.
GPU_RESERVE_BYTES = 1.0 * GIB
GPU_RESERVE_FRACTION = 0.10


@dataclass(frozen=True)
class Workload:
    """What the estimate depends on besides the model and the layout."""

    micro_batch_size: int
    global_batch_size: int
    data_parallel: int
    vocab_size: int
    """The padded vocabulary (the embedding's rows)."""
    bf16: bool
    recompute: str = "none"
    attention: str = "sdpa"
    """The resolved core attention: local (stores the score matrix), sdpa or te."""
    adam_impl: str = "fused"
    """The resolved AdamW kernel: fused, or foreach (a temporary copy of the second moments)."""


@dataclass(frozen=True)
class MemoryEstimate:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    optimizer_step: float
    """The optimizer step's temporary memory, held after the activations are freed."""
    microbatches_in_flight: int
    stage: str
    """Which pipeline stage this is (the busiest one)."""

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + max(self.activations, self.optimizer_step)


def layer_parameters(m: ModelConfig, tensor: int) -> float:
    """One block's parameters on one tensor-parallel rank (the norms are replicated)."""
    kv = m.hidden_size * m.num_query_groups // m.num_attention_heads
    matrices = m.hidden_size * (m.hidden_size + 2 * kv) + m.hidden_size ** 2 + 3 * m.hidden_size * m.ffn_hidden_size
    return matrices / tensor + 2 * m.hidden_size


def activation_bytes_per_layer(m: ModelConfig, tensor: int, tokens: int, bytes_per_element: int,
                               attention: str, recompute: str) -> float:
    """What one block saves for backward for ``tokens`` tokens on one tensor-parallel rank."""
    kv = m.hidden_size * m.num_query_groups / m.num_attention_heads
    per_token = UNSPLIT_PER_HIDDEN * m.hidden_size + (
        SPLIT_PER_HIDDEN * m.hidden_size + PER_FFN * m.ffn_hidden_size + PER_KV * kv) / tensor
    saved = per_token * tokens * bytes_per_element
    if attention == "local" and recompute == "none":
        saved += local_attention_scores(m, tensor, tokens) * (bytes_per_element + (4 if bytes_per_element < 4 else 0))
    return saved


def local_attention_scores(m: ModelConfig, tensor: int, tokens: int) -> float:
    """Elements of one layer's [heads/TP, s, s] score matrices over ``tokens`` tokens.

    megatron-core's local attention keeps the softmax output for backward; under bf16 the softmax
    runs in fp32 and both the fp32 output and its bf16 copy (the input of the value matmul) are
    kept: 6 bytes per score, 4 in fp32."""
    return m.num_attention_heads * m.seq_length * tokens / tensor


def microbatches_in_flight(p: ParallelConfig, microbatches: int) -> float:
    """Microbatches whose activations the first pipeline stage holds at its peak, in units of that
    stage's layers: 1F1B keeps up to PP in flight; the interleaved schedule keeps
    PP * (1 + (PP - 1) / (PP * VPP)) (Narayanan et al., 2021)."""
    if p.pipeline == 1:
        return 1
    if p.virtual_pipeline:
        return min(p.pipeline * (1 + (p.pipeline - 1) / (p.pipeline * p.virtual_pipeline)), microbatches)
    return min(p.pipeline, microbatches)


def estimate(m: ModelConfig, p: ParallelConfig, w: Workload) -> MemoryEstimate:
    """Peak memory of the busiest stage's rank: the larger of the first and the last stage."""
    weight_bytes = 2 if w.bf16 else 4
    layers = m.num_layers // p.pipeline
    embedding = w.vocab_size * m.hidden_size / p.tensor
    tokens = w.micro_batch_size * m.seq_length
    microbatches = max(w.global_batch_size // (w.micro_batch_size * w.data_parallel), 1)
    per_layer = activation_bytes_per_layer(m, p.tensor, tokens, weight_bytes, w.attention, w.recompute)
    # While a layer runs, the local attention also holds its fp32 scores (forward) or their
    # gradient (backward) on top of what is stored.
    workspace = local_attention_scores(m, p.tensor, tokens) * 4 if w.attention == "local" else 0.0
    if w.recompute == "full":
        # Each layer keeps only its input; backward rebuilds one layer's activations at a time.
        stored = layers * tokens * m.hidden_size * weight_bytes
        peak_layer = per_layer + workspace
    else:
        stored, peak_layer = layers * per_layer, workspace
    logits = tokens * w.vocab_size / p.tensor * LOGITS_PER_VOCAB * 4

    stage_layers = layers * layer_parameters(m, p.tensor)
    in_flight = microbatches_in_flight(p, microbatches)
    if p.pipeline == 1:
        params = stage_layers + embedding * (1 if m.tie_embeddings else 2) + m.hidden_size
        stages = [("only", params, stored + peak_layer + logits, 1)]
    else:
        # The last stage holds its own output layer, tied or not (megatron-core syncs the copies).
        stages = [("first", stage_layers + embedding, stored * in_flight + peak_layer, in_flight),
                  ("last", stage_layers + embedding + m.hidden_size, stored + peak_layer + logits, 1)]
    estimates = [_stage(name, params, act, flight, w, p) for name, params, act, flight in stages]
    return max(estimates, key=lambda e: e.total)


def _stage(name: str, params: float, activations: float, in_flight: float, w: Workload,
           p: ParallelConfig) -> MemoryEstimate:
    dp_shard = w.data_parallel if p.distributed_optimizer else 1
    optimizer = params * (8 + (4 if w.bf16 else 0)) / dp_shard
    step_temporary = params * 4 / dp_shard if w.adam_impl == "foreach" else 0.0
    return MemoryEstimate(weights=params * (2 if w.bf16 else 4), gradients=params * 4,
                          optimizer=optimizer, activations=activations, optimizer_step=step_temporary,
                          microbatches_in_flight=math.ceil(in_flight), stage=name)


def usable_gpu_bytes(gpu_bytes: float) -> float:
    """What a run may plan to use of a GPU's memory."""
    return gpu_bytes * (1 - GPU_RESERVE_FRACTION) - GPU_RESERVE_BYTES


def largest_fitting_micro_batch(m: ModelConfig, p: ParallelConfig, w: Workload, budget: float) -> int | None:
    """The largest micro batch (dividing the per-replica batch) whose estimate fits ``budget``."""
    per_replica = w.global_batch_size // w.data_parallel
    best = None
    for mb in range(1, per_replica + 1):
        if per_replica % mb:
            continue
        trial = Workload(**{**w.__dict__, "micro_batch_size": mb})
        if estimate(m, p, trial).total <= budget:
            best = mb
    return best


def flops_per_step(m: ModelConfig, global_batch_size: int, vocab_size: int) -> float:
    """Model FLOPs of one optimizer step (all ranks together), as MFU counts them."""
    per_token = flops_per_token(m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads,
                                m.num_query_groups, m.seq_length, vocab_size)
    return per_token * global_batch_size * m.seq_length
