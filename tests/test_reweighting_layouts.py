"""Reweighting is exact under every parallel layout (heft's training loop in real torchrun
processes on gloo; the conftest fixture ``layout_runs`` trains each world size's layouts in one job).

Per-sample weights are compared keyed by the sample's identity (domain, index), so a weight
attached to the wrong sample -- e.g. weights sliced by the wrong rank, the public implementations'
LOCAL_RANK bug -- fails here even where the sorted sets of weights would agree. The reweighting
settings and why r = 1.0: conftest.REWEIGHT.
"""

from __future__ import annotations

import json

import pytest

from conftest import REWEIGHT_GLOBAL_LAYOUTS, read_metrics

RTOL = 1e-5


def results(run_dir):
    weights = {}
    for path in (run_dir / "sample_weights").glob("rank*.jsonl"):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            key = (row["step"], row["domain"], row["index"])
            assert key not in weights, f"sample {key} reported twice"
            weights[key] = (row["loss"], row["weight"])
    return read_metrics(run_dir), weights


def assert_same(reference, other, name):
    ref_metrics, ref_weights = reference
    metrics, weights = other
    assert set(weights) == set(ref_weights), f"{name}: different samples"
    for key, (loss, weight) in ref_weights.items():
        assert weights[key][0] == pytest.approx(loss, rel=RTOL), f"{name}: loss of sample {key}"
        assert weights[key][1] == pytest.approx(weight, rel=RTOL), f"{name}: weight of sample {key}"
    assert len(metrics) == len(ref_metrics) == 3
    for a, b in zip(ref_metrics, metrics):
        for field in ("loss", "weighted_loss", "grad_norm", "weight_min", "weight_max", "ess_fraction"):
            assert b[field] == pytest.approx(a[field], rel=RTOL), f"{name}: step {a['step']} {field}"


def test_the_reference_is_really_reweighted(layout_runs):
    metrics, weights = results(layout_runs["reweight/reference"])
    assert len(weights) == 3 * 8
    # Step 1 has no previous statistics (uniform); steps 2 and 3 are really reweighted.
    assert metrics[0]["weight_min"] == pytest.approx(1) and metrics[0]["weight_max"] == pytest.approx(1)
    assert metrics[2]["weight_max"] / metrics[2]["weight_min"] > 1.3


@pytest.mark.parametrize("name", list(REWEIGHT_GLOBAL_LAYOUTS))
def test_global_scope_is_layout_invariant(name, layout_runs):
    assert_same(results(layout_runs["reweight/reference"]), results(layout_runs[f"reweight/global/{name}"]), name)


def test_microbatch_scope_matches_between_equal_dp_layouts(layout_runs):
    dp2 = results(layout_runs["reweight/microbatch/dp2"])
    for name in ("tp2_dp2", "pp2_dp2"):
        assert_same(dp2, results(layout_runs[f"reweight/microbatch/{name}"]), name)
    # Per-microbatch statistics really are per microbatch: weights are reweighted from step 1,
    # and each microbatch (2 samples x 2 replicas) normalises to a mean weight of 1.
    metrics, weights = dp2
    assert metrics[0]["weight_max"] > 1.02
    assert metrics[0]["weight_mean"] == pytest.approx(1)
