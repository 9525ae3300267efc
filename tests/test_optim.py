"""The AdamW kernel choice (optim.adam_impl) on megatron-core's optimizer, in one process."""

from __future__ import annotations

import dataclasses

import torch

from conftest import one_process_world
from heft.launcher.config import OptimConfig, load_config
from heft.launcher.config import adam_impl
from heft.launcher.train.optim import build_optimizer, settle_adam_state, torch_adams
from heft.launcher.train.build import build_model
from heft.model.build import Backends


def test_auto_is_fused_on_cuda_and_foreach_on_cpu():
    assert adam_impl(OptimConfig(), cuda=True) == "fused"
    assert adam_impl(OptimConfig(), cuda=False) == "foreach"
    assert adam_impl(OptimConfig(adam_impl="fused"), cuda=False) == "fused"


def test_adam_impl_sets_the_kernel_and_gives_each_parameter_its_own_step():
    cfg = load_config(None, ["model.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=2"])
    with one_process_world(cfg):
        chunks = build_model(cfg, 257, Backends.detect())
        for impl in ("fused", "foreach"):
            chosen = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, adam_impl=impl))
            optimizer, _ = build_optimizer(chosen, chunks, bf16=False)
            inners = torch_adams(optimizer)
            assert inners  # megatron-core fell back to torch's AdamW (no TE/apex here)
            for inner in inners:
                for group in [*inner.param_groups, inner.defaults]:
                    assert (group["fused"], group["foreach"]) == (impl == "fused", impl == "foreach")
        # megatron-core's load gives every parameter the same step tensor; torch increments it in
        # place, so shared it would advance once per parameter per step.
        shared = torch.tensor(3.0, dtype=torch.float64)
        params = [p for inner in inners for group in inner.param_groups for p in group["params"]]
        for inner in inners:
            for group in inner.param_groups:
                for param in group["params"]:
                    inner.state[param]["step"] = shared
        settle_adam_state(optimizer, "fused")
        steps = [inner.state[p]["step"] for inner in inners for g in inner.param_groups for p in g["params"]]
        assert len({id(step) for step in steps}) == len(params) > 1
        for param, step in zip(params, steps):
            assert step.item() == 3.0 and step.dtype == torch.float32 and step.device == param.device
        assert all(g["fused"] for inner in inners for g in inner.param_groups)
