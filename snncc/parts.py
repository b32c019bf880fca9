"""A block-by-block compile's finished blocks on disk, so a killed compile resumes.

`snncc compile MODEL -o out.snn` keeps, beside out.snn, a folder `.out.snn.parts` holding each
compiled block as it finishes: its graph as JSON, its state (the calibration batch's values at
its output, which the next block reads, and the ranges it recorded), and its new weights, as
one safetensors shard appended to the artifact itself, which is written there
(`artifact.zip`, snncc.resumable_zip) and mapped back, so the weights leave memory and are
written once. progress.json, written last, counts the blocks that are complete and records
the artifact's members so far. The folder carries a key: a hash
of everything that decides the program (the traced model and its weight files, the pipeline
and its options, T, the weight dtype, the calibration tokens, snncc's version). Run the same
command again after a kill and the compile starts at the first unfinished block; anything
else finds another key and starts afresh. At the end the artifact gets its graph, tokenizer
and manifest (snncc.artifact's `ArtifactWriter`), moves to out.snn, and the folder is removed.

The folder is read back like an artifact (snncc.artifact's graph loader, snncc.shards for the
weights, safetensors for the state): nothing in it runs code.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
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
from snncc.resumable_zip import ResumableZip
from snncc.shards import map_shards, shard_name, write_shard
from snncc.version import __version__

log = logging.getLogger(__name__)
PROGRESS = "progress.json"
ARTIFACT = "artifact.zip"


def parts_folder(artifact: Path) -> Path:
    return artifact.with_name(f".{artifact.name}.parts")


def compile_key(ann: fx.GraphModule, weight_files: list[Path], pipeline_spec: str, T: int, dtype: str,
                batches: list[torch.Tensor], range_factors: dict[str, torch.Tensor] | None = None) -> str:
    """A hash of what decides the compiled program (see the module docstring)."""
    digest = hashlib.sha256(f"{__version__}|{pipeline_spec}|{T}|{dtype}|{ann.graph}".encode())
    for name, factor in sorted((range_factors or {}).items()):  # a precision plan
        digest.update(name.encode() + factor.numpy().tobytes())
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
        self.artifact: ResumableZip | None = None  # opened by `resume`
        self.shards: dict[str, tuple[str, dict[str, torch.Tensor]]] = {}  # shard -> its SHA-256 and tensors
        self._saved_stats: set[str] = set()  # ranges kept by earlier blocks' state files
        self._writer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="snncc-parts")
        self._pending: tuple[int, concurrent.futures.Future] | None = None  # the block being written

    def resume(self) -> Resumed | None:
        """The finished blocks of an earlier run of this compile, or None (the folder is then
        emptied for a fresh start; so is a folder whose files do not read back)."""
        progress = self._progress()
        if progress is not None and progress.get("key") == self.key:
            try:
                self.artifact = ResumableZip(self.folder / ARTIFACT, progress["artifact"])
                resumed = self._read(progress["done"], progress["sha256"])
                log.warning("resuming the compile at block %d of its parts in %s", len(resumed.stages), self.folder)
                return resumed
            except (SnnccError, OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                log.warning("the compile's parts in %s do not read back (%s): starting afresh", self.folder, exc)
                self.close()
                self.shards.clear()
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        self.artifact = ResumableZip(self.folder / ARTIFACT)
        return None

    def _read(self, done: int, sums: dict[str, str]) -> Resumed:
        from snncc.artifact import graph_from_json

        resumed = Resumed([], [], {}, {}, {})
        for member in self.artifact.members():
            tensors = map_shards(self.artifact.path, [member])
            self.shards[member.filename] = (str(sums[member.filename]), tensors)
            resumed.taken.update(tensors)
        for index in range(done):
            block = json.loads((self.folder / f"block-{index:05d}.json").read_text())
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
                   values: dict[str, list], stats: dict[str, ActivationStats]) -> None:
        """Keep a finished block and what the next needs. It is written in a background thread
        while the next block computes (writing waits on the disk, computing does not);
        `written_tensors` waits for it and hands back its new tensors mapped from the artifact.
        One block is in flight at a time."""
        self.written_tensors()
        recorded = {f"stat|{name}|{stats[name].samples}": stats[name].absmax  # the ranges this block recorded
                    for name in set(stats) - self._saved_stats}
        self._saved_stats |= set(stats)
        self._pending = (index, self._writer.submit(self._write_block, index, stage, new, records, dict(values),
                                                    recorded))

    def written_tensors(self) -> tuple[int, dict[str, torch.Tensor]] | None:
        """The block last handed to `save_block` and its new tensors mapped from the artifact
        (they may leave memory now), once it is written; None if none is pending."""
        if self._pending is None:
            return None
        (index, future), self._pending = self._pending, None
        return index, future.result()

    def _write_block(self, index: int, stage: Stage, new: dict[str, torch.Tensor], records: list[PassRecord],
                     values: dict[str, list], recorded: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from snncc.artifact import graph_to_json

        mapped = self._append_shard(new) if new else {}
        state, kinds = dict(recorded), {}
        for name, batches in values.items():  # what the next block reads
            kinds[name] = "int" if isinstance(batches[0], int) else "tensor"
            for i, value in enumerate(batches):
                state[f"value|{name}|{i:06d}"] = torch.tensor(value) if isinstance(value, int) else value.contiguous()
        safetensors.torch.save_file({k: t.contiguous() for k, t in state.items()},
                                    self.folder / f"block-{index:05d}.state.safetensors")
        block = {"name": stage.name, "inputs": stage.inputs, "outputs": stage.outputs, "value_kinds": kinds,
                 "graph": graph_to_json(stage.graph_module.graph), "records": [vars(r) for r in records]}
        _write_json(self.folder / f"block-{index:05d}.json", block)
        sums = {shard: sha256 for shard, (sha256, _) in self.shards.items()}
        _write_json(self.folder / PROGRESS, {"key": self.key, "done": index + 1, "sha256": sums,
                                            "artifact": self.artifact.state()})  # last: the block counts now
        return mapped

    def _append_shard(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Write `tensors` to the artifact as its next shard; returns them mapped from it."""
        name = shard_name(len(self.shards) + 1)
        sha256 = write_shard(self.artifact.archive, name, tensors)
        self.artifact.state()  # flushed, so the mapping sees the bytes
        mapped = map_shards(self.artifact.path, [self.artifact.archive.NameToInfo[name]])
        self.shards[name] = (sha256, mapped)
        return mapped

    def close(self) -> None:
        """Let go of the artifact file as it stands (its complete members are in progress.json),
        after the block being written, if any: what it recorded stays consistent."""
        with contextlib.suppress(Exception):
            self.written_tensors()
        if self.artifact is not None:
            self.artifact.abandon()
            self.artifact = None

    def remove(self) -> None:
        self.close()
        self._writer.shutdown()
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
