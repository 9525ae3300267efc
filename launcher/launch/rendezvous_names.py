"""torchrun's rendezvous names its events without reading source files (a torch compatibility shim).

torch's dynamic rendezvous names each event it records after the calling method, found with
``inspect.stack()``, which builds every frame's source context: it looks up each frame's module and
reads its file. In ``heft train``, whose agent runs in a process with torch already imported, that
cost 1.2 s of the launcher's time per run (nine events, profiled 2026-12-07, torch 2.9), before any
worker started. The same name comes from the frame object itself.

Installed by the agent (``launch/agent.py``) only when torch still has the helper, with the same
signature and result; otherwise torch's own runs.
"""

from __future__ import annotations

import sys


def _method_name(depth: int = 2) -> str:
    # depth counts as in torch's helper: 0 is the helper itself, 1 its caller, 2 the caller's caller.
    try:
        return sys._getframe(depth).f_code.co_name
    except ValueError:  # the stack is shallower than depth
        return "no_method_name"


def install() -> None:
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous

    if callable(getattr(dynamic_rendezvous, "get_method_name", None)):
        dynamic_rendezvous.get_method_name = _method_name
