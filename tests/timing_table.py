"""docs/testing.md's table: each test file's wall time (from pytest's JUnit XML) and the processes
it starts (from the counts conftest writes when HEFT_TEST_PROCESS_COUNTS is set), slowest first.

    HEFT_TEST_PROCESS_COUNTS=counts.json make test PYTEST_ARGS="--junitxml=run.xml"
    python tests/timing_table.py run.xml counts.json
"""

from __future__ import annotations

import collections
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def file_times(junit_xml: str) -> dict[str, tuple[float, int]]:
    """Test file -> (seconds, tests): setup, call and teardown of its tests, as pytest timed them."""
    times: dict = collections.defaultdict(lambda: [0.0, 0])
    for case in ET.parse(junit_xml).getroot().iter("testcase"):
        name = case.get("classname", "").split(".")[-1] + ".py"
        times[name][0] += float(case.get("time", 0))
        times[name][1] += 1
    return {k: (v[0], v[1]) for k, v in times.items()}


def table(junit_xml: str, counts_json: str | None) -> str:
    times = file_times(junit_xml)
    counts = json.loads(Path(counts_json).read_text()) if counts_json else {}
    rows = ["| test file | tests | wall time | heft train/eval or torchrun runs | other heft runs | Slurm jobs |",
            "|---|---:|---:|---:|---:|---:|"]
    for name, (seconds, tests) in sorted(times.items(), key=lambda item: -item[1][0]):
        c = counts.get(name, {})
        rows.append(f"| {name} | {tests} | {seconds:.0f} s | {c.get('torchrun', 0)} | {c.get('heft', 0)} | "
                    f"{c.get('slurm', 0)} |")
    total = sum(s for s, _ in times.values())
    rows.append(f"| **all** | {sum(n for _, n in times.values())} | {total:.0f} s ({total / 60:.1f} min) | "
                f"{sum(c.get('torchrun', 0) for c in counts.values())} | "
                f"{sum(c.get('heft', 0) for c in counts.values())} | {sum(c.get('slurm', 0) for c in counts.values())} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None))
