"""Placed executor: a program run across devices by accelerate's big-model placement.

The program is cut into its stages (snncc.ir.stages: the prologue, one per decoder block, the
epilogue). Each stage is one module, `stages.N`, that accelerate places whole
(`no_split_module_classes`) on a GPU, the CPU or the disk; StagedProgram runs them in order,
wiring values by name as join_stages does. accelerate's hooks move each stage's inputs to its
device and, for a stage on the disk, read its tensors back before its forward and drop them after.

A program's tensors are buffers, and accelerate keeps an offloaded stage's buffers in memory
unless told to offload them too (`offload_buffers=True`). A disk stage's tensors are written to
a folder of their own under the offload folder, because accelerate reuses, unchecked, an offload
index it finds in the folder it is given.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import weakref
from collections.abc import Mapping
from pathlib import Path

import accelerate
import torch
import torch.fx as fx
from accelerate.utils import convert_file_size_to_int, get_balanced_memory
from torch import nn

from snncc.backends.fuse import fuse_for_execution
from snncc.backends.reference import point_factories_at
from snncc.errors import InputError
from snncc.ir.ops import execution_mode
from snncc.ir.stages import Stage, last_readers, split_stages

PLACEMENTS = ("auto", "balanced", "balanced_low_0", "sequential")
MAX_DEVICE_MAP_BYTES = 2**20  # a map names one device per stage: a bigger file is not one
Device = int | str  # a GPU index, "cpu" or "disk": how accelerate's device maps name devices
_GPU = re.compile(r"cuda(?::(\d+))?|(\d+)")
_STAGE_KEY = re.compile(r"|stages|stages\.\d+")  # the whole program, or one stage


class ProgramStage(nn.Module):
    """One stage of a program: a graph that reads `inputs` and returns the tuple `outputs`."""

    def __init__(self, stage: Stage, mode: str):
        super().__init__()
        self.graph_module = fuse_for_execution(stage.graph_module) if mode == "fused" else stage.graph_module
        self.inputs = stage.inputs
        self.outputs = stage.outputs

    def forward(self, *values: torch.Tensor) -> tuple:
        return self.graph_module(*values)


class StagedProgram(nn.Module):
    """A program as a list of stages, each run on the values of the same name that earlier
    stages returned; a value is dropped after the last stage that reads it."""

    def __init__(self, gm: fx.GraphModule, mode: str):
        super().__init__()
        self.model_inputs = [node.name for node in gm.graph.nodes if node.op == "placeholder"]
        self.stages = nn.ModuleList(ProgramStage(stage, mode) for stage in split_stages(gm))
        self._last_reader = last_readers(self.stages)

    def forward(self, *model_inputs: torch.Tensor) -> torch.Tensor:
        values = dict(zip(self.model_inputs, model_inputs, strict=True))
        *middle, last = self.stages
        for index, stage in enumerate(middle):
            values.update(zip(stage.outputs, stage(*(values[name] for name in stage.inputs)), strict=True))
            for name in [n for n in values if self._last_reader.get(n, -1) <= index]:
                del values[name]
        (output,) = last(*(values[name] for name in last.inputs))
        return output


class PlacedExecutor:
    """Runs a program's stages where `device_map` puts them (a placement name, or a dict from
    stage module names to devices), without autograd; outputs come back on the CPU."""

    def __init__(self, gm: fx.GraphModule, device_map: str | Mapping, max_memory: Mapping | None = None,
                 offload_folder: str | Path | None = None, mode: str = "fused"):
        self.gm = gm  # the program itself, where it is: profiling runs it
        self.mode = mode
        staged = StagedProgram(gm, mode)
        self.device_map = resolve_device_map(staged, device_map, checked_max_memory(max_memory))
        main = main_device(self.device_map)
        self.device = _torch_device(main)
        _point_stages_at(staged, self.device_map, main)
        offload_dir = _offload_dir(self, offload_folder) if "disk" in self.device_map.values() else None
        # A program's tensors are buffers: without offload_buffers a stage on the disk (or, beside
        # a GPU, on the CPU) would keep them in memory, on its execution device. A stage's graph
        # reads tensors of container modules it never calls: its hook must load them all.
        self._staged = accelerate.dispatch_model(staged, self.device_map, main_device=main, offload_dir=offload_dir,
                                                 offload_buffers=True, preload_module_classes=[ProgramStage.__name__])

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), execution_mode(self.mode):
            return self._staged(input_ids.to(self.device)).cpu()


def stage_devices(gm: fx.GraphModule, device_map: str | Mapping, max_memory: Mapping | None = None
                  ) -> list[torch.device]:
    """Where each stage of `gm` (a traced ANN, its tensors possibly meta) computes under
    `device_map`: on its GPU, else (a stage accelerate puts on the CPU or the disk) on the CPU.
    A block-by-block compile holds one stage at a time, so the disk saves it nothing."""
    staged = StagedProgram(gm, mode="unrolled")
    placed = resolve_device_map(staged, device_map, checked_max_memory(max_memory))
    return [_torch_device(device if isinstance(device, int) else "cpu")
            for device in (placed[f"stages.{i}"] for i in range(len(staged.stages)))]


def resolve_device_map(staged: StagedProgram, device_map: str | Mapping,
                       max_memory: dict[Device, int] | None) -> dict[str, Device]:
    """The device of every stage (`stages.N`): inferred by accelerate for a placement name,
    checked and spelled out per stage for a dict."""
    if isinstance(device_map, str):
        if device_map not in PLACEMENTS:
            raise InputError(f"unknown device map '{device_map}': use one of {', '.join(PLACEMENTS)}, or a dict")
        device_map = _inferred(staged, device_map, max_memory)
    elif not isinstance(device_map, Mapping):
        raise InputError(f"a device map is a placement name or a dict, not {type(device_map).__name__}")
    return _per_stage(len(staged.stages), device_map)


def _inferred(staged: StagedProgram, placement: str, max_memory: dict[Device, int] | None) -> dict:
    """accelerate's map for `placement`; as transformers does, every placement but "sequential"
    first balances the memory budget over the GPUs (a no-op without GPUs)."""
    no_split = [ProgramStage.__name__]
    if placement != "sequential":
        max_memory = get_balanced_memory(staged, dict(max_memory) if max_memory else None, no_split,
                                         low_zero=placement == "balanced_low_0")
    return accelerate.infer_auto_device_map(staged, max_memory=dict(max_memory) if max_memory else None,
                                            no_split_module_classes=no_split)


def _per_stage(count: int, device_map: Mapping) -> dict[str, Device]:
    """`device_map` with one entry per stage: an entry for the whole program ('' or 'stages',
    as accelerate writes a map that fits one device) first, stage entries over it."""
    names = [f"stages.{i}" for i in range(count)]
    placed: dict[str, Device] = {}
    for key in sorted(device_map, key=lambda k: (not isinstance(k, str), len(str(k)))):
        if not isinstance(key, str) or not (key in ("", "stages") or key in names):
            raise InputError(f"the device map names '{key}', which is not a stage of this program: use stages.0 "
                             f"(the prologue) to stages.{count - 1} (the epilogue), or '' for all")
        device = device_of(device_map[key])
        placed.update({name: device for name in names if key in ("", "stages", name)})
    missing = [name for name in names if name not in placed]
    if missing:
        raise InputError(f"the device map places no device for {', '.join(missing)}: map every stage, "
                         f"stages.0 to stages.{count - 1}")
    return placed


def device_of(value: object) -> Device:
    """A device as accelerate's maps name it ("cpu", "disk" or a GPU index), from "cpu", "disk",
    an index, "cuda" or "cuda:N"; a GPU must be present."""
    if isinstance(value, torch.device):
        value = str(value)
    if isinstance(value, str) and value in ("cpu", "disk"):
        return value
    match = _GPU.fullmatch(value) if isinstance(value, str) else None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        index = value
    elif match:
        index = int(match.group(1) or match.group(2) or 0)
    else:
        raise InputError(f"'{value}' is not a device for a device map: give cpu, disk, a GPU index or cuda:N")
    if not torch.cuda.is_available():
        raise InputError(f"device '{value}' is named for placement but no CUDA GPU is available here: "
                         "place the program on cpu and disk")
    if index >= torch.cuda.device_count():
        raise InputError(f"device '{value}': this machine has {torch.cuda.device_count()} CUDA device(s)")
    return index


def main_device(device_map: Mapping[str, Device]) -> Device:
    """Where inputs go and offloaded stages run: the first GPU in stage order, else the CPU
    (accelerate's own rule, made deterministic: it picks one of a set)."""
    return next((device for device in device_map.values() if isinstance(device, int)), "cpu")


def _point_stages_at(staged: StagedProgram, device_map: Mapping[str, Device], main: Device) -> None:
    """Make each stage create its tensors where it runs: on its GPU, else (cpu, disk) on `main`."""
    for index, stage in enumerate(staged.stages):
        device = device_map[f"stages.{index}"]
        point_factories_at(stage.graph_module, _torch_device(device if isinstance(device, int) else main))


def _torch_device(device: Device) -> torch.device:
    return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)


