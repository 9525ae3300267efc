"""``heft eval RUN_DIR_OR_CHECKPOINT``: held-out loss and perplexity per domain of a checkpoint.

The launcher side (:meth:`EvalPlan.from_command`) turns the checkpoint's own config, the command's options and any
``key=value`` overrides into worker arguments: one process by default (TP1, PP1), or any layout the
given processes fit. Each worker (:func:`evaluate_checkpoint`, run by ``heft.launcher.worker
--eval``, :data:`EVAL_FLAG`) builds the model under that layout, loads only its weights, and runs the same forward-only
evaluation as training does (``train/evaluator.py``) over the data's validation splits, so the
numbers reproduce the in-training evaluation's. Rank 0 prints a table and writes
``<checkpoint>.eval.json`` beside the checkpoint.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from heft.launcher.atomic import write_atomically
from heft.launcher.checkpoint import files

EVAL_FLAG = "--eval"
"""``python -m heft.launcher.worker --eval CHECKPOINT [key=value ...]`` evaluates instead of training."""


@dataclass
class EvalPlan:
    """What ``heft eval`` launches: the checkpoint, the workers' overrides and how many workers."""

    checkpoint: Path
    overrides: list[str]
    world_size: int

    @classmethod
    def from_command(cls, path: str, data: str | None, nproc: int | None, micro_batch_size: int | None,
                     max_batches: int | None, overrides: list[str]) -> EvalPlan:
        """Check everything that needs no process; the one-line errors come from here."""
        from heft.launcher.config import ConfigError, config_from_dict, validate
        from heft.launcher.evaluate.inference import UNSPLIT

        for option, value in (("--nproc", nproc), ("--micro-batch-size", micro_batch_size),
                              ("--max-batches", max_batches)):
            if value is not None and value < 1:
                raise ConfigError(f"{option} must be >= 1, got {value}")
        checkpoint = files.resolve_checkpoint(path)
        state = files.verify(checkpoint)
        extra = [*UNSPLIT, *overrides]  # one process unless the overrides say otherwise
        if data:
            extra.append(f"data.path={data}")
        if micro_batch_size:
            extra.append(f"train.micro_batch_size={micro_batch_size}")
        extra.append(f"train.eval_max_microbatches={max_batches if max_batches else 'null'}")
        cfg = config_from_dict(state["config"], extra)
        model_parallel = cfg.parallel.model_parallel_size()
        world = nproc or model_parallel * (cfg.parallel.data or 1)
        if world % model_parallel:
            raise ConfigError(f"--nproc {world} is not a multiple of TP*PP*CP = {model_parallel}")
        # Evaluation has no global batch; make the training one agree with this layout.
        extra.append(f"train.global_batch_size={cfg.train.micro_batch_size * world // model_parallel}")
        validate(config_from_dict(state["config"], extra), world)
        _check_data(cfg, checkpoint, state)
        return cls(checkpoint, extra, world)


def _check_data(cfg, checkpoint: Path, state: dict) -> None:
    """The data must be tokenized as the model was trained, and have held-out samples."""
    from heft.data.config import DataConfigError
    from heft.data.loader import check_has_validation, check_sequence_length
    from heft.data.tokenizer import load_tokenizer
    from heft.data.verify import verify_dataset
    from heft.launcher.checkpoint.contents import checkpoint_tokenizer

    manifest = verify_dataset(cfg.data.path)
    check_sequence_length(manifest, cfg.model.seq_length, cfg.data.path)
    ours = checkpoint_tokenizer(checkpoint, state)
    theirs = load_tokenizer(Path(cfg.data.path), manifest["tokenizer"])
    if not ours.same_as(theirs):
        raise DataConfigError(f"{cfg.data.path} was tokenized with another tokenizer ({theirs.kind}, "
                              f"{theirs.vocab_size} tokens) than {checkpoint} ({ours.kind}, "
                              f"{ours.vocab_size} tokens); evaluate on data prepared with the model's tokenizer")
    check_has_validation(manifest, cfg.data.path)


