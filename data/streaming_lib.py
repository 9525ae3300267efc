"""mosaicml-streaming's base classes, imported without transformers and without its text, vision and
multimodal datasets.

Import streaming's classes from here (``from heft.data.streaming_lib import StreamingDataset``),
not from ``streaming``.

Why: ``import streaming`` runs the package's ``__init__``, which imports every dataset it ships (its
text and multimodal ones, C4, LAION, ..., import transformers' tokenizer and generation machinery),
and ``streaming.base`` imports ``StreamingDataLoader``, whose module imports transformers for two
batch types. heft reads only its own MDS shards with the base dataset classes and never uses that
loader, yet transformers cost 1.8 s of a training worker's 7 s of imports, paid by every rank of
every run (measured 2026-12-07, streaming 0.13 with transformers 4.57).

How: placeholder modules stand in for the three dataset subpackages and the loader's module while
the package's ``__init__`` runs, and are removed afterwards, so an explicit ``import streaming.text``
or ``import streaming.base.dataloader`` later imports the real one. ``streaming.StreamingDataLoader``
(and ``streaming.base``'s) is then imported on first use, through a module ``__getattr__``.

When another import of ``streaming`` came first (a user's script), this does nothing: the package
is whole already, and nothing here depends on how it was imported.
"""

from __future__ import annotations

import importlib
import sys
import types

_NOT_NEEDED = ("streaming.text", "streaming.vision", "streaming.multimodal")
_LOADER_MODULE = "streaming.base.dataloader"
_LOADER = "StreamingDataLoader"


def _import_loader_on_first_use(package: types.ModuleType) -> None:
    def __getattr__(name: str):
        if name != _LOADER:
            raise AttributeError(f"module {package.__name__!r} has no attribute {name!r}")
        loader = getattr(importlib.import_module(_LOADER_MODULE), _LOADER)
        setattr(package, _LOADER, loader)
        return loader

    package.__getattr__ = __getattr__


def _import_base_only() -> None:
    if "streaming" in sys.modules:
        return
    placeholders = {name: types.ModuleType(name) for name in (*_NOT_NEEDED, _LOADER_MODULE)}
    setattr(placeholders[_LOADER_MODULE], _LOADER, None)  # what streaming.base's __init__ imports
    sys.modules.update(placeholders)
    try:
        import streaming
        import streaming.base
    finally:
        for name, placeholder in placeholders.items():
            if sys.modules.get(name) is placeholder:
                del sys.modules[name]
    for name, placeholder in placeholders.items():
        parent, attribute = name.rsplit(".", 1)
        if getattr(sys.modules[parent], attribute, None) is placeholder:
            delattr(sys.modules[parent], attribute)
    for package in (streaming, streaming.base):
        if getattr(package, _LOADER, "missing") is None:
            delattr(package, _LOADER)
            _import_loader_on_first_use(package)


_import_base_only()

from streaming import LocalDataset, MDSWriter, Stream, StreamingDataset  # noqa: E402
from streaming.base.shuffle import get_shuffle  # noqa: E402

__all__ = ["LocalDataset", "MDSWriter", "Stream", "StreamingDataset", "get_shuffle"]