def checked_max_memory(max_memory: Mapping | None) -> dict[Device, int] | None:
    """`max_memory` ({device: size}, sizes in bytes or as "2GiB", "500MB") with its devices as
    accelerate names them and its sizes in bytes."""
    if max_memory is None:
        return None
    return {device_of(device): memory_size(size) for device, size in max_memory.items()}


def memory_size(size: object) -> int:
    """Bytes, from a count of bytes or a size with a unit, as accelerate reads it ("2GiB", "500MB")."""
    if isinstance(size, str) and size.strip().isdigit():
        size = int(size)
    try:
        if isinstance(size, bool) or not isinstance(size, int | str):
            raise ValueError
        count = convert_file_size_to_int(size.strip() if isinstance(size, str) else size)
    except (ValueError, OverflowError):
        count = -1
    if count < 0:
        raise InputError(f"'{size}' is not a memory size: give bytes or a number and a unit, e.g. 2GiB or 500MB")
    return count


def parse_max_memory(text: str) -> dict[Device, int]:
    """`cpu=2GiB,0=20GiB` (the CLI's --max-memory) as a max_memory dict."""
    budget: dict[Device, int] = {}
    try:
        for entry in text.split(","):
            device, equals, size = (part.strip() for part in entry.partition("="))
            if not equals or not device or not size:
                raise InputError(f"'{entry.strip()}' is not DEVICE=SIZE")
            key = device_of(device)
            if key in budget:
                raise InputError(f"'{device}' is given twice")
            budget[key] = memory_size(size)
    except InputError as exc:
        raise InputError(f"max memory '{text}': {exc} (give e.g. cpu=2GiB,0=20GiB)") from None
    return budget


