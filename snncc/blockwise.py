"""Block-by-block compile: the pipeline runs on one stage (prologue, decoder block, epilogue)
at a time, as sequential GPTQ/AWQ calibration does.

Each stage's weights are loaded when it starts (`StageWeights.load`), the calibration batch
runs through it (its outputs are the next stage's inputs, kept between stages), the passes
rewrite it, the compiled stage goes to disk where the compile writes an artifact
(snncc.parts), and the stage's weights are dropped (`StageWeights.release`) before the next
stage loads. Peak memory follows one block plus the calibration activations.

Every range a pass reads comes from the ANN (snncc.calibration), and the passes of a local
pipeline rewrite each block from that block alone, so the joined program equals the
whole-model compile's, value for value (tests/test_blockwise.py). Passes that run the whole
ANN as a teacher (qcfs, calibrate) cannot go block by block: `compile_graph` keeps those
pipelines on the whole-model path.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

import torch
import torch.fx as fx

from snncc.backends.reference import point_factories_at
from snncc.calibration import CalibrationContext
from snncc.ir.rewrite import copy_graph_module, get_tensor, set_tensor
from snncc.ir.stages import Stage, join_stages, last_readers, split_stages
from snncc.ir.storage import compute_in_float32, store_weights
from snncc.models import LoadedModel
from snncc.parts import CompileParts, Resumed
from snncc.pipeline import PassManager, PassRecord, Pipeline
from snncc.progress import bar
from snncc.resume import RUN_THE_ANN

log = logging.getLogger(__name__)


def runs_by_block(pipeline: Pipeline) -> bool:
    """Whether each pass of `pipeline` rewrites a block from that block alone."""
    return not any(p.name in RUN_THE_ANN for p in pipeline.passes)


class StageWeights:
    """Where a stage's weights come from and go: the default keeps everything in memory (the
    ANN's tensors are the stage's already); a lazily loaded model reads and drops them
    (CheckpointStageWeights)."""

    def load(self, stage: Stage) -> None:
        """Give the stage's graph its ANN weights before it runs."""

    def release(self, stage: Stage, program: fx.GraphModule) -> None:
        """The stage is compiled: its ANN weights and the program's may leave memory."""


class CheckpointStageWeights(StageWeights):
    """A lazily loaded model's weights (snncc.models, `LoadedModel.weights`): each stage reads
    its own from the checkpoint, in the dtype stored there, and drops them when it is compiled."""

    def __init__(self, loaded: LoadedModel):
        self.checkpoint = loaded.weights
        self.aliases = loaded.parameter_keys()

    def _key(self, target: str) -> str:
        return next((k for k in self.aliases.get(target, []) if k in self.checkpoint.files),
                    target.removeprefix("model."))

    def load(self, stage: Stage) -> None:
        gm = stage.graph_module
        targets = [n.target for n in gm.graph.nodes if n.op == "get_attr" and get_tensor(gm, n).is_meta]
        tensors = self.checkpoint.read(sorted({self._key(t) for t in targets}))
        for target in targets:
            set_tensor(gm, target, tensors[self._key(target)])

    def release(self, stage: Stage, program: fx.GraphModule) -> None:
        gm = stage.graph_module
        for node in gm.graph.nodes:
            if node.op == "get_attr" and node.target in self.aliases:
                set_tensor(gm, node.target, get_tensor(gm, node).to("meta"))


def stage_weights(loaded: LoadedModel) -> StageWeights:
    """Where the stages of `loaded`'s traced graph get their weights."""
    return CheckpointStageWeights(loaded) if loaded.weights is not None else StageWeights()


def load_all_weights(loaded: LoadedModel, ann: fx.GraphModule) -> None:
    """Give a lazily loaded model's traced graph all its weights at once, computing in float32,
    for what needs the whole ANN in memory: the whole-model compile path, the debugger."""
    if loaded.weights is not None:
        CheckpointStageWeights(loaded).load(Stage("model", ann, [], []))
        compute_in_float32(ann)


def run_stages(ann: fx.GraphModule, batches: list[torch.Tensor], weights: StageWeights,
               progress: bool | None = None) -> list[torch.Tensor]:
    """The ANN's outputs for `batches`, run a stage at a time over all of them (each stage's
    weights loaded once): the reference a lazily loaded model is evaluated against."""
    stages = split_stages(ann)
    last_reader = last_readers(stages)
    values: dict[str, list] = {}
    outputs: list = []
    for index, stage in enumerate(bar(stages, desc="running the ANN", progress=progress, unit="block")):
        weights.load(stage)
        with torch.no_grad():
            outputs = [stage.graph_module(*x) if isinstance(x, tuple) else stage.graph_module(x)
                       for x in _stage_batches(stage, index, batches, values)]
        _hand_on(stage, index, outputs, values, last_reader)
        weights.release(stage, stage.graph_module)
    return [output[0] for output in outputs]


