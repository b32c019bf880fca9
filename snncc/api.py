"""The Python API: compile, load, and the pieces the CLI is a thin layer over."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.fx as fx

from snncc import passes as _passes  # noqa: F401  (registers the passes)
from snncc.calibration import CalibrationContext, make_context
from snncc.frontend import trace
from snncc.ir.rewrite import copy_graph_module
from snncc.ir.verify import coverage_report, verify
from snncc.models import CAUSAL_LM, LoadedModel, load_model
from snncc.pipeline import DEFAULT_PIPELINE, Instrument, PassManager, default_T, parse_pipeline
from snncc.program import ProgramInfo, SpikingProgram
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


def prepare(model: str | torch.nn.Module | LoadedModel, calib: str | Path | None = None,
            calib_tokens: int = CALIB_TOKENS, seq_len: int = CALIB_SEQ_LEN,
            tokenizer: Tokenizer | None = None, task: str = CAUSAL_LM,
            progress: bool = False) -> tuple[LoadedModel, fx.GraphModule, CalibrationContext]:
    """Load and trace the model and set up calibration: what every pipeline starts from.
    Passes record the ANN tensors they need through the context, each tensor once."""
    loaded = model if isinstance(model, LoadedModel) else load_model(model, tokenizer, task)
    ann = trace(loaded)
    verify(ann)
    ctx = make_context(loaded.tokenizer, calib, min(seq_len, loaded.max_positions), calib_tokens)
    ctx.attach(ann, progress=progress)
    return loaded, ann, ctx


def compile_graph(loaded: LoadedModel, ann: fx.GraphModule, ctx: CalibrationContext,
                  passes: str = DEFAULT_PIPELINE, T: int | None = None, debug: bool = False,
                  instrument: Instrument | None = None, device: str = "cpu") -> SpikingProgram:
    """Run a pipeline on a copy of the traced ANN (the ANN itself is left untouched).
    T None: the pipeline's measured default (snncc.pipeline.DEFAULT_T)."""
    T = default_T(passes) if T is None else T
    pipeline = parse_pipeline(passes, T)
    gm = copy_graph_module(ann)
    manager = PassManager(pipeline, debug=debug, instrument=instrument)
    gm = manager.run(gm, ctx)
    used_T = next((p.T for p in pipeline if hasattr(p, "T")), T)
    info = ProgramInfo(
        model=loaded.name, task=loaded.task, pipeline=passes, T=used_T if pipeline else 0,
        max_positions=loaded.max_positions, vocab_size=_vocab_size(ann, loaded),
        passes=[dict(vars(r)) for r in manager.records], calibration=ctx.summary(),
        coverage=coverage_report(gm).to_dict(),
    )
    return SpikingProgram(gm, info, loaded.tokenizer, device=device)


def compile(model: str | torch.nn.Module, passes: str = DEFAULT_PIPELINE, T: int | None = None,
            calib: str | Path | None = None, calib_tokens: int = CALIB_TOKENS,
            tokenizer: Tokenizer | None = None, task: str = CAUSAL_LM, device: str = "cpu",
            debug: bool = False, progress: bool = False,
            instrument: Callable | None = None) -> SpikingProgram:
    """Trace `model`, calibrate on `calib` text, run the `passes` pipeline, return the program."""
    loaded, ann, ctx = prepare(model, calib, calib_tokens, tokenizer=tokenizer, task=task,
                               progress=progress)
    return compile_graph(loaded, ann, ctx, passes, T, debug, instrument, device)


def load(path: str | Path, device: str = "cpu", backend: str = "reference", progress: bool = False) -> SpikingProgram:
    """Load an artifact written by `SpikingProgram.save`, checking format and integrity;
    `backend` is "reference" (dense, CPU or CUDA) or "event" (event-driven, CPU)."""
    from snncc.artifact import load_program

    return load_program(Path(path), device, backend, progress)
