"""Start heft's model from a Hugging Face Llama checkpoint (``checkpoint.init_hf=DIR``), under any layout.

Each rank fills only its own shard: megatron-core's ``sharded_state_dict`` says, for every local
weight, which global tensor it belongs to (by the same keys heft's checkpoints use) and where in it
the local piece sits; the global tensor is assembled per layer from the HF weights
(``model/hf_llama.py``) and the piece copied in place. Embedding rows are read as slices.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from heft.model import hf_llama


class HFImportError(ValueError):
    """An HF checkpoint that does not fit the configured model or data. Names the fix."""


def read_config(hf_dir: Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise HFImportError(f"{path} not found: checkpoint.init_hf must name a Hugging Face model "
                            f"directory (save_pretrained's output)")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise HFImportError(f"{path} is not valid JSON ({exc})") from None


def check_fits(hf_dir: Path, model_cfg, tokenizer) -> dict:
    """Refuse an HF checkpoint whose architecture or vocabulary does not fit, before any process
    starts. ``tokenizer`` is the training data's. Returns the HF config."""
    hf_dir = Path(hf_dir)
    config = read_config(hf_dir)
    try:
        overrides = hf_llama.mismatches(config, model_cfg)
    except ValueError as exc:
        raise HFImportError(f"{hf_dir}: {exc}") from None
    if overrides:
        raise HFImportError(f"{hf_dir} holds another shape than the configured model; set "
                            f"{' '.join(overrides)}")
    if tokenizer.vocab_size > config["vocab_size"]:
        raise HFImportError(f"the data's tokenizer has {tokenizer.vocab_size} tokens but {hf_dir} has "
                            f"{config['vocab_size']} embedding rows; prepare the data with the "
                            f"model's own tokenizer")
    _check_tokenizer(hf_dir, tokenizer)
    _check_shapes(hf_dir, config, hf_llama.Shape.of(model_cfg))
    return config


def _check_shapes(hf_dir: Path, config: dict, shape) -> None:
    """Every weight heft will read has the shape the config implies (safetensors headers only)."""
    read = _Weights(hf_dir)
    h, f, d = shape.hidden_size, shape.ffn_hidden_size, shape.head_dim
    q, kv = shape.num_attention_heads * d, shape.num_query_groups * d
    expected = {"model.embed_tokens.weight": (config["vocab_size"], h), "model.norm.weight": (h,)}
    if not shape.tie_embeddings:
        expected["lm_head.weight"] = (config["vocab_size"], h)
    for i in range(shape.num_layers):
        names = hf_llama.hf_names(i)
        expected.update({names["q"]: (q, h), names["k"]: (kv, h), names["v"]: (kv, h),
                         names[hf_llama.PROJ]: (h, q), names["gate"]: (f, h), names["up"]: (f, h),
                         names[hf_llama.FC2]: (h, f), names[hf_llama.INPUT_NORM]: (h,),
                         names[hf_llama.MLP_NORM]: (h,)})
    for name, wanted in expected.items():
        found = tuple(read.shape(name))
        if found != wanted:
            raise HFImportError(f"{hf_dir}: {name} has shape {found}, but its config.json implies "
                                f"{wanted}; the weights do not match their config")


def _check_tokenizer(hf_dir: Path, tokenizer) -> None:
    """The data must be tokenized the way the HF model's embedding rows were trained."""
    from tokenizers import Tokenizer as HFTokenizer

    from heft.data.tokenizer import BPETokenizer

    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        raise HFImportError(f"{hf_dir} has no tokenizer.json, so heft cannot check that the data was "
                            f"tokenized with the model's tokenizer; copy the model's tokenizer.json there")
    theirs = BPETokenizer(HFTokenizer.from_file(str(path)), eos_id=None, kind="hf")
    if not theirs.same_as(tokenizer):
        raise HFImportError(f"the data was tokenized with another tokenizer than {hf_dir}'s "
                            f"tokenizer.json; prepare the data with the model's tokenizer")


