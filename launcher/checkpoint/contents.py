"""What a heft checkpoint holds, and what can be read from it without a Trainer: the model's
signature, its tokenizer, its weights (into a model built under any layout).

A checkpoint directory (``checkpoint/files.py`` says how it is named and made complete) holds:

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
passed the allow-list in ``files.verify``.

Saving and resuming a training run (optimizer, RNG, data position) is ``train/checkpointing.py``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from heft.launcher.checkpoint import files
from heft.launcher.checkpoint.files import CheckpointError

FORMAT = "heft-checkpoint/1"
# fully_reshardable: the distributed optimizer's state in per-parameter form, loadable under any DP
# size and by the plain optimizer. dp_reshardable is faster but ties the checkpoint to TP x PP.
SHARDING_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}
# The fields whose change makes a checkpoint another model.
MODEL_SHAPE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                      "ffn_hidden_size", "tie_embeddings", "make_vocab_size_divisible_by")


def without_extra_state(tree: dict) -> dict:
    """Drop the layers' ``_extra_state`` entries. They are ShardedObjects, which torch's checkpoint
    reader unpickles without restriction; megatron-core's local layers keep nothing in them (None),
    TE layers only FP8 scaling history, which heft does not use. No other object may remain."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    kept = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            kept[key] = without_extra_state(value)
        elif isinstance(value, ShardedObject):
            if not key.endswith("_extra_state"):
                raise CheckpointError(f"heft does not save pickled objects, but megatron-core offered {key}")
        else:
            kept[key] = value
    return kept


def model_signature(model_cfg, vocab_size: int, tensor_parallel: int) -> dict:
    """What must match for a checkpoint's weights to be this model's: the shape fields, the
    tokenizer's vocabulary and the padded embedding."""
    from heft.model.build import padded_vocab_size

    return {**{k: getattr(model_cfg, k) for k in MODEL_SHAPE_FIELDS}, "vocab_size": vocab_size,
            "padded_vocab_size": padded_vocab_size(vocab_size, model_cfg.make_vocab_size_divisible_by,
                                                   tensor_parallel)}


def model_differences(ours: dict, state: dict, whose: str) -> list[str]:
    theirs = state["model"]
    return [f"{key} {theirs.get(key)} (checkpoint) vs {ours[key]} ({whose})"
            for key in ours if theirs.get(key) != ours[key]]


def copy_tokenizer(data_path: str, heft_dir: Path) -> dict:
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

    differ = model_differences(model_signature(model_cfg, vocab_size, tensor_parallel), state, "this model")
    if differ:
        raise CheckpointError(f"{path} holds another model: {'; '.join(differ)}")
    request = {f"model{i}": without_extra_state(unwrap(chunk).sharded_state_dict(metadata=dict(SHARDING_METADATA)))
               for i, chunk in enumerate(chunks)}
    loaded = dist_checkpointing.load(request, str(path), validate_access_integrity=False)
    for i, chunk in enumerate(chunks):
        unwrap(chunk).load_state_dict(loaded[f"model{i}"], strict=True)
        for name, param in unwrap(chunk).named_parameters():
            if not torch.isfinite(param).all():
                raise CheckpointError(f"{path}: weight {name} holds NaN/inf values; the checkpoint is "
                                      f"damaged or the run diverged: use an earlier checkpoint")


def check_same_tokenizer(state: dict, data_path: str, path: Path) -> None:
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
