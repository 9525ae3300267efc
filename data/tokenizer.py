"""Tokenizers heft can prepare data with: raw bytes (no files needed) or a BPE trained on the corpus."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Protocol

EOS_TEXT = "<|endoftext|>"


class Tokenizer(Protocol):
    kind: str
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are token ids 0..255; 256 is end-of-document."""

    kind = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def save(self, directory: Path) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id}


class BPETokenizer:
    """Byte-level BPE from the `tokenizers` library: lossless on any UTF-8 text."""

    kind = "bpe"
    FILE = "tokenizer.json"

    def __init__(self, backend):
        self._tok = backend
        self.eos_id = backend.token_to_id(EOS_TEXT)
        self.vocab_size = backend.get_vocab_size()

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
    def load(cls, path: Path) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_file(str(path)))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([i for i in ids if i != self.eos_id], skip_special_tokens=False)

    def save(self, directory: Path) -> dict:
        self._tok.save(str(directory / self.FILE))
        return {"kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "file": self.FILE}


def load_tokenizer(data_dir: Path, spec: dict) -> Tokenizer:
    """The tokenizer a prepared dataset was written with (its manifest's ``tokenizer`` entry)."""
    if spec["kind"] == "byte":
        return ByteTokenizer()
    if spec["kind"] == "bpe":
        return BPETokenizer.load(Path(data_dir) / spec["file"])
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
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TEXT, bos_token=EOS_TEXT,
                                   unk_token=None, pad_token=EOS_TEXT, model_max_length=max_length,
                                   clean_up_tokenization_spaces=False)


def tokenizer_files(data_dir: Path, spec: dict) -> list[Path]:
    """The files a prepared dataset's tokenizer needs beside its manifest entry."""
    return [Path(data_dir) / spec["file"]] if spec.get("file") else []
