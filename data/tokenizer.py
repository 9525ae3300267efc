"""Tokenizers heft can prepare data with: raw bytes (no files needed), a BPE trained on the corpus,
or an existing Hugging Face tokenizer (a ``tokenizer.json``, e.g. Llama's, GPT-2's, NeoX's).

heft appends the end-of-document token after every document and adds no BOS: the manifest says so
(``eos_after_document``, ``bos_id``), and records the tokenizer's ``sha256`` so a checkpoint can tell
data tokenized another way.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Protocol

EOS_TEXT = "<|endoftext|>"


class Tokenizer(Protocol):
    kind: str
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def vocabulary(self) -> dict[str, int]: ...

    def same_as(self, other: Tokenizer) -> bool: ...


class ByteTokenizer:
    """UTF-8 bytes are token ids 0..255; 256 is end-of-document."""

    kind = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def encode_batch(self, texts: list[str]):
        """As arrays: the bytes themselves, without a Python int per byte."""
        import numpy as np

        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def vocabulary(self) -> dict[str, int]:
        """Token string -> id, in the byte-level alphabet Hugging Face's BPE tokenizers use."""
        return byte_tokenizer_backend().get_vocab(True)

    def same_as(self, other: Tokenizer) -> bool:
        return same_tokens(self, other)

    def save(self, directory: Path) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "bos_id": None, "eos_after_document": True,
                "sha256": hashlib.sha256(b"heft-byte-tokenizer/1").hexdigest()}


class BPETokenizer:
    """Byte-level BPE from the `tokenizers` library: lossless on any UTF-8 text."""

    kind = "bpe"
    FILE = "tokenizer.json"

    def __init__(self, backend, eos_id: int | None = None, kind: str = "bpe"):
        self._tok = backend
        self.kind = kind
        self.eos_id = backend.token_to_id(EOS_TEXT) if eos_id is None else eos_id
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS_TEXT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: Path, eos_id: int | None = None, kind: str = "bpe") -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_file(str(path)), eos_id, kind)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([i for i in ids if i != self.eos_id], skip_special_tokens=False)

    def vocabulary(self) -> dict[str, int]:
        """Token string -> id, special tokens included."""
        return self._tok.get_vocab(True)

    def same_as(self, other: Tokenizer) -> bool:
        return same_tokens(self, other)

    def save(self, directory: Path) -> dict:
        path = directory / self.FILE
        self._tok.save(str(path))
        return {"kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "bos_id": None, "eos_after_document": True, "file": self.FILE,
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


# Names of the end-of-document token in widespread tokenizers, tried in this order.
EOS_CANDIDATES = (EOS_TEXT, "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")


def load_existing(path: str | Path) -> BPETokenizer:
    """An existing Hugging Face tokenizer: a ``tokenizer.json`` or a directory holding one (its
    ``tokenizer_config.json`` names the EOS token; otherwise a well-known EOS name is looked up)."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"--tokenizer {path}: no tokenizer.json there; give byte, bpe, a "
                                f"tokenizer.json or a Hugging Face tokenizer directory")
    from tokenizers import Tokenizer as HFTokenizer

    try:
        backend = HFTokenizer.from_file(str(file))
    except Exception as exc:
        raise ValueError(f"--tokenizer {file} is not a Hugging Face tokenizer.json ({exc})") from None
    names = list(EOS_CANDIDATES)
    config = file.parent / "tokenizer_config.json"
    if config.is_file():
        eos = json.loads(config.read_text()).get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        if eos:
            names.insert(0, eos)
    for name in names:
        if backend.token_to_id(name) is not None:
            return BPETokenizer(backend, backend.token_to_id(name), kind="hf")
    raise ValueError(f"--tokenizer {file} has none of the end-of-document tokens {', '.join(EOS_CANDIDATES)}; "
                     f"add an eos_token to its tokenizer_config.json")


def same_tokens(a: Tokenizer, b: Tokenizer) -> bool:
    """heft's one definition of "the same tokenizer" for two loaded tokenizers: every token id
    stands for the same token, so a model's embedding rows mean the same with either (what a model
    trained on one needs of data tokenized by the other). Checkpoints and datasets also record a
    sha256 of their tokenizer's file, which resuming compares without loading anything
    (checkpoint/contents.check_same_tokenizer)."""
    return a.vocab_size == b.vocab_size and a.vocabulary() == b.vocabulary()


def load_tokenizer(data_dir: Path, spec: dict) -> Tokenizer:
    """The tokenizer a prepared dataset was written with (its manifest's ``tokenizer`` entry)."""
    if spec["kind"] == "byte":
        return ByteTokenizer()
    if spec["kind"] in ("bpe", "hf"):
        return BPETokenizer.load(Path(data_dir) / spec["file"], spec["eos_id"], spec["kind"])
    raise ValueError(f"unknown tokenizer kind {spec['kind']!r} in {data_dir}/manifest.json")



def byte_tokenizer_backend():
    """The byte tokenizer as a `tokenizers` object (ids 0..255 are the bytes, 256 end-of-document),
    so tools that only know Hugging Face tokenizers encode exactly as heft does: a byte-level BPE
    with the 256 byte symbols as its vocabulary and no merges."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    symbols = pre_tokenizers.ByteLevel.alphabet()  # one printable symbol per byte, GPT-2's mapping
    byte_of = _byte_level_symbols()
    vocab = {symbol: byte_of[symbol] for symbol in symbols}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOS_TEXT, special=True, normalized=False)])
    assert tok.token_to_id(EOS_TEXT) == ByteTokenizer.eos_id
    return tok


def _byte_level_symbols() -> dict[str, int]:
    """GPT-2's reversible byte -> printable character table, as symbol -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def to_transformers(tokenizer: Tokenizer, max_length: int):
    """A transformers ``PreTrainedTokenizerFast`` that encodes and decodes like ``tokenizer``."""
    from transformers import PreTrainedTokenizerFast

    backend = byte_tokenizer_backend() if tokenizer.kind == "byte" else tokenizer._tok
    eos = backend.id_to_token(tokenizer.eos_id)  # <|endoftext|>, or an existing tokenizer's own
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, bos_token=eos,
                                   unk_token=None, pad_token=eos, model_max_length=max_length,
                                   clean_up_tokenization_spaces=False,
                                   model_input_names=["input_ids", "attention_mask"])  # as Llama's


def tokenizer_files(data_dir: Path, spec: dict) -> list[Path]:
    """The files a prepared dataset's tokenizer needs beside its manifest entry."""
    return [Path(data_dir) / spec["file"]] if spec.get("file") else []
