"""``heft prepare``: tokenize documents per domain, pack them, write one MDS dataset per domain and split.

Layout of a prepared directory::

    OUT/manifest.json            written last: domains, sample/token counts, sequence length, tokenizer
    OUT/tokenizer.json           the BPE or existing tokenizer (not for the byte tokenizer)
    OUT/<domain>/train/          MDS shards (mosaicml-streaming) of packed sequences
    OUT/<domain>/val/            held-out packed sequences of the same domain

Streaming: documents flow from the inputs (``data/sources.py``) in batches through the tokenizer
(in ``workers`` processes, results taken in order, so the output does not depend on their number)
into per-split packers that write each finished sample to its MDS writer: memory is bounded by the
batches in flight, not the corpus. Packing joins a split's documents, each followed by EOS, and cuts
samples of ``seq_length + 1`` tokens; the ragged tail is dropped. Each document goes wholly to
``val`` or ``train`` by a stable hash of its text, so no held-out document is trained on; a
domain whose hash draws hold out nothing gives its last document to ``val``, unless an identical
copy of it is in ``train`` (then the domain has no held-out document).

Safety: the dataset is built in ``OUT.partial`` and swapped in only when complete (the manifest,
written last and atomically, is what training looks for). An existing OUT is replaced only if it
is an earlier heft dataset holding nothing but heft's files; anything else is refused untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from heft.data.config import DataConfigError
from heft.data.sources import BadRecord, ReadOptions, Record, expand, read_records
from heft.data.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, load_existing, load_tokenizer

MANIFEST = "manifest.json"
FORMAT = "heft-prepared/1"
COLUMNS = {"tokens": "ndarray", "domain": "int", "index": "int"}
PARTIAL = ".partial"
PARTIAL_MARKER = ".heft-prepare-partial"


@dataclass
class PrepareOptions:
    tokenizer: str = "byte"
    """byte, bpe (trained on a sample of the corpus), or a tokenizer.json / HF tokenizer directory."""
    seq_length: int = 128
    bpe_vocab_size: int = 4096
    val_fraction: float = 0.02
    """Share of documents held out (chosen by a hash of each document's text)."""
    workers: int = 0
    """Tokenizer processes; 0: one per core. The output is the same for any number."""
    bpe_sample_bytes: int = 200 << 20
    """Text the BPE is trained on at most (the first documents of each domain, in equal parts)."""
    batch_bytes: int = 4 << 20
    """Text per tokenizer batch; memory holds about 2 x workers such batches (sent and returned)."""
    read: ReadOptions = field(default_factory=ReadOptions)
    progress: bool = True

    def check(self) -> None:
        if self.seq_length < 1:
            raise ValueError(f"--seq-length must be >= 1, got {self.seq_length}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.workers < 0:
            raise ValueError(f"--workers must be >= 0 (0: all cores), got {self.workers}")


# --- output directory safety ------------------------------------------------------------------------

def _is_heft_dataset(path: Path) -> bool:
    try:
        return json.loads((path / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_output(out: Path) -> None:
    """Refuse an OUT heft may not replace: anything but absent, empty, or an earlier heft dataset
    holding only heft's files."""
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; choose a directory path")
    entries = {p.name for p in out.iterdir()}
    if not entries:
        return
    if not _is_heft_dataset(out):
        raise FileExistsError(f"--out {out} holds files that are not a heft dataset (no {MANIFEST} of "
                              f"format {FORMAT}); heft never deletes other files: choose a new --out")
    manifest = json.loads((out / MANIFEST).read_text())
    own = {MANIFEST, manifest["tokenizer"].get("file")} | {d["name"] for d in manifest["domains"]}
    foreign = sorted(entries - own)
    if foreign:
        raise FileExistsError(f"--out {out} is a heft dataset but also holds {', '.join(foreign[:5])}, "
                              f"which heft did not write; move them away or choose a new --out")


def _start_partial(out: Path) -> Path:
    partial = out.with_name(out.name + PARTIAL)
    if partial.exists():
        if not (partial / PARTIAL_MARKER).is_file():
            raise FileExistsError(f"{partial} exists and is not heft's; move it away")
        shutil.rmtree(partial)  # an interrupted prepare of this OUT: start clean
    partial.mkdir(parents=True)
    (partial / PARTIAL_MARKER).write_text("being written by heft prepare; never read\n")
    return partial


def swap_in(partial: Path, out: Path) -> None:
    """Replace ``out`` (absent, empty, or heft's own earlier output) with the complete ``partial``."""
    old = out.with_name(out.name + ".old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(partial, out)
    shutil.rmtree(old, ignore_errors=True)


# --- tokenizing in worker processes ------------------------------------------------------------------

_worker_tokenizer: Tokenizer | None = None


def _init_worker(directory: str, spec: dict, in_pool: bool = False) -> None:
    global _worker_tokenizer
    if in_pool:  # Ctrl-C reaches the whole process group: the main process alone handles it
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker process
    _worker_tokenizer = load_tokenizer(Path(directory), spec)


def _encode(texts: list[str]) -> list[np.ndarray]:
    dtype = _token_dtype(_worker_tokenizer.vocab_size)
    return [np.asarray(ids, dtype=dtype) for ids in _worker_tokenizer.encode_batch(texts)]


def _token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


def _batches(records: Iterator[tuple[str, Record]], batch_bytes: int) -> Iterator[list[tuple[str, Record]]]:
    batch, size = [], 0
    for item in records:
        batch.append(item)
        size += len(item[1].text)
        if size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _tokenized(records, tokenizer_dir: Path, spec: dict, workers: int, batch_bytes: int):
    """(domain, record, token ids) in input order; one batch per worker in flight. Closing
    the generator (an error or Ctrl-C in the consumer) terminates the worker processes."""
    if workers <= 1:
        _init_worker(str(tokenizer_dir), spec)
        for batch in _batches(records, batch_bytes):
            yield from ((d, r, ids) for (d, r), ids in zip(batch, _encode([r.text for _, r in batch])))
        return
    pool = _TokenizerWorkers(workers, str(tokenizer_dir), spec)
    try:
        in_flight: deque = deque()
        for k, batch in enumerate(_batches(records, batch_bytes)):
            if len(in_flight) == workers:  # every worker busy: take the oldest result first
                done_k, done = in_flight.popleft()
                yield from ((d, r, ids) for (d, r), ids in zip(done, pool.result(done_k)))
            pool.submit(k, [r.text for _, r in batch])
            in_flight.append((k, batch))
        while in_flight:
            done_k, done = in_flight.popleft()
            yield from ((d, r, ids) for (d, r), ids in zip(done, pool.result(done_k)))
    finally:
        pool.stop()


class _TokenizerWorkers:
    """``n`` tokenizer processes, each with its own pipe: batch ``k`` goes to worker ``k % n`` and
    results are read back in ``k`` order, so the output order never depends on timing.

    Not ``multiprocessing.Pool`` or ``ProcessPoolExecutor``: a Pool worker killed while holding the
    shared task queue's lock hangs the Pool (``terminate()`` included), and the Pool quietly
    replaces a dead worker while its batch never returns. With a pipe per worker, a death is an
    EOF or a dead process, and stopping is killing. One batch per worker is in flight at most: a
    worker blocked sending a result must not be sent another."""

    def __init__(self, n: int, directory: str, spec: dict):
        import multiprocessing

        ctx = multiprocessing.get_context()
        self.conns, self.procs = [], []
        for _ in range(n):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(child, directory, spec), daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)

    def submit(self, k: int, texts: list[str]) -> None:
        try:
            self.conns[k % len(self.conns)].send(texts)
        except OSError:  # BrokenPipeError, ConnectionResetError: the worker is gone
            raise self._died() from None

    def result(self, k: int) -> list[np.ndarray]:
        conn, proc = self.conns[k % len(self.conns)], self.procs[k % len(self.procs)]
        while not conn.poll(1.0):
            if not proc.is_alive():
                raise self._died()
        try:
            return conn.recv()
        except (EOFError, OSError):  # OSError: "got end of file during message", killed mid-send
            raise self._died() from None

    @staticmethod
    def _died() -> DataConfigError:
        return DataConfigError("a tokenizer worker process died (killed, or out of memory); nothing "
                               "was kept: run heft prepare again, with fewer --workers if memory is short")

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()  # idle at the end; on an error or Ctrl-C nothing they hold is wanted
        for proc, conn in zip(self.procs, self.conns):
            proc.join()
            conn.close()


def _serve(conn, directory: str, spec: dict) -> None:
    """A tokenizer worker: encode each batch of texts that arrives, until the pipe closes."""
    _init_worker(directory, spec, in_pool=True)
    while True:
        try:
            texts = conn.recv()
        except EOFError:
            return
        conn.send(_encode(texts))


# --- packing and writing ------------------------------------------------------------------------------

def document_digest(text: str) -> bytes:
    """8 bytes of blake2b of a document's text: equal texts, equal digests."""
    return hashlib.blake2b(text.encode("utf-8", errors="surrogatepass"), digest_size=8).digest()


def is_held_out(text: str, val_fraction: float) -> bool:
    """A stable per-document draw: the same document is held out in every prepare (and so are all
    its identical copies)."""
    if val_fraction <= 0:
        return False
    return int.from_bytes(document_digest(text), "little") / 2.0 ** 64 < val_fraction


class SplitWriter:
    """Packs one split of one domain and writes each finished sample to its MDS shards."""

    def __init__(self, directory: Path, domain_id: int, width: int, eos_id: int, dtype):
        self.directory, self.domain_id, self.width = directory, domain_id, width
        self.eos = np.asarray([eos_id], dtype=dtype)
        self.pending = np.zeros(0, dtype=dtype)
        self.samples = self.documents = 0
        self.writer = None

    def add(self, ids: np.ndarray) -> None:
        self.documents += 1
        stream = np.concatenate([self.pending, ids, self.eos])
        whole = len(stream) // self.width
        if whole:
            if self.writer is None:
                from heft.data.streaming_lib import MDSWriter

                self.writer = MDSWriter(out=str(self.directory), columns=COLUMNS, size_limit=1 << 24,
                                        progress_bar=False)
            for row in stream[:whole * self.width].reshape(whole, self.width):
                self.writer.write({"tokens": row, "domain": self.domain_id, "index": self.samples})
                self.samples += 1
        self.pending = stream[whole * self.width:]

    def close(self) -> dict:
        if self.writer is not None:
            self.writer.finish()
        return {"samples": self.samples, "tokens": self.samples * self.width, "documents": self.documents}


class Progress:
    """A bar on a terminal; a plain line every 30 s otherwise (logs, CI)."""

    def __init__(self, enabled: bool):
        self.enabled, self.tty = enabled, sys.stderr.isatty()
        self.docs = self.tokens = self.bytes = 0
        self.start = self.last_line = time.monotonic()
        self.bar = None
        if enabled and self.tty:
            from tqdm import tqdm

            self.bar = tqdm(unit="B", unit_scale=True, desc="heft prepare", leave=False)

    def add(self, nbytes: int, ntokens: int) -> None:
        self.docs, self.tokens, self.bytes = self.docs + 1, self.tokens + ntokens, self.bytes + nbytes
        if self.bar is not None:
            self.bar.update(nbytes)
            if self.docs % 1000 == 0:
                self.bar.set_postfix(docs=self.docs, tokens=self.tokens)
        elif self.enabled and time.monotonic() - self.last_line > 30:
            self.last_line = time.monotonic()
            print(f"heft prepare: {self.line()}", file=sys.stderr, flush=True)

    def line(self) -> str:
        seconds = max(time.monotonic() - self.start, 1e-9)
        return (f"{self.docs:,} documents, {self.tokens:,} tokens, {self.bytes / 1e6:,.1f} MB in "
                f"{seconds:.0f} s ({self.bytes / 1e6 / seconds:.1f} MB/s)")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --- the whole preparation ------------------------------------------------------------------------------

def _make_tokenizer(options: PrepareOptions, sample: Iterable[str], directory: Path) -> tuple[Tokenizer, dict]:
    if options.tokenizer == "byte":
        tok: Tokenizer = ByteTokenizer()
    elif options.tokenizer == "bpe":
        tok = BPETokenizer.train(sample, options.bpe_vocab_size)
    else:
        tok = load_existing(options.tokenizer)
    return tok, tok.save(directory)


def _bpe_sample(streams: dict, budget: int) -> Iterator[str]:
    """The first documents of each domain's stream, ``budget`` bytes in equal parts."""
    share = budget // max(len(streams), 1)
    for make in streams.values():
        taken = 0
        for _, record in make():
            if taken >= share:
                break
            taken += len(record.text)
            yield record.text


def build(streams: dict, out: Path, options: PrepareOptions) -> dict:
    """Write a dataset from ``streams``: name -> callable giving (domain, Record) pairs (a name
    whose records carry their own domain yields many domains). Returns the manifest."""
    options.check()
    out = Path(out)
    check_output(out)
    partial = _start_partial(out)
    try:
        manifest = _write(streams, partial, options)
        (partial / PARTIAL_MARKER).unlink()
        tmp = partial / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp, partial / MANIFEST)  # last: a dataset without it is never read
        swap_in(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return manifest


def _check_domain_name(name: str) -> None:
    """A domain is a directory under OUT: a field value must not leave it or hide in it."""
    if not name or name.startswith(".") or any(c in name for c in "/\\\0") or name in (MANIFEST, "tokenizer.json"):
        raise DataConfigError(f"domain name {name!r} cannot be a directory name under --out; domain names "
                              f"must not be empty, start with '.', or contain '/'")


def _write(streams: dict, directory: Path, options: PrepareOptions) -> dict:
    sample = _bpe_sample(streams, options.bpe_sample_bytes) if options.tokenizer == "bpe" else ()
    tok, spec = _make_tokenizer(options, sample, directory)
    width, dtype = options.seq_length + 1, _token_dtype(tok.vocab_size)
    workers = options.workers or os.cpu_count() or 1
    writers: dict[str, dict[str, SplitWriter]] = {}
    held_back: dict[str, tuple[np.ndarray, bytes]] = {}
    # Digests of each domain's train documents while it has no held-out one yet: the fallback below
    # must not hold out a document whose identical copy is trained on. A domain stops keeping them
    # at its first held-out document (after about 1/val_fraction documents), so this stays small.
    train_digests: dict[str, set[bytes] | None] = {}
    progress = Progress(options.progress)

    def records():
        for make in streams.values():
            yield from make()

    tokenized = _tokenized(records(), directory, spec, workers, options.batch_bytes)
    try:
        for domain, record, ids in tokenized:
            if domain not in writers:
                _check_domain_name(domain)
                domain_id = len(writers)
                writers[domain] = {s: SplitWriter(directory / domain / s, domain_id, width, tok.eos_id, dtype)
                                   for s in ("train", "val")}
            if is_held_out(record.text, options.val_fraction):
                writers[domain]["val"].add(ids)
                train_digests[domain] = None
            elif options.val_fraction > 0:
                # Each train document waits for the next one: a domain whose hash draws held out
                # nothing gives its last document to val instead (below), so small domains still
                # get evaluated. One document per domain in memory.
                previous, held_back[domain] = held_back.get(domain), (ids, document_digest(record.text))
                if previous is not None:
                    writers[domain]["train"].add(previous[0])
                    seen = train_digests.setdefault(domain, set())
                    if seen is not None:
                        seen.add(previous[1])
            else:
                writers[domain]["train"].add(ids)
            progress.add(record.nbytes or len(record.text), len(ids) + 1)
    finally:
        tokenized.close()
        progress.close()
    for domain, (ids, digest) in held_back.items():
        splits = writers[domain]
        copy_in_train = digest in (train_digests.get(domain) or ())
        last_goes_to_val = splits["val"].documents == 0 and splits["train"].documents >= 1 and not copy_in_train
        splits["val" if last_goes_to_val else "train"].add(ids)
    if not writers:
        raise DataConfigError("the inputs hold no documents")
    domains = []
    for name, splits in writers.items():
        counts = {s: w.close() for s, w in splits.items()}
        if counts["train"]["samples"] < 1:
            raise DataConfigError(f"domain {name!r} yields no training sample of {width} tokens; give it "
                                  f"more text or lower --seq-length")
        domains.append({"name": name, "id": splits["train"].domain_id,
                        "documents": counts["train"]["documents"] + counts["val"]["documents"],
                        **{s: {"samples": c["samples"], "tokens": c["tokens"], "documents": c["documents"]}
                           for s, c in counts.items()}})
    manifest = {"format": FORMAT, "seq_length": options.seq_length, "tokenizer": spec, "domains": domains,
                "val_fraction": options.val_fraction, "split": "by document (blake2b of the text)",
                "skipped_records": dict(options.read.skipped), "input_bytes": progress.bytes}
    if options.read.unsupported_files:
        manifest["unsupported_files"] = list(options.read.unsupported_files)
    return manifest


def prepare(domains: dict[str, list[str]], out: Path, tokenizer: str = "byte", seq_length: int = 128,
            bpe_vocab_size: int = 4096, val_fraction: float = 0.02, workers: int = 1) -> dict:
    """Prepare in-memory documents (name -> documents): the demo corpus and tests."""
    if not domains:
        raise ValueError("no domains to prepare")

    def stream(name, docs):
        return lambda: ((name, Record(d, None, len(d))) for d in docs)

    options = PrepareOptions(tokenizer=tokenizer, seq_length=seq_length, bpe_vocab_size=bpe_vocab_size,
                             val_fraction=val_fraction, workers=workers, progress=False)
    return build({name: stream(name, docs) for name, docs in domains.items()}, out, options)


def prepare_files(domains: dict[str, list[str]], out: Path, options: PrepareOptions) -> dict:
    """Prepare input files: domain name -> files/directories/globs. With ``options.read.domain_field``
    the names only group inputs; each record's field names its domain."""
    expanded = {name: expand(paths, options.read.unsupported_files) for name, paths in domains.items()}

    def stream(name, files):
        def records():
            for file in files:
                for record in read_records(file, options.read):
                    yield (record.domain if options.read.domain_field else name), record
        return records

    return build({name: stream(name, files) for name, files in expanded.items()}, out, options)


def load_manifest(path: str | Path) -> dict:
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.is_file():
        partial = Path(path).with_name(Path(path).name + PARTIAL)
        hint = f" ({partial} is an interrupted heft prepare: run it again)" if partial.exists() else ""
        raise FileNotFoundError(
            f"{manifest_path} not found: {path} is not a prepared dataset{hint}; run "
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


__all__ = ["BadRecord", "PrepareOptions", "build", "check_output", "load_manifest", "prepare",
           "prepare_files", "swap_in"]
