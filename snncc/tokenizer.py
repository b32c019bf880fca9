"""Tokenizers behind one small interface, so programs can carry theirs into artifacts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    """What snncc needs from a tokenizer: text <-> ids, and a way to ship it."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def save(self, directory: Path) -> None: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids (ids 0..255): the tokenizer of the tiny test models."""

    kind = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def save(self, directory: Path) -> None:
        (directory / "snncc_tokenizer.json").write_text(json.dumps({"kind": self.kind}))


class HFTokenizer:
    """A Hugging Face tokenizer, saved with `save_pretrained` and loaded offline."""

    kind = "huggingface"

    def __init__(self, hf_tokenizer) -> None:
        self.hf = hf_tokenizer

    def encode(self, text: str) -> list[int]:
        # Long texts are chunked by snncc, so the model-length warning does not apply.
        return self.hf.encode(text, add_special_tokens=False, verbose=False)

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids)

    def save(self, directory: Path) -> None:
        self.hf.save_pretrained(directory)
        (directory / "snncc_tokenizer.json").write_text(json.dumps({"kind": self.kind}))


def load_tokenizer(directory: Path) -> Tokenizer:
    """Load a tokenizer written by one of the `save` methods above."""
    kind = json.loads((directory / "snncc_tokenizer.json").read_text())["kind"]
    if kind == ByteTokenizer.kind:
        return ByteTokenizer()
    from transformers import AutoTokenizer

    return HFTokenizer(AutoTokenizer.from_pretrained(directory, local_files_only=True))
