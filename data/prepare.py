"""``heft prepare``: tokenize raw documents per domain, pack them, write one MDS dataset per domain.

Layout of a prepared directory::

    OUT/manifest.json            domains, sample and token counts, sequence length, tokenizer
    OUT/tokenizer.json           the trained BPE (BPE only)
    OUT/<domain>/train/          MDS shards (mosaicml-streaming) of packed sequences
    OUT/<domain>/val/            held-out packed sequences of the same domain

Packing: the documents of a domain are joined, each followed by EOS, and cut into samples of
``seq_length + 1`` tokens (inputs and shifted labels come from the same sample); the ragged tail is
dropped. Each sample carries its domain id and its index within the domain's split.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterable

import numpy as np

from heft.data.config import DataConfigError
from heft.data.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer

MANIFEST = "manifest.json"
FORMAT = "heft-prepared/1"
COLUMNS = {"tokens": "ndarray", "domain": "int", "index": "int"}


def read_documents(paths: Iterable[Path]) -> list[str]:
    """Documents from .txt files (one file, one document) and .jsonl files (a ``text`` per line).
    A directory contributes its .txt/.jsonl files, recursively, in sorted order."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl"))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"input {path} does not exist")
    docs: list[str] = []
    for file in files:
        if file.suffix == ".jsonl":
            for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    record = json.loads(line)
                    if "text" not in record:
                        raise ValueError(f"{file}:{n}: a jsonl record needs a 'text' field")
                    docs.append(record["text"])
        else:
            docs.append(file.read_text(encoding="utf-8"))
    return docs


def pack(documents: Iterable[str], tokenizer: Tokenizer, seq_length: int) -> np.ndarray:
    """Join documents with EOS and cut into [n, seq_length + 1] samples (the tail is dropped)."""
    stream: list[int] = []
    for doc in documents:
        stream.extend(tokenizer.encode(doc))
        stream.append(tokenizer.eos_id)
    width = seq_length + 1
    n = len(stream) // width
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    return np.asarray(stream[: n * width], dtype=dtype).reshape(n, width)


def _write_split(directory: Path, samples: np.ndarray, domain_id: int) -> None:
    from streaming import MDSWriter

    with MDSWriter(out=str(directory), columns=COLUMNS, size_limit=1 << 24, progress_bar=False) as w:
        for index, sample in enumerate(samples):
            w.write({"tokens": sample, "domain": domain_id, "index": index})


def prepare(
    domains: dict[str, list[str]],
    out: Path,
    tokenizer: str = "byte",
    seq_length: int = 128,
    bpe_vocab_size: int = 4096,
    val_fraction: float = 0.02,
) -> dict:
    """Tokenize, pack and write ``domains`` (name -> documents) to ``out``. Returns the manifest."""
    if not domains:
        raise ValueError("no domains to prepare")
    out = Path(out)
    if out.exists():
        if not (out / MANIFEST).is_file():
            raise FileExistsError(
                f"{out} exists and is not a heft-prepared directory; choose an empty output path"
            )
        shutil.rmtree(out)  # only ever replaces an earlier `heft prepare` output
    out.mkdir(parents=True)

    if tokenizer == "byte":
        tok: Tokenizer = ByteTokenizer()
    elif tokenizer == "bpe":
        tok = BPETokenizer.train((d for docs in domains.values() for d in docs), bpe_vocab_size)
    else:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; choose byte or bpe")

    manifest = {"format": FORMAT, "seq_length": seq_length, "tokenizer": tok.save(out), "domains": []}
    for domain_id, (name, docs) in enumerate(domains.items()):
        samples = pack(docs, tok, seq_length)
        n_val = max(1, int(round(len(samples) * val_fraction))) if len(samples) > 1 else 0
        if len(samples) - n_val < 1:
            raise ValueError(
                f"domain {name!r} yields {len(samples)} samples of {seq_length + 1} tokens; "
                f"give it more text or lower --seq-length"
            )
        splits = {"train": samples[: len(samples) - n_val], "val": samples[len(samples) - n_val:]}
        for split, rows in splits.items():
            if len(rows):
                _write_split(out / name / split, rows, domain_id)
        manifest["domains"].append({
            "name": name,
            "id": domain_id,
            "documents": len(docs),
            **{split: {"samples": int(len(rows)), "tokens": int(rows.size)} for split, rows in splits.items()},
        })
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def load_manifest(path: str | Path) -> dict:
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"{manifest_path} not found: {path} is not a prepared dataset; run "
            f"`heft prepare --demo {path}` or `heft prepare --domain NAME=FILES --out {path}`"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != FORMAT:
            raise DataConfigError(f"{manifest_path} has format {manifest.get('format')!r}, expected "
                                  f"{FORMAT}; re-run heft prepare")
        for entry in manifest["domains"]:
            entry["name"], entry["train"]["samples"], entry["val"]["samples"]
        manifest["seq_length"], manifest["tokenizer"]["vocab_size"]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        if isinstance(exc, DataConfigError):
            raise
        raise DataConfigError(f"{manifest_path} is corrupt ({type(exc).__name__}: {exc}); re-run heft "
                              f"prepare for {path}") from None
    return manifest
