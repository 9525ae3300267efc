"""Reading ``RUN_DIR/metrics.jsonl``: the one reader, with one set of rules for every user.

The file holds one JSON object per line, written by ``metrics/writer.py`` on global rank 0: a
training record (it has ``loss``) every ``train.log_interval`` steps and an evaluation record (it
has ``eval_loss``) after each evaluation; both have ``step``. A line that is not such an object is
*damaged*: a kill while writing cuts the last line short, which is expected; a damaged line
elsewhere means the file was changed by something other than heft.

Readers: ``heft plot`` (needs an intact file), ``heft status`` (the latest numbers, whatever the
damage), where a run starts (the last logged step) and a resumed run's writer (keep the records up
to the checkpoint's step).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

FILE_NAME = "metrics.jsonl"


def path_in(run_dir: str | Path) -> Path:
    return Path(run_dir) / FILE_NAME


def is_eval(record: dict) -> bool:
    """An evaluation record; every other record is a training step's."""
    return "eval_loss" in record


@dataclass
class MetricsLog:
    """Everything readable in one metrics.jsonl, in file order."""

    path: Path
    exists: bool = False
    records: list[dict] = field(default_factory=list)
    damaged_lines: list[int] = field(default_factory=list)
    """1-based numbers of the non-blank lines that are not a record with a ``step``."""
    line_count: int = 0

    @property
    def train(self) -> list[dict]:
        return [r for r in self.records if not is_eval(r)]

    @property
    def evals(self) -> list[dict]:
        return [r for r in self.records if is_eval(r)]

    @property
    def last_step(self) -> int | None:
        """The last logged step; None for a missing or empty file, 0 when no line is readable."""
        if not self.line_count:
            return None
        return int(self.records[-1]["step"]) if self.records else 0

    def check_intact(self) -> None:
        """Raise ValueError naming the first damaged line, unless it is only the last line (a run
        killed while writing it)."""
        for number in self.damaged_lines:
            if number != self.line_count:
                raise ValueError(f"{self.path}:{number} is not a JSON record; the file is damaged")


def read(run_dir: str | Path) -> MetricsLog:
    """The run's metrics.jsonl (an empty MetricsLog when the file does not exist)."""
    path = path_in(run_dir)
    log = MetricsLog(path=path)
    if not path.is_file():
        return log
    log.exists = True
    lines = path.read_text().splitlines()
    log.line_count = len(lines)
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            int(record["step"])
        except (ValueError, KeyError, TypeError):
            log.damaged_lines.append(number)
            continue
        log.records.append(record)
    return log
