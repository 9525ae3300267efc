"""`make demo` itself, shortened: builds the embedded corpus, trains on 4 processes, loss falls."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, heft_env, read_metrics


def test_make_demo_trains_and_loss_falls(tmp_path):
    data, run = tmp_path / "demo_data", tmp_path / "run"
    proc = subprocess.run(
        ["make", "demo", f"DEMO_DATA={data}",
         f"DEMO_ARGS=train.steps=40 train.log_interval=20 reweight.warmup_steps=25 train.run_dir={run}"],
        cwd=REPO, env=heft_env(), capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = json.loads((data / "manifest.json").read_text())
    assert [d["name"] for d in manifest["domains"]] == ["code", "docs", "legal"]
    records = read_metrics(run)
    assert [r["step"] for r in records] == [20, 40]
    assert records[-1]["loss"] < records[0]["loss"] - 0.4, records  # measured 3.98 -> 3.39
    assert "step     40 | loss" in proc.stdout  # the console line
    # linupper switches on after the warm-up and reports its weights.
    assert records[0]["reweighting_active"] == 0 and records[-1]["reweighting_active"] == 1
    assert records[-1]["weight_min"] < 1 < records[-1]["weight_max"]
    last = records[-1]
    present = [d for d in ("code", "docs", "legal") if last.get(f"domain_{d}_fraction", 0) > 0]
    assert len(present) >= 2 and "ess_fraction" in last  # a weight for every domain in the batch
    assert {f"domain_{d}_weight" for d in present} <= set(last)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    # Quiet, clear output: the banner, the step lines, the summary, and no library warnings.
    out = proc.stdout + proc.stderr
    assert "heft | model tiny:" in out and "layout TP2 PP1 CP1 DP2 = 4 processes" in out
    assert "heft | done: 40 steps" in out and f"tensorboard --logdir {run / 'tensorboard'}" in out
    noise = [line for line in out.splitlines()
             if "Warning" in line or "warnings.warn" in line or line.startswith(("W1", "I1", "[rank"))]
    assert not noise, noise

    # heft plot: a PNG a person can look at.
    import matplotlib.image

    plotted = subprocess.run([sys.executable, "-m", "heft.launcher.cli", "plot", str(run)], env=heft_env(),
                             capture_output=True, text=True, timeout=120)
    assert plotted.returncode == 0, plotted.stderr
    image = matplotlib.image.imread(run / "plots.png")
    assert image.shape[:2] == (1200, 1200)  # 3 x 2 panels
    assert image[..., :3].std() > 0.05  # not a blank canvas
