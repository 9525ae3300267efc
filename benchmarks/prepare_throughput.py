"""heft prepare: throughput and peak memory on a generated corpus, next to the tokenizer's own rate.

    python benchmarks/prepare_throughput.py [--mb 1024] [--bpe-mb 100] [--workers 0] [--keep DIR]

Generates jsonl documents of varied length (words drawn from a fixed vocabulary, so BPE has
something to merge), then runs the real ``heft prepare`` command on them:

* the byte tokenizer over ``--mb`` MB (the bounded-memory check: peak RSS of the prepare process
  and, separately, of its worker processes, from the kernel's own accounting);
* a BPE over ``--bpe-mb`` MB, trained on a sample and applied (``bpe+train``), then the same text
  again with that BPE given as an existing ``tokenizer.json`` (``bpe (file)``).

The reference is the tokenizer's own batch encode (``tokenizers`` ``encode_batch``, all cores) on
the same text: the practical upper limit for prepare's tokenizing. Prints one table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = [w for w in (
    "the of and to in is that for it as with was on be by this are from or have an they which one "
    "you were all we her she there would their will when who him been has more if no out do so can "
    "what up said about other into than its time only could new them man some these then two first "
    "may any like now my such make over our even most me state after also made many did must before "
    "back see through way where get much go well your know should down work year because come people "
    "just say each those take day good how long little use very great world own under last right "
    "def return import class self value data model train loss batch tensor layer court shall section"
).split()]


def generate(path: Path, megabytes: int, seed: int = 0) -> int:
    rng = random.Random(seed)
    target, written = megabytes * 1_000_000, 0
    with open(path, "w") as f:
        while written < target:
            n = rng.choice((50, 200, 800, 3000))
            line = json.dumps({"text": " ".join(rng.choices(WORDS, k=n)) + "."}) + "\n"
            f.write(line)
            written += len(line)
    return written


def run_prepare(src: Path, out: Path, tokenizer: str, workers: int, extra: list[str]) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    code = ("import resource, sys\nfrom heft.launcher.cli import main\nstatus = main(sys.argv[1:])\n"
            "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
            "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\nsys.exit(status)")
    proc = subprocess.run([sys.executable, "-c", code, "prepare", "--domain", f"gen={src}", "--out", str(out),
                           "--tokenizer", tokenizer, "--seq-length", "2048", "--workers", str(workers), *extra],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"heft prepare failed:\n{proc.stderr[-3000:]}")
    peak_main, peak_workers = (int(x) for x in proc.stderr.split("PEAK")[1].split()[:2])
    manifest = json.loads((out / "manifest.json").read_text())
    tokens = sum(d[s]["tokens"] for d in manifest["domains"] for s in ("train", "val"))
    del before
    return {"seconds": seconds, "mb": src.stat().st_size / 1e6, "tokens": tokens,
            "peak_main_mb": peak_main / 1024, "peak_worker_mb": peak_workers / 1024}


def tokenizer_rate(tokenizer_json: Path, src: Path, sample_mb: int = 50) -> float:
    """MB/s of the tokenizer's own encode_batch (all cores) on the first ``sample_mb`` of the text."""
    from tokenizers import Tokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    tok = Tokenizer.from_file(str(tokenizer_json))
    texts, size = [], 0
    with open(src) as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            size += len(texts[-1])
            if size >= sample_mb * 1_000_000:
                break
    start = time.perf_counter()
    for i in range(0, len(texts), 1000):
        tok.encode_batch(texts[i:i + 1000], add_special_tokens=False)
    return size / 1e6 / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=1024, help="corpus size for the byte tokenizer run")
    parser.add_argument("--bpe-mb", type=int, default=100, help="corpus size for the BPE run")
    parser.add_argument("--workers", type=int, default=0, help="heft prepare --workers (0: all cores)")
    parser.add_argument("--keep", help="work directory to keep (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="heft-prepare-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    big, small = work / "big.jsonl", work / "small.jsonl"
    print(f"generating {args.mb} MB and {args.bpe_mb} MB of jsonl in {work} ...", flush=True)
    generate(big, args.mb)
    generate(small, args.bpe_mb, seed=1)
    rows = [("byte", run_prepare(big, work / "out_byte", "byte", args.workers, []))]
    rows.append(("bpe+train", run_prepare(small, work / "out_bpe", "bpe", args.workers, ["--vocab-size", "8000"])))
    trained = work / "bpe_tokenizer.json"  # the trained BPE as an existing tokenizer.json
    trained.write_bytes((work / "out_bpe" / "tokenizer.json").read_bytes())
    rows.append(("bpe (file)", run_prepare(small, work / "out_file", str(trained), args.workers, [])))
    reference = tokenizer_rate(trained, small)
    print(f"\ncores: {os.cpu_count()}, workers: {args.workers or os.cpu_count()}, seq_length 2048")
    print(f"{'tokenizer':<10} {'input MB':>9} {'seconds':>8} {'MB/s':>7} {'Mtok/s':>7} "
          f"{'peak RSS MB':>12} {'worker peak MB':>15}")
    for name, r in rows:
        print(f"{name:<10} {r['mb']:>9.0f} {r['seconds']:>8.1f} {r['mb'] / r['seconds']:>7.2f} "
              f"{r['tokens'] / r['seconds'] / 1e6:>7.2f} {r['peak_main_mb']:>12.0f} {r['peak_worker_mb']:>15.0f}")
    bpe = rows[2][1]
    print(f"\nBPE: the tokenizer's own encode_batch on the same text and cores: {reference:.2f} MB/s; "
          f"heft prepare with that tokenizer.json (reading, tokenizing, packing, writing, process "
          f"start-up) reaches {bpe['mb'] / bpe['seconds'] / reference:.0%} of it")


if __name__ == "__main__":
    main()
