"""``heft export-hf CHECKPOINT OUT``: a Hugging Face Llama directory from a heft checkpoint.

Works offline in one process, whatever layout the checkpoint was trained under: megatron-core's
``torch_dist`` files are read with torch.distributed.checkpoint's single-process loader, which
assembles every weight whole from the ranks' shards. One weight is read at a time and mapped
(``model/hf_llama.py``); the output holds them all until written (the model's size in memory).

OUT is built beside itself (``OUT.partial``) and swapped in only when complete. An existing OUT is
replaced only if it is an earlier heft export (it has ``heft-export.json``); anything else is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch

from heft.data.prepare import swap_in
from heft.launcher.checkpoint import files
from heft.launcher.checkpoint.files import CheckpointError
from heft.launcher.launch.reporting import UserError
from heft.model import hf_llama

MARKER = "heft-export.json"
PARTIAL_MARKER = ".heft-export-partial"


class ExportError(UserError, ValueError):
    """The output directory cannot be used. The message names it and the fix."""


def check_output(out: Path) -> None:
    """OUT may be absent, empty, or an earlier heft export holding only the files heft wrote."""
    if not out.exists():
        return
    if not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file()):
        raise ExportError(f"{out} exists and is not an earlier heft export (no {MARKER}); heft never "
                          f"overwrites other files: choose a new output directory")
    if (out / MARKER).is_file():
        try:
            written = set(json.loads((out / MARKER).read_text())["files"])
        except (ValueError, KeyError, TypeError):
            written = set()
        foreign = sorted(p.name for p in out.iterdir() if p.name not in written)
        if foreign:
            raise ExportError(f"{out} is an earlier heft export but also holds {', '.join(foreign[:5])}, "
                              f"which heft did not write; move them away or choose a new output directory")


def read_weights(path: Path):
    """(key, whole tensor) of every model weight in a checkpoint, one at a time."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    reader = FileSystemReader(str(path))
    metadata = reader.read_metadata()
    for key, entry in metadata.state_dict_metadata.items():
        if key.startswith("optimizer.") or not hasattr(entry, "size"):
            continue
        holder = {key: torch.empty(entry.size, dtype=entry.properties.dtype)}
        with warnings.catch_warnings():  # "torch.distributed is disabled ... single process": intended
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(holder, storage_reader=FileSystemReader(str(path)), no_dist=True)
        if not torch.isfinite(holder[key]).all():
            raise CheckpointError(f"{path}: weight {key} holds NaN/inf values; the checkpoint is damaged "
                                  f"or the run diverged: export an earlier checkpoint")
        yield key, holder[key]


def hf_state_dict(path: Path, state: dict) -> dict[str, torch.Tensor]:
    shape = hf_llama.Shape.of(state["model"])
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in read_weights(path):
        # Copies, not views: each HF weight is its own tensor in the safetensors file.
        tensors.update({k: v.clone() for k, v in hf_llama.to_hf(key, tensor, shape).items()})
    expected = 3 + 9 * shape.num_layers - int(shape.tie_embeddings)  # embed, norm, (lm_head), 9 per layer
    if len(tensors) != expected:
        raise CheckpointError(f"{path} holds {len(tensors)} Llama weights, expected {expected}; "
                              f"is it a complete heft checkpoint?")
    return tensors


def export(checkpoint: Path, out: Path) -> Path:
    """Write the Hugging Face Llama equivalent of ``checkpoint`` to ``out``; returns ``out``."""
    from heft.launcher.checkpoint.contents import checkpoint_tokenizer

    checkpoint, out = Path(checkpoint), Path(out)
    state = files.verify(checkpoint)
    check_output(out)
    tokenizer = checkpoint_tokenizer(checkpoint, state)
    weights = hf_state_dict(checkpoint, state)
    dtype = next(iter(weights.values())).dtype
    model = {**state["config"]["model"], **state["model"]}
    seq_length = state["config"]["model"]["seq_length"]
    config = hf_llama.llama_config(model, state["model"]["padded_vocab_size"], seq_length,
                                   str(dtype).removeprefix("torch."), tokenizer.eos_id, tokenizer.eos_id)

    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        if not (partial / PARTIAL_MARKER).is_file():
            raise ExportError(f"{partial} exists and is not heft's; move it away")
        shutil.rmtree(partial)  # left by an interrupted export
    partial.mkdir(parents=True)
    (partial / PARTIAL_MARKER).write_text("being written by heft export-hf; never read\n")
    try:
        _write(partial, weights, config, tokenizer, seq_length, checkpoint, state)
        (partial / PARTIAL_MARKER).unlink()
        swap_in(partial, out)
    except BaseException:  # an error or Ctrl-C: nothing half-written stays behind
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


def _write(partial: Path, weights: dict, config: dict, tokenizer, seq_length: int, checkpoint: Path,
           state: dict) -> None:
    from huggingface_hub import save_torch_state_dict
    from transformers import GenerationConfig, LlamaConfig

    from heft.data.tokenizer import to_transformers

    save_torch_state_dict(weights, partial, max_shard_size="5GB")
    LlamaConfig(**config).save_pretrained(partial)
    GenerationConfig(bos_token_id=tokenizer.eos_id, eos_token_id=tokenizer.eos_id,
                     pad_token_id=tokenizer.eos_id).save_pretrained(partial)
    to_transformers(tokenizer, seq_length).save_pretrained(partial)
    (partial / MARKER).write_text(json.dumps({
        "checkpoint": str(checkpoint.resolve()), "step": state["step"],
        "vocab_size": state["model"]["vocab_size"], "padded_vocab_size": state["model"]["padded_vocab_size"],
        "note": "vocab_size in config.json is heft's padded vocabulary: the rows beyond the "
                "tokenizer's take part in the softmax, so they are kept for identical log-probabilities",
        "files": sorted([p.name for p in partial.iterdir() if p.name != PARTIAL_MARKER] + [MARKER]),
    }, indent=1) + "\n")
    mode = 0o666 & ~_umask()  # safetensors files come out 0600 from a temporary file; match the rest
    for file in partial.iterdir():
        os.chmod(file, mode)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current
