"""What a heft checkpoint holds, and how it is saved and loaded under any parallel layout.

A checkpoint directory (``checkpoint_files.py`` says how it is named and made complete) holds:

* megatron-core ``dist_checkpointing`` files (``torch_dist`` format): every model chunk under
  ``model<i>`` and the optimizer, keyed by global parameter names, so they load under any TP / PP /
  VPP / DP layout; the distributed optimizer writes its ``fully_reshardable`` form, which a plain
  optimizer (or another DP size) loads too;
* ``heft/state.json`` (rank 0): step, consumed samples and tokens, the LR scheduler, the loss
  reduction's lagged statistics, skip counters, the data position, the model's shape and the whole
  resolved config, and the layout it was written under;
* ``heft/rng_<rank>.pt`` (every rank): RNG states, restored only under the same layout (under
  another, each rank is reseeded from (seed, step): heft's model has no dropout, and data order and
  reweighting draw from counters, not RNG streams).

Nothing is unpickled on load except tensors (``weights_only``) and megatron's metadata after it
passed the allow-list in ``checkpoint_files.verify``.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from heft.launcher import checkpoint_files as files
from heft.launcher.checkpoint_files import CheckpointError
from heft.launcher.optim import adam_impl, settle_adam_state

FORMAT = "heft-checkpoint/1"
# fully_reshardable: the distributed optimizer's state in per-parameter form, loadable under any DP
# size and by the plain optimizer. dp_reshardable is faster but ties the checkpoint to TP x PP.
SHARDING_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}
# The fields whose change makes a checkpoint another model.
MODEL_SHAPE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                      "ffn_hidden_size", "tie_embeddings", "make_vocab_size_divisible_by")


@dataclass
class Progress:
    """Where training stands: restored from a checkpoint, carried by the loop."""

    step: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0


def _without_extra_state(tree: dict) -> dict:
    """Drop the layers' ``_extra_state`` entries. They are ShardedObjects, which torch's checkpoint
    reader unpickles without restriction; megatron-core's local layers keep nothing in them (None),
    TE layers only FP8 scaling history, which heft does not use. No other object may remain."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    kept = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            kept[key] = _without_extra_state(value)
        elif isinstance(value, ShardedObject):
            if not key.endswith("_extra_state"):
                raise CheckpointError(f"heft does not save pickled objects, but megatron-core offered {key}")
        else:
            kept[key] = value
    return kept


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


def _sharded_state(trainer, is_loading: bool) -> dict:
    from heft.model.build import unwrap

    state = {f"model{i}": _without_extra_state(unwrap(chunk).sharded_state_dict(metadata=dict(SHARDING_METADATA)))
             for i, chunk in enumerate(trainer.chunks)}
    with _adam_steps_for_the_request(trainer.optimizer) if is_loading else contextlib.nullcontext():
        state["optimizer"] = trainer.optimizer.sharded_state_dict(state, is_loading=is_loading,
                                                                  metadata=dict(SHARDING_METADATA))
    return state


def _layout_signature(trainer) -> dict:
    p = trainer.cfg.parallel
    return {"tensor": p.tensor, "pipeline": p.pipeline, "virtual_pipeline": p.virtual_pipeline,
            "context": p.context, "data": trainer.layout.data_parallel,
            "distributed_optimizer": p.distributed_optimizer}


def model_signature(model_cfg, vocab_size: int, tensor_parallel: int) -> dict:
    """What must match for a checkpoint's weights to be this model's: the shape fields, the
    tokenizer's vocabulary and the padded embedding."""
    from heft.model.build import padded_vocab_size

    return {**{k: getattr(model_cfg, k) for k in MODEL_SHAPE_FIELDS}, "vocab_size": vocab_size,
            "padded_vocab_size": padded_vocab_size(vocab_size, model_cfg.make_vocab_size_divisible_by,
                                                   tensor_parallel)}


def _model_differences(ours: dict, state: dict, whose: str) -> list[str]:
    theirs = state["model"]
    return [f"{key} {theirs.get(key)} (checkpoint) vs {ours[key]} ({whose})"
            for key in ours if theirs.get(key) != ours[key]]


def _model_signature(trainer) -> dict:
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

    def __init__(self, trainer, ckpt_dir: Path, keep: int, async_save: bool = False):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.trainer, self.ckpt_dir, self.keep = trainer, ckpt_dir, keep
        self.queue = AsyncCallsQueue() if async_save else None

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
        request = dist_checkpointing.save(_sharded_state(trainer, is_loading=False), str(partial),
                                          validate_access_integrity=True,
                                          async_sharded_save=self.queue is not None)
        self._write_heft_files(partial, progress, reduction_state)
        if self.queue is not None:
            # megatron-core runs finalize functions on every rank once all ranks' writes are done.
            request = request._replace(finalize_fns=[*request.finalize_fns, self._commit_on_rank0(step)])
            self.queue.schedule_async_request(request)
        else:
            dist.barrier()  # every rank's files are written
            self._commit_on_rank0(step)()
            dist.barrier()  # nobody goes on (or exits) before the checkpoint is complete
        return self.ckpt_dir / files.name(step)

    def poll(self) -> None:
        """Complete a finished asynchronous save (collective; nothing to do when saving in the foreground)."""
        if self.queue is not None:
            self.queue.maybe_finalize_async_calls(blocking=False)

    def finish(self) -> None:
        """Wait for an asynchronous save in flight and complete it (collective)."""
        if self.queue is not None:
            self.queue.maybe_finalize_async_calls(blocking=True)

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
            "tokenizer": _copy_tokenizer(cfg.data.path, heft_dir),
            "saved_at": time.time(),
        }
        files.write_atomically(heft_dir / files.STATE_FILE, json.dumps(state, indent=1) + "\n")


