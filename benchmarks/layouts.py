"""Step time of the demo job under each parallel layout (4 processes unless noted), on this machine.

    python benchmarks/layouts.py [--steps 60]

Runs `heft train configs/demo.yaml` with reweighting off for each layout and reports the mean step
time and throughput of the last log window (the first window holds start-up and is dropped).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LAYOUTS = {
    "single (1 process)": ["parallel.tensor=1", "parallel.data=1"],
    "DP4": ["parallel.tensor=1", "parallel.data=4"],
    "DP4 + distributed optimizer": ["parallel.tensor=1", "parallel.data=4", "parallel.distributed_optimizer=true"],
    "TP2 x DP2": ["parallel.tensor=2", "parallel.data=2"],
    "PP2 x DP2": ["parallel.tensor=1", "parallel.pipeline=2", "parallel.data=2"],
    "TP2 x PP2": ["parallel.tensor=2", "parallel.pipeline=2", "parallel.data=1"],
    "PP2 x VPP2 x DP2": ["parallel.tensor=1", "parallel.pipeline=2", "parallel.virtual_pipeline=2", "parallel.data=2"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--data", default=str(REPO / "demo_data"))
    args = parser.parse_args()
    if not (Path(args.data) / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "heft.launcher.cli", "prepare", "--demo", args.data], check=True, cwd=REPO)
    print(f"\ndemo job (tiny model, global batch 16 x 128 tokens, micro 4), {args.steps} steps, 2 CPU cores")
    print(f"{'layout':<30} {'ms/step':>9} {'tokens/s':>10} {'loss':>8}")
    for name, overrides in LAYOUTS.items():
        with tempfile.TemporaryDirectory() as run_dir:
            subprocess.run([sys.executable, "-m", "heft.launcher.cli", "train", str(REPO / "configs" / "demo.yaml"),
                            f"data.path={args.data}", f"train.steps={args.steps}",
                            f"train.log_interval={args.steps // 2}", "reweight.strategy=none",
                            "train.tensorboard=false", f"train.run_dir={run_dir}", *overrides],
                           check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            last = json.loads((Path(run_dir) / "metrics.jsonl").read_text().splitlines()[-1])
        print(f"{name:<30} {last['step_time_s'] * 1000:>9.0f} {last['tokens_per_s']:>10.0f} {last['loss']:>8.4f}")


if __name__ == "__main__":
    main()
