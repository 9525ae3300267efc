"""Reweighting telemetry in metrics.jsonl and TensorBoard, and the non-finite loss policy."""

from __future__ import annotations

import pytest

from conftest import read_metrics, run_heft


def test_weight_telemetry_and_histogram(layout_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = layout_runs["telemetry/linupper_dp2"]  # DP2, 4 steps, linupper at r = 0.5, TensorBoard on
    records = read_metrics(run_dir)
    # Step 3: reweighted from step 2's statistics (step 1 is uniform in the global scope).
    last = records[2]
    for key in ("weight_min", "weight_max", "weight_mean", "ess_fraction", "temperature", "weighted_loss"):
        assert key in last
    assert last["weight_mean"] == pytest.approx(1.0)
    assert 0 < last["ess_fraction"] < 1 and last["weight_min"] < 1 < last["weight_max"]
    assert last["temperature"] == 0.5
    # Per-domain mean weight, averaged with the domains' sample fractions, is the overall mean.
    domains = ("code", "docs", "legal")
    mix = sum(last[f"domain_{d}_weight"] * last[f"domain_{d}_fraction"] for d in domains if f"domain_{d}_weight" in last)
    assert mix == pytest.approx(last["weight_mean"])
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"histograms": 0})
    events.Reload()
    histograms = events.Histograms("reweight/sample_weight")
    assert [h.step for h in histograms] == [1, 2, 3, 4]
    final = histograms[2].histogram_value
    assert final.num == 8 and final.min == pytest.approx(last["weight_min"]) and final.max == pytest.approx(last["weight_max"])
    assert [e.value for e in events.Scalars("train/ess_fraction")][2] == pytest.approx(last["ess_fraction"])


def test_skip_policy_counts_skipped_steps_then_stops(tiny_train_config, tmp_path):
    proc = run_heft(["train", str(tiny_train_config), f"train.run_dir={tmp_path / 'run'}", "train.steps=8",
                     "optim.lr=1e30", "optim.min_lr=0", "optim.clip_grad=0", "train.on_nonfinite_loss=skip",
                     "train.max_consecutive_skips=3", "reweight.strategy=linupper"], check=False)
    assert proc.returncode != 0
    assert "heft: skipping step" in proc.stdout
    assert "3 consecutive steps skipped" in proc.stderr
    assert "NaN/inf" in proc.stderr or "gradient norm is nan" in proc.stderr
