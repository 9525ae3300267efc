"""heft's configuration tree: the sections each room declares, composed, loaded and validated here.

A config file is YAML with one mapping per section. Each room owns its section's dataclass, where
every field is documented: ``model`` and ``parallel`` (``model/config.py``), ``data`` and
``mixture`` (``data/config.py``), ``reweight`` (``reweighting/config.py``); the launcher's own are ``train``,
``optim`` and ``checkpoint`` below. ``key=value`` overrides on the command line use dotted paths
(``parallel.tensor=2``, ``data.proportions.code=0.5``) and are parsed as YAML scalars, then checked
against the field's type.

Validation that needs no process group (:func:`validate`) runs before torchrun is launched and again
in every worker, so a config that cannot work fails in one line naming the numbers, not in a hang.
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

from heft.data.config import DataConfig, MixtureConfig
from heft.launcher.launch.reporting import UserError
from heft.model.config import ModelConfig, ParallelConfig
from heft.reweighting.config import ReweightConfig

ADAM_IMPLS = ("auto", "fused", "foreach")


class ConfigError(UserError, ValueError):
    """A configuration that cannot work. The message names the problem and the fix."""


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
    adam_impl: str = "auto"
    """torch's AdamW kernel: fused (one kernel for the whole update), foreach (a few multi-tensor
    kernels and a temporary copy of the second moments), or auto (fused on CUDA, foreach on CPU,
    where heft's tests pin down the results). With Transformer Engine or apex installed,
    megatron-core uses their FusedAdam instead and this has no effect."""

    def check(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)) or not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"optim.lr must be > 0 and 0 <= optim.min_lr <= optim.lr (got {self.lr}, {self.min_lr})")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.decay_steps is not None and self.decay_steps < 1:
            raise ValueError(f"optim.decay_steps must be >= 1 (or unset), got {self.decay_steps}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"optim.{name} must be in [0, 1), got {getattr(self, name)}")
        if not (self.eps > 0 and math.isfinite(self.eps)):
            raise ValueError(f"optim.eps must be > 0, got {self.eps}")
        if self.adam_impl not in ADAM_IMPLS:
            raise ValueError(f"optim.adam_impl must be auto, fused or foreach, got {self.adam_impl!r}")
        for name in ("weight_decay", "clip_grad"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"optim.{name} must be >= 0, got {value}")


def adam_impl(o: OptimConfig, cuda: bool | None = None) -> str:
    """The AdamW kernel a run uses (on CUDA when ``cuda``, by default where this process runs):
    ``auto`` is fused on CUDA and foreach on CPU. Here, not in train/optim.py, because ``heft plan``
    (preflight/) asks it for a GPU it is not running on."""
    if o.adam_impl != "auto":
        return o.adam_impl
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    return "fused" if cuda else "foreach"


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
    attention: str = "auto"
    """Core attention: auto (Transformer Engine when importable on CUDA, else torch SDPA on CUDA,
    megatron-core's local attention on CPU), local, sdpa or te. Checkpoints are interchangeable."""
    rope: str = "auto"
    """Rotary embedding kernel: fused (Transformer Engine's when installed, else heft's
    torch.compile'd one), unfused (megatron-core's elementwise ops), or auto (fused on CUDA,
    unfused on CPU)."""
    log_interval: int = 10
    run_dir: str = "runs/default"
    """Where metrics.jsonl, tensorboard/ and checkpoints/ are written. A directory that already
    holds a run is resumed from its latest checkpoint, or refused if it has none."""
    tensorboard: bool = True
    eval_interval: int = 0
    """Evaluate the held-out loss per domain every N steps (0: only if eval_at_end)."""
    eval_at_end: bool = False
    eval_max_microbatches: int | None = None
    """Cap on each domain's validation microbatches per data-parallel replica (None: every domain's
    whole val split). Per domain, so a capped evaluation still covers every domain."""
    on_nonfinite_loss: str = "error"
    """A NaN/inf sample loss or gradient norm: error (stop before the update) or skip (drop the
    step, count it; still an error after max_consecutive_skips in a row)."""
    max_consecutive_skips: int = 10
    stop_at_step: int | None = None
    """Save a checkpoint after this step and stop with status 0 (a preemption exits 75); the same
    command without it resumes. Splits a run into time-limited jobs; the LR schedule still spans
    train.steps."""
    collective_timeout_s: float = 600.0
    """torch.distributed timeout: a collective that waits longer than this fails instead of hanging."""
    step_timeout_s: float = 1800.0
    """Watchdog: a step (or evaluation, or checkpoint save) that runs longer than this ends the job
    with an error naming the step and the ranks that stopped responding. 0 disables it."""

    def is_last_step(self, step: int) -> bool:
        """The step this run ends on: train.steps, or train.stop_at_step."""
        return step in (self.steps, self.stop_at_step)

    def check(self) -> None:
        if self.steps < 1 or self.log_interval < 1:
            raise ValueError("train.steps and train.log_interval must be >= 1")
        if self.micro_batch_size < 1 or self.global_batch_size < 1:
            raise ValueError("train.micro_batch_size and train.global_batch_size must be >= 1")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"train.precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.recompute not in ("none", "selective", "full"):
            raise ValueError(f"train.recompute must be none, selective or full, got {self.recompute!r}")
        if self.attention not in ("auto", "local", "sdpa", "te"):
            raise ValueError(f"train.attention must be auto, local, sdpa or te, got {self.attention!r}")
        if self.rope not in ("auto", "fused", "unfused"):
            raise ValueError(f"train.rope must be auto, fused or unfused, got {self.rope!r}")
        if self.on_nonfinite_loss not in ("error", "skip"):
            raise ValueError(f"train.on_nonfinite_loss must be error or skip, got {self.on_nonfinite_loss!r}")
        if self.eval_interval < 0:
            raise ValueError(f"train.eval_interval must be >= 0, got {self.eval_interval}")
        if self.eval_max_microbatches is not None and self.eval_max_microbatches < 1:
            raise ValueError(f"train.eval_max_microbatches must be >= 1 (or unset), got {self.eval_max_microbatches}")
        if self.max_consecutive_skips < 1:
            raise ValueError(f"train.max_consecutive_skips must be >= 1, got {self.max_consecutive_skips}")
        if not self.collective_timeout_s > 0:
            raise ValueError(f"train.collective_timeout_s must be > 0, got {self.collective_timeout_s}")
        if self.step_timeout_s < 0:
            raise ValueError(f"train.step_timeout_s must be >= 0 (0: off), got {self.step_timeout_s}")
        if not self.run_dir:
            raise ValueError("train.run_dir must not be empty")
        if self.stop_at_step is not None and not 1 <= self.stop_at_step <= self.steps:
            raise ValueError(f"train.stop_at_step must be in [1, train.steps={self.steps}], got {self.stop_at_step}")


@dataclass
class CheckpointConfig:
    """Sharded checkpoints (megatron-core dist_checkpointing) and resume."""

    interval: int = 1000
    """Save every N steps; 0 saves only at the last step and when a signal asks the run to stop.
    The last step is always saved."""
    keep: int = 3
    """Complete checkpoints kept (the newest); older ones are deleted once a newer one is complete."""
    dir: str | None = None
    """Where checkpoints go; None: RUN_DIR/checkpoints."""
    load: str = "auto"
    """auto: resume from the newest complete checkpoint in ``dir`` if there is one; none: start
    fresh (refused if ``dir`` already holds checkpoints); or the path of one checkpoint to start from."""
    async_save: bool = False
    """Write checkpoint files in a background process while training goes on (megatron-core's
    asynchronous save); the checkpoint is marked complete once every rank's files are written."""
    init_hf: str | None = None
    """A Hugging Face Llama directory (config.json + safetensors) to start a fresh run from, under
    any layout (continued pretraining). Ignored once the run has checkpoints of its own: resuming
    continues from those."""

    def check(self) -> None:
        if self.interval < 0:
            raise ValueError(f"checkpoint.interval must be >= 0 (0: only at the end and on signals), got {self.interval}")
        if self.keep < 1:
            raise ValueError(f"checkpoint.keep must be >= 1, got {self.keep}")
        if not self.load:
            raise ValueError("checkpoint.load must be auto, none or a checkpoint path")
        if self.init_hf and self.load not in ("auto", "none"):
            raise ValueError(f"checkpoint.init_hf and checkpoint.load={self.load} both say where to "
                             f"start; set only one")

    def directory(self, run_dir: str) -> Path:
        return Path(self.dir) if self.dir else Path(run_dir) / "checkpoints"


@dataclass
class HeftConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reweight: ReweightConfig = field(default_factory=ReweightConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

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
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_type,) = typing.get_args(annotation)
        return [_coerce(item, item_type, f"{where}[{i}]") for i, item in enumerate(value)]
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


def _build_section(cls, raw: Any, where: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"section '{where}' must be a mapping of keys to values, got {raw!r}")
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
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(exc)})") from None
        parsed.append((key.strip(), value))
    return parsed


