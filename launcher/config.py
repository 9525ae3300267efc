"""heft's configuration: typed dataclasses, YAML loading, dotted overrides and validation.

A config file is YAML with one mapping per section (``model``, ``parallel``, ``data``, ``train``,
``optim``). Every field is documented where it is declared. ``key=value`` overrides on the command
line use dotted paths (``parallel.tensor=2``, ``data.proportions.code=0.5``) and are parsed as YAML
scalars, then checked against the field's type.

Validation that needs no process group (:func:`validate`) runs before torchrun is launched and again
in every worker, so a layout that cannot work fails in one line naming the numbers, not in a hang.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration that cannot work. The message names the problem and the fix."""


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
    """The embedding is padded to a multiple of this times the tensor-parallel size."""


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
    batch_p2p_comm: bool = False
    """Batch pipeline send/recv into one call. Never with interleaving at PP=2 (wrong grads upstream)."""

    def model_parallel_size(self) -> int:
        return self.tensor * self.pipeline * self.context


@dataclass
class DataConfig:
    """Where the training tokens come from (the output of ``heft prepare``)."""

    path: str = "demo_data"
    """Directory written by ``heft prepare``: one MDS dataset per domain and manifest.json."""
    proportions: dict[str, float] | None = None
    """Static domain mixture, e.g. {code: 0.5, docs: 0.5}; normalised. None: by token count."""
    shuffle_seed: int = 1234
    num_canonical_nodes: int | None = None
    """mosaicml-streaming's canonical node count; fixed values keep sample order layout-invariant."""


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and cosine decay (megatron-core's optimizer and scheduler)."""

    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 0
    decay_steps: int | None = None
    """Steps of cosine decay after warm-up ends; None: until train.steps."""
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""


@dataclass
class ReweightConfig:
    """Loss-based per-sample reweighting inside the data-parallel loss reduction (reweighting/)."""

    strategy: str = "none"
    """none (plain token mean), linupper, quadratic, extremes, softmax (IR-DRO) or infobatch."""
    scope: str = "global"
    """global: weights normalised over the whole global batch, min/max from the previous step
    (layout-invariant); microbatch: statistics of the current microbatch across DP (the paper)."""
    delta: float = 1.0
    """Half-width d of the min-max normalised loss range [-d, d]."""
    temperature: float = 1.0
    """Softmax temperature r (target value after warm-up/annealing); larger is more uniform."""
    temperature_schedule: str = "constant"
    """constant, linear or cosine from temperature_start to temperature over anneal_steps."""
    temperature_start: float = 100.0
    anneal_steps: int = 0
    warmup_steps: int = 0
    """Steps at the start with reweighting off (uniform weights; statistics are still gathered)."""
    warmup_mode: str = "off"
    """off: uniform weights during warm-up; hold: reweight with r = temperature_start."""
    keep_ratio: float = 0.5
    """infobatch: probability of keeping a below-mean-loss sample (kept ones weigh 1/keep_ratio)."""
    running_mean_momentum: float = 0.9
    """infobatch: EMA momentum of the running mean loss samples are compared with."""
    log_sample_weights: bool = False
    """Write every sample's (domain, index, loss, weight) per step under RUN_DIR/sample_weights/."""


@dataclass
class TrainConfig:
    steps: int = 100
    global_batch_size: int = 8
    """Sequences per optimizer step, over all data-parallel replicas and microbatches."""
    micro_batch_size: int = 1
    """Sequences per forward/backward pass on one replica."""
    seed: int = 1234
    """Weight init and dropout seed. The init is layout-invariant: same seed, same model."""
    precision: str = "auto"
    """fp32, bf16, or auto (bf16 on CUDA, fp32 on CPU)."""
    recompute: str = "none"
    """Activation recompute: none, selective (attention core) or full (whole layers)."""
    log_interval: int = 10
    run_dir: str = "runs/default"
    """Where metrics.jsonl and tensorboard/ are written."""
    tensorboard: bool = True
    eval_interval: int = 0
    """Evaluate the held-out loss per domain every N steps (0: only if eval_at_end)."""
    eval_at_end: bool = False
    eval_max_microbatches: int | None = None
    """Cap on validation microbatches per replica (None: the whole val split)."""
    on_nonfinite_loss: str = "error"
    """A NaN/inf sample loss: error (stop before the update) or skip (drop the step, count it;
    still an error after max_consecutive_skips in a row)."""
    max_consecutive_skips: int = 10


@dataclass
class HeftConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reweight: ReweightConfig = field(default_factory=ReweightConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------
# Loading


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check ``value`` against a field annotation, converting YAML's ints to floats where needed."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_type, value_type = typing.get_args(annotation)
        return {
            _coerce(k, key_type, where): _coerce(v, value_type, f"{where}.{k}") for k, v in value.items()
        }
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _build_section(cls, raw: dict[str, Any], where: str):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(where + '.' + k for k in unknown)}; "
            f"known keys of '{where}': {', '.join(sorted(known))}"
        )
    return cls(**{k: _coerce(v, hints[k], f"{where}.{k}") for k, v in raw.items()})


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: '{part}' is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    parsed = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        parsed.append((key.strip(), yaml.safe_load(text) if text.strip() else None))
    return parsed


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> HeftConfig:
    """Read a YAML config, apply ``key=value`` overrides, type-check, fill presets, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
    for key, value in parse_overrides(overrides or []):
        _set_dotted(raw, key, value)
    sections = typing.get_type_hints(HeftConfig)  # section name -> its dataclass
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(sections)}")
    cfg = HeftConfig(**{name: _build_section(cls, raw.get(name) or {}, name) for name, cls in sections.items()})
    from model.presets import apply_preset  # here, not at the top: presets imports ConfigError

    apply_preset(cfg.model)
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------------------------------
# Validation


def resolve_data_parallel(parallel: ParallelConfig, world_size: int | None) -> int:
    """The data-parallel size for a world, checking world = TP*PP*CP*DP."""
    mp = parallel.model_parallel_size()
    if world_size is None:
        return parallel.data or 1
    if world_size % mp != 0:
        raise ConfigError(
            f"world size {world_size} is not divisible by TP*PP*CP = {parallel.tensor}*"
            f"{parallel.pipeline}*{parallel.context} = {mp}; launch a multiple of {mp} processes"
        )
    dp = world_size // mp
    if parallel.data is not None and parallel.data != dp:
        raise ConfigError(
            f"world size {world_size} != TP*PP*CP*DP = {parallel.tensor}*{parallel.pipeline}*"
            f"{parallel.context}*{parallel.data} = {mp * parallel.data}; launch "
            f"{mp * parallel.data} processes or set parallel.data={dp}"
        )
    return dp


def validate(cfg: HeftConfig, world_size: int | None = None) -> None:
    """Reject configs that cannot work, naming the numbers. No process group is needed."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    for name in ("tensor", "pipeline", "context"):
        if getattr(p, name) < 1:
            raise ConfigError(f"parallel.{name} must be >= 1, got {getattr(p, name)}")
    if p.data is not None and p.data < 1:
        raise ConfigError(f"parallel.data must be >= 1, got {p.data}")
    dp = resolve_data_parallel(p, world_size)

    if m.num_attention_heads % p.tensor != 0:
        raise ConfigError(
            f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
            f"parallel.tensor={p.tensor}; pick a TP size that divides the head count"
        )
    if m.num_attention_heads % m.num_query_groups != 0:
        raise ConfigError(
            f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
            f"model.num_query_groups={m.num_query_groups}"
        )
    if m.num_query_groups % p.tensor != 0:
        raise ConfigError(
            f"model.num_query_groups={m.num_query_groups} is not divisible by "
            f"parallel.tensor={p.tensor}; each TP rank needs whole key/value heads"
        )
    if m.hidden_size % m.num_attention_heads != 0:
        raise ConfigError(
            f"model.hidden_size={m.hidden_size} is not divisible by "
            f"model.num_attention_heads={m.num_attention_heads}"
        )
    if m.ffn_hidden_size % p.tensor != 0:
        raise ConfigError(
            f"model.ffn_hidden_size={m.ffn_hidden_size} is not divisible by parallel.tensor={p.tensor}"
        )
    vpp = p.virtual_pipeline or 1
    if p.virtual_pipeline is not None:
        if p.virtual_pipeline < 1:
            raise ConfigError(f"parallel.virtual_pipeline must be >= 1, got {p.virtual_pipeline}")
        if p.pipeline < 2:
            raise ConfigError(
                f"parallel.virtual_pipeline={p.virtual_pipeline} needs parallel.pipeline >= 2 "
                f"(got {p.pipeline}); unset virtual_pipeline or raise pipeline"
            )
        if p.batch_p2p_comm and p.pipeline == 2:
            raise ConfigError(
                "parallel.batch_p2p_comm=true with interleaved pipeline (virtual_pipeline) and "
                "parallel.pipeline=2 silently computes wrong gradients in megatron-core "
                "(send/recv with the same peer are mis-paired); set parallel.batch_p2p_comm=false"
            )
    if m.num_layers % (p.pipeline * vpp) != 0:
        raise ConfigError(
            f"model.num_layers={m.num_layers} is not divisible by PP*VPP = {p.pipeline}*{vpp} = "
            f"{p.pipeline * vpp}; every pipeline chunk needs the same number of layers"
        )
    if p.context > 1 and m.seq_length % (2 * p.context) != 0:
        raise ConfigError(
            f"model.seq_length={m.seq_length} must be divisible by 2*parallel.context="
            f"{2 * p.context} (load-balanced context parallelism)"
        )
    if t.micro_batch_size < 1 or t.global_batch_size < 1:
        raise ConfigError("train.micro_batch_size and train.global_batch_size must be >= 1")
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step != 0:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by "
            f"train.micro_batch_size*DP = {t.micro_batch_size}*{dp} = {per_step}; "
            f"use a multiple of {per_step}"
        )
    num_micro = t.global_batch_size // per_step
    if p.virtual_pipeline is not None and num_micro % p.pipeline != 0:
        raise ConfigError(
            f"interleaved pipeline needs the number of microbatches ({num_micro} = global batch "
            f"{t.global_batch_size} / (micro {t.micro_batch_size} * DP {dp})) to be a multiple of "
            f"parallel.pipeline={p.pipeline}"
        )
    if t.precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"train.precision must be auto, fp32 or bf16, got {t.precision!r}")
    if t.recompute not in ("none", "selective", "full"):
        raise ConfigError(f"train.recompute must be none, selective or full, got {t.recompute!r}")
    if t.steps < 1 or t.log_interval < 1:
        raise ConfigError("train.steps and train.log_interval must be >= 1")
    o = cfg.optim
    if not (o.lr > 0 and math.isfinite(o.lr)) or o.min_lr < 0 or o.min_lr > o.lr:
        raise ConfigError(f"optim.lr must be > 0 and 0 <= optim.min_lr <= optim.lr (got {o.lr}, {o.min_lr})")
    if t.on_nonfinite_loss not in ("error", "skip"):
        raise ConfigError(f"train.on_nonfinite_loss must be error or skip, got {t.on_nonfinite_loss!r}")
    _validate_reweight(cfg.reweight)
    if cfg.data.proportions is not None:
        if not cfg.data.proportions or any(v < 0 for v in cfg.data.proportions.values()):
            raise ConfigError("data.proportions must map domain names to non-negative weights")
        if sum(cfg.data.proportions.values()) <= 0:
            raise ConfigError("data.proportions must have a positive total")


