"""Tokenizers behind one small interface, so programs can carry theirs into artifacts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from snncc.errors import InputError


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


def as_tokenizer(tokenizer) -> Tokenizer:
    """snncc's own tokenizers as they are; a Hugging Face tokenizer object (what
    AutoTokenizer.from_pretrained returns) wrapped, so that programs can save it."""
    if isinstance(tokenizer, (ByteTokenizer, HFTokenizer)):
        return tokenizer
    if all(callable(getattr(tokenizer, name, None)) for name in ("encode", "decode", "save_pretrained")):
        return HFTokenizer(tokenizer)
    if all(callable(getattr(tokenizer, name, None)) for name in ("encode", "decode", "save")):
        return tokenizer  # a tokenizer of the Tokenizer protocol
    raise InputError(f"a {type(tokenizer).__name__} is not a tokenizer: give a Hugging Face tokenizer "
                     "(AutoTokenizer.from_pretrained) or one with encode, decode and save")


REMOTE_CODE_FILES = ("tokenizer_config.json", "config.json")
MAX_CONFIG_BYTES = 16 * 2**20  # a config larger than this is not a config


def refuse_remote_code(source: str | Path) -> None:
    """Refuse a local folder whose configs name Python classes to import from the folder
    (`auto_map`): snncc never runs code that comes with a model, tokenizer or artifact."""
    folder = Path(source)
    if not folder.is_dir():
        return
    for name in REMOTE_CODE_FILES:
        file = folder / name
        if not file.is_file():
            continue
        with file.open("rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise InputError(f"'{file}' is over {MAX_CONFIG_BYTES // 2**20} MiB: not a config")
        try:
            config = json.loads(data.decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise InputError(f"'{file}' is not valid JSON") from None
        if isinstance(config, dict) and "auto_map" in config:
            raise InputError(f"'{file}' asks to run Python code shipped with it (auto_map); snncc never runs "
                             "code from a model, tokenizer or artifact: use a model whose classes transformers has")



def load_hf_tokenizer(source: str | Path, local_files_only: bool = True) -> HFTokenizer:
    """A Hugging Face tokenizer from a folder or hub id, never running code shipped with it."""
    from transformers import AutoTokenizer

    refuse_remote_code(source)
    return HFTokenizer(AutoTokenizer.from_pretrained(source, local_files_only=local_files_only,
                                                     trust_remote_code=False))


def load_tokenizer(directory: Path) -> Tokenizer:
    """Load a tokenizer written by one of the `save` methods above."""
    kind = json.loads((directory / "snncc_tokenizer.json").read_text())["kind"]
    if kind == ByteTokenizer.kind:
        return ByteTokenizer()
    return load_hf_tokenizer(directory)
