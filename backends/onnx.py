"""ONNX export of spiking programs, and an onnxruntime executor for the exported files.

`torch.onnx` (the torch.export-based exporter) translates the program's ATen ops; each `snn`
op becomes one node of the `snn` domain (backends.onnx_functions: schema + defining
function). Two formats:

    onnx-snn   the spiking ops stay custom-domain nodes; the model carries the function
               library that defines them, so onnxruntime still runs it
    onnx       the library inlined: standard opset only (neurons are Loops over time)

Both have named inputs and outputs (`input_ids` -> `logits` or `last_hidden_state`), dynamic
batch and sequence length, and metadata (pipeline, T, model, snncc version). Weights go to an
external data file beside the model when the model would pass protobuf's 2 GB limit.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import torch

from snncc.atomic import atomic_file
from snncc.backends.onnx_functions import DOMAIN, DOMAIN_VERSION, OPS, function_library, register_schemas
from snncc.errors import ExportError, InputError, first_line, require
from snncc.ir.ops import execution_mode
from snncc.ir.spec import OpSpec, arguments, onnx_gaps, require_covered, spec_of, specs
from snncc.models import CAUSAL_LM
from snncc.numerics import EXPORT_TOLERANCES, Comparison, compare
from snncc.progress import phase
from snncc.version import __version__

FORMATS = ("onnx", "onnx-snn")
INPUT_NAME = "input_ids"
PROTOBUF_LIMIT = 2 * 1024**3
ATOL, RTOL = EXPORT_TOLERANCES["onnx"]  # verify_onnx's default tolerance

require_covered("snncc.backends.onnx", onnx_gaps(OPS))


def output_name(task: str) -> str:
    return "logits" if task == CAUSAL_LM else "last_hidden_state"


def _translations() -> dict:
    """torch.onnx translations: every snn op with an ONNX form to its snn-domain node."""
    from onnxscript import values
    from onnxscript.onnx_opset import opset18 as op

    register_schemas()
    domain = values.Opset(DOMAIN, DOMAIN_VERSION)
    return {spec.op: _translation(spec, domain, op) for spec in specs() if spec.onnx is not None}


def _is_tensor(argument) -> bool:
    return argument.type.isSubtypeOf(torch._C.OptionalType.ofTensor())


def _translation(spec: OpSpec, domain, op):
    """The translation of one op (snncc.ir.spec.OnnxForm): its tensor arguments become the
    function's inputs in order (an optional one left out: a scalar 0), its other arguments the
    function's attributes of the same name (case aside; flags as ints)."""
    schema = spec.op._schema.arguments

    def translate(*args, **kwargs):
        bound = arguments(spec.op, args, kwargs)
        function = OPS[spec.onnx.function_for(bound)]
        inputs = [op.Constant(value_float=0.0) if bound[a.name] is None else bound[a.name]
                  for a in schema if _is_tensor(a)]
        if len(inputs) != len(function.inputs):
            raise ExportError(f"{spec.op} has {len(inputs)} tensor arguments but its ONNX function "
                              f"{function.name} {len(function.inputs)} inputs")
        by_name = {name.lower(): value for name, value in bound.items()}
        attributes = {name: (float if kind == "float" else int)(by_name[name.lower()])
                      for name, kind in function.attributes}
        return getattr(domain, function.name)(*inputs, **attributes)

    translate.__name__ = spec.name
    translate.__signature__ = inspect.Signature([  # what torch.onnx reads to match the call
        inspect.Parameter(a.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                          default=a.default_value if a.has_default_value() else inspect.Parameter.empty)
        for a in schema])
    return translate


def _refuse_what_onnx_cannot_say(gm: torch.fx.GraphModule) -> None:
    """Raise ExportError for the first op whose arguments have no ONNX form (snncc.ir.spec's
    OnnxForm.refusal), before the export spends its time on the graph."""
    for node in gm.graph.nodes:
        spec = spec_of(node.target) if node.op == "call_function" else None
        if spec is not None and spec.onnx is not None:
            refusal = spec.onnx.refusal(arguments(spec.op, node.args, node.kwargs))
            if refusal is not None:
                raise ExportError(refusal)