def evaluate_checkpoint(checkpoint: str, overrides: list[str]) -> dict:
    """Worker side: build, load, evaluate; rank 0 reports. Returns the results (every rank)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from heft.data.loader import validation_batches
    from heft.data.prepare import load_manifest
    from heft.launcher.checkpoint.contents import load_weights
    from heft.launcher.config import config_from_dict
    from heft.launcher.launch.reporting import REPORT_DIR_VAR
    from heft.launcher.preflight.checks import check_backends
    from heft.launcher.train.build import (build_loss_reduction, build_model, clean_stale_data_state,
                                           start_processes)
    from heft.launcher.train.evaluator import Evaluator
    from heft.model import cpu_compat
    from heft.model.build import Backends
    from heft.model.parallel import shutdown
    from heft.reweighting.config import ReweightConfig

    path = Path(checkpoint)
    # `heft eval` verified the files' contents before launching; started otherwise, verify them here.
    state = files.verify(path, contents=not os.environ.get(REPORT_DIR_VAR))
    cfg = config_from_dict(state["config"], overrides)
    cpu_compat.enable_if_no_cuda()
    backends = Backends.detect()
    check_backends(cfg, backends)
    layout = start_processes(cfg)
    manifest = load_manifest(cfg.data.path)
    vocab_size = manifest["tokenizer"]["vocab_size"]
    domains = [d["name"] for d in manifest["domains"]]
    clean_stale_data_state(cfg)
    chunks = build_model(cfg, vocab_size, backends)
    load_weights(chunks, path, state, cfg.model, vocab_size, cfg.parallel.tensor)
    t = cfg.train
    batches = validation_batches(cfg.data.path, t.micro_batch_size, layout.dp_rank, layout.data_parallel,
                                 t.eval_max_microbatches)
    evaluator = Evaluator(batches, build_loss_reduction(cfg, layout, domains, ReweightConfig(strategy="none")),
                          chunks, get_forward_backward_func(), t.micro_batch_size, cfg.model.seq_length)
    bar = _progress_bar(len(batches), enabled=layout.rank == 0)
    metrics = evaluator.run(state["step"], progress=bar.update)
    bar.close()
    results = _results(path, state, cfg, layout, metrics, evaluator.last_report, domains)
    if layout.rank == 0:
        out = output_path(path, state, cfg)
        write_atomically(out, json.dumps(results, indent=1) + "\n")
        print(table(results) + f"\nheft: wrote {out}", flush=True)
    shutdown()
    return results


def output_path(checkpoint: Path, state: dict, cfg) -> Path:
    """``step_N.eval.json`` for the whole validation split of the training data; other data or a
    capped evaluation get their own file (``step_N.eval-<data>-max<M>.json``), never overwriting it."""
    tags = []
    if Path(cfg.data.path).resolve() != Path(state["config"]["data"]["path"]).resolve():
        tags.append(Path(cfg.data.path).name)
    if cfg.train.eval_max_microbatches:
        tags.append(f"max{cfg.train.eval_max_microbatches}")
    return checkpoint.with_name(checkpoint.name + ".eval" + "".join("-" + t for t in tags) + ".json")


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    import sys

    return tqdm(total=total, desc="heft eval", unit="microbatch", leave=False,
                disable=not (enabled and sys.stderr.isatty()))  # no bar in logs


def _results(path: Path, state: dict, cfg, layout, metrics: dict, report, domains: list[str]) -> dict:
    seq = cfg.model.seq_length
    per_domain = {}
    for name, count in zip(domains, report.domain_counts):
        if count:
            loss = metrics[f"eval_{name}_loss"]
            per_domain[name] = {"loss": loss, "perplexity": math.exp(loss), "tokens": int(count) * seq}
    return {
        "checkpoint": str(path.resolve()), "step": state["step"], "data": str(cfg.data.path),
        "layout": {"tensor": cfg.parallel.tensor, "pipeline": cfg.parallel.pipeline,
                   "data": layout.data_parallel, "world_size": layout.world_size},
        "micro_batch_size": cfg.train.micro_batch_size,
        "max_microbatches_per_domain_per_replica": cfg.train.eval_max_microbatches,
        "overall": {"loss": metrics["eval_loss"], "perplexity": math.exp(metrics["eval_loss"]),
                    "tokens": sum(d["tokens"] for d in per_domain.values())},
        "domains": per_domain,
    }


def table(results: dict) -> str:
    rows = [*results["domains"].items(), ("overall (token-weighted)", results["overall"])]
    width = max(len(name) for name, _ in rows)
    cap = results["max_microbatches_per_domain_per_replica"]
    capped = f"; capped at {cap} microbatch(es) of each domain per replica" if cap else ""
    lines = [f"heft eval: {results['checkpoint']} (step {results['step']}) on {results['data']}{capped}",
             f"{'domain':<{width}}  {'tokens':>10}  {'loss':>8}  {'perplexity':>10}"]
    lines += [f"{name:<{width}}  {r['tokens']:>10,}  {r['loss']:>8.4f}  {r['perplexity']:>10.3f}" for name, r in rows]
    return "\n".join(lines)
