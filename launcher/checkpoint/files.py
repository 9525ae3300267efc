"""Checkpoints on disk: names, atomic completion, the ``latest`` pointer, pruning, verification.

Protocol (``CKPT_DIR`` is ``checkpoint.dir``, by default ``RUN_DIR/checkpoints``)::

    CKPT_DIR/step_<N>.partial/   being written by every rank; never read
    CKPT_DIR/step_<N>/           complete: renamed from .partial by rank 0 after every rank finished
    CKPT_DIR/step_<N>.deleting/  being pruned (renamed first, so it never looks complete)
    CKPT_DIR/latest              the name of the newest complete checkpoint, replaced atomically
                                 after the rename (for people and tools: heft itself resumes from
                                 the newest complete checkpoint that verifies)

Older complete checkpoints are pruned only after a newer one is complete, so a crash or a kill at
any moment leaves ``latest`` naming a complete checkpoint (or no ``latest`` at all).

Verification before loading (:func:`verify`): heft's own state file parses; megatron-core's
metadata unpickles under an allow-list of the classes torch.distributed.checkpoint writes (nothing
else is ever unpickled); and every data file the metadata references exists and is long enough.
A checkpoint that fails is skipped, with a warning naming the file, in favour of the one before.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import zipfile
import zlib
from pathlib import Path

from heft.launcher.atomic import write_atomically
from heft.launcher.launch.reporting import UserError

PARTIAL = ".partial"
DELETING = ".deleting"
LATEST = "latest"
HEFT_DIR = "heft"
STATE_FILE = "state.json"
_NAME = re.compile(r"^step_(\d+)$")
_LEFTOVER_NAME = re.compile(r"^step_\d+\.(partial|deleting)$")


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used. The message names the file and the fix."""


def name(step: int) -> str:
    return f"step_{step}"


def step_of(path: Path) -> int | None:
    match = _NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and step_of(p) is not None
             and (p / HEFT_DIR / STATE_FILE).is_file()]
    return sorted(found, key=step_of)


def partial_dir(ckpt_dir: Path, step: int) -> Path:
    return ckpt_dir / (name(step) + PARTIAL)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _delete(path: Path) -> None:
    """Rename out of the way first (no longer 'complete' from that instant), then delete, so an
    interrupted deletion never leaves a half-deleted directory that still looks complete."""
    doomed = path.with_name(path.name + DELETING)
    if doomed.exists():
        shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def commit(ckpt_dir: Path, step: int, keep: int) -> Path:
    """Rank 0, after every rank finished writing: mark step_<N> complete, point latest at it,
    then prune the oldest complete checkpoints below it beyond ``keep`` (never step_<N> itself)."""
    final = ckpt_dir / name(step)
    if final.exists():  # the same step saved again (e.g. a signal at the last step): replace it
        _delete(final)
    os.replace(partial_dir(ckpt_dir, step), final)
    _fsync_dir(ckpt_dir)
    write_atomically(ckpt_dir / LATEST, final.name + "\n")
    older = [p for p in complete_checkpoints(ckpt_dir) if step_of(p) < step]
    for old in older[:max(len(older) - (keep - 1), 0)]:
        _delete(old)
    return final


def remove_stale_partials(ckpt_dir: Path) -> None:
    """Left by a run killed while saving or pruning; never complete, never read."""
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            if p.is_dir() and _LEFTOVER_NAME.match(p.name):
                shutil.rmtree(p, ignore_errors=True)


# --- verification ------------------------------------------------------------------------------

# torch.distributed.checkpoint's metadata is a pickle. These are the only globals it may name.
_ALLOWED_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
     ("torch.distributed.checkpoint.planner", "LoadItemType"),
     ("torch.distributed.checkpoint.planner", "WriteItemType"),
     ("torch.distributed.checkpoint.planner", "WriteItem"),
     ("torch.distributed.checkpoint.planner", "SavePlan"),
     ("torch.distributed.checkpoint.planner", "TensorWriteData"),
     ("torch", "Size"), ("torch._utils", "_rebuild_tensor_v2"), ("collections", "OrderedDict"),
     ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
     ("torch.serialization", "_get_layout"), ("torch", "strided"), ("torch", "layout")}
_DTYPE_NAMES = {"float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8",
                "uint8", "bool", "float8_e4m3fn", "float8_e5m2", "complex64"}


class _AllowListUnpickler(pickle.Unpickler):
    def find_class(self, module, attribute):
        if (module, attribute) in _ALLOWED_GLOBALS or (module == "torch" and attribute in _DTYPE_NAMES):
            return super().find_class(module, attribute)
        raise pickle.UnpicklingError(f"{module}.{attribute} is not allowed in checkpoint metadata")


def _read_metadata(path: Path):
    metadata_file = path / ".metadata"
    if not metadata_file.is_file():
        raise CheckpointError(f"{metadata_file} is missing")
    try:
        return _AllowListUnpickler(io.BytesIO(metadata_file.read_bytes())).load()
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{metadata_file} was refused: {exc}") from None
    except Exception as exc:
        raise CheckpointError(f"{metadata_file} is corrupt ({type(exc).__name__}: {exc})") from None