def parse_device_map(text: str) -> str | dict[str, Device]:
    """The CLI's --device-map: a placement name, or a JSON file mapping stage module names
    (stages.0 ... stages.N, or '' for all) to devices, parsed and checked."""
    if text in PLACEMENTS:
        return text
    path = Path(text)
    if not path.is_file():
        raise InputError(f"device map '{text}' is neither {', '.join(PLACEMENTS)} nor a JSON file")
    if path.stat().st_size > MAX_DEVICE_MAP_BYTES:
        raise InputError(f"device map '{text}' is over {MAX_DEVICE_MAP_BYTES // 2**10} KiB: not a device map")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"device map '{text}' is not a readable JSON file ({type(exc).__name__})") from None
    if not isinstance(entries, dict) or not entries:
        raise InputError(f"device map '{text}' must hold a JSON object such as {{\"stages.0\": \"cpu\"}}")
    for key in entries:
        if not _STAGE_KEY.fullmatch(key):
            raise InputError(f"device map '{text}' names '{key}': name stages stages.0, stages.1, ... ('' for all)")
    try:
        return {key: device_of(device) for key, device in entries.items()}
    except InputError as exc:
        raise InputError(f"device map '{text}': {exc}") from None


def _offload_dir(owner: object, offload_folder: str | Path | None) -> str:
    """A fresh folder under `offload_folder` for the disk stages' tensors, removed with `owner`."""
    if offload_folder is None:
        raise InputError("the device map puts stages on the disk, which needs an offload folder: give one "
                         "(offload_folder)")
    try:
        Path(offload_folder).mkdir(parents=True, exist_ok=True)
        folder = tempfile.mkdtemp(prefix="snncc-offload-", dir=offload_folder)
    except OSError as exc:
        raise InputError(f"cannot use offload folder '{offload_folder}': {exc.strerror or exc}") from None
    weakref.finalize(owner, shutil.rmtree, folder, ignore_errors=True)
    return folder
