"""Does loss-based reweighting help when the data holds redundant and noisy samples?

    python benchmarks/reweight_quality.py [--steps 400]

Corpus: the three clean demo domains (code, docs, legal) plus
* ``redundant``: a handful of short documents repeated hundreds of times (quickly memorised, low loss);
* ``noise``: random printable characters (unlearnable, high loss).
Each arm trains the tiny model from the same seed on the same token budget and the same data order
(DP2 on CPU) and is evaluated on the held-out split of every domain at the end. Prints the held-out
loss per domain and the mean weight each domain received while reweighting was on.
"""

from __future__ import annotations

import argparse
import json
import shutil
import random
import statistics
import string
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

ARMS = {
    "none": ["reweight.strategy=none"],
    "linupper r=1.0": ["reweight.strategy=linupper", "reweight.temperature=1.0"],
    "linupper r=0.4": ["reweight.strategy=linupper", "reweight.temperature=0.4"],
}
CLEAN = ("code", "docs", "legal")


def build_corpus(out: Path) -> None:
    from heft.data.demo_corpus import demo_documents
    from heft.data.prepare import prepare

    docs = demo_documents()
    rng = random.Random(0)
    seeds = docs["docs"][:5]
    docs["redundant"] = [seeds[i % len(seeds)][:2000] for i in range(600)]
    alphabet = string.ascii_letters + string.digits + string.punctuation + " \n"
    docs["noise"] = ["".join(rng.choice(alphabet) for _ in range(2000)) for _ in range(300)]
    prepare(docs, out, tokenizer="byte", seq_length=128, val_fraction=0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--work", default=str(REPO / "runs" / "bench_quality"))
    args = parser.parse_args()
    work = Path(args.work)
    data = work / "data"
    if not (data / "manifest.json").is_file():
        build_corpus(data)
    results = {}
    for arm, overrides in ARMS.items():
        run_dir = work / arm.replace(" ", "_").replace("=", "")
        if run_dir.exists():  # the benchmark's own earlier run: start it afresh
            shutil.rmtree(run_dir)
        subprocess.run([sys.executable, "-m", "heft.launcher.cli", "train", str(REPO / "configs" / "demo.yaml"),
                        f"data.path={data}", "data.proportions={code: 0.3, docs: 0.2, legal: 0.2, redundant: 0.15, noise: 0.15}",
                        "parallel.tensor=1", "parallel.data=2", f"train.steps={args.steps}", "train.log_interval=10",
                        "train.eval_at_end=true", "train.tensorboard=false", f"train.run_dir={run_dir}",
                        "reweight.warmup_steps=50", *overrides],
                       check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        final_eval = [r for r in rows if "eval_loss" in r][-1]
        active = [r for r in rows if r.get("reweighting_active")]
        weights = {d: statistics.mean(r[f"domain_{d}_weight"] for r in active if f"domain_{d}_weight" in r)
                   for d in (*CLEAN, "redundant", "noise")} if active else {}
        results[arm] = {"eval": final_eval, "weights": weights}
    (work / "results.json").write_text(json.dumps(results, indent=2))

    domains = (*CLEAN, "redundant", "noise")
    print(f"\nheld-out loss after {args.steps} steps (tiny model, byte tokens, global batch 16 x 128 tokens)")
    print(f"{'arm':<16}" + "".join(f"{d:>11}" for d in domains) + f"{'clean mean':>12}")
    for arm, r in results.items():
        clean = statistics.mean(r["eval"][f"eval_{d}_loss"] for d in CLEAN)
        print(f"{arm:<16}" + "".join(f"{r['eval'][f'eval_{d}_loss']:>11.4f}" for d in domains) + f"{clean:>12.4f}")
    print("\nmean relative weight per domain while reweighting was on (1 = uniform)")
    for arm, r in results.items():
        if r["weights"]:
            print(f"{arm:<16}" + "".join(f"{r['weights'][d]:>11.3f}" for d in domains))


if __name__ == "__main__":
    main()
