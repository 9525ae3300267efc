"""Data: tokenizer round trips through prepared MDS shards; replica/rank distribution; proportions."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import read_mds_split, run_heft
from heft.data.prepare import load_manifest, prepare
from heft.data.tokenizer import EOS_TEXT, load_tokenizer

DOCS = {
    "prose": ["Hello, world!\nSecond line with ünïcödé and emoji 🚀.", "  leading spaces\tand tabs  ",
              "Ἐν ἀρχῇ ἦν ὁ λόγος " * 20],
    "code": ["def f(x):\n    return x ** 2  # square\n" * 15, "print('done')\n"],
}


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_prepare_round_trips_text(tmp_path, kind):
    out = tmp_path / kind
    manifest = prepare(DOCS, out, tokenizer=kind, seq_length=16, bpe_vocab_size=300, val_fraction=0.2)
    tok = load_tokenizer(out, manifest["tokenizer"])
    assert manifest["tokenizer"]["kind"] == kind
    complete = 0
    for domain in manifest["domains"]:
        name = domain["name"]
        for split in ("train", "val"):
            if not domain[split]["samples"]:
                continue
            rows = np.stack(read_mds_split(out / name / split))
            assert rows.shape == (domain[split]["samples"], 17)
            # Split the packed stream on EOS: every complete document comes back exactly, in order.
            docs, current = [], []
            for token in rows.reshape(-1).tolist():
                if token == tok.eos_id:
                    docs.append(tok.decode(current))
                    current = []
                else:
                    current.append(token)
            assert docs == [d for d in DOCS[name] if d in docs]  # all whole documents, in order
            complete += len(docs)
        assert tok.decode(tok.encode(DOCS[name][-1])) == DOCS[name][-1]
    assert complete >= 1


def test_bpe_tokenizer_is_saved_beside_data(tmp_path):
    prepare(DOCS, tmp_path / "d", tokenizer="bpe", seq_length=16, bpe_vocab_size=300)
    manifest = load_manifest(tmp_path / "d")
    assert (tmp_path / "d" / manifest["tokenizer"]["file"]).is_file()
    assert load_tokenizer(tmp_path / "d", manifest["tokenizer"]).encode(EOS_TEXT) == [manifest["tokenizer"]["eos_id"]]


def test_cli_prepare_from_files(tmp_path):
    src = tmp_path / "src.jsonl"
    src.write_text("".join(json.dumps({"text": f"document number {i} " * 10}) + "\n" for i in range(30)))
    run_heft(["prepare", "--domain", f"web={src}", "--out", str(tmp_path / "out"), "--tokenizer", "bpe",
              "--vocab-size", "300", "--seq-length", "32"], timeout=120)
    manifest = load_manifest(tmp_path / "out")
    assert [d["name"] for d in manifest["domains"]] == ["web"] and manifest["domains"][0]["train"]["samples"] > 0


@pytest.mark.parametrize("layout", ["tp2_dp2", "pp2_dp2"])
def test_replica_ranks_share_samples_and_replicas_are_disjoint(batch_dumps, layout):
    ranks = batch_dumps[f"replicas/{layout}"]  # 20 steps
    assert len(ranks) == 4
    by_replica: dict[int, list] = {}
    for r in ranks:
        by_replica.setdefault(r["dp_rank"], []).append(r["batches"])
    assert sorted(by_replica) == [0, 1]
    for dp, members in by_replica.items():
        assert len(members) == 2 and members[0] == members[1], f"ranks of replica {dp} differ"
    samples = [{tuple(s) for batch in by_replica[dp][0] for s in batch} for dp in (0, 1)]
    assert len(samples[0]) == 20 * 4 and not samples[0] & samples[1]


def test_static_proportions_hold(batch_dumps):
    ranks = batch_dumps["proportions/dp4"]  # 150 steps, 4 replicas
    assert len(ranks) == 4 and all(len(r["batches"]) == 150 for r in ranks)
    domains = Counter(d for r in ranks for batch in r["batches"] for d, _ in batch)
    total = sum(domains.values())  # 150 steps x 8 samples
    for domain_id, want in {0: 0.5, 1: 0.25, 2: 0.25}.items():
        sigma = (want * (1 - want) / total) ** 0.5
        assert abs(domains[domain_id] / total - want) < 4 * sigma + 1e-3, (domains, total)


def test_streaming_is_imported_without_its_text_and_vision_datasets_or_transformers():
    """Their imports, and streaming's data loader, pull in transformers (1.8 s of a worker's
    start-up); heft reads MDS with the base classes. They stay importable on request, and
    ``streaming.StreamingDataLoader`` is imported when first used."""
    from conftest import python_in_a_fresh_process

    script = ("import sys; from heft.data.streaming_lib import StreamingDataset; import streaming; "
              "print(sorted(m for m in ('streaming.text', 'streaming.vision', 'streaming.multimodal', "
              "'streaming.base.dataloader', 'transformers') if m in sys.modules), "
              "hasattr(streaming, 'text')); "
              "import streaming.text; print(streaming.text.StreamingC4.__name__); "
              "import streaming.base.dataloader as d; "
              "print(streaming.StreamingDataLoader is d.StreamingDataLoader is streaming.base.StreamingDataLoader)")
    out = python_in_a_fresh_process(script)
    assert out.split("\n")[:3] == ["[] False", "StreamingC4", "True"], out