def _copy_tokenizer(data_path: str, heft_dir: Path) -> dict:
    """The data's tokenizer goes with every checkpoint (heft/ beside state.json; a BPE's
    tokenizer.json is a few MB at most), so evaluating, generating and exporting need no dataset."""
    import shutil

    from heft.data.prepare import load_manifest
    from heft.data.tokenizer import tokenizer_files

    spec = load_manifest(data_path)["tokenizer"]
    for file in tokenizer_files(Path(data_path), spec):
        shutil.copyfile(file, heft_dir / file.name)
    return spec


def checkpoint_tokenizer(path: Path, state: dict):
    """The tokenizer a checkpoint was trained with (from its heft/ directory, or, for checkpoints
    written before heft kept it there, from the dataset its config names)."""
    from heft.data.prepare import load_manifest
    from heft.data.tokenizer import load_tokenizer

    if "tokenizer" in state:
        return load_tokenizer(Path(path) / files.HEFT_DIR, state["tokenizer"])
    data_path = state["config"]["data"]["path"]
    try:
        return load_tokenizer(Path(data_path), load_manifest(data_path)["tokenizer"])
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} does not hold its tokenizer and its dataset {data_path} is "
                              f"unreadable ({exc}); pass the dataset with --data PATH") from None


def load_weights(chunks, path: Path, state: dict, model_cfg, vocab_size: int, tensor_parallel: int) -> None:
    """Load only the model weights of a verified checkpoint into ``chunks`` (built under any
    layout; collective): for evaluation, generation and starting a new run from them."""
    from megatron.core import dist_checkpointing

    from heft.model.build import unwrap

    differ = _model_differences(model_signature(model_cfg, vocab_size, tensor_parallel), state, "this model")
    if differ:
        raise CheckpointError(f"{path} holds another model: {'; '.join(differ)}")
    request = {f"model{i}": _without_extra_state(unwrap(chunk).sharded_state_dict(metadata=dict(SHARDING_METADATA)))
               for i, chunk in enumerate(chunks)}
    loaded = dist_checkpointing.load(request, str(path), validate_access_integrity=False)
    for i, chunk in enumerate(chunks):
        unwrap(chunk).load_state_dict(loaded[f"model{i}"], strict=True)
        for name, param in unwrap(chunk).named_parameters():
            if not torch.isfinite(param).all():
                raise CheckpointError(f"{path}: weight {name} holds NaN/inf values; the checkpoint is "
                                      f"damaged or the run diverged: use an earlier checkpoint")


def _check_same_tokenizer(state: dict, data_path: str, path: Path) -> None:
    """Data tokenized another way than the checkpoint's training data is another language to the
    model, even at the same vocabulary size (the manifests' sha256 tell)."""
    from heft.data.prepare import load_manifest

    theirs = state.get("tokenizer", {}).get("sha256")
    ours = load_manifest(data_path)["tokenizer"].get("sha256")
    if theirs and ours and theirs != ours:
        raise CheckpointError(
            f"{path} was trained on data tokenized with another tokenizer (sha256 {theirs[:12]}...) "
            f"than {data_path} ({ours[:12]}...); prepare the data with the checkpoint's tokenizer "
            f"(its heft/ directory holds it: heft prepare --tokenizer {path / files.HEFT_DIR / 'tokenizer.json'})")


def check_compatible(trainer, state: dict, path: Path) -> None:
    """A checkpoint of another model fails here, before any weight is touched."""
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {state.get('format')!r}, not {FORMAT}")
    differ = _model_differences(_model_signature(trainer), state, "this run")
    if differ:
        raise CheckpointError(
            f"{path} holds another model: {'; '.join(differ)}. Use the config the checkpoint was "
            f"trained with (its heft/state.json has it), or checkpoint.load=none with a new "
            f"train.run_dir to train this model from scratch")
    _check_same_tokenizer(state, trainer.cfg.data.path, path)
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


def load(trainer, path: Path, state: dict) -> Progress:
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
    trainer.reduction.load_state_dict(state["reduction"])
    rng_file = path / files.HEFT_DIR / f"rng_{trainer.layout.rank}.pt"
    if state["layout"] == _layout_signature(trainer) and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        _reseed(trainer.cfg.train.seed, state["step"])
    return Progress(step=state["step"], skipped_steps=state["skipped_steps"],
                    consecutive_skips=state["consecutive_skips"])


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
