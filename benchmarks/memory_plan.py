"""`heft plan`'s memory estimate against the measured peak of real training steps.

    python benchmarks/memory_plan.py [--case NAME ...]

Each case runs in its own process: one gloo rank, heft's own model, optimizer and loss reduction,
three real training steps (Adam's state exists from the first), on random tokens. The measured
figure is the peak resident memory minus the resident memory just before the model was built
(imports, torch and the process group excluded, as the estimate excludes them). On a GPU the same
comparison uses ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import subprocess
import sys

CASES = {
    # name: overrides (one process). Wide enough that the estimate dwarfs allocator noise.
    "local_fp32": ["model.num_layers=4", "model.hidden_size=512", "model.num_attention_heads=8",
                   "model.num_query_groups=2", "model.ffn_hidden_size=1536", "model.seq_length=256",
                   "train.micro_batch_size=4", "train.global_batch_size=8", "train.attention=local"],
    "sdpa_fp32_selective": ["model.num_layers=4", "model.hidden_size=512", "model.num_attention_heads=8",
                            "model.num_query_groups=2", "model.ffn_hidden_size=1536",
                            "model.seq_length=256", "train.micro_batch_size=8",
                            "train.global_batch_size=8", "train.attention=sdpa",
                            "train.recompute=selective"],
}
VOCAB = 256


def measure(overrides: list[str]) -> dict:
    """Run the steps in this process; return the estimate and the measured peak, in bytes."""
    import threading

    import psutil
    import torch

    from heft.launcher.config import load_config
    from heft.launcher.preflight.plan import workload_for
    from heft.launcher.train.build import start_processes
    from heft.model import cpu_compat
    from heft.model.build import Backends, padded_vocab_size
    from heft.model.memory import estimate

    cfg = load_config(None, overrides)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cpu_compat.enable_if_no_cuda()
    layout = start_processes(cfg)
    backends = Backends.detect()
    # A few steps of a small model of the same kind first: the kernels' code pages, lazily
    # imported modules and the allocator's bookkeeping then count in the baseline, not the peak.
    small = load_config(None, [*overrides, "model.hidden_size=64", "model.ffn_hidden_size=64",
                                "model.num_layers=1", "model.seq_length=16"])
    _steps(small, layout, backends)
    gc.collect()
    process = psutil.Process()
    before, peak, done = process.memory_info().rss, [0], threading.Event()

    def sample() -> None:  # resident memory every 2 ms: the peak of this run alone
        while not done.wait(0.002):
            peak[0] = max(peak[0], process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    if backends.cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        sampler.start()
    _steps(cfg, layout, backends)
    done.set()
    if backends.cuda:
        measured = torch.cuda.max_memory_allocated() - before
    else:
        sampler.join()
        measured = peak[0] - before
    m = cfg.model
    vocab = padded_vocab_size(VOCAB, m.make_vocab_size_divisible_by, 1)
    planned = estimate(m, cfg.parallel, workload_for(cfg, vocab, data_parallel=1, cuda=backends.cuda))
    return {"estimate": planned.total, "measured": measured, "weights": planned.weights,
            "gradients": planned.gradients, "optimizer": planned.optimizer,
            "activations": planned.activations}


def _steps(cfg, layout, backends) -> None:
    """Three real training steps of ``cfg``'s model on random tokens (Adam's state exists from the
    first); everything is freed on return."""
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_model_config

    from heft.data.loader import Batch
    from heft.launcher.train.optim import build_optimizer
    from heft.launcher.train.step import train_step
    from heft.launcher.train.build import build_loss_reduction, build_model

    chunks = build_model(cfg, VOCAB, backends)
    optimizer, scheduler = build_optimizer(cfg, chunks, bf16=backends.cuda)
    reduction = build_loss_reduction(cfg, layout, ["all"])
    reduction.install(get_model_config(chunks[0]))
    t, m = cfg.train, cfg.model
    generator = torch.Generator().manual_seed(0)
    for step in range(1, 4):
        batch = Batch(torch.randint(0, VOCAB, (t.global_batch_size, m.seq_length + 1), generator=generator),
                      torch.zeros(t.global_batch_size, dtype=torch.long),
                      torch.arange(t.global_batch_size))
        train_step(get_forward_backward_func(), chunks, optimizer, scheduler, reduction, step, batch,
                   t.micro_batch_size, m.seq_length)


def run_case(name: str) -> dict:
    """One case in a fresh process, so that its peak is its own."""
    # Large blocks straight from mmap, returned at free: resident memory then follows live tensors
    # instead of glibc's arenas.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run([sys.executable, __file__, "--child", name], capture_output=True, text=True,
                          timeout=900, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"case {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", choices=list(CASES))
    parser.add_argument("--json", action="store_true", help="print the results as one JSON line")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(CASES[args.child])))
        return
    results = {name: run_case(name) for name in args.case or list(CASES)}
    if args.json:
        print(json.dumps(results))
        return
    mib = 1024 ** 2
    print(f"{'case':22} {'estimate MiB':>13} {'measured MiB':>13} {'error':>7}")
    for name, r in results.items():
        print(f"{name:22} {r['estimate'] / mib:13.0f} {r['measured'] / mib:13.0f} "
              f"{r['estimate'] / r['measured'] - 1:+7.1%}")


if __name__ == "__main__":
    main()