def _stage_batches(stage: Stage, index: int, batches: list, values: dict[str, list]) -> list:
    """What stage `index` runs on: the token batches for the first, else per batch the tuple
    of its inputs, from the values earlier stages handed on."""
    return batches if index == 0 else list(zip(*(values[name] for name in stage.inputs), strict=True))


def _hand_on(stage: Stage, index: int, outputs: list, values: dict[str, list], last_reader: dict[str, int]) -> None:
    """Keep the stage's outputs (per batch) for the stages after it; drop what none reads."""
    for position, name in enumerate(stage.outputs):
        values[name] = [output[position] for output in outputs]
    for name in [n for n in values if last_reader.get(n, -1) <= index]:
        del values[name]


def ann_outputs(loaded: LoadedModel, ann: fx.GraphModule, batches: list[torch.Tensor],
                progress: bool | None = None) -> list[torch.Tensor]:
    """The model's own outputs for `batches` (the reference fidelity is measured against): from
    its module where it is in memory, else its traced graph run a stage at a time."""
    if loaded.weights is None:
        with torch.no_grad():
            return [loaded.module(batch) for batch in batches]
    return run_stages(ann, batches, stage_weights(loaded), progress)


def compile_stages(ann: fx.GraphModule, ctx: CalibrationContext, pipeline: Pipeline,
                   weights: StageWeights | None = None, dtype: torch.dtype = torch.float32,
                   progress: bool | None = None, parts: CompileParts | None = None,
                   devices: list[torch.device] | None = None) -> tuple[fx.GraphModule, list[PassRecord]]:
    """Run `pipeline` on each stage of `ann` in turn, each compiled stage's weights stored in
    `dtype` (snncc.ir.storage) and, with `parts`, written to disk as the stage finishes and
    mapped back (a compile killed part-way resumes from there: snncc.parts); the joined
    program graph and, per pass, its record summed over the stages. `devices`: where each
    stage's calibration batches run (snncc.backends.placed.stage_devices; default the CPU);
    the passes run on the CPU."""
    weights = weights or StageWeights()
    stages = split_stages(ann)
    last_reader = last_readers(stages)
    resumed = parts.resume() if parts is not None else None
    if resumed is None:
        resumed = Resumed([], [], {}, {}, {})
    ctx.stats.update(resumed.stats)
    compiled, records, taken, values = resumed.stages, resumed.records, resumed.taken, resumed.values
    # A context that holds every range already (one reused across compiles, as a budget's
    # search does) runs no calibration batch: the passes read only ranges. A resumable
    # compile keeps running them, to store what the next block reads.
    calibrate = parts is not None or any(ctx.unrecorded(stage.graph_module) for stage in stages)
    with bar(total=len(stages), initial=len(compiled), desc="compiling", progress=progress, unit="block",
             leave=True) as shown:
        for index in range(len(compiled), len(stages)):
            stage = stages[index]
            shown.set_postfix_str(f"{stage.name}: loading weights")
            weights.load(stage)
            batches = _stage_batches(stage, index, ctx.batches, values) if calibrate else []
            device = devices[index] if devices else _CPU
            if device != _CPU:
                _move_stage(stage, device)
                batches = _moved(batches, device)
            # Ranges go into (and come from) the compile's context: a context reused across
            # compiles records each once, as on the whole-model path.
            stage_ctx = CalibrationContext(batches, ctx.source, stats=ctx.stats, ann_only=True,
                                           range_factors=ctx.range_factors)
            stage_ctx.attach(stage.graph_module)
            shown.set_postfix_str(f"{stage.name}: recording calibration activations")
            keep = bool(stage.outputs)  # not the logits of the last
            outputs = stage_ctx.record_all(keep_outputs=keep) if calibrate else []
            if device != _CPU:  # outputs, ranges and the stage come back: the passes run on the CPU
                outputs = _moved(outputs, _CPU)
                for stats in ctx.stats.values():
                    stats.absmax = stats.absmax.to(_CPU)
                _move_stage(stage, _CPU)
            manager = PassManager(list(pipeline.passes),
                                  on_pass=lambda p, name=stage.name: shown.set_postfix_str(f"{name}: pass {p.name}"))
            program = copy_graph_module(stage.graph_module)
            compute_in_float32(program)  # calibrated in the checkpoint's dtype; passes and neurons work in float32
            program = manager.run(program, stage_ctx)
            store_weights(program, dtype)
            new = claim_names(program, taken)
            _hand_on(stage, index, outputs, values, last_reader)
            compiled.append(Stage(stage.name, program, stage.inputs, stage.outputs))
            records.append(manager.records)
            if parts is not None:
                shown.set_postfix_str(f"{stage.name}: writing")
                _map_written(parts, compiled, taken)  # the block before: written while this one computed
                parts.save_block(index, compiled[-1], new, manager.records, values, ctx.stats)
            weights.release(stage, program)
            release_free_memory()
            shown.update()
        shown.set_postfix_str("")
    if parts is not None:
        _map_written(parts, compiled, taken)
    return join_stages(compiled), _summed(records)


