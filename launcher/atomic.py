"""Writing a file so that readers see the old content or the new, never a part: heft's one helper.

The text goes to a hidden temporary file beside the target (same directory, so the rename stays on
one filesystem), is flushed to disk, and replaces the target with one ``os.replace``. A kill at any
moment leaves either the previous file or the complete new one (and perhaps a stray ``.NAME.PID.tmp``,
which nothing reads). Used for checkpoint state and ``latest``, worker failure reports, the run's
state file, ``metrics.jsonl`` rewritten on resume, and ``heft eval``'s results.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_atomically(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: two writers never share one
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
