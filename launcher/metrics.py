"""Where training reports go: one console line, one JSON line in metrics.jsonl, TensorBoard scalars.

Only one process (global rank 0) writes; every value it writes is already reduced over the world.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsWriter:
    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def log(self, record: dict) -> None:
        """``record`` must hold ``step``; every other numeric field becomes a TensorBoard scalar."""
        if not self.enabled:
            return
        step = record["step"]
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"train/{key}", value, step)
        print(format_console_line(record), flush=True)

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
    if r.get("skipped_steps"):
        parts.append(f"skipped {r['skipped_steps']}")
    return " | ".join(parts)
