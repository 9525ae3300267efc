"""heft prepare at scale: data safety, input formats, tokenizers, document-level val split,
determinism over worker counts, bad input. Peak memory on a 1 GB corpus: benchmarks/prepare_throughput.py."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import read_mds_split, run_heft
from heft.data.prepare import PrepareOptions, is_held_out, load_manifest, prepare, prepare_files
from heft.data.sources import BadRecord, ReadOptions
from heft.data.tokenizer import load_tokenizer

DOCS = [f"Document {i}: " + "lorem ipsum dolor sit amet, ünïcödé " * (3 + i % 7) for i in range(60)]


def _documents(out: Path, domain: str, split: str) -> list[str]:
    """The complete documents of a split, decoded from its packed samples."""
    manifest = load_manifest(out)
    tok = load_tokenizer(out, manifest["tokenizer"])
    rows = read_mds_split(out / domain / split)
    stream = np.concatenate(rows).tolist() if rows else []
    docs, current, started = [], [], False
    for token in stream:
        if token == tok.eos_id:
            if started:  # the first piece may be the tail of a document cut by the previous sample
                docs.append(tok.decode(current))
            started, current = True, []
        else:
            current.append(token)
    return docs


def _write_inputs(root: Path) -> dict[str, Path]:
    """The same 60 documents in every input format heft reads."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    root.mkdir()
    lines = "".join(json.dumps({"text": d, "meta": {"set": "a" if i % 3 else "b"}}) + "\n"
                    for i, d in enumerate(DOCS)).encode()
    (root / "docs.jsonl").write_bytes(lines)
    (root / "docs.jsonl.gz").write_bytes(gzip.compress(lines))
    (root / "docs.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    pq.write_table(pa.table({"text": DOCS}), root / "docs.parquet")
    txt = root / "txt"
    txt.mkdir()
    for i, d in enumerate(DOCS):
        (txt / f"{i:03d}.txt").write_text(d)
    return {"jsonl": root / "docs.jsonl", "jsonl.gz": root / "docs.jsonl.gz",
            "jsonl.zst": root / "docs.jsonl.zst", "parquet": root / "docs.parquet", "txt": txt}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    return _write_inputs(tmp_path_factory.mktemp("inputs") / "in")


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "jsonl.zst", "parquet", "txt"])
def test_every_input_format_round_trips(inputs, tmp_path, fmt):
    out = tmp_path / "out"
    manifest = prepare_files({"web": [str(inputs[fmt])]}, out, PrepareOptions(seq_length=32, val_fraction=0.2,
                                                                              workers=1, progress=False))
    assert manifest["domains"][0]["documents"] == len(DOCS)
    train, val = _documents(out, "web", "train"), _documents(out, "web", "val")
    assert train and val and set(train) | set(val) <= set(DOCS)
    assert not set(train) & set(val)  # held out by document: no document in both splits
    assert train == [d for d in DOCS if d in train]  # in input order


@pytest.mark.parametrize("kind", ["bpe", "existing"])
def test_tokenizers_round_trip_and_are_recorded(inputs, tmp_path, kind):
    tokenizer = "bpe"
    if kind == "existing":  # a tokenizer.json from elsewhere (here: a BPE trained on other text)
        from heft.data.tokenizer import BPETokenizer

        other = tmp_path / "other"
        other.mkdir()
        BPETokenizer.train(["some other corpus, quite different " * 40], 320)._tok.save(str(other / "tokenizer.json"))
        tokenizer = str(other)
    out = tmp_path / "out"
    manifest = prepare_files({"web": [str(inputs["jsonl"])]}, out,
                             PrepareOptions(tokenizer=tokenizer, bpe_vocab_size=400, seq_length=32,
                                            val_fraction=0.2, workers=1, progress=False))
    spec = manifest["tokenizer"]
    assert spec["kind"] == ("bpe" if kind == "bpe" else "hf") and len(spec["sha256"]) == 64
    assert spec["eos_after_document"] and spec["bos_id"] is None
    assert set(_documents(out, "web", "train")) <= set(DOCS) and _documents(out, "web", "train")


def test_domains_from_a_record_field(inputs, tmp_path):
    out = tmp_path / "out"
    options = PrepareOptions(seq_length=16, val_fraction=0.0, workers=1, progress=False,
                             read=ReadOptions(domain_field="meta.set"))
    manifest = prepare_files({"inputs": [str(inputs["jsonl.gz"])]}, out, options)
    assert [d["name"] for d in manifest["domains"]] == ["b", "a"]  # in order of first appearance
    assert [d["documents"] for d in manifest["domains"]] == [20, 40]
    assert set(_documents(out, "b", "train")) <= {d for i, d in enumerate(DOCS) if i % 3 == 0}