def _validate_reweight(r: ReweightConfig) -> None:
    from reweighting.strategies import STRATEGIES

    if r.strategy != "none" and r.strategy not in STRATEGIES:
        raise ConfigError(
            f"reweight.strategy={r.strategy!r} is unknown; known: none, {', '.join(sorted(STRATEGIES))}"
        )
    if r.scope not in ("global", "microbatch"):
        raise ConfigError(f"reweight.scope must be global or microbatch, got {r.scope!r}")
    for name in ("temperature", "temperature_start", "delta"):
        value = getattr(r, name)
        if not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"reweight.{name} must be a positive finite number, got {value}")
    if r.temperature_schedule not in ("constant", "linear", "cosine"):
        raise ConfigError(
            f"reweight.temperature_schedule must be constant, linear or cosine, got {r.temperature_schedule!r}"
        )
    if r.warmup_mode not in ("off", "hold"):
        raise ConfigError(f"reweight.warmup_mode must be off or hold, got {r.warmup_mode!r}")
    if not 0 < r.keep_ratio <= 1:
        raise ConfigError(f"reweight.keep_ratio must be in (0, 1], got {r.keep_ratio}")
    if not 0 <= r.running_mean_momentum < 1:
        raise ConfigError(f"reweight.running_mean_momentum must be in [0, 1), got {r.running_mean_momentum}")
    if r.warmup_steps < 0 or r.anneal_steps < 0:
        raise ConfigError("reweight.warmup_steps and reweight.anneal_steps must be >= 0")


def num_microbatches(cfg: HeftConfig, data_parallel: int) -> int:
    return cfg.train.global_batch_size // (cfg.train.micro_batch_size * data_parallel)
