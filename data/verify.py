"""Check a prepared dataset before any process starts, so a broken one fails in one line.

What is checked, per domain and split: the MDS ``index.json`` exists and parses, every shard it lists
exists with the byte size the index records (compressed shards: the ``.zstd`` file, or the
decompressed file streaming leaves beside it), and the sample counts agree with the manifest.
Reading every byte is not needed: a truncated, missing or swapped shard shows in its size.
"""

from __future__ import annotations

import json
from pathlib import Path

from heft.data.loader import DataConfigError
from heft.data.prepare import load_manifest


def _shard_problem(split_dir: Path, shard: dict) -> str | None:
    raw, zipped = shard.get("raw_data") or {}, shard.get("zip_data") or {}
    candidates = [(raw.get("basename"), raw.get("bytes"))]
    if zipped:
        candidates.insert(0, (zipped.get("basename"), zipped.get("bytes")))
    problems = []
    for basename, size in candidates:
        if not basename:
            continue
        path = split_dir / basename
        if not path.is_file():
            problems.append(f"{path} is missing")
            continue
        actual = path.stat().st_size
        if size is not None and actual != size:
            return f"{path} has {actual} bytes, its index records {size} (truncated or replaced)"
        return None  # one good copy (compressed or raw) is enough
    return problems[0] if problems else f"a shard entry in {split_dir / 'index.json'} names no file"


def verify_split(data_dir: Path, domain: str, split: str, expected_samples: int) -> None:
    split_dir = data_dir / domain / split
    index_path = split_dir / "index.json"
    fix = f"re-run heft prepare for {data_dir}"
    if not index_path.is_file():
        raise DataConfigError(f"domain {domain!r}: {index_path} is missing; {fix}")
    try:
        index = json.loads(index_path.read_text())
        shards = index["shards"]
    except (ValueError, KeyError, TypeError) as exc:
        raise DataConfigError(f"domain {domain!r}: {index_path} is not a valid MDS index ({exc}); {fix}") from None
    for shard in shards:
        problem = _shard_problem(split_dir, shard)
        if problem:
            raise DataConfigError(f"domain {domain!r}: {problem}; {fix}")
    samples = sum(int(s.get("samples", 0)) for s in shards)
    if samples != expected_samples:
        raise DataConfigError(
            f"domain {domain!r}: {index_path} lists {samples} samples but the manifest records "
            f"{expected_samples}; {fix}"
        )


def verify_dataset(path: str | Path, domains: list[str] | None = None) -> dict:
    """Verify the prepared dataset at ``path`` (only ``domains`` if given). Returns its manifest."""
    data_dir = Path(path)
    manifest = load_manifest(data_dir)
    for entry in manifest["domains"]:
        if domains is not None and entry["name"] not in domains:
            continue
        for split in ("train", "val"):
            if entry[split]["samples"] > 0:
                verify_split(data_dir, entry["name"], split, entry[split]["samples"])
    return manifest


def check_enough_samples(manifest: dict, weights: dict[str, float], global_batch_size: int, path) -> None:
    """One step needs ``global_batch_size`` samples from the domains in the mixture."""
    counts = {d["name"]: d["train"]["samples"] for d in manifest["domains"] if d["name"] in weights}
    total = sum(counts.values())
    if total < global_batch_size:
        detail = ", ".join(f"{name} {n}" for name, n in counts.items())
        raise DataConfigError(
            f"{path} has {total} training samples in the mixture ({detail}) but one step needs "
            f"train.global_batch_size={global_batch_size}; prepare more text or lower "
            f"train.global_batch_size"
        )