def test_output_is_the_same_for_any_number_of_workers(inputs, tmp_path):
    def files(out: Path) -> dict[str, bytes]:
        return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    outputs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        prepare_files({"web": [str(inputs["jsonl"])], "txt": [str(inputs["txt"])]}, out,
                      PrepareOptions(tokenizer="bpe", bpe_vocab_size=300, seq_length=16, workers=workers,
                                     batch_bytes=2000, progress=False))  # many small batches in flight
        outputs.append(files(out))
    assert outputs[0] == outputs[1]


def test_foreign_directories_are_never_deleted(tmp_path):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "README.md").write_text("mine")
    (project / "manifest.json").write_text('{"name": "not heft"}')  # a foreign manifest.json
    with pytest.raises(FileExistsError, match="not a heft dataset"):
        prepare({"d": DOCS}, project, seq_length=16)
    assert sorted(p.name for p in project.iterdir()) == ["README.md", "manifest.json", "src"]

    data = tmp_path / "data"
    prepare({"d": DOCS}, data, seq_length=16)
    (data / "notes.txt").write_text("my notes")  # a user's file inside an earlier dataset
    with pytest.raises(FileExistsError, match="notes.txt"):
        prepare({"d": DOCS}, data, seq_length=16)
    assert (data / "notes.txt").read_text() == "my notes"


def test_a_failing_reprepare_keeps_the_previous_dataset(tmp_path):
    src = tmp_path / "src.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    out = tmp_path / "data"
    prepare_files({"web": [str(src)]}, out, PrepareOptions(seq_length=16, workers=1, progress=False))
    before = load_manifest(out)
    src.write_text(src.read_text() + '{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(BadRecord, match=r"src.jsonl:62: not valid JSON"):
        prepare_files({"web": [str(src)]}, out, PrepareOptions(seq_length=16, workers=1, progress=False))
    assert load_manifest(out) == before and read_mds_split(out / "web" / "train")
    assert not (tmp_path / "data.partial").exists()


@pytest.mark.parametrize("line, reason", [
    (b'{"text": broken', "not valid JSON"),
    (b'{"body": "no text field"}', "no 'text' field"),
    (b'{"text": 42}', "'text' is a int, not a string"),
    (b'\xff\xfe\x00binary junk\n', "not UTF-8"),
    (b'["a", "list"]', "a record must be a JSON object"),
])
def test_bad_records_name_file_and_line_or_are_counted(tmp_path, line, reason):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"text": "' + b"good " * 40 + b'"}\n' + line + b"\n" + b'{"text": "' + b"more " * 40 + b'"}\n')
    options = PrepareOptions(seq_length=16, val_fraction=0.0, workers=1, progress=False)
    with pytest.raises(BadRecord, match=f"in.jsonl:2: {reason}"):
        prepare_files({"web": [str(src)]}, tmp_path / "out", options)
    options.read.skip_bad = True
    manifest = prepare_files({"web": [str(src)]}, tmp_path / "out", options)
    assert manifest["domains"][0]["documents"] == 2 and sum(manifest["skipped_records"].values()) == 1