def _map_written(parts: CompileParts, compiled: list[Stage], taken: dict[str, torch.Tensor]) -> None:
    """Once the block last saved is on disk, its program reads its new tensors from there, and
    so does any later stage that shares one (a tied embedding)."""
    written = parts.written_tensors()
    if written is None:
        return
    index, mapped = written
    in_memory = {id(taken[name]): name for name in mapped}
    for stage in compiled[index:]:
        gm = stage.graph_module
        for node in gm.graph.nodes:
            name = in_memory.get(id(get_tensor(gm, node))) if node.op == "get_attr" else None
            if name is not None:
                set_tensor(gm, node.target, mapped[name])
    taken.update(mapped)


_CPU = torch.device("cpu")


def _move_stage(stage: Stage, device: torch.device) -> None:
    """The stage's tensors, and the tensors its graph creates, on `device`."""
    point_factories_at(stage.graph_module, device)
    stage.graph_module.to(device)


def _moved(value, device: torch.device):
    """`value` (a tensor, or lists and tuples of them and of sizes) with its tensors on `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, list | tuple):
        return type(value)(_moved(v, device) for v in value)
    return value


def release_free_memory() -> None:
    """Hand memory freed by the block just compiled back to the system. glibc keeps freed
    blocks of medium size in its heap, fragmented by the next block's allocations: measured
    on a 32-block model, the compile's resident memory crept from 0.7 to 1.35 GiB without this
    and stayed at 0.7-0.8 GiB with it. A no-op without glibc."""
    global _malloc_trim
    if _malloc_trim is None:
        library = ctypes.util.find_library("c")
        _malloc_trim = getattr(ctypes.CDLL(library), "malloc_trim", False) if library else False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def claim_names(program: fx.GraphModule, taken: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Give a compiled stage's tensors names no earlier stage uses for another tensor: a name
    an earlier stage holds an equal tensor under is shared (a tied embedding, read for the
    prologue and again for the epilogue, is stored once), any other is renamed. Records the
    stage's tensors in `taken`; returns those new to this stage."""
    new: dict[str, torch.Tensor] = {}
    renamed: dict[str, str] = {}
    for node in program.graph.nodes:
        if node.op != "get_attr":
            continue
        if node.target in renamed:
            node.target = renamed[node.target]
            continue
        tensor, earlier = get_tensor(program, node), taken.get(node.target)
        if node.target in new or earlier is tensor:
            continue
        if earlier is None:
            new[node.target] = tensor
        elif earlier.dtype == tensor.dtype and earlier.shape == tensor.shape and torch.equal(earlier, tensor):
            set_tensor(program, node.target, earlier)
        else:
            target, i = node.target, 1
            while f"{target}_{i}" in taken or f"{target}_{i}" in new:
                i += 1
            renamed[node.target] = node.target = f"{target}_{i}"
            set_tensor(program, node.target, tensor)
            new[node.target] = tensor
    program.recompile()
    taken.update(new)
    return new


def _summed(per_stage: list[list[PassRecord]]) -> list[PassRecord]:
    """One record per pass: seconds and nodes summed over the stages, modified if any stage was."""
    summed = []
    for records in zip(*per_stage, strict=True):
        first = records[0]
        reports = [r.report for r in records if r.report]
        summed.append(PassRecord(first.name, first.options, sum(r.seconds for r in records),
                                 any(r.modified for r in records), sum(r.nodes for r in records),
                                 reports[0] if len(reports) == 1 else ({"blocks": reports} if reports else None)))
    return summed

