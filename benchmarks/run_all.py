"""Every benchmark that says whether heft is fast and lean, as one table (and JSON).

    python benchmarks/run_all.py [--quick] [--json PATH]

Rows:
* heft's step against a bare megatron-core loop on the same model and batches (target <= 1.05),
  and the step's time split (``step_breakdown.py``);
* reweighting's step-time ratio, ``linupper`` against the plain mean, per CPU layout
  (``reweight_overhead.py``; target <= 1.02 on GPUs, where the model dominates);
* ``heft plan``'s memory estimate against a measured peak (``memory_plan.py``; within 15%);
* on CUDA only: tokens/s and MFU for the 1b and 1.4b presets at seq 2048 and the widest 7b layout
  that fits one GPU (7b width, as many layers as ``heft plan`` fits), reweighting off and on. MFU = tokens/s x FLOPs per token /
  peak bf16 FLOP/s, FLOPs per token = 3 x forward matmul FLOPs (model/flops.py: QKV, attention
  2 x 2 s h, projection, SwiGLU 3 matmuls, logits; causal masking not discounted).

``--quick`` is the reduced CPU run CI keeps alive (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

# name: (config, overrides) for the CUDA rows; one GPU, micro batches as measured on an H100.
GPU_CASES = {
    "1b": ("configs/1b.yaml", ["parallel.tensor=1", "train.micro_batch_size=4"]),
    "1.4b": ("configs/1.4b.yaml", ["parallel.tensor=1", "parallel.pipeline=1", "train.micro_batch_size=4"]),
    # Full 7b width, as many layers as `heft plan` says fit this GPU (gpu_rows fills them in).
    "7b width": ("configs/7b.yaml", ["parallel.tensor=1", "parallel.pipeline=1", "parallel.virtual_pipeline=null",
                                     "model.seq_length=2048", "train.micro_batch_size=1", "train.recompute=none"]),
}
GPU_STEPS = 24


def row(benchmark: str, case: str, metric: str, value, target: str = "", ok: bool | None = None) -> dict:
    return {"benchmark": benchmark, "case": case, "metric": metric, "value": value, "target": target,
            "ok": ok}


def step_rows(rounds: int) -> list[dict]:
    from step_breakdown import PIECES, measure

    result = measure(rounds, 1, str(REPO / "configs" / "demo.yaml"), ["parallel.tensor=1", "parallel.data=1"], None)
    case = "demo model, 1 process"
    rows = [row("step vs bare megatron-core", case, "heft step ms", result["heft"]),
            row("step vs bare megatron-core", case, "bare step ms", result["bare"]),
            row("step vs bare megatron-core", case, "heft / bare", result["heft / bare"], "<= 1.05",
                result["heft / bare"] <= 1.05)]
    rows += [row("step time split", case, f"{piece} ms", result[piece]) for piece in PIECES]
    return rows


def reweight_rows(layouts: list[str], rounds: int) -> list[dict]:
    from reweight_overhead import measure

    rows = []
    for layout, _, ratios in measure(layouts, rounds, str(REPO / "demo_data")):
        rows.append(row("reweighting overhead (CPU)", layout, "A/A control ratio", ratios["none_control"]))
        for arm in ("linupper_global", "linupper_microbatch"):
            rows.append(row("reweighting overhead (CPU)", layout, f"{arm} / none", ratios[arm], "<= 1.02 on GPU"))
    return rows


def memory_rows() -> list[dict]:
    from memory_plan import run_case

    result = run_case("local_fp32")
    error = result["estimate"] / result["measured"] - 1
    return [row("heft plan memory", "local_fp32", "estimate MiB", result["estimate"] / 2 ** 20),
            row("heft plan memory", "local_fp32", "measured MiB", result["measured"] / 2 ** 20),
            row("heft plan memory", "local_fp32", "error", error, "within 15%", abs(error) <= 0.15)]


def gpu_rows() -> list[dict]:
    import torch

    if not torch.cuda.is_available():
        return [row("GPU throughput", name, "tokens/s, MFU", "skipped: no CUDA") for name in GPU_CASES]
    data = _gpu_data()
    rows = []
    for name, (config, overrides) in GPU_CASES.items():
        if name == "7b width":
            layers = _most_layers_that_fit(config, overrides)
            overrides, name = [*overrides, f"model.num_layers={layers}"], f"7b width, {layers} layers"
        for strategy in ("none", "linupper"):
            record = _train(config, [*overrides, f"reweight.strategy={strategy}", f"data.path={data}"])
            case = f"{name}, reweight {strategy}"
            rows.append(row("GPU throughput", case, "tokens/s", record["tokens_per_s"]))
            rows.append(row("GPU throughput", case, "MFU", record["mfu"], ">= 0.45", record["mfu"] >= 0.45))
    return rows


def _most_layers_that_fit(config: str, overrides: list[str]) -> int:
    """The most layers (a multiple of 2) of the full-width model that `heft plan` fits on this GPU."""
    from heft.launcher.plan import plan

    for layers in range(32, 1, -2):
        _, fits = plan(str(REPO / config), [*overrides, f"model.num_layers={layers}", "train.global_batch_size=16"],
                       gpus=1, gpu_memory_gb=None)
        if fits:
            return layers
    return 2


def _gpu_data() -> str:
    """Byte-level demo data at seq 2048 (a tiny vocabulary: the logits are a negligible share)."""
    from reweight_overhead import ensure_demo_data

    path = str(REPO / "demo_data_2048")
    ensure_demo_data(path, seq_length=2048)
    return path


def _train(config: str, overrides: list[str]) -> dict:
    """A short `heft train` on one GPU; the last logged record (the first window holds start-up)."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "heft.launcher.cli", "train", str(REPO / config), "--nproc-per-node", "1",
                        f"train.run_dir={tmp}/run", f"train.steps={GPU_STEPS}", "train.log_interval=8",
                        "train.global_batch_size=16", "train.tensorboard=false", "checkpoint.interval=0",
                        *overrides], check=True, cwd=REPO)
        records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "tokens_per_s" in r][-1]


def print_table(rows: list[dict]) -> None:
    print(f"{'benchmark':<30} {'case':<28} {'metric':<28} {'value':>14}  target")
    for r in rows:
        value = r["value"]
        shown = f"{value:14.3f}" if isinstance(value, float) else f"{value!s:>14}"
        verdict = "" if r["ok"] is None else (" ok" if r["ok"] else " MISSED")
        print(f"{r['benchmark']:<30} {r['case']:<28} {r['metric']:<28} {shown}  {r['target']}{verdict}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the reduced CPU run (CI)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    rows = step_rows(rounds=5 if args.quick else 30)
    rows += reweight_rows(["single"] if args.quick else ["single", "tp2", "tp2_dp2"], 5 if args.quick else 60)
    rows += memory_rows()
    rows += gpu_rows()
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    bad = [r for r in rows if isinstance(r["value"], float) and not math.isfinite(r["value"])]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
