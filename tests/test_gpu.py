"""What only a CUDA GPU can show: the SDPA attention's loss against the local spec's in bf16, the
fused RoPE and fused AdamW kernels on the device (and resume with them), and a real CUDA out of
memory becoming one line. Skipped without CUDA (CI); run on a GPU machine with
``bash benchmarks/gpu_session.sh`` (docs/performance.md)."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import read_metrics, run_heft

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (benchmarks/gpu_session.sh runs these)")
# One GPU only: the overlapped weight gather across data-parallel ranks is checked on CPU (gloo,
# tests/test_checkpoint.py) and still needs a multi-GPU run.

PARITY_STEPS = 20
BF16_LOSS_RTOL = 2e-2
"""Two attention kernels in bf16 round differently at every step; over 20 steps the losses of
the same init and data drift apart by this much at most."""


@pytest.fixture(scope="module")
def corpus_2048(tmp_path_factory):
    """Byte-level demo documents at seq 2048: enough for 20 steps of 8 sequences."""
    from heft.data.demo_corpus import demo_documents
    from heft.data.prepare import prepare

    out = tmp_path_factory.mktemp("corpus2048") / "data"
    prepare(demo_documents({"code": 800_000, "docs": 400_000, "legal": 400_000}), out,
            tokenizer="byte", seq_length=2048)
    return out


def _run(config, run_dir, *overrides):
    run_heft(["train", str(config), f"train.run_dir={run_dir}", *overrides], timeout=600)
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)}


def test_sdpa_loss_matches_the_local_spec_over_20_steps(corpus_2048, tmp_path):
    """The 1b preset's width (GQA 32/8, head dim 64) at seq 2048, four layers, bf16, same seed
    and data: heft's SDPA core attention against megatron-core's local attention."""
    config = tmp_path / "parity.yaml"
    config.write_text(f"""
model: {{preset: 1b, num_layers: 4}}
data: {{path: {corpus_2048}, num_canonical_nodes: 1}}
train: {{steps: {PARITY_STEPS}, global_batch_size: 8, micro_batch_size: 2, log_interval: 1,
        tensorboard: false, precision: bf16}}
optim: {{lr: 3.0e-4, warmup_steps: 0}}
checkpoint: {{interval: 0}}
""")
    local = _run(config, tmp_path / "local", "train.attention=local")
    sdpa = _run(config, tmp_path / "sdpa", "train.attention=sdpa")
    assert sorted(local) == sorted(sdpa) == list(range(1, PARITY_STEPS + 1))
    assert local[PARITY_STEPS] < local[1] - 0.5  # it trained
    worst = max(abs(sdpa[s] - local[s]) / local[s] for s in local)
    print(f"SDPA vs local over {PARITY_STEPS} steps: worst relative loss difference {worst:.2e}")
    assert worst <= BF16_LOSS_RTOL


@pytest.mark.parametrize("distributed_optimizer", [True, False])
def test_fused_adam_and_rope_resume_on_the_gpu(distributed_optimizer, tiny_train_config, tmp_path):
    """CUDA's defaults (fused AdamW with its step counters on the device, compiled RoPE, SDPA,
    bf16, with the distributed optimizer its overlapped gather) through a stop and a resume, by
    both optimizers' load paths (the plain one keeps a common step in common.pt)."""
    common = ["train.steps=6", "checkpoint.interval=3", f"parallel.distributed_optimizer={distributed_optimizer}"]
    straight = _run(tiny_train_config, tmp_path / "straight", *common)
    _run(tiny_train_config, tmp_path / "resumed", *common, "train.stop_at_step=3")
    resumed = _run(tiny_train_config, tmp_path / "resumed", *common)
    # A step counter lost or shared on resume changes Adam's bias correction by a factor of 2 or
    # more at step 4; what is left is GPU kernels' run-to-run rounding.
    for step in range(4, 7):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-3), step


def test_fused_adam_keeps_its_step_counters_on_the_device(tiny_train_config):
    from conftest import one_process_world
    from heft.data.loader import Batch
    from heft.launcher.config import load_config
    from heft.launcher.train.optim import build_optimizer, torch_adams
    from heft.launcher.train.step import train_step
    from heft.launcher.train.build import build_loss_reduction, build_model
    from heft.model.build import Backends

    cfg = load_config(tiny_train_config, ["model.seq_length=32", "train.global_batch_size=2"])
    with one_process_world(cfg) as layout:
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.utils import get_model_config

        chunks = build_model(cfg, 257, Backends.detect())
        optimizer, scheduler = build_optimizer(cfg, chunks, bf16=True)
        reduction = build_loss_reduction(cfg, layout, ["a"])
        reduction.install(get_model_config(chunks[0]))
        batch = Batch(tokens=torch.randint(0, 257, (2, 33)), domain=torch.zeros(2, dtype=torch.long),
                      index=torch.arange(2))
        result = train_step(get_forward_backward_func(), chunks, optimizer, scheduler, reduction, 1, batch, 2, 32)
        assert result.updated and math.isfinite(result.report.loss)
        inners = torch_adams(optimizer)
        if not inners:
            pytest.skip("megatron-core uses Transformer Engine's or apex's FusedAdam here")
        for inner in inners:
            assert all(group["fused"] for group in inner.param_groups)
            for param, state in inner.state.items():
                assert state["step"].device == param.device and state["step"].item() == 1.0


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_fused_rope_equals_megatron_cores_unfused_rope(dtype, rtol):
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from heft.model.rope import fused_apply_rotary_pos_emb

    g = torch.Generator(device="cuda").manual_seed(0)
    t = torch.randn(2048, 2, 16, 128, device="cuda", generator=g).to(dtype).requires_grad_()
    freqs = torch.rand(2048, 1, 1, 128, device="cuda", generator=g) * 100
    grad = torch.randn(t.shape, device="cuda", generator=g).to(dtype)
    ref = _apply_rotary_pos_emb_bshd(t.float(), freqs)
    (ref_grad,) = torch.autograd.grad(ref, t, grad.float())
    out = fused_apply_rotary_pos_emb(t, freqs)
    (out_grad,) = torch.autograd.grad(out, t, grad)
    for got, want in ((out, ref), (out_grad, ref_grad)):
        assert torch.isfinite(got).all()
        assert ((got.float() - want).norm() / want.norm()).item() <= rtol


def test_a_cuda_out_of_memory_is_one_line(tmp_path, corpus_2048):
    """A 7b-width model whose micro batch cannot fit: one line naming the phase, the memory and
    what to change, not a traceback or NCCL's 'unhandled cuda error'."""
    total_gib = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
    layers = 8 if total_gib < 100 else 16  # weights and Adam fit; a micro batch of 32 does not
    proc = run_heft(["train", "configs/7b.yaml", f"data.path={corpus_2048}", f"train.run_dir={tmp_path / 'run'}",
                     "parallel.tensor=1", "parallel.pipeline=1", "parallel.virtual_pipeline=null",
                     f"model.num_layers={layers}", "model.seq_length=2048", "train.micro_batch_size=32",
                     "train.global_batch_size=32", "train.recompute=none", "train.steps=2"],
                    timeout=600, check=False)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if "out of memory" in line.lower()]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "step 1" in lines[0] and "micro_batch_size" in lines[0] and "GiB" in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
