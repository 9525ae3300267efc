"""Domain mixer throughput, and the data wait inside a training run.

    python benchmarks/mixer_throughput.py [--seq-length 2048] [--global-batch 64] [--steps 30]

1. Reading: one process plans and reads ``--steps`` global batches from the demo corpus (three
   domains, one StreamingDataset each) with a changing schedule, as one data-parallel replica
   of ``--replicas``; prints tokens/s per rank without prefetch (the raw read rate) and with it.
2. In training: a short CPU run of ``configs/demo.yaml`` (the ``schedule`` controller) and the
   mean ``data_wait_s`` it logged (time the step waited for its batch) next to its step time.

The trainer's appetite to compare with: a 1B model on one H100 consumes about 40k tokens/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAINER_TOKENS_PER_S_1B_H100 = 40_000


def read_rate(data: Path, seq_length: int, global_batch: int, replicas: int, steps: int, prefetch: bool,
              compute_s: float) -> tuple[float, float]:
    """(tokens/s over the time spent waiting, mean wait per step) over ``steps``, with ``compute_s``
    of simulated compute per step so a prefetch has something to overlap. Without prefetch the
    wait is the read, so the rate is the raw read rate."""
    from heft.data.config import DataConfig, MixtureConfig
    from heft.data.mixer import DomainMixer

    mixture = MixtureConfig(controller="schedule", prefetch=prefetch, schedule=[
        {"step": 1, "code": 1.0}, {"step": steps, "docs": 1.0, "legal": 1.0}])
    mixer = DomainMixer(DataConfig(path=str(data)), mixture, global_batch, 0, replicas, seed=0,
                        total_steps=steps, seq_length=seq_length)
    next(mixer)  # the first batch is read synchronously
    waits = []
    for _ in range(steps):
        waited = time.perf_counter()
        next(mixer)
        waits.append(time.perf_counter() - waited)
        time.sleep(compute_s)
    mixer.close()
    tokens = steps * (global_batch // replicas) * seq_length
    return tokens / max(sum(waits), 1e-9), statistics.mean(waits)


def training_wait(steps: int) -> tuple[float, float]:
    """(mean data_wait_s, mean step_time_s) of a short demo run."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        schedule = "[{fraction: 0.0, code: 0.6, docs: 0.2, legal: 0.2}, {fraction: 1.0, code: 0.2, docs: 0.4, legal: 0.4}]"
        subprocess.run([sys.executable, "-m", "heft.launcher.cli", "train", str(REPO / "configs" / "demo.yaml"),
                        f"train.steps={steps}", "train.log_interval=5", f"train.run_dir={run_dir}",
                        "checkpoint.interval=0", "train.eval_interval=0", "train.eval_at_end=false",
                        "mixture.controller=schedule", f"mixture.schedule={schedule}"],
                       check=True, capture_output=True, text=True, cwd=REPO)  # demo.yaml's data is relative
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        records = [r for r in records if "data_wait_s" in r][1:]  # the first window holds start-up
        return (statistics.mean(r["data_wait_s"] for r in records),
                statistics.mean(r["step_time_s"] for r in records))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--replicas", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--compute-s", type=float, default=0.05, help="simulated compute per step")
    parser.add_argument("--train-steps", type=int, default=60)
    args = parser.parse_args()

    from heft.data.demo_corpus import demo_documents
    from heft.data.prepare import prepare

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        budget = args.seq_length * args.global_batch * args.steps // 2
        prepare(demo_documents({"code": budget, "docs": budget // 2, "legal": budget // 2}), data,
                tokenizer="byte", seq_length=args.seq_length)
        print(f"| read (seq {args.seq_length}, {args.global_batch // args.replicas} of {args.global_batch} "
              f"sequences per rank) | tokens/s per rank | mean wait per step |")
        print("|---|---:|---:|")
        for prefetch in (False, True):
            rate, wait = read_rate(data, args.seq_length, args.global_batch, args.replicas, args.steps,
                                   prefetch, args.compute_s)
            label = f"prefetch, {args.compute_s * 1000:.0f} ms compute per step" if prefetch else "no prefetch"
            shown = f"{rate:,.0f}" if not prefetch else "(overlapped)"
            print(f"| {label} | {shown} | {wait * 1000:.2f} ms |")
    print(f"\ntrainer consumption to compare: 1B on one H100 ~{TRAINER_TOKENS_PER_S_1B_H100:,} tokens/s per rank")
    wait, step = training_wait(args.train_steps)
    print(f"\n| demo training run ({args.train_steps} steps, schedule controller) | value |\n|---|---:|")
    print(f"| mean data wait per step | {wait * 1000:.3f} ms |\n| mean step time | {step * 1000:.0f} ms |")


if __name__ == "__main__":
    main()