def _yaml_problem(exc: yaml.YAMLError) -> str:
    return " ".join(str(getattr(exc, "problem", None) or exc).split())


def read_yaml(path: Path) -> dict[str, Any]:
    """A config file's mapping of sections; a syntax error names the file, line and column."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: YAML syntax error: {_yaml_problem(exc)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(raw).__name__}")
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> HeftConfig:
    """Read a YAML config, apply ``key=value`` overrides, type-check, fill presets, validate."""
    return config_from_dict(read_yaml(Path(path)) if path is not None else {}, overrides)


def config_from_dict(raw: dict[str, Any], overrides: list[str] | None = None) -> HeftConfig:
    """A config from its dict form (a YAML file's, or a checkpoint's saved ``config``), with
    ``key=value`` overrides applied, type-checked, preset-filled and validated."""
    import copy

    raw = copy.deepcopy(raw)
    for key, value in parse_overrides(overrides or []):
        _set_dotted(raw, key, value)
    sections = typing.get_type_hints(HeftConfig)  # section name -> its dataclass
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(sections)}")
    cfg = HeftConfig(**{name: _build_section(cls, raw.get(name) or {}, name) for name, cls in sections.items()})
    from heft.model.presets import apply_preset

    try:
        apply_preset(cfg.model)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------------------------------
# Validation


def validate(cfg: HeftConfig, world_size: int | None = None) -> None:
    """Reject configs that cannot work, naming the numbers. No process group is needed.

    Each section checks itself; the checks that span sections (the model against the layout, the
    batch against the data-parallel size) are here. A room's ValueError becomes a ConfigError."""
    try:
        for section in (cfg.model, cfg.parallel, cfg.data, cfg.mixture, cfg.optim, cfg.train,
                        cfg.reweight, cfg.checkpoint):
            section.check()
        cfg.parallel.check_model(cfg.model)
        dp = cfg.parallel.data_parallel_size(world_size)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    t, p = cfg.train, cfg.parallel
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


def num_microbatches(cfg: HeftConfig, data_parallel: int) -> int:
    return cfg.train.global_batch_size // (cfg.train.micro_batch_size * data_parallel)