def to_onnx(program, fmt: str = "onnx", progress: bool | None = False):
    """The program as an onnx_ir.Model in format `fmt` (see FORMATS); `progress`
    (snncc.progress) shows its steps on stderr."""
    if fmt not in FORMATS:
        raise InputError(f"unknown ONNX format '{fmt}': use one of {', '.join(FORMATS)}")
    onnx_ir = require("onnx_ir", "ONNX export")
    require("onnxscript", "ONNX export")  # torch.onnx's exporter, and _simplify's constant folding
    from onnx_ir.passes.common import InlinePass
    from torch.export import Dim

    _refuse_what_onnx_cannot_say(program.graph_module)
    info = program.info
    example = torch.randint(0, info.vocab_size, (2, min(8, info.max_positions)))
    dims = {INPUT_NAME: {0: Dim("batch", min=1), 1: Dim("seq", min=1, max=info.max_positions)}}
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # its notes on optional packages (torchvision) are noise here
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            with phase("exporting with torch.onnx", progress, "exported with torch.onnx"):
                exported = torch.onnx.export(
                    program.graph_module, (example,), dynamo=True, custom_translation_table=_translations(),
                    input_names=[INPUT_NAME], output_names=[output_name(info.task)], dynamic_shapes=dims,
                    opset_version=18, optimize=False, verbose=False)
    except ExportError:
        raise
    except Exception as exc:
        cause = exc
        while cause.__cause__ is not None:  # torch.onnx wraps the translation's own error
            cause = cause.__cause__
        if isinstance(cause, ExportError):
            raise cause from exc
        raise ExportError(f"torch.onnx could not export the program: {first_line(cause)}") from exc
    finally:
        exporter_log.setLevel(level)
    model = exported.model
    _name_spiking_values(model, program.graph_module)
    with phase("simplifying the ONNX graph", progress, "simplified the ONNX graph"):
        _simplify(model)
    used = sorted({node.op_type for node in model.graph.all_nodes() if node.domain == DOMAIN})
    for proto in function_library(used):
        function = onnx_ir.serde.deserialize_function(proto)
        model.functions[function.identifier()] = function
    model.opset_imports[DOMAIN] = DOMAIN_VERSION
    if fmt == "onnx":
        with phase("inlining the snn functions", progress, "inlined and simplified the snn functions"):
            with _names_numbered_in_linear_time():
                InlinePass()(model)
            model.functions.clear()
            _simplify(model)  # fold what the inlined bodies compute from constants
    model.metadata_props.update(metadata(program, fmt, used))
    model.producer_name, model.producer_version = "snncc", __version__
    return model


@contextlib.contextmanager
def _names_numbered_in_linear_time() -> Iterator[None]:
    """onnx_ir's inliner names each copied value `name`, `name_2`, `name_3`, ... by trying
    every suffix from the first until one is free: quadratic in the call sites of a function
    (SmolLM2's 30 blocks: over 8 minutes to inline, against 10 s at 4 blocks). While it runs,
    each name goes on from the last suffix it handed out (still checked against the used
    names: unique all the same, the numbers may differ)."""
    from onnx_ir.passes.common import inliner

    if not hasattr(inliner, "_make_unique_name"):  # an onnx_ir that names values otherwise
        yield
        return
    last_suffix: dict[str, int] = {}

    def unique_name(name: str, callstack, used_names: set[str]) -> str:
        suffix = last_suffix.get(name, 1)
        candidate = name if suffix == 1 else f"{name}_{suffix}"
        while candidate in used_names:
            suffix += 1
            candidate = f"{name}_{suffix}"
        last_suffix[name] = suffix
        used_names.add(candidate)
        return candidate

    with mock.patch.object(inliner, "_make_unique_name", unique_name):
        yield


