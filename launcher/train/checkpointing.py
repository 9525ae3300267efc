"""Saving and resuming a training run: the Trainer's whole state (model, optimizer, LR schedule,
loss reduction, data position, RNG) under any parallel layout, with megatron-core's
dist_checkpointing. What a checkpoint holds, and reading it without a Trainer, is
``checkpoint/contents.py``; its files on disk are ``checkpoint/files.py``."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from heft.launcher.atomic import write_atomically
from heft.launcher.checkpoint import files, write_results
from heft.launcher.checkpoint.contents import (FORMAT, SHARDING_METADATA, check_same_tokenizer, copy_tokenizer,
                                               model_differences, model_signature, without_extra_state)
from heft.launcher.checkpoint.files import CheckpointError
from heft.launcher.config import adam_impl, config_from_dict
from heft.launcher.train.failures import is_collective_failure
from heft.launcher.train.optim import schedule_change, settle_adam_state

if TYPE_CHECKING:
    from heft.launcher.train.build import Trainer


@dataclass
class Progress:
    """Where training stands: restored from a checkpoint, carried by the loop."""

    step: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0


class CheckpointSaveFailed(RuntimeError):
    """Writing a checkpoint failed (a full disk, a file-size limit, permissions). The previous
    checkpoint stays the newest complete one."""


def save_failed(step: int | None, partial: Path, detail: str) -> CheckpointSaveFailed:
    import resource

    notes = []
    try:
        notes.append(f"{shutil.disk_usage(partial.parent).free / 2**30:.1f} GiB free there")
    except OSError:
        pass
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        notes.append(f"file size limit (ulimit -f) {limit} bytes")
    return CheckpointSaveFailed(
        f"saving the checkpoint of step {step} to {partial} failed: {detail}"
        + (f" ({'; '.join(notes)})" if notes else "")
        + "; the previous checkpoint is still the newest complete one: free space or raise the limit, "
          "then run the same command to resume from it")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__


def _agreed_detail(exc) -> str:
    """Collective: the failure torch.distributed.checkpoint reported, the same text on every rank
    (only the ranks that failed know why; each rank raises the exception alike, so gathering is safe)."""
    failures = getattr(exc, "failures", {}) or {}
    # Each failure is the exception, or (exception, its traceback frames).
    mine = "; ".join(f"rank {rank}: {_first_line(failure[0] if isinstance(failure, tuple) else failure)}"
                     for rank, failure in sorted(failures.items()))
    details: list = [None] * dist.get_world_size()
    dist.all_gather_object(details, mine)
    return "; ".join(sorted({d for d in details if d})) or "a rank's write failed"


@contextlib.contextmanager
def _adam_steps_for_the_request(optimizer):
    """Compatibility shim (megatron-core 0.16 with torch's Adam, i.e. without apex/TE): building the
    distributed optimizer's load request calls its ``state_dict()``, which asserts one common Adam
    ``step`` over the parameters; a fresh process has no state at all. Give each parameter a
    placeholder state for the duration of the request, then remove it again, because the
    distributed optimizer allocates its state itself while loading (and refuses extra keys)."""
    added = []
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(part, "optimizer", None)
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)) or not hasattr(part, "buffers"):
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                if not inner.state[param]:
                    inner.state[param].update(exp_avg=torch.zeros_like(param.data),
                                              exp_avg_sq=torch.zeros_like(param.data), step=torch.tensor(0.0))
                    added.append((inner, param))
    try:
        yield
    finally:
        for inner, param in added:
            del inner.state[param]


def _sharded_state(trainer: Trainer, is_loading: bool) -> dict:
    from heft.model.build import unwrap

    state = {f"model{i}": without_extra_state(unwrap(chunk).sharded_state_dict(metadata=dict(SHARDING_METADATA)))
             for i, chunk in enumerate(trainer.chunks)}
    with _adam_steps_for_the_request(trainer.optimizer) if is_loading else contextlib.nullcontext():
        state["optimizer"] = trainer.optimizer.sharded_state_dict(state, is_loading=is_loading,
                                                                  metadata=dict(SHARDING_METADATA))
    return state


def _layout_signature(trainer: Trainer) -> dict:
    p = trainer.cfg.parallel
    return {"tensor": p.tensor, "pipeline": p.pipeline, "virtual_pipeline": p.virtual_pipeline,
            "context": p.context, "data": trainer.layout.data_parallel,
            "distributed_optimizer": p.distributed_optimizer}


def _model_signature(trainer: Trainer) -> dict:
    return model_signature(trainer.cfg.model, trainer.vocab_size, trainer.cfg.parallel.tensor)


def _rng_state() -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {"cpu": torch.get_rng_state(),
             "tracker": {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(state["cpu"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _reseed(seed: int, step: int) -> None:
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(seed + step)
    model_parallel_cuda_manual_seed(seed + step)


class Saver:
    """Saves checkpoints (collective), in the foreground or, with ``checkpoint.async_save``, with
    megatron-core's asynchronous save: tensors are staged and written by a background process while
    training goes on; the checkpoint becomes complete (renamed, ``latest`` updated) when every rank's
    write has finished, which :meth:`poll` checks at each step boundary. One save is in flight at most."""

    def __init__(self, trainer: Trainer, ckpt_dir: Path, keep: int, async_save: bool = False):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.trainer, self.ckpt_dir, self.keep = trainer, ckpt_dir, keep
        self.queue = AsyncCallsQueue() if async_save else None
        self.last_saved: Path | None = None
        """The path of the newest checkpoint this run saved (complete once :meth:`finish` returns)."""

    def due(self, step: int) -> bool:
        """At every checkpoint.interval steps, and always at the step the run ends on."""
        cfg = self.trainer.cfg
        return cfg.train.is_last_step(step) or bool(cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0)

    def save(self, progress: Progress) -> Path:
        """Start saving ``progress.step``; returns the path the complete checkpoint will have."""
        from megatron.core import dist_checkpointing

        from heft.model.build import finish_weight_gather

        trainer, rank, step = self.trainer, self.trainer.layout.rank, progress.step
        self.finish()  # the previous asynchronous save, if any, completes first
        partial = files.partial_dir(self.ckpt_dir, step)
        if rank == 0:
            files.remove_stale_partials(self.ckpt_dir)
            partial.mkdir(parents=True)
        dist.barrier()
        reduction_state = trainer.reduction.state_dict()  # collective
        finish_weight_gather(trainer.chunks)  # collective: the weights the last step updated
        try:
            with contextlib.nullcontext() if self.queue is not None else write_results.kept_in_process():
                request = dist_checkpointing.save(_sharded_state(trainer, is_loading=False), str(partial),
                                                  validate_access_integrity=True,
                                                  async_sharded_save=self.queue is not None)
        except CheckpointException as exc:  # raised on every rank alike; a BaseException, not an Exception
            detail = _agreed_detail(exc)  # collective: every rank is done with the partial checkpoint
            if rank == 0:
                shutil.rmtree(partial, ignore_errors=True)
            raise save_failed(step, partial, detail) from None
        except (OSError, RuntimeError) as exc:  # one rank's own write (common.pt, metadata) failed
            if is_collective_failure(exc):
                raise
            raise save_failed(step, partial, _first_line(exc)) from None
        try:
            self._write_heft_files(partial, progress, reduction_state)
        except (OSError, RuntimeError) as exc:  # torch.save's archive writer raises RuntimeError
            raise save_failed(step, partial, _first_line(exc)) from None
        if self.queue is not None:
            # megatron-core runs finalize functions on every rank once all ranks' writes are done.
            request = request._replace(finalize_fns=[*request.finalize_fns, lambda: self._record_checksums(partial),
                                                     self._commit_on_rank0(step)])
            self.queue.schedule_async_request(request)
        else:
            dist.barrier()  # every rank's files are written
            self._record_checksums(partial)
            self._commit_on_rank0(step)()
            dist.barrier()  # nobody goes on (or exits) before the checkpoint is complete
        self.last_saved = self.ckpt_dir / files.name(step)
        return self.last_saved

    def poll(self) -> None:
        """Complete a finished asynchronous save (collective; nothing to do when saving in the foreground)."""
        if self.queue is not None:
            self._finalize(blocking=False)

    def finish(self) -> None:
        """Wait for an asynchronous save in flight and complete it (collective)."""
        if self.queue is not None:
            self._finalize(blocking=True)

    def _finalize(self, blocking: bool) -> None:
        try:
            self.queue.maybe_finalize_async_calls(blocking=blocking)
        except CheckpointException as exc:
            step = files.step_of(self.last_saved) if self.last_saved else None
            partial = files.partial_dir(self.ckpt_dir, step) if step else self.ckpt_dir
            detail = _agreed_detail(exc)  # collective: every rank is done with the partial checkpoint
            if step and self.trainer.layout.rank == 0:
                shutil.rmtree(partial, ignore_errors=True)
            raise save_failed(step, partial, detail) from None

    def _record_checksums(self, partial: Path) -> None:
        """Collective: every file's size and crc32 into heft/checksums.json, each rank hashing a
        share of the files (just written, so mostly from the page cache); loading compares them."""
        rank, world = self.trainer.layout.rank, self.trainer.layout.world_size
        names = files.files_to_checksum(partial)
        mine = {name: ((partial / name).stat().st_size, files.file_checksum(partial / name))
                for name in names[rank::world]}
        shares: list = [None] * world
        dist.all_gather_object(shares, mine)
        if rank == 0:
            files.write_checksums(partial, {k: v for share in shares for k, v in share.items()})

    def _commit_on_rank0(self, step: int):
        def commit() -> None:
            if self.trainer.layout.rank == 0:
                files.commit(self.ckpt_dir, step, self.keep)
        return commit

    def _write_heft_files(self, partial: Path, progress: Progress, reduction_state: dict) -> None:
        trainer, rank = self.trainer, self.trainer.layout.rank
        heft_dir = partial / files.HEFT_DIR
        if rank == 0:
            heft_dir.mkdir(exist_ok=True)
        dist.barrier()
        torch.save(_rng_state(), heft_dir / f"rng_{rank}.pt")
        if rank != 0:
            return
        cfg, step = trainer.cfg, progress.step
        state = {
            "format": FORMAT,
            "step": step,
            "consumed_samples": step * cfg.train.global_batch_size,
            "consumed_tokens": step * cfg.train.global_batch_size * cfg.model.seq_length,
            "skipped_steps": progress.skipped_steps,
            "consecutive_skips": progress.consecutive_skips,
            "scheduler": trainer.scheduler.state_dict(),
            "reduction": reduction_state,
            "data": trainer.batches.state_dict(),
            "model": _model_signature(trainer),
            "layout": _layout_signature(trainer),
            "world_size": trainer.layout.world_size,
            "config": cfg.to_dict(),
            "tokenizer": copy_tokenizer(cfg.data.path, heft_dir),
            "saved_at": time.time(),
        }
        write_atomically(heft_dir / files.STATE_FILE, json.dumps(state, indent=1) + "\n")


def check_compatible(trainer: Trainer, state: dict, path: Path) -> None:
    """A checkpoint of another model fails here, before any weight is touched."""
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {state.get('format')!r}, not {FORMAT}")
    differ = model_differences(_model_signature(trainer), state, "this run")
    if differ:
        raise CheckpointError(
            f"{path} holds another model: {'; '.join(differ)}. Use the config the checkpoint was "
            f"trained with (its heft/state.json has it), or checkpoint.load=none with a new "
            f"train.run_dir to train this model from scratch")
    check_same_tokenizer(state, trainer.cfg.data.path, path)
    saved_data, data = state["config"]["data"], trainer.cfg.data
    # data.proportions and the mixture may change on resume: they steer the draws from here on.
    for key in ("num_canonical_nodes", "shuffle_seed"):
        if saved_data.get(key) != getattr(data, key):
            raise CheckpointError(
                f"{path} was trained with data.{key}={saved_data.get(key)}, this run has "
                f"{getattr(data, key)}; resuming would change the sample order. Set "
                f"data.{key}={saved_data.get(key)}, or start a new run from it with checkpoint.load "
                f"in a new train.run_dir after changing it deliberately")
    if state["config"]["train"]["global_batch_size"] != trainer.cfg.train.global_batch_size:
        raise CheckpointError(
            f"{path} was trained with train.global_batch_size="
            f"{state['config']['train']['global_batch_size']}, this run has "
            f"{trainer.cfg.train.global_batch_size}; resuming exactly needs the same global batch")


def load(trainer: Trainer, path: Path, state: dict) -> Progress:
    """Load a verified checkpoint into the built trainer under its own layout (collective)."""
    from megatron.core import dist_checkpointing

    from heft.model.build import unwrap

    check_compatible(trainer, state, path)
    request = _sharded_state(trainer, is_loading=True)
    master_copies_missing = _drop_master_copies_not_in(request, set(dist_checkpointing.load_tensors_metadata(str(path))))
    loaded = dist_checkpointing.load(request, str(path), validate_access_integrity=True)
    for i, chunk in enumerate(trainer.chunks):
        unwrap(chunk).load_state_dict(loaded[f"model{i}"], strict=True)
    optimizer_state = _optimizer_state_for(trainer.optimizer, trainer.cfg.parallel.distributed_optimizer,
                                           loaded["optimizer"])
    if master_copies_missing:  # a plain fp32 optimizer's checkpoint: the loaded weights are the masters
        _masters_from_weights(trainer.optimizer, optimizer_state["param_state"])
    if trainer.cfg.parallel.distributed_optimizer:
        _load_distributed_optimizer(trainer.optimizer, optimizer_state)
    else:
        trainer.optimizer.load_state_dict(optimizer_state)
    settle_adam_state(trainer.optimizer, adam_impl(trainer.cfg.optim))  # the load replaced the groups
    trainer.scheduler.load_state_dict(state["scheduler"])
    if trainer.layout.rank == 0:
        _say_if_the_schedule_changed(trainer, state)
    trainer.reduction.load_state_dict(state["reduction"])
    rng_file = path / files.HEFT_DIR / f"rng_{trainer.layout.rank}.pt"
    if state["layout"] == _layout_signature(trainer) and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        _reseed(trainer.cfg.train.seed, state["step"])
    return Progress(step=state["step"], skipped_steps=state["skipped_steps"],
                    consecutive_skips=state["consecutive_skips"])


def _say_if_the_schedule_changed(trainer: Trainer, state: dict) -> None:
    """One line when this run's LR schedule gives the next step another LR than the checkpoint's
    did (a longer train.steps stretches the decay). A note only: a saved config that no longer
    validates skips it."""
    try:
        saved = config_from_dict(state["config"])
    except Exception:
        return
    line = schedule_change(saved, trainer.cfg, state["step"] + 1, trainer.scheduler.num_steps)
    if line:
        print(line, flush=True)


def _drop_master_copies_not_in(request: dict, saved_keys: set[str]) -> bool:
    """The distributed optimizer asks for its fp32 master weights (``optimizer.state.param.*``); a
    plain fp32 optimizer never saves them, because its masters are the model weights. Loading such a
    checkpoint into the distributed optimizer, drop those requests (the masters are then refreshed
    from the loaded model weights). Returns whether any were dropped."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    dropped = False

    def unwanted(value) -> bool:
        nonlocal dropped
        key = value.key if isinstance(value, (ShardedTensor, ShardedTensorFactory)) else None
        if key and key.startswith("optimizer.state.param.") and key not in saved_keys:
            dropped = True
            return True
        return False

    def prune(node):
        if isinstance(node, dict):
            for key in [k for k, v in node.items() if unwanted(v)]:
                del node[key]
            children = node.values()
        elif isinstance(node, list):
            node[:] = [v for v in node if not unwanted(v)]
            children = node
        else:
            return
        for child in children:
            prune(child)

    prune(request.get("optimizer", {}))
    return dropped


def _masters_from_weights(optimizer, param_state: dict) -> None:
    """Give the distributed optimizer's fully_reshardable state the fp32 master weight of each
    parameter it lacks: the just-loaded model weight, in the order megatron-core enumerates them
    (its buffers' parameter index maps)."""
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    if len(parts) != 1:
        raise CheckpointError("cannot load a plain optimizer's checkpoint into a distributed optimizer "
                              "with several parts; resume with parallel.distributed_optimizer=false")
    index = -1
    for buffer in parts[0].buffers:
        for model_param in buffer.param_index_map:
            index += 1
            entry = param_state.get(index)
            if entry is not None and "param" not in entry:
                entry["param"] = model_param.detach().float()


def _optimizer_state_for(optimizer, distributed: bool, loaded: dict) -> dict:
    """Compatibility shim between megatron-core 0.16's two optimizer state layouts, so a checkpoint
    of the plain optimizer loads into the distributed one and back. The tensors already arrived in
    the requesting optimizer's own structure (dist_checkpointing matched them by name); only the
    non-tensor part differs: the plain optimizer keeps torch's {state: {common_step}, param_groups},
    the distributed one {optimizer: {param_groups (with step)}, param_state_sharding_type}."""
    from_distributed = "param_state_sharding_type" in loaded
    if distributed and not from_distributed:
        step = loaded["state"].get("common_step")
        groups = [{k: v for k, v in group.items() if k != "params"} for group in loaded["param_groups"]]
        for group in groups:
            group["step"] = float(step) if step is not None else None
        return {"optimizer": {"param_groups": groups}, "param_state": loaded["param_state"],
                "param_state_sharding_type": SHARDING_METADATA["distrib_optim_sharding_type"]}
    if from_distributed and not distributed:
        saved_groups = loaded["optimizer"]["param_groups"]
        step = next((g.get("step") for g in saved_groups if g.get("step") is not None), None)
        state = {k: v for k, v in loaded["state"].items() if k != "common_step"}
        if step is not None:
            state["common_step"] = torch.tensor(float(step))
        # The saved groups carry hyper-parameters but no parameter ids; take the ids (the keys of
        # ``state``) from this optimizer's own groups, matched the way megatron-core matches them.
        def group_key(group):
            return tuple(group.get(k) for k in ("wd_mult", "lr_mult", "is_expert_parallel", "is_decoupled_lr"))
        by_key = {group_key(g): g for g in saved_groups}
        inner = getattr(optimizer, "chained_optimizers", [optimizer])[0].optimizer
        groups = [{**{k: v for k, v in by_key[group_key(g)].items() if k != "step"}, "params": g["params"]}
                  for g in inner.state_dict()["param_groups"]]
        return {"state": state, "param_groups": groups}
    return loaded


def _load_distributed_optimizer(optimizer, state: dict) -> None:
    """Compatibility shim for megatron-core 0.16's DistributedOptimizer with torch's Adam (no
    apex/TE): its ``load_state_dict`` gives every parameter's state a ``step`` and then copies
    every state key from the fully_reshardable tensors, which never hold ``step`` (KeyError). Load
    the two halves through its own methods instead: param groups and step first, then the
    parameter state with ``step`` set aside and given back (one copy per parameter)."""
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    if len(parts) != 1:
        raise CheckpointError("heft loads the distributed optimizer with one parameter group set only")
    part = parts[0]
    state = dict(state)
    param_state = state.pop("param_state")
    state.pop("param_state_sharding_type")
    part.load_state_dict(state)
    steps = {param: s.pop("step") for param, s in part.optimizer.state.items() if "step" in s}
    part.load_parameter_state_from_fully_reshardable(param_state)
    for param, step in steps.items():
        part.optimizer.state[param]["step"] = step.clone()
