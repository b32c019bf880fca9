"""The Python API: compile, load, and the pieces the CLI is a thin layer over."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.fx as fx

from snncc import passes as _passes  # noqa: F401  (registers the passes)
from snncc.artifact import ArtifactWriter
from snncc.blockwise import compile_stages, load_all_weights, runs_by_block, stage_weights
from snncc.budget import BUDGET_T, DEFAULT, Budget, budget_or_default, compile_within_budget, default_budget
from snncc.calibration import CalibrationContext, make_context
from snncc.errors import PipelineError, SnnccError
from snncc.frontend import trace
from snncc.ir.rewrite import copy_graph_module
from snncc.ir.storage import STORAGE_DTYPES, store_weights
from snncc.ir.verify import coverage_report, verify
from snncc.models import CAUSAL_LM, LoadedModel, load_model
from snncc.parts import CompileParts, compile_key, parts_folder
from snncc.pipeline import DEFAULT_PIPELINE, Instrument, PassManager, Pipeline, check_T_given_once
from snncc.program import ProgramInfo, SpikingProgram
from snncc.progress import phase
from snncc.resume import capture, check_resumable, restore, split
from snncc.tokenizer import Tokenizer

log = logging.getLogger(__name__)

CALIB_SEQ_LEN = 128
CALIB_TOKENS = 8192


def _vocab_size(ann: fx.GraphModule, model: LoadedModel) -> int:
    config = getattr(getattr(model.module, "model", None), "config", None)
    if config is not None and getattr(config, "vocab_size", None):
        return int(config.vocab_size)
    for node in ann.graph.nodes:  # the embedding table's rows
        if node.op == "call_function" and node.target == torch.ops.aten.embedding.default:
            return int(node.args[0].meta["val"].shape[0])
    return 2**31 - 1


def load_and_trace(model: str | torch.nn.Module | LoadedModel, tokenizer: Tokenizer | None = None,
                   task: str = CAUSAL_LM, progress: bool | None = None) -> tuple[LoadedModel, fx.GraphModule]:
    """The model loaded (unless it is already) and its ANN graph, each step shown as a phase
    (snncc.progress; None: on a terminal)."""
    if isinstance(model, LoadedModel):
        loaded = model
    else:
        name = model if isinstance(model, str) else type(model).__name__
        with phase(f"loading {name}", progress, f"loaded {name}"):
            loaded = load_model(model, tokenizer, task)
    with phase(f"tracing {loaded.name}", progress, f"traced {loaded.name}"):
        return loaded, trace(loaded)


def prepare(model: str | torch.nn.Module | LoadedModel, calib: str | Path | None = None,
            calib_tokens: int = CALIB_TOKENS, seq_len: int = CALIB_SEQ_LEN,
            tokenizer: Tokenizer | None = None, task: str = CAUSAL_LM,
            progress: bool | None = None) -> tuple[LoadedModel, fx.GraphModule, CalibrationContext]:
    """Load and trace the model and set up calibration: what every pipeline starts from.
    Passes record the ANN tensors they need through the context, each tensor once.
    `progress` (snncc.progress; None: on a terminal) is the compile's: the context carries it."""
    loaded, ann = load_and_trace(model, tokenizer, task, progress)
    verify(ann)
    ctx = make_context(loaded.tokenizer, calib, min(seq_len, loaded.max_positions), calib_tokens)
    ctx.attach(ann, progress=progress)
    return loaded, ann, ctx


