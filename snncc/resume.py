"""Compiling in parts: a program stopped after a pass, and the passes after it run later.

Passes read more than a program's graph and tensors, and the rest must travel with a program
saved part-way for the passes after it to do what they would have done in one go:

  - the ANN's calibration ranges: recorded by running the ANN, which a program does not hold
    (so all of them are recorded before the stop, `CalibrationContext.record_ann`), with the
    ranges passes recorded from their own graphs;
  - the calibration batches those ranges came from, for ranges a later pass records;
  - node shapes (`meta["val"]`, symbolic in batch and sequence length): a save drops them; the
    continuation propagates them afresh and checks each against the signature saved;
  - the names FX has used: it never gives a new node the name of an erased one, and ranges
    are looked up by node name.

`ResumeState` holds them; `check_resumable` and `restore` are the continuation's side.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import sympy
import torch
import torch.fx as fx
from torch._dynamo.source import LocalSource
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from snncc.calibration import ActivationStats, CalibrationContext
from snncc.errors import PipelineError
from snncc.frontend import EXAMPLE_SHAPE
from snncc.ir.rewrite import copy_graph_module
from snncc.pipeline import Pipeline
from snncc.program import ProgramInfo


@dataclass
class ResumeState:
    """What the passes after a stop need besides the graph and its tensors (module docstring)."""

    batches: list[torch.Tensor]  # calibration token ids, (1, tokens) each
    ranges: dict[str, torch.Tensor]  # per-channel max |x| of each recorded tensor, by node name
    shapes: dict[str, str]  # node name -> shape_signature of its meta["val"], for nodes that have one
    reserved_names: list[str]  # names of erased nodes, which FX does not hand out again
    name_counts: dict[str, int]  # FX's next-suffix counter per base name


# --- shapes ---------------------------------------------------------------------------------


def _symbol_names(graph: fx.Graph) -> dict:
    """The input's symbolic (batch, sequence) sizes, named as signatures spell them."""
    placeholder = next(iter(graph.find_nodes(op="placeholder")), None)
    value = placeholder.meta.get("val") if placeholder is not None else None
    if not isinstance(value, torch.Tensor):
        return {}
    return {size.node.expr: sympy.Symbol(name) for size, name in zip(value.shape, ("batch", "seq"), strict=False)
            if isinstance(size, torch.SymInt)}


def shape_signature(value, symbols: dict) -> str:
    """`float32[batch, seq, 64]`: dtype and shape of a node's meta["val"], comparable across
    symbolic shape environments (sizes in terms of the input's batch and seq)."""
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')}[{', '.join(_size(d, symbols) for d in value.shape)}]"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(shape_signature(v, symbols) for v in value) + ")"
    if isinstance(value, torch.SymInt):
        return f"int({_size(value, symbols)})"
    return repr(value) if isinstance(value, (int, float, bool)) else type(value).__name__


def _size(size, symbols: dict) -> str:
    return str(size.node.expr.xreplace(symbols)) if isinstance(size, torch.SymInt) else str(size)


def graph_shapes(graph: fx.Graph) -> dict[str, str]:
    """The signature of every node that has a meta["val"]."""
    symbols = _symbol_names(graph)
    return {n.name: shape_signature(n.meta["val"], symbols) for n in graph.nodes if n.meta.get("val") is not None}


def _restore_shapes(gm: fx.GraphModule, shapes: dict[str, str]) -> None:
    """Propagate symbolic shapes through the graph as the frontend traced it (batch and length
    dynamic) and keep them where the saved program had them: a pass that reads a node's shape
    must see what it saw in one go, and no shape where it saw none."""
    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    dynamic = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC] * len(EXAMPLE_SHAPE))
    source = LocalSource(next(iter(gm.graph.find_nodes(op="placeholder"))).name)  # export's, so sizes print alike
    example = mode.from_tensor(torch.zeros(EXAMPLE_SHAPE, dtype=torch.long), symbolic_context=dynamic, source=source)
    FakeTensorProp(gm, mode).propagate_dont_convert_inputs(example)
    symbols = _symbol_names(gm.graph)
    for node in gm.graph.nodes:
        node.meta.pop("tensor_meta", None)
        if node.name not in shapes:
            node.meta.pop("val", None)
            continue
        found = shape_signature(node.meta.get("val"), symbols)
        if found != shapes[node.name]:
            raise PipelineError(f"cannot continue this program: node '{node.name}' was {shapes[node.name]} when it "
                                f"was saved, but computes {found}; compile it in one go")


# --- names ----------------------------------------------------------------------------------


def _namespace(graph: fx.Graph):
    return graph._graph_namespace  # FX keeps no public handle on the names it has used


