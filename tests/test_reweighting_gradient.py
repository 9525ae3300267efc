"""The reweighted step's parameter gradient equals autograd of sum_i w_i l_i computed directly.

One process, the tiny model. heft's path: megatron-core's schedule over two microbatches, the
reduction's loss function and its finalize (division by the global weight sum). The reference:
one forward of the whole batch through the same module, per-sample losses, weights from the
spec's formulas in NumPy, and torch.autograd on sum_i w_i l_i.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import one_process_world
from heft.data.loader import Batch
from heft.launcher.config import load_config


@pytest.fixture(scope="module")
def setup():
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_model_config

    from heft.launcher.train.build import build_loss_reduction, build_model
    from heft.model.build import Backends, unwrap

    cfg = load_config(None, ["model.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=4",
                             "parallel.overlap_grad_reduce=false", "reweight.strategy=linupper",
                             "reweight.temperature=0.5"])
    with one_process_world(cfg) as layout:
        chunks = build_model(cfg, 257, Backends.detect())
        reduction = build_loss_reduction(cfg, layout, ["a", "b"])
        reduction.install(get_model_config(chunks[0]))
        yield cfg, chunks[0], unwrap(chunks[0]), reduction, get_forward_backward_func()


def assert_grads_close(got: dict, want: dict, rtol: float = 1e-5):
    """Per parameter: ||got - want|| <= rtol * ||want|| (float32 noise is relative to the tensor)."""
    for name, ref in want.items():
        error = (got[name] - ref).norm().item()
        assert error <= rtol * ref.norm().item(), f"{name}: relative error {error / ref.norm().item():.2e}"


def _grads(gpt):
    return {n: p.main_grad.detach().clone() for n, p in gpt.named_parameters()}


def test_parameter_gradient_is_that_of_the_weighted_loss(setup):
    from heft.launcher.train.step import make_forward_step

    cfg, ddp, gpt, reduction, forward_backward = setup
    tokens = torch.randint(0, 257, (4, 33), generator=torch.Generator().manual_seed(3))
    batch = Batch(tokens=tokens, domain=torch.tensor([0, 1, 0, 1]), index=torch.arange(4))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    pos = torch.arange(32).unsqueeze(0).expand(4, -1)

    with torch.no_grad():
        losses = gpt(inputs, pos, None, labels=labels).mean(dim=1).double().numpy()
    lo, hi = float(losses.min()) + 0.01, float(losses.max()) - 0.01  # "previous step" statistics
    reduction.lagged_minmax = (lo, hi)

    # heft: the schedule over 2 microbatches, weights inside the loss reduction.
    ddp.zero_grad_buffer()
    reduction.begin_step(2)
    forward_backward(forward_step_func=make_forward_step(reduction), data_iterator=iter(batch.microbatches(2)),
                     model=ddp, num_microbatches=2, seq_length=32, micro_batch_size=2, forward_only=False)
    heft_grads = _grads(gpt)

    # Reference: NumPy weights from the spec, autograd of sum_i w_i l_i over the whole batch.
    span = hi - lo
    h = np.clip(2 * losses / span - (hi + lo) / span, -1, 1)
    e = np.exp(np.minimum(h + 1, 1) / 0.5)
    w = torch.tensor(e / e.sum())
    assert w.max() / w.min() > 1.2  # the weights are far from uniform
    ddp.zero_grad_buffer()
    per_sample = gpt(inputs, pos, None, labels=labels).float().mean(dim=1)
    (w.float() * per_sample).sum().backward()
    reference = _grads(gpt)

    assert_grads_close(heft_grads, reference)
    assert any(ref.abs().sum() > 0 for ref in reference.values())


def test_large_temperature_gives_the_plain_mean_gradient(setup):
    from heft.launcher.train.step import make_forward_step

    cfg, ddp, gpt, reduction, forward_backward = setup
    tokens = torch.randint(0, 257, (4, 33), generator=torch.Generator().manual_seed(4))
    batch = Batch(tokens=tokens, domain=torch.zeros(4, dtype=torch.long), index=torch.arange(4))
    reduction.lagged_minmax = (1.0, 6.0)
    reduction.cfg.temperature = 1e9
    ddp.zero_grad_buffer()
    reduction.begin_step(2)
    forward_backward(forward_step_func=make_forward_step(reduction), data_iterator=iter(batch.microbatches(2)),
                     model=ddp, num_microbatches=2, seq_length=32, micro_batch_size=2, forward_only=False)
    heft_grads = _grads(gpt)
    ddp.zero_grad_buffer()
    pos = torch.arange(32).unsqueeze(0).expand(4, -1)
    gpt(tokens[:, :-1], pos, None, labels=tokens[:, 1:]).float().mean().backward()
    assert_grads_close(heft_grads, _grads(gpt))