def _weight_files(hf_dir: Path) -> list[Path]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [hf_dir / n for n in names]
    else:
        files = [hf_dir / "model.safetensors"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        hint = " (pytorch_model.bin: load and save_pretrained it again, which writes safetensors)" \
            if (hf_dir / "pytorch_model.bin").is_file() else ""
        raise HFImportError(f"{hf_dir} lacks {', '.join(missing)}{hint}")
    return files


class _Weights:
    """Read access to an HF checkpoint's safetensors files by weight name."""

    def __init__(self, hf_dir: Path):
        from safetensors import safe_open

        self.handles = {}
        for file in _weight_files(hf_dir):
            handle = safe_open(str(file), framework="pt")
            for name in handle.keys():
                self.handles[name] = handle
        self.hf_dir = hf_dir

    def __call__(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._handle(name).get_slice(name)[start:stop]

    def num_rows(self, name: str) -> int:
        return self.shape(name)[0]

    def shape(self, name: str) -> list[int]:
        return self._handle(name).get_slice(name).get_shape()

    def _handle(self, name: str):
        if name not in self.handles:
            raise HFImportError(f"{self.hf_dir} has no weight {name}; is it a complete Llama checkpoint?")
        return self.handles[name]


def load_into(chunks, hf_dir: Path, model_cfg) -> int:
    """Copy this rank's share of the HF weights into its model chunks; returns the weights filled."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    from heft.model.build import unwrap

    shape = hf_llama.Shape.of(model_cfg)
    read = _Weights(Path(hf_dir))
    filled = 0

    def visit(node) -> None:
        nonlocal filled
        if isinstance(node, dict):
            for value in node.values():
                visit(value)
        elif isinstance(node, ShardedTensorFactory):
            for piece in node.build():
                visit(piece)
        elif isinstance(node, ShardedTensor) and not node.key.endswith("_extra_state"):
            _fill(node, read, shape)
            filled += 1

    with torch.no_grad():
        for chunk in chunks:
            visit(unwrap(chunk).sharded_state_dict())
    return filled


def _fill(piece, read: _Weights, shape) -> None:
    """Copy the part of the global tensor ``piece.key`` that ``piece`` (a ShardedTensor) holds."""
    assert piece.flattened_range is None, "model weights are never flattened"
    prepend = piece.prepend_axis_num
    offsets = piece.global_offset[prepend:]
    name = hf_llama.layer_key(piece.key)
    if name is not None:
        source = hf_llama.from_hf_layer(name, piece.global_offset[0], read, shape)
    elif piece.key in (hf_llama.EMBEDDING, hf_llama.OUTPUT):
        _fill_vocab_rows(piece, read, shape)
        return
    else:
        source = hf_llama.from_hf_global(piece.key, read, shape)
    index = tuple(slice(o, o + n) for o, n in zip(offsets, piece.data.shape))
    if source[index].shape != piece.data.shape:
        raise HFImportError(f"{read.hf_dir}: {piece.key} has shape {tuple(source.shape)}, which does "
                            f"not hold heft's piece {tuple(piece.data.shape)} at {offsets}")
    piece.data.copy_(source[index])


def _fill_vocab_rows(piece, read: _Weights, shape) -> None:
    """Embedding / output rows: heft's padded vocabulary may have more or fewer rows than the HF
    model's; rows the HF model lacks keep heft's initialisation (they are padding: no token has them)."""
    hf_name = "model.embed_tokens.weight" if piece.key == hf_llama.EMBEDDING or shape.tie_embeddings \
        else "lm_head.weight"
    start, count = piece.global_offset[0], piece.data.shape[0]
    stop = min(start + count, read.num_rows(hf_name))
    if stop > start:
        piece.data[:stop - start].copy_(read.rows(hf_name, start, stop))
