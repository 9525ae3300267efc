"""Step-time overhead of loss-based reweighting, measured A/B interleaved in one run.

    python benchmarks/reweight_overhead.py [--rounds 60] [--layout tp2_dp2 ...]

For each layout one torchrun job builds the model once and alternates, step by step, the plain-mean
reduction (A) with linupper in the global scope (B) and in the microbatch scope (C), so machine
noise hits every arm alike, plus an A/A control arm whose ratio to A shows the noise floor.
Prints median step times and the ratios to A.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# name -> (processes, overrides of configs/demo.yaml). 2 cores: 1-2 processes measure cleanly,
# 4 processes oversubscribe the machine and the A/A control shows how much noise that adds.
LAYOUTS = {
    "single": (1, ["parallel.tensor=1", "parallel.data=1"]),
    "dp2": (2, ["parallel.tensor=1", "parallel.data=2"]),
    "tp2": (2, ["parallel.tensor=2", "parallel.data=1"]),
    "tp2_dp2": (4, ["parallel.tensor=2", "parallel.data=2"]),
    "pp2_dp2": (4, ["parallel.tensor=1", "parallel.pipeline=2", "parallel.data=2"]),
}
# "none_control" is a second plain-mean arm: its ratio to "none" is the benchmark's noise floor.
ARMS = {"none": {"strategy": "none"},
        "none_control": {"strategy": "none"},
        "linupper_global": {"strategy": "linupper", "scope": "global"},
        "linupper_microbatch": {"strategy": "linupper", "scope": "microbatch"}}
WARMUP_ROUNDS = 5


def worker(out: str, rounds: int, overrides: list[str]) -> None:
    from megatron.core.utils import get_model_config

    from heft.launcher.config import ReweightConfig, load_config
    from heft.launcher.train.build import build_loss_reduction, build_trainer
    from heft.model.parallel import shutdown

    cfg = load_config(REPO / "configs" / "demo.yaml", overrides)
    trainer = build_trainer(cfg)
    reductions = {name: build_loss_reduction(cfg, trainer.layout, trainer.domain_names,
                                             ReweightConfig(temperature=1.0, **arm))
                  for name, arm in ARMS.items()}
    model_config = get_model_config(trainer.chunks[0])
    times = {name: [] for name in ARMS}
    step = 0
    for round_ in range(WARMUP_ROUNDS + rounds):
        for name, reduction in reductions.items():
            step += 1
            reduction.install(model_config)
            trainer.reduction = reduction
            start = time.perf_counter()
            trainer.step(step)
            if round_ >= WARMUP_ROUNDS:
                times[name].append(time.perf_counter() - start)
    if trainer.layout.rank == 0:
        Path(out).write_text(json.dumps(times))
    shutdown()


def ensure_demo_data(path: str, seq_length: int = 128) -> None:
    """Prepare the embedded demo corpus at ``path`` unless it is there."""
    if not (Path(path) / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "heft.launcher.cli", "prepare", "--demo", path,
                        "--seq-length", str(seq_length)], check=True, cwd=REPO, stdout=subprocess.DEVNULL)


def measure(layouts: list[str], rounds: int, data: str,
            env: dict[str, str] | None = None) -> list[tuple[str, dict, dict]]:
    """For each layout: (name, median ms per arm, median paired ratio to the plain mean per arm).
    ``env`` adds to the workers' environment (``CUDA_VISIBLE_DEVICES=""`` keeps them on the CPU)."""
    ensure_demo_data(data)
    rows = []
    for layout in layouts:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "times.json"
            nproc, overrides = LAYOUTS[layout]
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                            __file__, "--worker", str(out), str(rounds), f"data.path={data}",
                            "train.tensorboard=false", f"train.run_dir={tmp}/run", *overrides],
                           check=True, env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}, cwd=REPO,
                           stdout=subprocess.DEVNULL)
            times = json.loads(out.read_text())
        medians = {name: statistics.median(values) * 1000 for name, values in times.items()}
        # Paired: each arm's step against the plain-mean step of the same round.
        ratios = {name: statistics.median(b / a for a, b in zip(times["none"], values))
                  for name, values in times.items()}
        rows.append((layout, medians, ratios))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--layout", action="append", choices=list(LAYOUTS))
    parser.add_argument("--data", default=str(REPO / "demo_data"))
    args = parser.parse_args()
    rows = measure(args.layout or list(LAYOUTS), args.rounds, args.data)
    print(f"\nmedian step time (ms), {args.rounds} interleaved rounds, tiny model, global batch 16, micro 4, 2 CPU cores")
    print(f"{'layout':<10} {'none':>8} {'A/A control':>12} {'linupper global':>16} {'linupper microbatch':>20}")
    for layout, m, _ in rows:
        print(f"{layout:<10} {m['none']:>8.1f} " + " ".join(
            f"{m[arm]:>{w}.1f}" for arm, w in (("none_control", 12), ("linupper_global", 16), ("linupper_microbatch", 20))))
    print("\nmedian of per-round paired ratios to none")
    for layout, _, r in rows:
        print(f"{layout:<10} {'1.000':>8} " + " ".join(
            f"{r[arm]:>{w}.3f}" for arm, w in (("none_control", 12), ("linupper_global", 16), ("linupper_microbatch", 20))))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), sys.argv[4:])
    else:
        main()
