"""A block-by-block compile's finished blocks on disk, so a killed compile resumes.

`snncc compile MODEL -o out.snn` keeps, beside out.snn, a folder `.out.snn.parts` holding each
compiled block as it finishes: its graph as JSON, its new weights as safetensors (mapped back,
so they leave memory), and its state: the calibration batch's values at its output (what the
next block reads) and the ranges it recorded. progress.json, written last, counts the blocks
that are complete. The folder carries a key: a hash
of everything that decides the program (the traced model and its weight files, the pipeline
and its options, T, the weight dtype, the calibration tokens, snncc's version). Run the same
command again after a kill and the compile starts at the first unfinished block; anything
else finds another key and starts afresh. The artifact is assembled from the parts at the
end and the folder removed.

The folder is read back like an artifact (snncc.artifact's graph loader, safetensors for
tensors): nothing in it runs code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
import torch.fx as fx
from safetensors import safe_open

from snncc.calibration import ActivationStats
from snncc.errors import ArtifactError, SnnccError
from snncc.ir.rewrite import set_tensor
from snncc.ir.stages import Stage
from snncc.pipeline import PassRecord
from snncc.version import __version__

log = logging.getLogger(__name__)
PROGRESS = "progress.json"


def parts_folder(artifact: Path) -> Path:
    return artifact.with_name(f".{artifact.name}.parts")


def compile_key(ann: fx.GraphModule, weight_files: list[Path], pipeline_spec: str, T: int, dtype: str,
                batches: list[torch.Tensor]) -> str:
    """A hash of what decides the compiled program (see the module docstring)."""
    digest = hashlib.sha256(f"{__version__}|{pipeline_spec}|{T}|{dtype}|{ann.graph}".encode())
    for file in sorted(weight_files):
        stat = file.stat()
        digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    for batch in batches:
        digest.update(batch.numpy().tobytes())
    return digest.hexdigest()


@dataclass
class Resumed:
    """What the finished blocks left: their compiled stages, pass records and tensors, and the
    values and ranges the next block starts from."""

    stages: list[Stage]
    records: list[list[PassRecord]]
    taken: dict[str, torch.Tensor]
    values: dict[str, list]
    stats: dict[str, ActivationStats]


class CompileParts:
    """The parts folder of one compile (module docstring)."""

    def __init__(self, folder: Path, key: str):
        self.folder = folder
        self.key = key
        self.blocks: list[tuple[Path, dict[str, torch.Tensor]]] = []  # each block's weight file and its tensors
        self._saved_stats: set[str] = set()  # ranges kept by earlier blocks' state files

    def resume(self) -> Resumed | None:
        """The finished blocks of an earlier run of this compile, or None (the folder is then
        emptied for a fresh start; so is a folder whose files do not read back)."""
        progress = self._progress()
        if progress is not None and progress.get("key") == self.key:
            try:
                resumed = self._read(progress["done"])
                log.warning("resuming the compile at block %d of its parts in %s", len(resumed.stages), self.folder)
                return resumed
            except (SnnccError, OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("the compile's parts in %s do not read back (%s): starting afresh", self.folder, exc)
                self.blocks.clear()
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        return None

    def _read(self, done: int) -> Resumed:
        from snncc.artifact import graph_from_json

        resumed = Resumed([], [], {}, {}, {})
        for index in range(done):
            block = json.loads((self.folder / f"block-{index:05d}.json").read_text())
            weights = self.folder / f"block-{index:05d}.safetensors"
            mapped = _mapped(weights)
            resumed.taken.update(mapped)
            self.blocks.append((weights, mapped))
            graph = graph_from_json(block["graph"], set(resumed.taken), max_inputs=len(block["inputs"]) + 1)
            root = torch.nn.Module()
            for node in graph.nodes:
                if node.op == "get_attr":
                    set_tensor(root, node.target, resumed.taken[node.target])
            resumed.stages.append(Stage(block["name"], fx.GraphModule(root, graph), block["inputs"],
                                        block["outputs"]))
            resumed.records.append([PassRecord(**record) for record in block["records"]])
            for key, tensor in _mapped(self.folder / f"block-{index:05d}.state.safetensors").items():
                kind, name, *rest = key.split("|")
                if kind == "stat":
                    resumed.stats[name] = ActivationStats(tensor.clone(), int(rest[0]))
                elif index == done - 1:  # the values after the last finished block
                    resumed.values.setdefault(name, []).append(tensor.clone())
        self._saved_stats = set(resumed.stats)
        for name, kind in block["value_kinds"].items():
            if kind == "int":  # a size the graph passes between blocks
                resumed.values[name] = [int(t) for t in resumed.values[name]]
        return resumed

    def _progress(self) -> dict | None:
        try:
            progress = json.loads((self.folder / PROGRESS).read_text())
        except (OSError, ValueError):
            return None
        return progress if isinstance(progress, dict) and isinstance(progress.get("done"), int) else None

    def save_block(self, index: int, stage: Stage, new: dict[str, torch.Tensor], records: list[PassRecord],
                   values: dict[str, list], stats: dict[str, ActivationStats]) -> dict[str, torch.Tensor]:
        """Keep a finished block and what the next needs; returns its new tensors mapped from
        the file (they leave memory)."""
        from snncc.artifact import graph_to_json

        weights = self.folder / f"block-{index:05d}.safetensors"
        safetensors.torch.save_file({k: t.detach().contiguous() for k, t in new.items()}, weights)
        state, kinds = {}, {}
        for name, batches in values.items():  # what the next block reads
            kinds[name] = "int" if isinstance(batches[0], int) else "tensor"
            for i, value in enumerate(batches):
                state[f"value|{name}|{i:06d}"] = torch.tensor(value) if isinstance(value, int) else value.contiguous()
        for name in set(stats) - self._saved_stats:  # the ranges this block recorded
            state[f"stat|{name}|{stats[name].samples}"] = stats[name].absmax.contiguous()
        safetensors.torch.save_file(state, self.folder / f"block-{index:05d}.state.safetensors")
        self._saved_stats |= set(stats)
        block = {"name": stage.name, "inputs": stage.inputs, "outputs": stage.outputs, "value_kinds": kinds,
                 "graph": graph_to_json(stage.graph_module.graph), "records": [vars(r) for r in records]}
        _write_json(self.folder / f"block-{index:05d}.json", block)
        _write_json(self.folder / PROGRESS, {"key": self.key, "done": index + 1})  # last: the block counts now
        mapped = _mapped(weights)
        self.blocks.append((weights, mapped))
        return mapped

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _write_json(path: Path, value) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, default=str))
    os.replace(tmp, path)


def _mapped(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, mapped (not read): they cost memory only when used."""
    try:
        with safe_open(path, "pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors raises its own error type for a malformed file
        raise ArtifactError(f"the compile's parts in '{path.parent}' are damaged ({exc}): delete that folder") from None
