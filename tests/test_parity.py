"""Parallel layouts against the single-process reference: same init, same batches, 3 steps.

Each run is a real `heft train` over torchrun with gloo. Losses and gradient norms of every step
must equal the TP1/PP1/DP1 run within 1e-5 relative. Steps 2 and 3 depend on the weights the
previous updates produced, so the weights are compared through them too.
"""

from __future__ import annotations

import pytest

from conftest import read_metrics, run_heft

LAYOUTS = {
    "tp2_pp2": ["parallel.tensor=2", "parallel.pipeline=2", "parallel.data=1"],
    "tp2_dp2": ["parallel.tensor=2", "parallel.data=2"],
    "pp2_dp2": ["parallel.pipeline=2", "parallel.data=2"],
    "pp2_vpp2_dp2": ["parallel.pipeline=2", "parallel.virtual_pipeline=2", "parallel.data=2"],
    "dp4_distributed_optimizer": ["parallel.data=4", "parallel.distributed_optimizer=true"],
    # torch SDPA core attention (CUDA's default without Transformer Engine) under TP and PP, with
    # grouped-query heads split over TP, against the local attention's single process.
    "tp2_pp2_sdpa": ["parallel.tensor=2", "parallel.pipeline=2", "parallel.data=1", "train.attention=sdpa"],
}
RTOL = 1e-5


def _run(tiny_train_config, tmp_path, name, layout):
    run_dir = tmp_path / name
    run_heft(["train", str(tiny_train_config), f"train.run_dir={run_dir}", *layout])
    return read_metrics(run_dir)


@pytest.fixture(scope="module")
def reference(tiny_train_config, tmp_path_factory):
    records = _run(tiny_train_config, tmp_path_factory.mktemp("ref"), "ref", ["parallel.data=1"])
    assert [r["step"] for r in records] == [1, 2, 3]
    return records


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name, reference, tiny_train_config, tmp_path):
    records = _run(tiny_train_config, tmp_path, name, LAYOUTS[name])
    assert [r["step"] for r in records] == [1, 2, 3]
    for ref, got in zip(reference, records):
        assert got["loss"] == pytest.approx(ref["loss"], rel=RTOL), f"{name} step {ref['step']} loss"
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=RTOL), f"{name} step {ref['step']} grad norm"
    # The reference must actually train: a silent no-op would make every layout "agree".
    assert reference[0]["loss"] != reference[2]["loss"]
