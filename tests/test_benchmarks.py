"""The benchmark suite's reduced CPU run, so that it cannot rot (numbers belong in docs/)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_run_all_quick_prints_one_table_and_json(tmp_path):
    out = tmp_path / "rows.json"
    # The CPU run everywhere: on a GPU machine the CUDA rows would take minutes.
    done = subprocess.run([sys.executable, str(REPO / "benchmarks/run_all.py"), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())
    metrics = {(r["benchmark"], r["metric"]) for r in rows}
    for expected in [("step vs bare megatron-core", "heft / bare"), ("step vs bare megatron-core", "bare step ms"),
                     ("step time split", "forward/backward ms"), ("step time split", "data wait ms"),
                     ("step time split", "loss reduction ms"), ("step time split", "optimizer ms"),
                     ("step time split", "logging ms"), ("reweighting overhead (CPU)", "linupper_global / none"),
                     ("reweighting overhead (CPU)", "A/A control ratio"), ("heft plan memory", "error")]:
        assert expected in metrics, expected
    gpu = [r for r in rows if r["benchmark"] == "GPU throughput"]
    assert {r["case"] for r in gpu} == {"1b", "1.4b", "7b width"}
    for r in rows:
        if r["benchmark"] == "GPU throughput":
            assert r["value"] == "skipped: no CUDA"
        elif r["metric"] == "error":  # the plan's relative error: finite, either sign
            assert math.isfinite(r["value"]), r
        else:
            assert isinstance(r["value"], float) and math.isfinite(r["value"]) and r["value"] > 0, r
    # `heft plan`'s memory estimate against the measured peak of real training steps in a fresh
    # process (memory_plan.py's local_fp32 case): the resident memory they add is a real model,
    # optimizer and activations, and the estimate is within 15% of it.
    memory = {r["metric"]: r["value"] for r in rows if r["benchmark"] == "heft plan memory"}
    assert memory["measured MiB"] > 300
    assert abs(memory["error"]) <= 0.15, memory
    assert "heft / bare" in done.stdout  # the table itself
    assert "MFU = tokens/s x FLOPs per token" in done.stdout  # the formula the CUDA rows use
