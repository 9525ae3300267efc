"""Import megatron-core with its ``torch.compile`` fusions decorated lazily (a start-up shim).

megatron-core wraps its fused kernels (bias-GeLU/SwiGLU, bias-dropout-add, ...) in
``torch.compile`` as its modules are imported, through ``megatron.core.jit.jit_fuser``.
Compilation itself waits for a kernel's first call, but the wrapping imports TorchDynamo and
Inductor: 1.1 s of every worker's start-up (of ~4 s of imports on CPU), paid even where the
kernels never run (heft turns those fusions off without CUDA).

``jit_fuser`` is bound once, when ``megatron.core.jit`` is imported. While ``megatron.core`` is
imported here, ``torch.compile`` is :func:`compile_on_first_call`, which calls the real
``torch.compile`` with the same arguments when the wrapped function first runs, so ``jit_fuser``
keeps that behaviour. ``torch.compile`` is restored right after; nothing else sees the change.
The worker calls :func:`import_megatron` first thing; where megatron-core was imported already
(another entry point, a user's script), it changes nothing and the kernels are the same.
"""

from __future__ import annotations

import functools
import sys


def compile_on_first_call(model=None, **options):
    """``torch.compile(model, **options)``, made when ``model`` is first called. A plain function
    (not an object), so that it still binds as a method; like ``torch.compile``, it can be used as
    ``@compile_on_first_call`` or ``@compile_on_first_call(**options)``."""
    if model is None:
        return lambda fn: compile_on_first_call(fn, **options)
    compiled = None

    @functools.wraps(model)
    def run(*args, **kwargs):
        nonlocal compiled
        if compiled is None:
            import torch

            compiled = (_real_compile or torch.compile)(model, **options)
        return compiled(*args, **kwargs)

    return run


_real_compile = None  # torch.compile itself, kept while it is replaced


def import_megatron() -> None:
    """Import megatron-core with ``jit_fuser`` bound to :func:`compile_on_first_call`. Idempotent."""
    global _real_compile
    if "megatron.core" in sys.modules:
        return
    import torch

    _real_compile = torch.compile
    torch.compile = compile_on_first_call
    try:
        import megatron.core  # noqa: F401  (megatron.core.jit binds jit_fuser in here)
    finally:
        torch.compile = _real_compile