def _capture_names(graph: fx.Graph) -> tuple[list[str], dict[str, int]]:
    live = {n.name for n in graph.nodes}
    namespace = _namespace(graph)
    return sorted(namespace._used_names - live), dict(namespace._base_count)


def _restore_names(graph: fx.Graph, reserved: list[str], counts: dict[str, int]) -> None:
    namespace = _namespace(graph)
    namespace._used_names |= set(reserved)
    namespace._base_count = dict(counts)


# --- stop and continue ---------------------------------------------------------------------

# Passes that run the ANN itself (qcfs and calibrate distil from it as a teacher): a program
# saved part-way does not hold the ANN, so neither may run after a stop.
RUN_THE_ANN = frozenset({"qcfs", "calibrate"})


def split(pipeline: Pipeline, start_after: str | None, stop_after: str | None) -> tuple[int, int]:
    """The slice of `pipeline`'s passes a compile runs: those after `start_after` (a program
    saved part-way continued) up to and including `stop_after`; checked before any work."""
    start = pipeline.after(start_after, "start after")
    stop = pipeline.after(stop_after, "stop after") if stop_after else len(pipeline.passes)
    if start and stop <= start:
        raise PipelineError(f"cannot stop after {stop_after}: it must come after {start_after}, where the compile "
                            f"starts, in '{pipeline.spec}'" if stop_after else
                            f"cannot start after {start_after}: no pass of '{pipeline.spec}' comes after it")
    later = pipeline.passes[start:] if start else pipeline.passes[stop:]
    teacher = next((p.name for p in later if p.name in RUN_THE_ANN), None)
    if teacher:
        where = f"cannot stop after {stop_after}" if not start else f"cannot start after {start_after}"
        raise PipelineError(f"{where}: '{teacher}' runs after it, and it runs the ANN itself (as a teacher), which "
                            f"a program saved part-way does not hold: split '{pipeline.spec}' after {teacher}")
    return start, stop



def capture(gm: fx.GraphModule, ctx: CalibrationContext) -> ResumeState:
    """What a program stopped after a pass carries (module docstring)."""
    ctx.record_ann()
    reserved, counts = _capture_names(gm.graph)
    return ResumeState(batches=list(ctx.batches), ranges={name: s.absmax for name, s in ctx.stats.items()},
                       shapes=graph_shapes(gm.graph), reserved_names=reserved, name_counts=counts)


def _plain(options: dict) -> dict:
    """Options as a manifest stores them (JSON), so a loaded record compares with a parsed pass."""
    return json.loads(json.dumps(options, default=str))


def check_resumable(info: ProgramInfo, state: ResumeState | None, pipeline: Pipeline, start: int,
                    start_after: str) -> None:
    """Refuse to continue a program with passes other than those it ran: the passes of
    `pipeline` up to and including `start_after` must be the program's, with the same options."""
    if state is None:
        raise PipelineError(f"this program of {info.model} is complete ('{info.pipeline}' ran to the end): only a "
                            "program compiled to stop after a pass (stop_after) can be continued")
    ran = [(r.get("name"), _plain(r.get("options", {}))) for r in info.passes]
    wanted = [(p.name, _plain(p.options())) for p in pipeline.passes[:start]]
    ran_names, names = [name for name, _ in ran], [p.name for p in pipeline.passes]
    if ran_names != names[:start]:
        hint = f"start after {ran_names[-1]}" if ran_names == names[:len(ran_names)] else \
            f"'{pipeline.spec}' does not begin with them: continue the pipeline it was compiled with, '{info.pipeline}'"
        raise PipelineError(f"cannot start after {start_after}: the program ran "
                            f"{', '.join(map(str, ran_names))}; {hint}")
    for (name, had), (_, want) in zip(ran, wanted, strict=True):
        for key in sorted(set(had) | set(want)):
            if had.get(key) != want.get(key):
                raise PipelineError(f"cannot start after {start_after}: pass '{name}' ran with "
                                    f"{key}={had.get(key)}, but '{pipeline.spec}' gives it {key}={want.get(key)}: "
                                    "continue with the options (and T) the program was compiled with")


def restore(gm: fx.GraphModule, state: ResumeState, source: str, progress: bool | None = False
            ) -> tuple[fx.GraphModule, CalibrationContext]:
    """A copy of a saved program's graph as the passes after its stop would have found it, and
    the calibration context they would have had."""
    gm = copy_graph_module(gm)
    _restore_names(gm.graph, state.reserved_names, state.name_counts)
    _restore_shapes(gm, state.shapes)
    samples = len(state.batches)
    ctx = CalibrationContext(batches=list(state.batches), source=source, progress=progress, ann_recorded=True,
                             stats={name: ActivationStats(r, samples) for name, r in state.ranges.items()})
    return gm, ctx