def test_cli_prepare_refuses_a_domain_given_twice_and_names_files_it_did_not_read(tmp_path):
    """Duplicate --domain names were merged and other file types skipped, both silently (issue 22, item 13)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("plain text that heft reads " * 40)
    (src / "notes.pdf").write_bytes(b"%PDF-1.4 not read")
    twice = run_heft(["prepare", "--domain", f"web={src}", "--domain", f"web={src / 'a.txt'}",
                      "--out", str(tmp_path / "twice"), "--seq-length", "16"], check=False)
    assert twice.returncode == 2 and twice.stderr.count("\n") == 1 and "--domain web is given twice" in twice.stderr
    assert not (tmp_path / "twice").exists()
    done = run_heft(["prepare", "--domain", f"web={src}", "--out", str(tmp_path / "out"), "--seq-length", "16"])
    assert f"did not read 1 file(s) of other types in the input directories: {src / 'notes.pdf'}" in done.stdout
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["unsupported_files"] == [str(src / "notes.pdf")]


def test_no_held_out_document_has_a_copy_in_train(tmp_path):
    """When the hash draws held out nothing, the last document went to val even with identical
    copies in train: 50 copies, 49 train and 1 val (issue 22, item 8)."""
    text = "the same boilerplate page, copied many times over. " * 4
    src = tmp_path / "copies.jsonl"
    src.write_text("".join(json.dumps({"text": text}) + "\n" for _ in range(50)))
    assert not is_held_out(text, 0.02)
    run_heft(["prepare", "--domain", f"web={src}", "--out", str(tmp_path / "copies"), "--seq-length", "16"])
    web = json.loads((tmp_path / "copies" / "manifest.json").read_text())["domains"][0]
    assert (web["train"]["documents"], web["val"]["documents"]) == (50, 0)
    distinct = "one page that appears only once, at the end. " * 4
    assert not is_held_out(distinct, 0.02)
    src.write_text(src.read_text() + json.dumps({"text": distinct}) + "\n")
    run_heft(["prepare", "--domain", f"web={src}", "--out", str(tmp_path / "last"), "--seq-length", "16"])
    web = json.loads((tmp_path / "last" / "manifest.json").read_text())["domains"][0]
    assert (web["train"]["documents"], web["val"]["documents"]) == (50, 1)


def test_cli_prepare_reports_bad_input_in_one_line(tmp_path):
    src = tmp_path / "in.jsonl.gz"
    src.write_bytes(gzip.compress(b'{"text": "ok"}\n')[:-6])  # truncated
    proc = run_heft(["prepare", "--domain", f"web={src}", "--out", str(tmp_path / "out")], check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "damaged or truncated" in proc.stderr and not (tmp_path / "out").exists()
    proc = run_heft(["prepare", "--domain", f"web={tmp_path}/*.none", "--out", str(tmp_path / "out")], check=False)
    assert proc.returncode == 2 and "matches no file" in proc.stderr


def test_resume_refuses_data_tokenized_another_way(tmp_path):
    from heft.launcher.checkpoint.contents import check_same_tokenizer as _check_same_tokenizer
    from heft.launcher.checkpoint.files import CheckpointError

    data = tmp_path / "data"
    manifest = prepare({"d": DOCS}, data, tokenizer="bpe", bpe_vocab_size=300, seq_length=16)
    _check_same_tokenizer({"tokenizer": manifest["tokenizer"]}, str(data), tmp_path / "step_1")  # same: fine
    other = dict(manifest["tokenizer"], sha256="0" * 64)
    with pytest.raises(CheckpointError, match="another tokenizer"):
        _check_same_tokenizer({"tokenizer": other}, str(data), tmp_path / "step_1")


def test_a_domain_field_cannot_write_outside_out(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": "x " * 200, "set": "../escape"}) + "\n")
    options = PrepareOptions(seq_length=16, workers=1, progress=False, read=ReadOptions(domain_field="set"))
    with pytest.raises(ValueError, match="cannot be a directory name"):
        prepare_files({"inputs": [str(src)]}, tmp_path / "out", options)
    assert not (tmp_path / "escape").exists() and not (tmp_path / "out").exists()


def test_evaluation_without_held_out_data_fails_before_launch(tmp_path, tiny_train_config):
    data = tmp_path / "data"
    prepare({"code": DOCS, "docs": DOCS[::-1], "legal": DOCS}, data, seq_length=64, val_fraction=0.0)
    proc = run_heft(["train", str(tiny_train_config), f"data.path={data}", "model.seq_length=64",
                     f"train.run_dir={tmp_path / 'run'}", "train.eval_at_end=true"], check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "no validation samples" in proc.stderr and "--val-fraction" in proc.stderr


def _start_big_prepare(tmp_path):
    """A two-worker `heft prepare` of 60 MB (a few seconds of work), once it has started writing."""
    import subprocess
    import sys
    import time

    from conftest import REPO, ctrl_c_as_at_a_terminal, heft_env

    src = tmp_path / "big.jsonl"
    line = (json.dumps({"text": "some words to pack " * 400}) + "\n").encode()
    src.write_bytes(line * (60_000_000 // len(line)))
    proc = subprocess.Popen([sys.executable, "-m", "heft.launcher.cli", "prepare", "--domain", f"web={src}",
                             "--out", str(tmp_path / "out"), "--workers", "2"], cwd=REPO, env=heft_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=ctrl_c_as_at_a_terminal)
    deadline = time.monotonic() + 120
    while not (tmp_path / "out.partial").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    return proc


def test_ctrl_c_stops_prepare_and_leaves_nothing_half_written(tmp_path):
    import signal

    proc = _start_big_prepare(tmp_path)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "interrupted" in stderr, stderr
    assert not (tmp_path / "out.partial").exists() and not (tmp_path / "out").exists()


def test_a_killed_tokenizer_worker_is_one_line_not_a_hang(tmp_path):
    import psutil

    proc = _start_big_prepare(tmp_path)
    psutil.Process(proc.pid).children()[-1].kill()
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2 and stderr.count("\n") == 1 and "worker process died" in stderr, stderr
    assert not (tmp_path / "out.partial").exists() and not (tmp_path / "out").exists()
