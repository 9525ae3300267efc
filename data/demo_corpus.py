"""The embedded default corpus: three domains built from text every Python installation carries.

* ``code``: the standard library's own source files;
* ``docs``: the documentation topics bundled with pydoc (``pydoc_data.topics``);
* ``legal``: license texts of the interpreter and of the installed distributions.

Files are taken in sorted order up to a per-domain byte budget, so the corpus is deterministic for a
given installation and needs no download.
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path
from typing import Iterator

DEFAULT_BUDGET_BYTES = {"code": 3_000_000, "docs": 1_000_000, "legal": 1_000_000}


def _take(texts: Iterator[str], budget: int) -> list[str]:
    out, used = [], 0
    for text in texts:
        if not text.strip():
            continue
        if used + len(text) > budget:
            break
        out.append(text)
        used += len(text)
    return out


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return ""


def stdlib_sources() -> Iterator[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
    for path in sorted(root.rglob("*.py")):
        if not skip.intersection(path.relative_to(root).parts):
            yield _read(path)


def doc_topics() -> Iterator[str]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]


def license_texts() -> Iterator[str]:
    seen: set[str] = set()
    candidates = [Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "LICENSE.txt"]
    for site in sorted({p for p in sys.path if p.endswith("site-packages")}):
        root = Path(site)
        candidates += sorted(root.glob("*.dist-info/licenses/**/*"))
        candidates += sorted(root.glob("*.dist-info/LICENSE*"))
        candidates += sorted(root.glob("*.dist-info/COPYING*"))
    for path in candidates:
        if path.is_file():
            text = _read(path)
            if text and text not in seen:  # many packages ship the very same license text
                seen.add(text)
                yield text


def demo_documents(budgets: dict[str, int] | None = None) -> dict[str, list[str]]:
    budgets = {**DEFAULT_BUDGET_BYTES, **(budgets or {})}
    return {
        "code": _take(stdlib_sources(), budgets["code"]),
        "docs": _take(doc_topics(), budgets["docs"]),
        "legal": _take(license_texts(), budgets["legal"]),
    }
