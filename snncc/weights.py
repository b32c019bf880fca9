"""A model directory's safetensors weights, read a few tensors at a time.

A big model is traced on the meta device (no weights in memory) and its weights come from
here one block at a time (snncc.blockwise): peak memory follows a block, not the model. The
files are untrusted like every model directory: the index must name flat files inside the
folder, and safetensors checks each file's header before any tensor is read.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open

from snncc.errors import ModelError, first_line

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_INDEX_BYTES = 64 * 2**20
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def has_safetensors(folder: Path) -> bool:
    return (folder / SINGLE_FILE).is_file() or (folder / INDEX_FILE).is_file()


class CheckpointWeights:
    """The tensors of a Hugging Face checkpoint by name, in the dtype they are stored in."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files = self._weight_map(folder)
        dtypes = Counter()
        for file in sorted(set(self.files.values())):
            with self._open(file) as handle:
                for key in handle.keys():
                    dtypes[handle.get_slice(key).get_dtype()] += 1
        floating = [name for name, _ in dtypes.most_common() if name in _DTYPES]
        # The dtype most of the model's tensors are stored in: what the user runs it in.
        self.dtype = _DTYPES[floating[0]] if floating else torch.float32

    @staticmethod
    def _weight_map(folder: Path) -> dict[str, str]:
        if (folder / INDEX_FILE).is_file():
            index_path = folder / INDEX_FILE
            if index_path.stat().st_size > MAX_INDEX_BYTES:
                raise ModelError(f"'{index_path}' is larger than {MAX_INDEX_BYTES >> 20} MiB: not a weight index")
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ModelError(f"'{index_path}' is not a safetensors index ({first_line(exc)})") from None
            if not isinstance(weight_map, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise ModelError(f"'{index_path}' is not a safetensors index (its weight_map is malformed)")
        else:
            with safe_open(folder / SINGLE_FILE, "pt") as handle:
                weight_map = dict.fromkeys(handle.keys(), SINGLE_FILE)
        for file in set(weight_map.values()):
            if Path(file).name != file or file in ("", ".", "..") or not (folder / file).is_file():
                raise ModelError(f"the weight index of '{folder}' names '{file}', which is not a file in that folder")
        return weight_map

    def _open(self, file: str):
        try:
            return safe_open(self.folder / file, "pt")
        except Exception as exc:  # safetensors raises its own error type for a malformed header
            raise ModelError(f"'{self.folder / file}' is not a readable safetensors file ({first_line(exc)})") from None

    def read(self, keys: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The named tensors, copied out of the files (converted to `dtype` where given); each
        file is opened once and closed after, so nothing of it stays mapped."""
        by_file: dict[str, list[str]] = {}
        for key in keys:
            if key not in self.files:
                raise ModelError(f"the checkpoint in '{self.folder}' has no tensor '{key}'")
            by_file.setdefault(self.files[key], []).append(key)
        tensors = {}
        for file, names in by_file.items():
            with self._open(file) as handle:
                for key in names:
                    tensor = handle.get_tensor(key)
                    tensors[key] = tensor.to(dtype) if dtype is not None else tensor.clone()
        return tensors
