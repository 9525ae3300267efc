"""`heft plan`: per-GPU memory and FLOPs of a layout (its estimate against a measured peak is
checked by test_benchmarks.py, on the benchmark suite's memory case)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from heft.launcher.cli import main
from heft.model.config import ModelConfig, ParallelConfig
from heft.model.memory import Workload, estimate
from heft.model.presets import apply_preset

REPO = Path(__file__).resolve().parents[1]


def test_plan_reports_each_part_and_the_largest_micro_batch(capsys):
    assert main(["plan", str(REPO / "configs/1b.yaml"), "--gpu-memory", "80", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    for part in ("weights", "gradients", "optimizer", "activations", "total", "FLOPs per step"):
        assert part in out
    assert "TP2 PP1 DP4 on 8 GPUs" in out and "sdpa attention" in out and "fits." in out


def test_a_layout_that_does_not_fit_says_what_to_change(capsys):
    # The 1B model at micro batch 4 with megatron-core's local attention ran out of memory on an
    # 80 GB H100 (docs/benchmarks.md); micro batch 2 ran.
    args = ["plan", str(REPO / "configs/1b.yaml"), "--gpu-memory", "80", "--gpus", "1", "parallel.tensor=1",
            "train.global_batch_size=16", "train.attention=local"]
    assert main([*args, "train.micro_batch_size=4"]) == 1
    assert "does not fit: set train.micro_batch_size=2" in capsys.readouterr().out
    assert main([*args, "train.micro_batch_size=2"]) == 0


def test_bad_plan_arguments_are_one_line(capsys):
    assert main(["plan", str(REPO / "configs/1b.yaml"), "--gpu-memory", "0"]) == 2
    assert main(["plan", str(REPO / "configs/1b.yaml"), "--gpus", "3"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and "--gpu-memory must be > 0" in errors[0] and "not divisible" in errors[1]


def _model(preset: str) -> ModelConfig:
    model = ModelConfig(preset=preset)
    apply_preset(model)
    return model


def test_sharding_recompute_and_pipeline_move_the_estimate_the_right_way():
    m = _model("7b")
    work = Workload(micro_batch_size=1, global_batch_size=64, data_parallel=8, vocab_size=32000, bf16=True)
    plain = estimate(m, ParallelConfig(tensor=1), work)
    sharded = estimate(m, ParallelConfig(tensor=1, distributed_optimizer=True), work)
    assert sharded.optimizer == pytest.approx(plain.optimizer / 8)
    full = estimate(m, ParallelConfig(tensor=1), Workload(**{**work.__dict__, "recompute": "full"}))
    assert full.activations < plain.activations / 5
    pp = estimate(m, ParallelConfig(tensor=1, pipeline=4), work)
    assert pp.microbatches_in_flight == 4 and pp.weights < plain.weights / 3


def test_foreach_adams_temporary_counts_when_it_outgrows_the_activations(capsys, tmp_path):
    # The 7b width with 18 layers on byte-level data: `heft plan` said it fits an 80 GB H100 (79.2
    # GiB to torch), and torch's foreach AdamW then ran out of memory taking the square root of all
    # second moments (13.6 GiB; docs/benchmarks.md).
    (tmp_path / "manifest.json").write_text(json.dumps({"tokenizer": {"vocab_size": 257}}))
    args = ["plan", str(REPO / "configs/7b.yaml"), "--gpu-memory", "79.2", "--gpus", "1", "parallel.tensor=1",
            "parallel.pipeline=1", "parallel.virtual_pipeline=null", "model.seq_length=2048",
            "model.num_layers=18", "train.micro_batch_size=1", "train.global_batch_size=16",
            "train.recompute=none", f"data.path={tmp_path}"]
    assert main([*args, "optim.adam_impl=foreach"]) == 1
    out = capsys.readouterr().out
    assert "foreach AdamW's copy of the second moments" in out
    assert "does not fit: even micro batch 1 does not fit; try optim.adam_impl=fused" in out
    assert "recompute" not in out.splitlines()[-3]  # it would not lower the peak
    assert main([*args, "optim.adam_impl=fused"]) == 0  # fused AdamW allocates no temporary
    m, work = _model("7b"), Workload(micro_batch_size=1, global_batch_size=16, data_parallel=2, vocab_size=32000,
                                     bf16=True, adam_impl="foreach")
    sharded = estimate(m, ParallelConfig(tensor=1, distributed_optimizer=True), work)
    assert sharded.optimizer_step == pytest.approx(sharded.gradients / 2)  # 4 B per parameter of the shard
    assert sharded.total == pytest.approx(sharded.weights + sharded.gradients + sharded.optimizer
                                          + max(sharded.activations, sharded.optimizer_step))


def test_a_model_state_too_large_for_the_gpu_asks_for_more_gpus(capsys):
    # The whole 7b on one 80 GB GPU: weights, gradients and Adam alone are 113 GiB, so neither the
    # micro batch nor recompute can help, and TP2 needs two GPUs.
    assert main(["plan", str(REPO / "configs/7b.yaml"), "--gpus", "1", "--gpu-memory", "80", "parallel.tensor=1",
                 "parallel.pipeline=1", "parallel.virtual_pipeline=null"]) == 1
    verdict = capsys.readouterr().out.splitlines()[-3]
    assert verdict.startswith("does not fit: the model state alone") and "GiB" in verdict
    assert "--gpus 2 with parallel.tensor=2 or parallel.pipeline=2" in verdict and "recompute" not in verdict
