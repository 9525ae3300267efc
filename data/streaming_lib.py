"""mosaicml-streaming's base classes, imported without its text, vision and multimodal datasets.

Import streaming's classes from here (``from heft.data.streaming_lib import StreamingDataset``),
not from ``streaming``.

Why: ``import streaming`` runs the package's ``__init__``, which imports every dataset it ships,
and its text and multimodal ones (C4, LAION, ...) import transformers' tokenizer and generation
machinery. That was 1.7 s of a training worker's 5.8 s of imports, paid by every rank of every
run, and heft reads only its own MDS shards with the base classes. Placeholder modules stand in
for the three subpackages while that ``__init__`` runs; they are removed afterwards, so an explicit
``import streaming.text`` later imports the real one.

When another import of ``streaming`` came first (a user's script), this does nothing: the package
is whole already, and nothing here depends on how it was imported.
"""

from __future__ import annotations

import sys
import types

_NOT_NEEDED = ("streaming.text", "streaming.vision", "streaming.multimodal")


def _import_base_only() -> None:
    if "streaming" in sys.modules:
        return
    placeholders = {name: types.ModuleType(name) for name in _NOT_NEEDED}
    sys.modules.update(placeholders)
    try:
        import streaming
    finally:
        for name, placeholder in placeholders.items():
            if sys.modules.get(name) is placeholder:
                del sys.modules[name]
    for name, placeholder in placeholders.items():
        attribute = name.rsplit(".", 1)[1]
        if getattr(streaming, attribute, None) is placeholder:
            delattr(streaming, attribute)


_import_base_only()

from streaming import LocalDataset, MDSWriter, Stream, StreamingDataLoader, StreamingDataset  # noqa: E402
from streaming.base.shuffle import get_shuffle  # noqa: E402

__all__ = ["LocalDataset", "MDSWriter", "Stream", "StreamingDataLoader", "StreamingDataset", "get_shuffle"]
