"""Where ``heft prepare`` reads documents: files, directories and globs of .txt, .jsonl, .jsonl.gz,
.jsonl.zst and .parquet, one record at a time (bounded memory; a .txt file is one document).

A bad record (malformed JSON, no text field, text that is not a string, bytes that are not UTF-8)
raises :class:`BadRecord` naming the file and line, or, with ``skip_bad``, is counted and skipped.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")


class BadRecord(ValueError):
    """An input record heft cannot use; the message names the file and the line."""


@dataclass
class Record:
    text: str
    domain: str | None
    """The value of the domain field (``--domain-field``), else None."""
    nbytes: int
    """Bytes of input this record was read from (for progress)."""


@dataclass
class ReadOptions:
    text_field: str = "text"
    """Field holding the document (dotted for nested records, e.g. ``content.body``)."""
    domain_field: str | None = None
    """Field naming each record's domain (e.g. ``meta.redpajama_set_name``); None: by input."""
    skip_bad: bool = False
    """Count and skip bad records instead of stopping at the first."""
    skipped: Counter = field(default_factory=Counter)
    """Skipped records by reason (filled while reading)."""
    unsupported_files: list[str] = field(default_factory=list)
    """Files of other types found inside input directories, which were not read (filled by expand)."""


def _supported(path: Path) -> bool:
    return any(path.name.endswith(s) for s in SUFFIXES)


def expand(inputs: list[str], unsupported: list[str] | None = None) -> list[Path]:
    """Files from files, directories (recursively, sorted) and globs, in the order given. Files of
    other types inside a directory are left out and appended to ``unsupported``."""
    files: list[Path] = []
    for item in inputs:
        if any(c in item for c in "*?["):
            matched = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not matched:
                raise FileNotFoundError(f"input {item} matches no file")
            files += matched
            continue
        path = Path(item)
        if path.is_dir():
            everything = sorted(p for p in path.rglob("*") if p.is_file())
            found = [p for p in everything if _supported(p)]
            if unsupported is not None:
                unsupported.extend(str(p) for p in everything if not _supported(p))
            if not found:
                raise FileNotFoundError(f"input directory {path} holds no {', '.join(SUFFIXES)} file")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"input {path} does not exist")
    for file in files:
        if not _supported(file):
            raise BadRecord(f"{file}: unsupported input format; heft reads {', '.join(SUFFIXES)}")
    return files


def read_records(path: Path, options: ReadOptions) -> Iterator[Record]:
    if path.name.endswith(".txt"):
        yield from _read_txt(path, options)
    elif path.name.endswith(".parquet"):
        yield from _read_parquet(path, options)
    else:
        yield from _read_jsonl(path, options)


def _bad(options: ReadOptions, where: str, reason: str) -> None:
    if not options.skip_bad:
        raise BadRecord(f"{where}: {reason}; fix or remove it, or pass --skip-bad-records")
    options.skipped[reason.split(" (")[0]] += 1


def _read_txt(path: Path, options: ReadOptions) -> Iterator[Record]:
    raw = _read_bytes(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        _bad(options, str(path), f"not UTF-8 text (byte {exc.start})")
        return
    yield Record(text, None, len(raw))


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BadRecord(f"{path}: cannot be read ({exc.strerror or exc})") from None


def _open_lines(path: Path):
    try:
        if path.name.endswith(".gz"):
            return gzip.open(path, "rb")
        if path.name.endswith(".zst"):
            import zstandard

            return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")))
        return open(path, "rb")
    except OSError as exc:
        raise BadRecord(f"{path}: cannot be read ({exc.strerror or exc})") from None


def _field(record, dotted: str):
    value = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


_MISSING = object()


def _document(record, where: str, options: ReadOptions) -> Record | None:
    if not isinstance(record, dict):
        _bad(options, where, f"a record must be a JSON object, not {type(record).__name__}")
        return None
    text = _field(record, options.text_field)
    if text is _MISSING:
        _bad(options, where, f"no '{options.text_field}' field (choose another with --text-field)")
        return None
    if not isinstance(text, str):
        _bad(options, where, f"'{options.text_field}' is a {type(text).__name__}, not a string")
        return None
    domain = None
    if options.domain_field:
        domain = _field(record, options.domain_field)
        if not isinstance(domain, str) or not domain:
            _bad(options, where, f"no string '{options.domain_field}' field to take the domain from")
            return None
    return Record(text, domain, 0)


def _read_jsonl(path: Path, options: ReadOptions) -> Iterator[Record]:
    with _open_lines(path) as lines:
        number = 0
        while True:
            try:
                line = lines.readline()
            except (OSError, EOFError) as exc:  # a truncated or corrupt .gz / .zst
                raise BadRecord(f"{path}:{number + 1}: cannot be decompressed ({exc}); the file is "
                                f"damaged or truncated") from None
            except Exception as exc:  # zstandard.ZstdError is no OSError
                raise BadRecord(f"{path}:{number + 1}: cannot be decompressed ({exc}); the file is "
                                f"damaged or truncated") from None
            if not line:
                return
            number += 1
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as exc:
                _bad(options, where, f"not UTF-8 (byte {exc.start})")
                continue
            except ValueError as exc:
                _bad(options, where, f"not valid JSON ({exc})")
                continue
            document = _document(record, where, options)
            if document is not None:
                document.nbytes = len(line)
                yield document


def _read_parquet(path: Path, options: ReadOptions) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as exc:
        raise BadRecord(f"{path}: not a readable parquet file ({exc})") from None
    wanted = {options.text_field.split(".")[0]} | ({options.domain_field.split(".")[0]} if options.domain_field else set())
    missing = wanted - set(table.schema_arrow.names)
    if missing:
        raise BadRecord(f"{path}: no column {', '.join(sorted(missing))} (columns: "
                        f"{', '.join(table.schema_arrow.names)}); choose one with --text-field")
    row = 0
    for batch in table.iter_batches(batch_size=1024, columns=sorted(wanted)):
        for record in batch.to_pylist():
            row += 1
            document = _document(record, f"{path}: row {row}", options)
            if document is not None:
                document.nbytes = len(document.text)  # decoded size: parquet pages are compressed
                yield document
