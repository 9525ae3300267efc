"""The benchmark suite's reduced CPU run, so that it cannot rot (numbers belong in docs/)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_run_all_quick_prints_one_table_and_json(tmp_path):
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks/run_all.py"), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())
    metrics = {(r["benchmark"], r["metric"]) for r in rows}
    for expected in [("step vs bare megatron-core", "heft / bare"), ("step time split", "forward/backward ms"),
                     ("step time split", "data wait ms"), ("step time split", "optimizer ms"),
                     ("reweighting overhead (CPU)", "linupper_global / none"), ("heft plan memory", "error")]:
        assert expected in metrics
    for r in rows:
        if r["benchmark"] == "GPU throughput":
            assert r["value"] == "skipped: no CUDA"
        elif r["metric"] != "error":
            assert isinstance(r["value"], float) and math.isfinite(r["value"]) and r["value"] > 0, r
    assert "heft / bare" in done.stdout  # the table itself
