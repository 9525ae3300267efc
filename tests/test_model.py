"""The model in one process: causal attention, FLOPs counting, vocab padding, CPU compat layer."""

from __future__ import annotations

import pytest
import torch

from conftest import one_process_world
from heft.launcher.config import load_config
from heft.launcher.train.build import build_model
from heft.model.build import Backends, padded_vocab_size, unwrap
from heft.model.flops import flops_per_token


@pytest.fixture(scope="module")
def tiny_model():
    cfg = load_config(None, ["model.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=2"])
    with one_process_world(cfg):
        chunks = build_model(cfg, 257, Backends.detect())
        yield cfg, unwrap(chunks[0])


def test_attention_is_causal(tiny_model):
    _, gpt = tiny_model
    tokens = torch.randint(0, 257, (2, 33), generator=torch.Generator().manual_seed(0))
    def losses(t):
        pos = torch.arange(32).unsqueeze(0).expand(2, -1)
        with torch.no_grad():
            return gpt(t[:, :-1], pos, None, labels=t[:, 1:])
    base = losses(tokens)
    changed = tokens.clone()
    changed[:, 20] = (changed[:, 20] + 1) % 257  # input position 20, label of position 19
    after = losses(changed)
    assert torch.equal(base[:, :19], after[:, :19])
    assert not torch.equal(base[:, 19:], after[:, 19:])


def test_flops_per_token_matches_the_built_model(tiny_model):
    cfg, gpt = tiny_model
    m = cfg.model
    # Every matmul weight does 2 FLOPs per token forward, 6 with backward; the logits use the
    # (tied) embedding matrix; attention adds 2 matmuls of s x h per layer.
    matmul_params = sum(p.numel() for n, p in gpt.named_parameters()
                        if p.dim() == 2 and "word_embeddings" not in n)
    vocab = padded_vocab_size(257, m.make_vocab_size_divisible_by, 1)
    expected = 6 * matmul_params + 6 * vocab * m.hidden_size + 12 * m.num_layers * m.seq_length * m.hidden_size
    got = flops_per_token(m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads,
                          m.num_query_groups, m.seq_length, vocab)
    assert got == pytest.approx(expected, rel=1e-12)


def test_7b_flops_are_about_six_times_parameters():
    # Llama-2-7B: 6.74e9 parameters; at s=4096 attention adds ~16% over 6N.
    got = flops_per_token(32, 4096, 11008, 32, 32, 4096, 32000)
    assert 6 * 6.74e9 * 1.1 < got < 6 * 6.74e9 * 1.25


def test_vocab_padding_does_not_depend_on_tensor_parallel_size():
    assert {padded_vocab_size(257, 128, tp) for tp in (1, 2, 4, 8)} == {384}
    assert padded_vocab_size(50257, 128, 8) == 50304


def test_cpu_compat_maps_cuda_allocations_to_cpu(tiny_model):
    from heft.model import cpu_compat

    assert cpu_compat.is_active() != torch.cuda.is_available()
    if cpu_compat.is_active():
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        assert torch.ones(1, device=torch.cuda.current_device()).device.type == "cpu"
        assert torch.zeros(1).cuda().device.type == "cpu"


def _losses_and_grads(cfg, tokens: torch.Tensor, **train):
    from dataclasses import replace

    cfg = replace(cfg, train=replace(cfg.train, **train))
    gpt = unwrap(build_model(cfg, 257, Backends.detect())[0])
    pos = torch.arange(tokens.shape[1] - 1).unsqueeze(0).expand(tokens.shape[0], -1)
    losses = gpt(tokens[:, :-1], pos, None, labels=tokens[:, 1:])
    losses.mean().backward()
    return losses.detach(), {n: p.main_grad.clone() if hasattr(p, "main_grad") else p.grad.clone()
                             for n, p in gpt.named_parameters()}


def test_sdpa_attention_equals_the_local_spec_on_cpu(tiny_model):
    # Same init (layout-invariant, seeded), same tokens: SDPA's per-token losses and every
    # gradient equal megatron-core's local attention in fp32. Grouped-query (4 heads, 2 groups).
    cfg, _ = tiny_model  # its one-process world is live for the module
    tokens = torch.randint(0, 257, (2, 33), generator=torch.Generator().manual_seed(1))
    local_losses, local_grads = _losses_and_grads(cfg, tokens, attention="local")
    sdpa_losses, sdpa_grads = _losses_and_grads(cfg, tokens, attention="sdpa")
    # Per-token losses reach the loss reduction as [b, s]: nothing fused them away.
    assert sdpa_losses.shape == (2, 32)
    torch.testing.assert_close(sdpa_losses, local_losses, rtol=1e-5, atol=1e-6)
    assert local_grads.keys() == sdpa_grads.keys()
    for name in local_grads:
        torch.testing.assert_close(sdpa_grads[name], local_grads[name], rtol=1e-4, atol=1e-7, msg=name)
    assert any(g.abs().sum() > 0 for g in sdpa_grads.values())


