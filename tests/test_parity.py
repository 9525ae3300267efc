"""Parallel layouts against the single-process reference: same init, same batches, 3 steps.

Each run is heft's real training loop in torchrun processes on gloo (the conftest fixture
``layout_runs`` trains every layout of a world size in one torchrun job). Losses and gradient norms
of every step must equal the TP1/PP1/DP1 run within 1e-5 relative. Steps 2 and 3 depend on the
weights the previous updates produced, so the weights are compared through them too.
"""

from __future__ import annotations

import pytest

from conftest import PARITY_LAYOUTS, read_metrics

RTOL = 1e-5


@pytest.mark.parametrize("name", list(PARITY_LAYOUTS))
def test_layout_matches_single_process(name, layout_runs):
    reference = read_metrics(layout_runs["parity/reference"])
    records = read_metrics(layout_runs[f"parity/{name}"])
    assert [r["step"] for r in reference] == [1, 2, 3]
    assert [r["step"] for r in records] == [1, 2, 3]
    for ref, got in zip(reference, records):
        assert got["loss"] == pytest.approx(ref["loss"], rel=RTOL), f"{name} step {ref['step']} loss"
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=RTOL), f"{name} step {ref['step']} grad norm"
    # The reference must actually train: a silent no-op would make every layout "agree".
    assert reference[0]["loss"] != reference[2]["loss"]