def read_state(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        pruned = (f" (pruned? checkpoint.keep keeps the newest few; {path.parent} holds "
                  f"{', '.join(p.name for p in complete_checkpoints(path.parent)) or 'none'})"
                  if path.parent.is_dir() and step_of(path) is not None else "")
        raise CheckpointError(f"{path} does not exist{pruned}")
    state_file = path / HEFT_DIR / STATE_FILE
    try:
        return json.loads(state_file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{state_file} is missing: {path} is not a complete heft checkpoint") from None
    except ValueError as exc:
        raise CheckpointError(f"{state_file} is corrupt ({exc})") from None


CHECKSUMS_FILE = "checksums.json"
_CHUNK = 16 << 20


def file_checksum(path: Path) -> int:
    """crc32 of a file's bytes (zlib: about 2.7 GB/s here, so a save's own files, still in the page
    cache, cost little; docs/benchmarks.md has the measured save overhead)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def files_to_checksum(path: Path) -> list[str]:
    """Every file of a checkpoint, relative and sorted, except the checksum list itself."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")
                  if p.is_file() and p.relative_to(path) != Path(HEFT_DIR) / CHECKSUMS_FILE)


def write_checksums(path: Path, sums: dict[str, tuple[int, int]]) -> None:
    """``sums``: relative file name -> (size, crc32)."""
    write_atomically(path / HEFT_DIR / CHECKSUMS_FILE,
                     json.dumps({"algorithm": "crc32", "files": dict(sorted(sums.items()))}, indent=0) + "\n")


def _check_checksums(path: Path) -> None:
    """Every file listed in heft/checksums.json has its recorded size and crc32 (checkpoints saved
    before heft recorded checksums have none, and pass)."""
    listed = path / HEFT_DIR / CHECKSUMS_FILE
    if not listed.is_file():
        return
    try:
        recorded = json.loads(listed.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{listed} is corrupt ({exc})") from None
    for relative, (size, crc) in recorded.items():
        file = path / relative
        if not file.is_file():
            raise CheckpointError(f"{file} is missing")
        if file.stat().st_size != size:
            raise CheckpointError(f"{file} has {file.stat().st_size} bytes, {size} when it was saved")
        if file_checksum(file) != crc:
            raise CheckpointError(f"{file} does not match the checksum recorded when it was saved: its "
                                  f"contents are damaged")


def _check_structure(path: Path) -> None:
    """megatron-core's metadata.json parses and common.pt's archive is readable."""
    metadata = path / "metadata.json"
    if metadata.is_file():
        try:
            json.loads(metadata.read_text())
        except ValueError as exc:
            raise CheckpointError(f"{metadata} is corrupt ({exc})") from None
    common = path / "common.pt"
    try:
        with zipfile.ZipFile(common) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{common} is damaged ({exc})") from None
    if bad is not None:
        raise CheckpointError(f"{common} is damaged (member {bad} fails its CRC)")


def verify(path: Path, contents: bool = True) -> dict:
    """Check a checkpoint without loading tensors; returns heft's state. Raises CheckpointError.
    ``contents``: also compare every file with the checksums recorded at save (a full read; the
    launching process leaves it to the workers)."""
    state = read_state(path)
    metadata = _read_metadata(path)
    needed: dict[str, int] = {}
    for info in getattr(metadata, "storage_data", {}).values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for relative, size in needed.items():
        file = path / relative
        if not file.is_file():
            raise CheckpointError(f"{file} is missing")
        if file.stat().st_size < size:
            raise CheckpointError(f"{file} is truncated ({file.stat().st_size} of {size} bytes)")
    common = path / "common.pt"
    if not common.is_file():
        raise CheckpointError(f"{common} is missing")
    _check_structure(path)
    if contents:
        _check_checksums(path)
    return state


def newest_usable(ckpt_dir: Path, warn, contents: bool = True,
                  trusted: str | None = None) -> tuple[Path, dict] | None:
    """The newest complete checkpoint that verifies, warning about each newer one that does not.
    ``trusted``: a checkpoint whose contents were verified already (by the launching process)."""
    for path in reversed(complete_checkpoints(ckpt_dir)):
        try:
            return path, verify(path, contents and str(path) != trusted)
        except CheckpointError as exc:
            warn(f"heft: warning: skipping checkpoint {path}: {exc}; trying the one before")
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or the newest complete one in a run directory (``RUN_DIR`` or its
    ``checkpoints/``). Raises CheckpointError naming what was looked at."""
    path = Path(path)
    if (path / HEFT_DIR / STATE_FILE).is_file():
        return path
    for ckpt_dir in (path / "checkpoints", path):
        found = newest_usable(ckpt_dir, warn=lambda line: print(line, flush=True))
        if found:
            return found[0]
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    raise CheckpointError(f"{path} is neither a heft checkpoint (no {HEFT_DIR}/{STATE_FILE}) nor a "
                          f"run directory with a complete checkpoint")
