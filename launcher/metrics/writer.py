"""Where training reports go: one console line, one JSON line in metrics.jsonl, TensorBoard scalars.

Only one process (global rank 0) writes; every value it writes is already reduced over the world.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from heft.launcher.atomic import write_atomically
from heft.launcher.metrics import records


class MetricsWriter:
    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool = True, resume_step: int = 0):
        """``resume_step``: the step of the checkpoint this run resumes from (0: a new run). Records
        the earlier run logged after it are dropped, in metrics.jsonl and in TensorBoard, so the
        resumed run continues the curves without duplicated steps."""
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = records.path_in(self.run_dir)
        if resume_step:
            _keep_records_up_to(path, resume_step)
        self._jsonl = open(path, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard discards this directory's events from that step on.
            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"),
                                     purge_step=resume_step + 1 if resume_step else None)

    def log(self, record: dict, histogram: dict | None = None) -> None:
        """``record`` must hold ``step``; every other numeric field becomes a TensorBoard scalar.
        ``histogram`` (the per-sample relative weights) becomes a TensorBoard histogram."""
        if not self.enabled:
            return
        step = record["step"]
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"train/{key}", value, step)
            if histogram is not None:
                self._tb.add_histogram_raw("reweight/sample_weight", global_step=step, **histogram)
        print(format_console_line(record), flush=True)

    def log_eval(self, record: dict) -> None:
        """An evaluation: a JSON line with eval_* keys, TensorBoard scalars under eval/."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and math.isfinite(value):
                    self._tb.add_scalar(f"eval/{key[len('eval_'):]}", value, record["step"])
        domains = " ".join(f"{k[len('eval_'):-len('_loss')]} {v:.4f}" for k, v in record.items()
                           if k.startswith("eval_") and k != "eval_loss")
        print(f"eval   {record['step']:>6} | loss {record['eval_loss']:.4f} | {domains}", flush=True)

    def write_sample_weights(self, step: int, rank: int, rows: list[tuple]) -> None:
        """Per-sample (domain, index, loss, relative weight) rows; any rank that owns samples writes
        its own file, so this does not depend on ``enabled``."""
        directory = self.run_dir / "sample_weights"
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / f"rank{rank}.jsonl", "a") as f:
            for domain, index, loss, weight in rows:
                f.write(json.dumps({"step": step, "domain": domain, "index": index, "loss": loss,
                                    "weight": weight}) + "\n")

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()


def format_console_line(r: dict) -> str:
    parts = [
        f"step {r['step']:>6}",
        f"loss {r['loss']:.4f}",
        f"lr {r['lr']:.3e}",
        f"grad_norm {r['grad_norm']:.3f}",
        f"{r['step_time_s'] * 1000:.0f} ms/step",
        f"{r['tokens_per_s']:.0f} tok/s",
    ]
    if r.get("mfu") is not None:
        parts.append(f"MFU {100 * r['mfu']:.1f}%")
    if r.get("reweighting_active"):
        parts.append(f"w [{r['weight_min']:.2f}, {r['weight_max']:.2f}] ess {r['ess_fraction']:.3f} r {r['temperature']:.3g}")
    if r.get("skipped_steps"):
        parts.append(f"skipped {r['skipped_steps']}")
    return " | ".join(parts)


def _keep_records_up_to(path: Path, step: int) -> None:
    """Rewrite metrics.jsonl (atomically) without the records after ``step``; a line cut short by
    a kill goes too."""
    log = records.read(path.parent)
    if log.exists:
        write_atomically(path, "".join(json.dumps(r) + "\n" for r in log.records if r["step"] <= step))
