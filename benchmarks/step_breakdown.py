"""heft's training step against a bare megatron-core loop, and where the step's time goes.

    python benchmarks/step_breakdown.py [--rounds 30] [--nproc 1] [--config C] [key=value ...]

One torchrun job builds heft's trainer once (model, optimizer, loss reduction, the streaming
domain mixer) and alternates, round by round:

* **heft**: ``Trainer.step`` exactly as the training loop calls it (next batch from the mixer, the
  pipeline schedule, the loss reduction, the checked optimizer update), plus its log record;
* **bare**: what one writes with megatron-core alone on the same model, optimizer and batches: the
  same schedule with a plain token-sum loss function, megatron-core's finalize, ``optimizer.step()``;
* **split**: heft's step in its public pieces, each timed: data wait, forward/backward (the
  schedule), loss reduction (``finish_step``), optimizer (update and LR schedule), logging.

Prints median milliseconds per arm and piece, and the median paired ratio heft / bare
(target <= 1.05). ``--json`` prints one JSON line instead. The default overrides (and run_all.py)
set ``reweight.strategy=none``, so that both arms reduce with the plain token mean; the demo
config would otherwise switch heft's arm to linupper after 50 steps.
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
WARMUP_ROUNDS = 3
PIECES = ("data wait", "forward/backward", "loss reduction", "optimizer", "logging")


def _bare_step(trainer, batch) -> None:
    """One optimizer step written against megatron-core only."""
    import torch
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.utils import get_model_config

    from heft.launcher.train.step import device

    get_model_config(trainer.chunks[0]).finalize_model_grads_func = finalize_model_grads
    for chunk in trainer.chunks:
        chunk.zero_grad_buffer()
    trainer.optimizer.zero_grad()

    def forward_step(data_iterator, model):
        micro = next(data_iterator)
        tokens = micro.tokens[:, :-1].contiguous().to(device())
        labels = micro.tokens[:, 1:].contiguous().to(device())
        positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
        output = model(tokens, positions, None, labels=labels)

        def loss_func(per_token_loss):
            total = per_token_loss.float().sum()
            return total, torch.tensor(per_token_loss.numel(), dtype=torch.int, device=total.device), {}
        return output, loss_func

    micro = batch.microbatches(trainer.cfg.train.micro_batch_size)
    chunks = trainer.chunks
    iterators = [iter(micro) for _ in chunks]
    trainer.forward_backward(forward_step_func=forward_step,
                             data_iterator=iterators if len(chunks) > 1 else iterators[0],
                             model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=len(micro),
                             seq_length=trainer.cfg.model.seq_length,
                             micro_batch_size=trainer.cfg.train.micro_batch_size, forward_only=False)
    trainer.optimizer.step()
    trainer.scheduler.step(increment=1)


def _split_step(trainer, step: int, clock) -> dict[str, float]:
    """heft's step in its public pieces (launcher/train/step.py's train_step, then the loop's record)."""
    from heft.launcher.train.step import apply_update, run_schedule
    from heft.launcher.train.loop import Throughput, step_record

    times = {}
    start = clock()
    batch = next(trainer.batches)
    times["data wait"] = clock() - start
    start = clock()
    for chunk in trainer.chunks:
        chunk.zero_grad_buffer()
    trainer.optimizer.zero_grad()
    trainer.reduction.begin_step(step)
    run_schedule(trainer.forward_backward, trainer.chunks, trainer.reduction,
                 batch.microbatches(trainer.cfg.train.micro_batch_size), trainer.cfg.train.micro_batch_size,
                 trainer.cfg.model.seq_length, forward_only=False)
    times["forward/backward"] = clock() - start
    start = clock()
    report = trainer.reduction.finish_step()
    times["loss reduction"] = clock() - start
    start = clock()
    updated, grad_norm = apply_update(trainer.optimizer)
    if updated:
        trainer.scheduler.step(increment=1)
    times["optimizer"] = clock() - start
    start = clock()
    from heft.launcher.train.step import StepResult

    throughput = Throughput()
    throughput.add(1.0, report.tokens)
    step_record(trainer, step, StepResult(report, grad_norm, updated, lr=float(trainer.optimizer.param_groups[0]["lr"])), throughput, 0)
    times["logging"] = clock() - start
    return times


def worker(out: str, rounds: int, config: str, overrides: list[str]) -> None:
    import torch

    from heft.launcher.config import load_config
    from heft.launcher.train.build import build_trainer
    from heft.launcher.train.loop import Throughput, step_record
    from heft.model.parallel import shutdown

    def clock() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    trainer = build_trainer(load_config(config, overrides))
    from megatron.core.utils import get_model_config

    model_config = get_model_config(trainer.chunks[0])
    times = {"heft": [], "bare": [], **{piece: [] for piece in PIECES}}
    step = 0
    for round_ in range(WARMUP_ROUNDS + rounds):
        keep = round_ >= WARMUP_ROUNDS
        step += 1
        trainer.reduction.install(model_config)
        start = clock()
        result = trainer.step(step)
        throughput = Throughput()
        throughput.add(1.0, result.report.tokens)
        step_record(trainer, step, result, throughput, 0)
        if keep:
            times["heft"].append(clock() - start)
        step += 1
        start = clock()
        _bare_step(trainer, next(trainer.batches))
        if keep:
            times["bare"].append(clock() - start)
        step += 1
        trainer.reduction.install(model_config)
        for piece, seconds in _split_step(trainer, step, clock).items():
            if keep:
                times[piece].append(seconds)
    if trainer.layout.rank == 0:
        Path(out).write_text(json.dumps(times))
    trainer.batches.close()
    shutdown()


def measure(rounds: int, nproc: int, config: str, overrides: list[str], data: str | None) -> dict:
    """Median milliseconds of heft's step, the bare step and each piece, and the paired ratio."""
    from reweight_overhead import ensure_demo_data

    if data is None:
        data = str(REPO / "demo_data")
        ensure_demo_data(data)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "times.json"
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                        __file__, "--worker", str(out), str(rounds), config, f"data.path={data}",
                        "train.tensorboard=false", f"train.run_dir={tmp}/run", "train.steps=100000",
                        *overrides],
                       check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}, cwd=REPO,
                       stdout=subprocess.DEVNULL)
        times = json.loads(out.read_text())
    result = {name: statistics.median(values) * 1000 for name, values in times.items()}
    result["heft / bare"] = statistics.median(a / b for a, b in zip(times["heft"], times["bare"]))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--data", help="prepared data (default: the demo corpus, prepared if missing)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("overrides", nargs="*",
                        default=["parallel.tensor=1", "parallel.data=1", "reweight.strategy=none"])
    args = parser.parse_args()
    result = measure(args.rounds, args.nproc, args.config, args.overrides, args.data)
    if args.json:
        print(json.dumps(result))
        return
    print(f"median ms over {args.rounds} interleaved rounds: {args.config} {' '.join(args.overrides)}")
    for name in ("heft", "bare", *PIECES):
        print(f"  {name:<18} {result[name]:9.1f}")
    print(f"  heft / bare        {result['heft / bare']:9.3f}  (target <= 1.05)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5:])
    else:
        main()
