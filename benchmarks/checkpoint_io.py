"""Checkpoint save and load time, and throughput, for a preset (default 125m) on this machine.

    python benchmarks/checkpoint_io.py [--preset 125m] [--nproc 1] [--repeats 3] [--async-save]

One torchrun job builds the model, takes one optimizer step (so Adam's moments exist and are saved),
then saves the checkpoint ``--repeats`` times and loads it back as many times, through heft's own
``checkpoint.Saver`` and ``checkpoint.load`` (megatron-core dist_checkpointing underneath). Prints a
table: checkpoint size, median save and load seconds, GB/s. The model trains on the demo corpus at
sequence length 128 (the preset's width and depth; the sequence length does not change the size).
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


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def worker(out: str, repeats: int, overrides: list[str]) -> None:
    import torch.distributed as dist

    from heft.launcher.checkpoint import files
    from heft.launcher.train import checkpointing
    from heft.launcher.config import load_config
    from heft.launcher.train.build import build_trainer
    from heft.model.parallel import shutdown

    cfg = load_config(REPO / "configs" / "125m.yaml", overrides)
    trainer = build_trainer(cfg)
    trainer.step(1)
    progress = checkpointing.Progress(step=1)
    ckpt_dir = Path(cfg.train.run_dir) / "checkpoints"
    saver = checkpointing.Saver(trainer, ckpt_dir, keep=1, async_save=cfg.checkpoint.async_save)
    saves, blocking, loads = [], [], []
    for i in range(repeats):
        progress.step = 1 + i
        dist.barrier()
        start = time.perf_counter()
        path = saver.save(progress)
        blocking.append(time.perf_counter() - start)  # how long training is held up
        saver.finish()
        dist.barrier()
        saves.append(time.perf_counter() - start)
    size = _size(path)
    state = files.verify(path)
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        checkpointing.load(trainer, path, state)
        dist.barrier()
        loads.append(time.perf_counter() - start)
    if trainer.layout.rank == 0:
        Path(out).write_text(json.dumps({"bytes": size, "save": saves, "blocking": blocking, "load": loads}))
    shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="125m")
    parser.add_argument("--nproc", type=int, default=1, help="data-parallel processes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--async-save", action="store_true")
    parser.add_argument("--data", default=str(REPO / "demo_data"))
    args = parser.parse_args()
    if not (Path(args.data) / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "heft.launcher.cli", "prepare", "--demo", args.data], check=True, cwd=REPO)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc-per-node={args.nproc}", __file__, "--worker", str(out), str(args.repeats),
                        f"model.preset={args.preset}", "model.seq_length=128", f"data.path={args.data}",
                        "train.global_batch_size=" + str(args.nproc), "train.micro_batch_size=1",
                        f"parallel.data={args.nproc}", "train.tensorboard=false", f"train.run_dir={tmp}/run",
                        f"checkpoint.async_save={'true' if args.async_save else 'false'}"],
                       check=True, cwd=REPO, env={**os.environ, "PYTHONWARNINGS": "ignore"}, stdout=subprocess.DEVNULL)
        result = json.loads(out.read_text())
    gb = result["bytes"] / 1e9
    save, load, blocking = (statistics.median(result[k]) for k in ("save", "load", "blocking"))
    print(f"\ncheckpoint I/O, preset {args.preset}, {args.nproc} process(es), {args.repeats} repeats, "
          f"{os.cpu_count()} CPU cores{', async save' if args.async_save else ''}")
    print(f"{'size GB':>8} {'save s':>8} {'save GB/s':>10} {'blocks training s':>18} {'load s':>8} {'load GB/s':>10}")
    print(f"{gb:>8.2f} {save:>8.2f} {gb / save:>10.2f} {blocking:>18.2f} {load:>8.2f} {gb / load:>10.2f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), sys.argv[4:])
    else:
        main()
