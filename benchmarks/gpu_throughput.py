"""Tokens/s and MFU on one GPU, reweighting off and on, measured A/B interleaved in one process.

    python benchmarks/gpu_throughput.py [--case 1b ...] [--rounds 6]

One torchrun job per case builds heft's trainer once (model, optimizer, the streaming mixer on
byte-level demo data at seq 2048) and alternates, step by step, the plain-mean reduction with
``linupper``, so both arms see the same GPU clocks and the same model. No checkpoint is written
(``heft train`` always saves its last step: tens of GB for the 7b-width case), which is why this
runs in-process instead of through ``heft train``.

MFU = tokens/s x FLOPs per token / the GPU's dense bf16 peak (model/flops.py: 989 TFLOP/s on an
H100). FLOPs per token = 3 x the forward matmuls: per layer 2h(h + 2h g/n) for QKV, 2 x 2 s h for
the attention scores and values (causal masking not discounted), 2h^2 for the output projection,
3 x 2 h ffn for SwiGLU; plus 2 h V for the logits.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

DATA = REPO / "demo_data_2048"
"""Byte-level demo corpus at seq 2048 (vocab padded to 384: the logits are a negligible share)."""
COMMON = ["parallel.tensor=1", "parallel.pipeline=1", "parallel.virtual_pipeline=null", "parallel.data=1",
          "model.seq_length=2048", "train.global_batch_size=16", "train.recompute=none"]
# name: (config, overrides on top of COMMON). Micro batch 4 fits 1b and 1.4b on an H100 with SDPA
# attention (26.6 and 34.3 GiB peak, 2026-11-24).
CASES = {
    "1b": ("configs/1b.yaml", ["train.micro_batch_size=4"]),
    "1.4b": ("configs/1.4b.yaml", ["train.micro_batch_size=4"]),
    # The full 7b width; the number of layers is the most that `heft plan` fits (widest_7b_layers).
    "7b width": ("configs/7b.yaml", ["train.micro_batch_size=1"]),
}
ARMS = ("none", "linupper")
WARMUP_ROUNDS = 2
RETRIES = 2
FORMULA = ("MFU = tokens/s x FLOPs per token / peak bf16 FLOP/s (989e12 on an H100); FLOPs per token = "
           "3 x [layers x (2h(h + 2hg/n) + 4sh + 2h^2 + 6h ffn) + 2hV] (model/flops.py; matmuls only, "
           "causal masking not discounted)")


def worker(out: str, rounds: int, config: str, overrides: list[str]) -> None:
    import torch
    from megatron.core.utils import get_model_config

    from heft.launcher.config import ReweightConfig, load_config
    from heft.launcher.train.out_of_memory import is_out_of_memory
    from heft.launcher.train.build import build_loss_reduction, build_trainer
    from heft.model.parallel import shutdown

    cfg = load_config(config, overrides)
    trainer = build_trainer(cfg)
    reductions = {arm: build_loss_reduction(cfg, trainer.layout, trainer.domain_names, ReweightConfig(strategy=arm))
                  for arm in ARMS}
    model_config = get_model_config(trainer.chunks[0])
    times: dict[str, list[float]] = {arm: [] for arm in ARMS}
    losses: dict[str, float] = {}
    step = 0
    try:
        for round_ in range(WARMUP_ROUNDS + rounds):
            for arm, reduction in reductions.items():
                step += 1
                reduction.install(model_config)
                trainer.reduction = reduction
                torch.cuda.synchronize()
                start = time.perf_counter()
                result = trainer.step(step)
                torch.cuda.synchronize()
                if round_ >= WARMUP_ROUNDS:
                    times[arm].append(time.perf_counter() - start)
                losses[arm] = result.report.loss
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        # Said in the result, so that the caller can try a smaller layout.
        Path(out).write_text(json.dumps({"out_of_memory": f"step {step}: {str(exc).splitlines()[0]}",
                                         "peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30}))
        sys.exit(3)
    Path(out).write_text(json.dumps({
        "times": times, "losses": losses, "flops_per_token": trainer.flops_per_token,
        "peak_flops": trainer.peak_flops, "device": torch.cuda.get_device_name(),
        "tokens_per_step": cfg.train.global_batch_size * cfg.model.seq_length,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30}))
    trainer.batches.close()
    shutdown()


def case_overrides(name: str, layers: int | None = None) -> tuple[str, list[str], str]:
    """(config, overrides, label) of a case; the 7b-width case gets ``layers`` (by default the
    most that `heft plan` fits) as its last override."""
    config, extra = CASES[name]
    overrides = [*COMMON, *extra, f"data.path={DATA}"]
    if name == "7b width":
        layers = layers or widest_7b_layers(config, overrides)
        return config, [*overrides, f"model.num_layers={layers}"], f"7b width, {layers} layers"
    return config, overrides, name


def widest_7b_layers(config: str, overrides: list[str]) -> int:
    """The most layers (even) of the full-width 7b that `heft plan` fits on this GPU."""
    from heft.launcher.preflight.plan import plan

    for layers in range(32, 1, -2):
        _, fits = plan(str(REPO / config), [*overrides, f"model.num_layers={layers}"], gpus=1, gpu_memory_gb=None)
        if fits:
            return layers
    return 2


def measure(name: str, rounds: int) -> dict:
    """One case in its own torchrun job: tokens/s, MFU and step time per arm, and their ratio.

    The 7b-width case starts at the layer count `heft plan` fits and, should the GPU run out of
    memory after all, tries two layers fewer (at most RETRIES times); ``plan_misses`` lists
    what ran out, so the table shows where the plan was too optimistic."""
    from reweight_overhead import ensure_demo_data

    ensure_demo_data(str(DATA), seq_length=2048)
    config, overrides, label = case_overrides(name)
    misses = []
    for _ in range(RETRIES + 1):
        raw = _run_worker(config, overrides, rounds)
        if "out_of_memory" not in raw or name != "7b width":
            break
        misses.append(f"{label}: {raw['out_of_memory']} (peak allocated {raw['peak_memory_gib']:.1f} GiB)")
        fewer = int(overrides[-1].removeprefix("model.num_layers=")) - 2
        config, overrides, label = case_overrides(name, fewer)
    if "out_of_memory" in raw:
        raise RuntimeError(f"{label} ran out of GPU memory: {raw['out_of_memory']}")
    result = {"case": label, "device": raw["device"], "peak_memory_gib": raw["peak_memory_gib"],
              "plan_misses": misses}
    for arm, times in raw["times"].items():
        seconds = statistics.median(times)
        tokens_per_s = raw["tokens_per_step"] / seconds
        result[arm] = {"step_ms": seconds * 1000, "tokens_per_s": tokens_per_s, "loss": raw["losses"][arm],
                       "mfu": tokens_per_s * raw["flops_per_token"] / raw["peak_flops"] if raw["peak_flops"] else None}
    result["linupper / none"] = statistics.median(b / a for a, b in zip(raw["times"]["none"], raw["times"]["linupper"]))
    return result


def _run_worker(config: str, overrides: list[str], rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                               __file__, "--worker", str(out), str(rounds), str(REPO / config), *overrides,
                               "train.tensorboard=false", f"train.run_dir={tmp}/run", "train.steps=100000",
                               "train.eval_interval=0", "train.eval_at_end=false"],
                              env={**os.environ, "PYTHONWARNINGS": "ignore"}, cwd=REPO, stdout=subprocess.DEVNULL)
        if not out.is_file():
            raise subprocess.CalledProcessError(done.returncode, done.args)
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", choices=list(CASES))
    parser.add_argument("--rounds", type=int, default=6, help="measured rounds (one step per arm each)")
    args = parser.parse_args()
    print(f"{'case':<22} {'arm':<9} {'ms/step':>8} {'tokens/s':>9} {'MFU':>6} {'peak GiB':>9}")
    for name in args.case or list(CASES):
        r = measure(name, args.rounds)
        for arm in ARMS:
            mfu = f"{r[arm]['mfu']:.1%}" if r[arm]["mfu"] is not None else "n/a"
            print(f"{r['case']:<22} {arm:<9} {r[arm]['step_ms']:8.0f} {r[arm]['tokens_per_s']:9.0f} {mfu:>6} "
                  f"{r['peak_memory_gib']:9.1f}")
        print(f"{r['case']:<22} linupper / none {r['linupper / none']:.3f}")
        for miss in r["plan_misses"]:
            print(f"  heft plan said it fits, but it ran out of GPU memory: {miss}")
    print(FORMULA)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5:])
    else:
        main()