def compile_graph(loaded: LoadedModel, ann: fx.GraphModule, ctx: CalibrationContext,
                  passes: str | Pipeline = DEFAULT_PIPELINE, T: int | None = None, debug: bool = False,
                  instrument: Instrument | None = None, device: str = "cpu",
                  stop_after: str | None = None, by_block: bool = True, dtype: str | None = None,
                  save_to: str | Path | None = None, device_map: str | dict | None = None,
                  max_memory: dict | None = None, offload_folder: str | Path | None = None,
                  budget: str | Budget | None = None) -> SpikingProgram:
    """Run a pipeline on a copy of the traced ANN (the ANN itself is left untouched).
    `passes` is a spec, parsed at T (None: the pipeline's default, snncc.pipeline.default_T), or
    a Pipeline parsed already. `stop_after`: run the passes up to and including that one; the
    program carries what the rest need (snncc.resume), to be continued with `resume`.
    A complete compile of a local pipeline goes block by block (snncc.blockwise; the same
    program); `by_block=False`, `debug` (whose pass checks are about the whole graph) and
    `instrument` run the passes on the whole graph at once. `dtype`: what the program stores
    its synapse weights in (snncc.ir.storage), by default the dtype the model's checkpoint has.
    `save_to`: write the artifact there; a block-by-block compile writes each block's weights
    into it as the block finishes (snncc.parts: they leave memory, and a killed compile run
    again resumes at the first unfinished block).
    `device_map` (with `max_memory`, `offload_folder`; snncc.backends.placed): each block's
    calibration batches run on the GPU accelerate places the block on, and the program is
    returned placed by the same map. Only a block-by-block compile takes one.
    `budget` (snncc.budget): give each synapse input's channels the digits that meet it, at
    most T (default BUDGET_T) each; the program is checked against it before it returns.
    `budget=DEFAULT` ("default"): the default fidelity targets where the model allows a budget,
    else the default pipeline at its default T (info.precision says which, and why)."""
    precision = {}
    if budget == DEFAULT:
        budget, why = _default_budget(loaded, ctx)
        precision = {"default": True, "why": why}
        if budget is None:
            passes, T = DEFAULT_PIPELINE, None  # uniform, at the pipeline's own T
    if budget is not None:
        return _compile_within_budget(loaded, ann, ctx, passes, T, budget, device, stop_after, dtype, save_to,
                                      device_map, max_memory, offload_folder, debug or instrument is not None,
                                      precision)
    pipeline = _pipeline(passes, T)
    _, stop = split(pipeline, None, stop_after)
    info = ProgramInfo(model=loaded.name, task=loaded.task, pipeline=pipeline.spec, T=pipeline.steps,
                       max_positions=loaded.max_positions, vocab_size=_vocab_size(ann, loaded),
                       dtype=_storage_dtype(dtype, loaded), generation=loaded.generation, precision=precision)
    block_wise = (by_block and not debug and instrument is None and stop == len(pipeline.passes)
                  and runs_by_block(pipeline))
    devices = _calibration_devices(ann, pipeline, block_wise, device_map, max_memory)
    try:
        program = _compile_and_save(loaded, ann, ctx, pipeline, info, stop, debug, instrument, device, block_wise,
                                    devices, save_to)
    except SnnccError:
        if save_to:  # a compile that fails will fail again: nothing to resume
            shutil.rmtree(parts_folder(Path(save_to)), ignore_errors=True)
        raise
    return program.place(device_map, max_memory, offload_folder) if device_map is not None else program


def _compile_within_budget(loaded: LoadedModel, ann: fx.GraphModule, ctx: CalibrationContext,
                           passes: str | Pipeline, T: int | None, budget: str | Budget, device: str,
                           stop_after: str | None, dtype: str | None, save_to: str | Path | None,
                           device_map: str | dict | None, max_memory: dict | None,
                           offload_folder: str | Path | None, instrumented: bool,
                           precision: dict) -> SpikingProgram:
    """compile_graph with a budget: the plan search compiles the program more than once.
    `precision`: what info.precision also records (why the budget was chosen)."""
    if stop_after or instrumented:
        raise PipelineError("a budget compiles the whole pipeline, more than once: it cannot stop part-way, dump "
                            "or debug the passes")
    budget = Budget.parse(budget) if isinstance(budget, str) else budget
    pipeline = _pipeline(passes, BUDGET_T if T is None and isinstance(passes, str) else T)
    load_all_weights(loaded, ann)  # the sensitivity runs the whole ANN

    def compile_with(plan_ctx: CalibrationContext) -> SpikingProgram:
        return compile_graph(loaded, ann, plan_ctx, pipeline, device=device, dtype=dtype)

    program = compile_within_budget(ann, ctx, pipeline, budget, loaded.task, compile_with, ctx.progress)
    program.info = dataclasses.replace(program.info, precision=precision | program.info.precision)
    if save_to:
        program.save(save_to, ctx.progress)
    return program.place(device_map, max_memory, offload_folder) if device_map is not None else program


def _default_budget(loaded: LoadedModel, ctx: CalibrationContext) -> tuple[Budget | None, str]:
    """snncc.budget.default_budget for this model, its calibration and this machine's free memory."""
    import psutil

    parameters = sum(p.numel() for p in loaded.module.parameters())
    return default_budget(loaded.task, parameters, len(ctx.batches), psutil.virtual_memory().available)