def _simplify(model) -> None:
    """Fold constants, then drop dead nodes, repeated subexpressions and unused opsets. This is
    onnxscript's `optimize` without its pattern rewriter: the rewriter took about half of the
    export time of a real model (more of an inlined one: its matching grows with the graph)
    and removed few nodes."""
    import onnx_ir
    import onnxscript.optimizer
    from onnx_ir.passes import common

    onnxscript.optimizer.fold_constants_ir(model)
    onnx_ir.passes.Sequential(  # the rest of optimize's passes, in its order
        common.RemoveUnusedNodesPass(), common.RemoveUnusedOpsetsPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(), common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(), common.RemoveUnusedNodesPass(), common.OutputFixPass(),
        common.NameFixPass())(model)


def _name_spiking_values(model, gm) -> None:
    """Give each snn node and its output (a spike train or a synapse's output) the program's
    own node name: torch.onnx re-traces the graph and numbers nodes by op. The translation is
    one node per snn op, in graph order, so the k-th of each kind corresponds."""
    translated = collections.defaultdict(list)
    for node in model.graph.all_nodes():
        if node.domain == DOMAIN:
            translated[node.op_type].append(node)
    originals = collections.defaultdict(list)
    for node in gm.graph.nodes:
        spec = spec_of(node.target) if node.op == "call_function" else None
        if spec is not None and spec.onnx is not None:
            originals[_onnx_name(node)].append(node)
    for name, nodes in originals.items():
        onnx_nodes = translated[name]
        if len(onnx_nodes) != len(nodes):
            return  # the exporter merged or dropped some: keep its names rather than guess
        for onnx_node, node in zip(onnx_nodes, nodes, strict=True):
            onnx_node.name = node.name
            onnx_node.outputs[0].name = node.name


def _onnx_name(node: torch.fx.Node) -> str:
    """The snn-domain op a program node exports as (table neurons with ranges: FnMrEncode)."""
    return spec_of(node.target).onnx.function_for(arguments(node.target, node.args, node.kwargs))


def metadata(program, fmt: str, spiking_ops: list[str]) -> dict[str, str]:
    info = program.info
    coverage = info.coverage.get("coverage")
    return {
        "snncc.version": __version__, "snncc.format": fmt, "snncc.model": info.model,
        "snncc.task": info.task, "snncc.pipeline": info.pipeline, "snncc.T": str(info.T),
        "snncc.max_positions": str(info.max_positions),
        "snncc.spiking_ops": ",".join(spiking_ops),
        "snncc.coverage": "unknown" if coverage is None else str(coverage),
        "snncc.time_axis": "spike trains are int8 (T, ...) tensors; neurons are Loops over the T steps",
    }


@dataclass
class ExportReport:
    path: Path
    external_data: Path | None
    bytes: int
    seconds: float
    nodes: int
    inputs: list[dict] = field(default_factory=list)  # name, dtype, shape (a dim by its size or its name)
    outputs: list[dict] = field(default_factory=list)
    opsets: dict[str, int] = field(default_factory=dict)  # domain ('' the standard one) -> version


def _signature(values) -> list[dict]:
    return [{"name": v.name, "dtype": str(v.dtype.numpy()) if v.dtype is not None else None,
             "shape": [d if isinstance(d, int) else d.value for d in v.shape] if v.shape is not None else None}
            for v in values]


def export_onnx(program, path: str | Path, fmt: str = "onnx", external_data: bool | None = None,
                progress: bool | None = None) -> ExportReport:
    """Write `program` as ONNX to `path` atomically (model and external data file both or
    neither). external_data None: only when the model would exceed protobuf's 2 GB limit.
    `progress` (snncc.progress; None: on a terminal) shows each step on stderr."""
    start = time.perf_counter()
    path = Path(path)
    model = to_onnx(program, fmt, progress)
    weight_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    if external_data is None:
        external_data = weight_bytes > PROTOBUF_LIMIT * 0.9
    data_name = f"{path.name}.data" if external_data else None
    with phase(f"writing {path.name}", progress, f"wrote {path.name}"):
        _save_together(model, path, data_name)
    total = path.stat().st_size + ((path.parent / data_name).stat().st_size if data_name else 0)
    nodes = sum(1 for _ in model.graph.all_nodes())
    return ExportReport(path, path.parent / data_name if data_name else None, total,
                        time.perf_counter() - start, nodes, _signature(model.graph.inputs),
                        _signature(model.graph.outputs), dict(model.opset_imports))


