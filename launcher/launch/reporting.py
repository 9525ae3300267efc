"""How a run ends, as the user sees it: exit statuses, and one line per distinct error, not one per rank.

Workers never print a failure themselves when ``heft train`` launched them: each writes it to
``$HEFT_REPORT_DIR/rank<N>.json`` and exits with a status below; the launching process then prints
every distinct message once, naming the ranks it came from (:func:`summarise`). A worker started
some other way (bare torchrun, srun) prints its own failure, prefixed with its rank.

Exit statuses (also the status of ``heft train``):

====  =========================================================================================
0     finished
1     training failed: non-finite loss or gradient, a stalled rank, a crash
2     the config, the data or the command line cannot work (nothing was trained)
75    a signal (SIGTERM, SIGUSR1) asked the run to stop: it saved a checkpoint; requeue it
130   interrupted by Ctrl-C
====  =========================================================================================
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

from heft.data.config import DataConfigError
from heft.launcher.atomic import write_atomically

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_REQUEUE = 75  # EX_TEMPFAIL: a temporary failure, try again
EXIT_INTERRUPTED = 130

REPORT_DIR_VAR = "HEFT_REPORT_DIR"


class UserError(Exception):
    """Something the user can fix: a config, data, checkpoint, run directory or command line that
    cannot work. heft prints its one-line message (no traceback) and exits with EXIT_USAGE. Each
    room's own error subclasses it (ConfigError, CheckpointError, SubmitError, ExportError, ...)."""


USER_ERRORS = (UserError, DataConfigError, FileNotFoundError, FileExistsError, PermissionError)
"""Every error that ends ``heft`` and a worker with EXIT_USAGE and one line: the one list both
``cli.main`` and ``worker.main`` catch. ``data/`` cannot import launcher/, so its error is named here."""


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def report(status: int, message: str, detail: str | None = None) -> None:
    """Record this worker's failure (``message``: one line; ``detail``: a traceback, if any)."""
    directory = os.environ.get(REPORT_DIR_VAR)
    if directory:
        record = {"rank": _rank(), "status": status, "message": message, "detail": detail,
                  "time": time.time()}
        write_atomically(Path(directory) / f"rank{_rank()}.json", json.dumps(record))
        return
    prefix = f"[rank {_rank()}] " if "RANK" in os.environ and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    if detail:
        print(detail, file=sys.stderr, end="" if detail.endswith("\n") else "\n")
    print(f"{prefix}heft: {'error' if status == EXIT_USAGE else 'failed'}: {message}", file=sys.stderr, flush=True)


def record_exit(status: int) -> None:
    """Every worker leaves its exit status here (``exit-rank<N>``), failures and successes alike:
    the launcher needs it when the agent itself fails after the workers ended (see
    launch._after_agent_error)."""
    directory = os.environ.get(REPORT_DIR_VAR)
    if directory:
        try:
            (Path(directory) / f"exit-rank{_rank()}").write_text(str(status))
        except OSError:
            pass


def read_exits(directory: str | Path) -> dict[int, int]:
    """Global rank -> exit status of this node's workers that recorded one."""
    exits = {}
    for path in Path(directory).glob("exit-rank*"):
        try:
            exits[int(path.name.removeprefix("exit-rank"))] = int(path.read_text())
        except (OSError, ValueError):
            continue
    return exits


def report_exception(exc: BaseException) -> None:
    """An unexpected error: its traceback travels with it (printed once by the launcher)."""
    detail = "".join(traceback.format_exception(exc))
    last = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    report(EXIT_FAILED, f"{type(exc).__name__}: {last}" if last else type(exc).__name__, detail)


def _ranks_text(ranks: list[int]) -> str:
    ranks = sorted(ranks)
    spans, start = [], ranks[0]
    for prev, cur in zip(ranks, ranks[1:] + [None]):
        if cur != prev + 1:
            spans.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return ("rank " if len(ranks) == 1 else "ranks ") + ",".join(spans)


def read_reports(directory: str | Path) -> list[dict]:
    reports = []
    for path in sorted(Path(directory).glob("rank*.json")):
        try:
            reports.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return reports


def summarise(reports: list[dict], world_size: int) -> tuple[int, list[str]]:
    """(exit status, lines to print) for the workers' reports: the earliest failure first, each
    distinct message once, with the ranks that gave it; one traceback at most."""
    if not reports:
        return EXIT_FAILED, []
    reports = sorted(reports, key=lambda r: r["time"])
    by_message: dict[str, list[dict]] = {}
    for r in reports:
        by_message.setdefault(r["message"], []).append(r)
    lines = []
    detail = next((r["detail"] for r in reports if r.get("detail")), None)
    if detail:
        lines.append(detail.rstrip("\n"))
    for message, group in by_message.items():
        ranks = [r["rank"] for r in group]
        where = "" if len(ranks) == world_size and len(by_message) == 1 else f" ({_ranks_text(ranks)})"
        word = "error" if group[0]["status"] == EXIT_USAGE else "failed"
        lines.append(f"heft: {word}{where}: {message}")
    return reports[0]["status"], lines