def _calibration_devices(ann: fx.GraphModule, pipeline: Pipeline, block_wise: bool, device_map: str | dict | None,
                         max_memory: dict | None) -> list[torch.device] | None:
    """Where each block calibrates under `device_map` (None: all on the CPU)."""
    if device_map is None:
        return None
    if not block_wise:
        raise PipelineError(f"a device map places a block-by-block compile; '{pipeline.spec}' here runs on the whole "
                            "model (a pass that runs the whole ANN, debugging, or stopping after a pass): compile "
                            "without a device map and place the program when you run it")
    from snncc.backends.placed import stage_devices

    return stage_devices(ann, device_map, max_memory)


def _compile_and_save(loaded: LoadedModel, ann: fx.GraphModule, ctx: CalibrationContext, pipeline: Pipeline,
                      info: ProgramInfo, stop: int, debug: bool, instrument: Instrument | None, device: str,
                      block_wise: bool, devices: list[torch.device] | None,
                      save_to: str | Path | None) -> SpikingProgram:
    """compile_graph's work: block by block where it can, the artifact written as it goes."""
    if not block_wise:
        load_all_weights(loaded, ann)
        program = _run(copy_graph_module(ann), ctx, pipeline, 0, stop, info, loaded.tokenizer, debug, instrument,
                       device)
        if save_to:
            program.save(save_to, ctx.progress)
        return program
    if not save_to:
        return _run_by_block(ann, ctx, pipeline, info, loaded, device, devices, None)
    key = compile_key(ann, loaded.weight_files(), pipeline.spec, pipeline.steps, info.dtype, ctx.batches,
                      ctx.range_factors)
    parts = CompileParts(parts_folder(Path(save_to)), key)
    try:
        program = _run_by_block(ann, ctx, pipeline, info, loaded, device, devices, parts)
        with phase(f"writing {Path(save_to).name}", ctx.progress, f"wrote {Path(save_to).name}"), \
                ArtifactWriter(Path(save_to), parts.artifact) as writer:
            for shard, (sha256, tensors) in parts.shards.items():
                writer.add_stored(shard, sha256, tensors)
            writer.finish(program)
    finally:
        parts.close()
    parts.remove()  # the artifact holds it all now (the program's views of it stay valid)
    return program


def resume(program: SpikingProgram, start_after: str, passes: str | Pipeline = DEFAULT_PIPELINE,
           T: int | None = None, stop_after: str | None = None, debug: bool = False,
           instrument: Instrument | None = None, device: str = "cpu", progress: bool | None = None) -> SpikingProgram:
    """Continue a program compiled with `stop_after`: run the passes of `passes` after
    `start_after` (which must be the passes, with their options, that the program ran). The
    result equals compiling in one go; the program is left as it was."""
    pipeline = _pipeline(passes, T)
    start, stop = split(pipeline, start_after, stop_after)
    check_resumable(program.info, program.resume, pipeline, start, start_after)
    gm, ctx = restore(program.graph_module, program.resume, program.info.calibration.get("source", ""), progress)
    info = dataclasses.replace(program.info, pipeline=pipeline.spec, T=pipeline.steps)
    return _run(gm, ctx, pipeline, start, stop, info, program.tokenizer, debug, instrument, device)


def _pipeline(passes: str | Pipeline, T: int | None) -> Pipeline:
    """`passes` parsed at T, or as parsed already (then at its own T: refused with another)."""
    if not isinstance(passes, Pipeline):
        return Pipeline.parse(passes, T)
    if T is not None and T != passes.T:
        raise PipelineError(f"T={T} given with a pipeline parsed at T={passes.T}: give T to Pipeline.parse")
    return passes


def _storage_dtype(dtype: str | None, loaded: LoadedModel) -> str:
    """The program's weight dtype: the one asked for, else the checkpoint's own."""
    if dtype is None:
        return str(loaded.dtype).removeprefix("torch.")
    if dtype not in STORAGE_DTYPES:
        raise PipelineError(f"unknown weight dtype '{dtype}': use one of {', '.join(STORAGE_DTYPES)}")
    return dtype


def _run_by_block(ann: fx.GraphModule, ctx: CalibrationContext, pipeline: Pipeline, info: ProgramInfo,
                  loaded: LoadedModel, device: str, devices: list[torch.device] | None,
                  parts: CompileParts | None) -> SpikingProgram:
    """Run every pass of `pipeline` one block at a time (snncc.blockwise)."""
    gm, records = compile_stages(ann, ctx, pipeline, stage_weights(loaded), STORAGE_DTYPES[info.dtype],
                                 ctx.progress, parts, devices)
    verify(gm)
    info = dataclasses.replace(info, passes=info.passes + [dict(vars(r)) for r in records], remaining=[],
                               calibration=ctx.summary(), coverage=coverage_report(gm).to_dict())
    return SpikingProgram(gm, info, loaded.tokenizer, device=device)


