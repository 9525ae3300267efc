"""Reweighting is exact under every parallel layout (real torchrun processes, gloo).

Per-sample weights are compared keyed by the sample's identity (domain, index), so a weight
attached to the wrong sample -- e.g. weights sliced by the wrong rank, the public implementations'
LOCAL_RANK bug -- fails here even where the sorted sets of weights would agree.
"""

from __future__ import annotations

import json

import pytest

from conftest import read_metrics, run_heft

# r = 1.0 (one of the paper's two settings). Per-sample losses of two layouts differ by float
# reordering (~1e-7 relative), and min-max normalisation amplifies that by about 2d/(r*span), span
# being the loss range of the batch; at r = 0.4 on this 4-layer model's early, narrow loss range the
# weights agree to ~5e-6 only, too close to 1e-5 for a test (docs/reweighting.md has the numbers).
REWEIGHT = ["reweight.strategy=linupper", "reweight.temperature=1.0", "reweight.log_sample_weights=true"]
RTOL = 1e-5


def run(config, run_dir, *overrides):
    run_heft(["train", str(config), f"train.run_dir={run_dir}", *REWEIGHT, *overrides])
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
    for a, b in zip(ref_metrics, metrics):
        for field in ("loss", "weighted_loss", "grad_norm", "weight_min", "weight_max", "ess_fraction"):
            assert b[field] == pytest.approx(a[field], rel=RTOL), f"{name}: step {a['step']} {field}"


GLOBAL_LAYOUTS = {
    "dp4": ["parallel.data=4"],
    "tp2_dp2": ["parallel.tensor=2", "parallel.data=2"],
    "pp2_dp2": ["parallel.pipeline=2", "parallel.data=2"],
    "tp2_pp2_dp1": ["parallel.tensor=2", "parallel.pipeline=2", "parallel.data=1"],
}


@pytest.fixture(scope="module")
def global_reference(tiny_train_config, tmp_path_factory):
    ref = run(tiny_train_config, tmp_path_factory.mktemp("gref"), "parallel.data=1")
    metrics, weights = ref
    assert len(weights) == 3 * 8
    # Step 1 has no previous statistics (uniform); steps 2 and 3 are really reweighted.
    assert metrics[0]["weight_min"] == pytest.approx(1) and metrics[0]["weight_max"] == pytest.approx(1)
    assert metrics[2]["weight_max"] / metrics[2]["weight_min"] > 1.3
    return ref


@pytest.mark.parametrize("name", list(GLOBAL_LAYOUTS))
def test_global_scope_is_layout_invariant(name, global_reference, tiny_train_config, tmp_path):
    assert_same(global_reference, run(tiny_train_config, tmp_path, *GLOBAL_LAYOUTS[name]), name)


def test_microbatch_scope_matches_between_equal_dp_layouts(tiny_train_config, tmp_path):
    scope = "reweight.scope=microbatch"
    dp2 = run(tiny_train_config, tmp_path / "dp2", scope, "parallel.data=2")
    for name, layout in {"tp2_dp2": ["parallel.tensor=2", "parallel.data=2"],
                         "pp2_dp2": ["parallel.pipeline=2", "parallel.data=2"]}.items():
        assert_same(dp2, run(tiny_train_config, tmp_path / name, scope, *layout), name)
    # Per-microbatch statistics really are per microbatch: weights are reweighted from step 1,
    # and each microbatch (2 samples x 2 replicas) normalises to a mean weight of 1.
    metrics, weights = dp2
    assert metrics[0]["weight_max"] > 1.02
    assert metrics[0]["weight_mean"] == pytest.approx(1)