def test_fused_rope_equals_megatron_cores_unfused_rope_on_cpu(tiny_model):
    # heft's torch.compile'd RoPE in megatron-core's fused slot (apply_rope_fusion) against
    # megatron-core's own unfused RoPE: same losses and gradients in fp32, query and key
    # (grouped-query: 4 heads, 2 groups) both rotated.
    from heft.model import rope

    cfg, _ = tiny_model
    tokens = torch.randint(0, 257, (2, 33), generator=torch.Generator().manual_seed(2))
    rope._compiled_rotate = None  # process-wide: forget what earlier tests compiled
    unfused_losses, unfused_grads = _losses_and_grads(cfg, tokens, rope="unfused")
    assert rope._compiled_rotate is None  # the unfused model never called the fused slot
    fused_losses, fused_grads = _losses_and_grads(cfg, tokens, rope="fused")
    assert rope._compiled_rotate is not None  # ... and the fused one did
    torch.testing.assert_close(fused_losses, unfused_losses, rtol=1e-5, atol=1e-6)
    for name in unfused_grads:
        torch.testing.assert_close(fused_grads[name], unfused_grads[name], rtol=1e-4, atol=1e-7, msg=name)


def test_auto_rope_is_fused_on_cuda_only():
    from heft.model.rope import resolve_rope

    assert resolve_rope("auto", cuda=False) == "unfused"
    assert resolve_rope("auto", cuda=True) == "fused"
    assert resolve_rope("fused", cuda=False) == "fused"


def test_auto_attention_keeps_cpu_on_the_local_spec():
    from heft.model.attention import resolve_attention

    assert resolve_attention("auto", cuda=False, transformer_engine=False) == "local"
    assert resolve_attention("auto", cuda=True, transformer_engine=False) == "sdpa"
    assert resolve_attention("auto", cuda=True, transformer_engine=True) == "te"
    assert resolve_attention("sdpa", cuda=False, transformer_engine=False) == "sdpa"


def test_megatron_is_imported_with_its_fusions_compiled_on_first_call():
    """Wrapping megatron-core's fused kernels in torch.compile at import cost each worker 1.1 s."""
    from conftest import python_in_a_fresh_process

    script = ("import sys, torch; real = torch.compile\n"
              "from heft.model.megatron_import import compile_on_first_call, import_megatron\n"
              "import_megatron(); import megatron.core.models.gpt, megatron.core.fusions.fused_bias_swiglu\n"
              "from megatron.core.jit import jit_fuser\n"
              "print(jit_fuser is compile_on_first_call, torch.compile is real, "
              "'torch._inductor.compile_fx' in sys.modules)")
    out = python_in_a_fresh_process(script)
    assert out.split() == ["True", "True", "False"], out


def test_compile_on_first_call_compiles_once_with_the_same_options(monkeypatch):
    from heft.model import megatron_import

    made = []

    def counting_compile(model, **options):  # the eager backend: no Inductor build on CPU
        made.append(options)
        return torch.compile(model, **{**options, "backend": "eager"})

    monkeypatch.setattr(megatron_import, "_real_compile", counting_compile)

    @megatron_import.compile_on_first_call(backend="eager")
    def gelu_of_sum(x, y):
        return torch.nn.functional.gelu(x + y)

    class Scale:  # still binds as a method, as torch.compile's wrapper does
        factor = 3.0

        @megatron_import.compile_on_first_call
        def apply(self, x):
            return x * self.factor

    x, y = torch.randn(4), torch.randn(4)
    assert not made and gelu_of_sum.__name__ == "gelu_of_sum"
    for _ in range(2):
        assert torch.equal(gelu_of_sum(x, y), torch.nn.functional.gelu(x + y))
    assert made == [{"backend": "eager"}]
    assert torch.equal(Scale().apply(x), x * 3.0)
    assert made == [{"backend": "eager"}, {}]