def _run(gm: fx.GraphModule, ctx: CalibrationContext, pipeline: Pipeline, start: int, stop: int, info: ProgramInfo,
         tokenizer: Tokenizer, debug: bool, instrument: Instrument | None, device: str) -> SpikingProgram:
    """Run passes start..stop of `pipeline` on `gm`; a program stopped early carries what the rest need."""
    manager = PassManager(list(pipeline.passes[start:stop]), debug=debug, instrument=instrument,
                          progress=ctx.progress)
    gm = manager.run(gm, ctx)
    remaining = [p.name for p in pipeline.passes[stop:]]
    state = capture(gm, manager.context) if remaining else None
    if not remaining:
        store_weights(gm, STORAGE_DTYPES[info.dtype])
    info = dataclasses.replace(info, passes=info.passes + [dict(vars(r)) for r in manager.records],
                               remaining=remaining, calibration=ctx.summary(), coverage=coverage_report(gm).to_dict())
    program = SpikingProgram(gm, info, tokenizer, device=device)
    program.resume = state
    return program


def compile(model: str | torch.nn.Module | SpikingProgram, passes: str = DEFAULT_PIPELINE, T: int | None = None,
            calib: str | Path | None = None, calib_tokens: int = CALIB_TOKENS,
            tokenizer: Tokenizer | None = None, task: str = CAUSAL_LM, device: str = "cpu",
            debug: bool = False, progress: bool | None = None, instrument: Callable | None = None,
            stop_after: str | None = None, start_after: str | None = None, dtype: str | None = None,
            save_to: str | Path | None = None, device_map: str | dict | None = None, max_memory: dict | None = None,
            offload_folder: str | Path | None = None, budget: str | None = None) -> SpikingProgram:
    """Trace `model`, calibrate on `calib` text, run the `passes` pipeline, return the program.
    `stop_after`: run the passes up to and including that one. `start_after`: `model` is a
    program (or its .snn file) compiled with stop_after that pass; run the passes after it,
    calibrated as it was (`calib` is not read). `dtype`: the program's weight dtype (float32,
    bfloat16, float16; default: the checkpoint's). `save_to`: write the artifact there as the
    compile goes (see compile_graph): the way to compile a model bigger than memory.
    `device_map`, `max_memory`, `offload_folder`: accelerate's placement for the calibration
    and the returned program (see compile_graph). `budget`: per-channel precision that meets
    it, e.g. "top1=0.995,ppl=1.005" or "energy=0.5" (snncc.budget); the plain default pipeline
    without T or budget gets the default fidelity targets where the model allows (T=14 gives
    uniform steps). `progress`: show each phase (load, trace, calibration, passes, blocks,
    save) on stderr; None: on a terminal."""
    if start_after:
        program = model if isinstance(model, SpikingProgram) else load(model, progress=progress)
        program = resume(program, start_after, passes, T, stop_after, debug, instrument, device, progress)
        return program.place(device_map, max_memory, offload_folder) if device_map is not None else program
    budget = budget_or_default(passes, T, budget, whole=not (stop_after or debug or instrument))
    pipeline = Pipeline.parse(passes, BUDGET_T if budget and T is None else T)
    check_T_given_once(pipeline, T)
    split(pipeline, None, stop_after)  # refused before the model loads
    if budget and budget != DEFAULT:
        Budget.parse(budget)  # refused before the model loads
    loaded, ann, ctx = prepare(model, calib, calib_tokens, tokenizer=tokenizer, task=task,
                               progress=progress)
    return compile_graph(loaded, ann, ctx, pipeline, debug=debug, instrument=instrument, device=device,
                         stop_after=stop_after, dtype=dtype, save_to=save_to, device_map=device_map,
                         max_memory=max_memory, offload_folder=offload_folder, budget=budget)


def load(path: str | Path, device: str = "cpu", backend: str = "reference", progress: bool | None = None,
         device_map: str | dict | None = None, max_memory: dict | None = None,
         offload_folder: str | Path | None = None) -> SpikingProgram:
    """Load an artifact written by `SpikingProgram.save`, checking format and integrity;
    `backend` is "reference" (dense, CPU or CUDA) or "event" (event-driven, CPU). `device_map`
    (with `max_memory`, `offload_folder`): run its stages where accelerate places them instead
    (SpikingProgram.place). `progress`: show the load on stderr; None: on a terminal."""
    from snncc.artifact import load_program

    return load_program(Path(path), device, backend, progress, device_map, max_memory, offload_folder)
