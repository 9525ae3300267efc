"""Every benchmark that says whether heft is fast and lean, as one table (and JSON).

    python benchmarks/run_all.py [--quick] [--json PATH] [--only step|reweight|memory|gpu ...]

Sections (``--only`` picks some, e.g. to spend a GPU lease on the CUDA rows alone):
* **step**: heft's step against a bare megatron-core loop on the same model and batches, both with
  the plain token mean (target <= 1.05), and the step's time split (``step_breakdown.py``). CPU:
  the demo model; CUDA: the 1b preset at seq 2048 on one GPU.
* **reweight**: ``linupper`` against the plain mean, per CPU layout, with an A/A control
  (``reweight_overhead.py``; target <= 1.02 on GPUs, where the model dominates). These run on
  the CPU on a GPU machine too.
* **memory**: ``heft plan``'s estimate against a measured peak (``memory_plan.py``; within 15%).
* **gpu**, CUDA only (one "skipped: no CUDA" row per case elsewhere): tokens/s and MFU for the 1b
  and 1.4b presets at seq 2048 and the widest 7b layout that fits one GPU (7b width, as many
  layers as ``heft plan`` fits), reweighting off and on, interleaved (``gpu_throughput.py``; the
  MFU formula is printed under the table and stored in the MFU rows' ``note``).

``--quick`` is the reduced run CI keeps alive (about a minute on 2 cores). The exit status is 1
when a value is not finite or a case failed to run.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

SECTIONS = ("step", "reweight", "memory", "gpu")


def row(benchmark: str, case: str, metric: str, value, target: str = "", ok: bool | None = None,
        note: str = "") -> dict:
    return {"benchmark": benchmark, "case": case, "metric": metric, "value": value, "target": target,
            "ok": ok, **({"note": note} if note else {})}


def step_rows(rounds: int, cuda: bool) -> list[dict]:
    """heft's step against the bare megatron-core loop, and the step's split, with heft's plain
    mean. CPU: the demo model; CUDA: the 1b preset at seq 2048 on one GPU."""
    from step_breakdown import PIECES, measure

    if cuda:
        from gpu_throughput import DATA, case_overrides
        from reweight_overhead import ensure_demo_data

        ensure_demo_data(str(DATA), seq_length=2048)
        config, overrides, _ = case_overrides("1b")
        case, data = "1b, seq 2048, 1 GPU", str(DATA)
    else:
        config, overrides = "configs/demo.yaml", ["parallel.tensor=1", "parallel.data=1"]
        case, data = "demo model, 1 process", None
    result = measure(rounds, 1, str(REPO / config), [*overrides, "reweight.strategy=none"], data)
    rows = [row("step vs bare megatron-core", case, "heft step ms", result["heft"]),
            row("step vs bare megatron-core", case, "bare step ms", result["bare"]),
            row("step vs bare megatron-core", case, "heft / bare", result["heft / bare"], "<= 1.05",
                result["heft / bare"] <= 1.05)]
    rows += [row("step time split", case, f"{piece} ms", result[piece]) for piece in PIECES]
    return rows


def reweight_rows(layouts: list[str], rounds: int, cuda: bool) -> list[dict]:
    """linupper against the plain mean per CPU layout; on a GPU machine these still run on the CPU
    (the GPU rows measure the same ratio on the GPU)."""
    from reweight_overhead import measure

    env = {"CUDA_VISIBLE_DEVICES": ""} if cuda else None
    rows = []
    for layout, _, ratios in measure(layouts, rounds, str(REPO / "demo_data"), env=env):
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


def gpu_rows(cuda: bool, rounds: int) -> list[dict]:
    """tokens/s and MFU per case, reweighting off and on (gpu_throughput.py)."""
    from gpu_throughput import CASES, FORMULA, measure

    if not cuda:
        return [row("GPU throughput", name, "tokens/s, MFU", "skipped: no CUDA", note=FORMULA) for name in CASES]
    rows = []
    for name in CASES:
        try:
            r = measure(name, rounds)
        except (subprocess.CalledProcessError, RuntimeError) as exc:
            rows.append(row("GPU throughput", name, "tokens/s, MFU", "failed", ok=False, note=str(exc)))
            continue
        for miss in r["plan_misses"]:  # a layout `heft plan` said fits ran out of memory
            rows.append(row("GPU throughput", miss.split(":")[0], "heft plan: fits", "ran out of memory",
                            ok=False, note=miss))
        for arm in ("none", "linupper"):
            case = f"{r['case']}, reweight {arm}"
            rows.append(row("GPU throughput", case, "step ms", r[arm]["step_ms"]))
            rows.append(row("GPU throughput", case, "tokens/s", r[arm]["tokens_per_s"]))
            mfu = r[arm]["mfu"]
            rows.append(row("GPU throughput", case, "MFU", mfu if mfu is not None else "unknown GPU peak",
                            ">= 0.45", None if mfu is None else mfu >= 0.45, note=FORMULA))
        rows.append(row("GPU throughput", r["case"], "linupper / none step time", r["linupper / none"], "<= 1.02",
                        r["linupper / none"] <= 1.02))
        rows.append(row("GPU throughput", r["case"], "peak allocated GiB", r["peak_memory_gib"]))
    return rows


def print_table(rows: list[dict]) -> None:
    widths = {key: max(len(key), *(len(str(r[key])) for r in rows)) for key in ("benchmark", "case", "metric")}
    header = "  ".join(f"{key:<{width}}" for key, width in widths.items())
    print(f"{header}  {'value':>14}  target")
    for r in rows:
        value = r["value"]
        shown = f"{value:14.3f}" if isinstance(value, float) else f"{value!s:>14}"
        verdict = "" if r["ok"] is None else (" ok" if r["ok"] else " MISSED")
        cells = "  ".join(f"{r[key]:<{width}}" for key, width in widths.items())
        print(f"{cells}  {shown}  {r['target']}{verdict}")
    for note in dict.fromkeys(r["note"] for r in rows if "note" in r):
        print(note)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the reduced CPU run (CI)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--only", action="append", choices=SECTIONS, help="run only these sections (repeatable)")
    args = parser.parse_args()
    import torch

    cuda, only = torch.cuda.is_available(), set(args.only or SECTIONS)
    rows = []
    if "step" in only:
        rows += step_rows(rounds=5 if args.quick else (10 if cuda else 30), cuda=cuda)
    if "reweight" in only:
        rows += reweight_rows(["single"] if args.quick else ["single", "tp2", "tp2_dp2"], 5 if args.quick else 60, cuda)
    if "memory" in only:
        rows += memory_rows()
    if "gpu" in only:
        rows += gpu_rows(cuda, rounds=3 if args.quick else 6)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    bad = [r for r in rows if (isinstance(r["value"], float) and not math.isfinite(r["value"]))
           or str(r["value"]).startswith("failed")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