def _save_together(model, path: Path, data_name: str | None) -> None:
    """Save `model` to `path` (and its weights to `data_name` beside it) all or nothing: both
    files are written in full to temporaries beside the targets first, then the data file is
    moved into place and the model last, so a reader never finds a model without its data;
    on any failure both temporaries go and earlier files stay as they were (a data file
    already moved is put back). The model records its data file by name, so both are written
    under their final names in a scratch folder."""
    import onnx_ir

    path.parent.mkdir(parents=True, exist_ok=True)
    data_path = path.parent / data_name if data_name else None
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as scratch:
        scratch = Path(scratch)
        with _restored_on_failure(data_path, scratch / "previous.data") if data_path else contextlib.nullcontext(), \
                atomic_file(path) as model_tmp, \
                atomic_file(data_path) if data_path else contextlib.nullcontext() as data_tmp:
            onnx_ir.save(model, scratch / path.name, external_data=data_name)
            if data_tmp is not None:
                os.replace(scratch / data_name, data_tmp)
            os.replace(scratch / path.name, model_tmp)


@contextlib.contextmanager
def _restored_on_failure(file: Path, backup: Path) -> Iterator[None]:
    """Keep `file` as it is now (a hard link at `backup`, same folder) and put it back if the
    block fails: the data file moves into place before the model, so a failed model move must
    undo it. A file that did not exist is removed again."""
    existed = file.exists()
    if existed:
        try:
            os.link(file, backup)
        except OSError:  # a file system without hard links: a copy keeps it just the same
            shutil.copy2(file, backup)
    try:
        yield
    except BaseException:
        if existed:
            os.replace(backup, file)
        else:
            file.unlink(missing_ok=True)
        raise


def check_onnx(path: str | Path, progress: bool | None = None) -> None:
    """onnx.checker on the file (by path, so external data and > 2 GB models work); `progress`
    (snncc.progress; None: on a terminal) shows it on stderr."""
    import onnx

    register_schemas()
    try:
        with phase(f"checking {Path(path).name} with onnx.checker", progress,
                   f"checked {Path(path).name} with onnx.checker"):
            onnx.checker.check_model(str(path), full_check=False)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the exported model fails onnx.checker: {first_line(exc)}") from exc


class OnnxRuntimeExecutor:
    """Runs an exported model with onnxruntime on the CPU: executor(input_ids) -> outputs."""

    def __init__(self, path: str | Path):
        ort = require("onnxruntime", "running an ONNX file")

        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        (out,) = self.session.run(None, {INPUT_NAME: input_ids.cpu().numpy().astype("int64")})
        return torch.from_numpy(out)


def verify_onnx(program, path: str | Path, input_ids: torch.Tensor, atol: float = ATOL,
                rtol: float = RTOL, progress: bool | None = None) -> Comparison:
    """onnxruntime against the reference executor on input_ids, within atol + rtol |reference|
    (snncc.numerics.Comparison). The reference runs in `exact` mode (float64 membranes,
    rounded once per op), which the exported graph implements; the default fused mode sums in
    float32 and can differ where a neuron's input sits on a threshold. `progress`
    (snncc.progress; None: on a terminal) shows each step on stderr."""
    input_ids = program.check_input(input_ids)
    tokens = f"{input_ids.numel()} tokens"
    with phase(f"running the reference executor (exact) on {tokens}", progress, "ran the reference executor"), \
            torch.no_grad(), execution_mode("exact"):
        reference = program.executor.gm(input_ids.to(program.executor.device)).cpu()
    with phase("creating the onnxruntime session", progress, "created the onnxruntime session"):
        runtime = OnnxRuntimeExecutor(path)
    with phase(f"running onnxruntime on {tokens}", progress, "ran onnxruntime"):
        output = runtime(input_ids)
    return compare(output, reference, atol, rtol)
