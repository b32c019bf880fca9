"""One declarative description of every `snn` op: what the passes, backends and analyses
need to know about it, in one place.

snncc.ir.ops holds the ops' math (their kernels); an entry here says what an op *is*: its
role in a program, which operands must be spike trains (and where their ranges and rate flags
are), which argument holds T, whether its train is a rate code, which quantize op the fused
lowering swaps a source for, how the event backend runs it, which ONNX function it exports
as, whether NIR can hold it, and what the profiler counts for it. The verifier, the fused
lowering, the event backend, ONNX and NIR export, the profiler, the analyses and the artifact
op set read these entries instead of keeping tables of their own (docs/adding-an-op.md).

Backends keep registries of what they implement, under the names used here: event handlers
(backends/event.py), ONNX functions (backends/onnx_functions.py), cost models
(snncc/profile.py), NIR forms (backends/nir.py). `coverage_gaps` lists every entry a registry
misses, and each backend checks its own registry at import: no op falls back silently.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import torch

from snncc.ir.ops import MAX_BURST, MAX_OUTLIER_RANGES, MAX_T, TABLE_MAX_BITS

# Roles: what an op does in a program.
SOURCE = "source"  # neurons that send a spike train
QUANTIZER = "quantizer"  # what a source's train decodes to, computed without it: fused execution only
SYNAPSE = "synapse"  # weights or stored partial sums driven by spike trains
DECODER = "decoder"  # reads a train back into the ANN's units
NORMALIZER = "normalizer"  # a floating-point neuron and the synapse it drives, in one op
ACTIVATION = "activation"  # an ANN activation trained before conversion: no spikes
ROLES = (SOURCE, QUANTIZER, SYNAPSE, DECODER, NORMALIZER, ACTIVATION)
READERS = (SYNAPSE, DECODER)  # the roles whose spike operands the fused lowering can decode

# Cost models: what the profiler counts for an op (snncc/profile.py implements each).
COST_TRAIN = "train"  # the spikes of the train it sends
COST_LINEAR = "linear"  # (spikes, weight, ...): each input spike adds a weight column into the outputs
COST_MATMUL = "matmul"  # (sa, scale_a, sb, scale_b): a spike adds a row or column of the other's partial sums
COST_ELEMENTWISE = "elementwise"  # (sa, scale_a, sb, scale_b): a spike adds the other's partial sum to one output
COST_NORMALIZE = "normalize"  # (x, a, power, thresholds, codes, T): its mantissa train's spikes, each scaling a row
COST_NONE = "none"  # nothing: no spikes sent, no synaptic operation (decoders, analog ops)
COSTS = (COST_TRAIN, COST_LINEAR, COST_MATMUL, COST_ELEMENTWISE, COST_NORMALIZE, COST_NONE)
SYNAPSE_COSTS = (COST_LINEAR, COST_MATMUL, COST_ELEMENTWISE)  # the ones snncc.ir.analysis counts MACs for

# How an op goes into NIR (backends/nir.py builds each).
NIR_IF_POPULATION = "if_population"  # signed IF neurons: args (x, threshold, membrane, T, burst)
NIR_SYNAPSE = "synapse"  # a static linear synapse: args (spikes, weight, bias), fed by an IF population
NIR_FORMS = (NIR_IF_POPULATION, NIR_SYNAPSE)

# The values an integer argument of an snn op may take, by schema name: the artifact loader
# bounds a program from a file by them (a graph cannot ask for 10^9 time steps), and every
# int argument of every op needs one (spec_gaps).
INT_BOUNDS = {"T": (1, MAX_T), "G": (0, MAX_OUTLIER_RANGES), "burst": (1, MAX_BURST), "L": (1, 2**16)}


@dataclass(frozen=True)
class SpikeOperand:
    """An argument that must be a spike train (the output of a source)."""

    position: int
    scale: int | None  # the argument holding the train's range (None: folded into the weights)
    rate_flag: str  # the keyword flag saying the train is a rate code (uniform gains 1/T)


@dataclass(frozen=True)
class TorchKernel:
    """The event backend runs the op's torch kernel on dense tensors (it has no event-driven
    form) and counts its result as `counted_as`: "train" (a spike train, whose events it
    counts as a source's) or "analog" (values: no spikes, no synaptic operations)."""

    counted_as: str


@dataclass(frozen=True)
class OnnxForm:
    """The snn-domain ONNX function an op exports as (backends/onnx_functions.py). Its tensor
    arguments become the function's inputs in order (an optional one left out: a scalar 0),
    its other arguments the attributes of the same name (case aside)."""

    function: str
    ranged: str | None = None  # the function when the op's G > 0 (multi-range codes)
    max_T: int | None = None  # T beyond which the export refuses, saying `beyond_max_T`
    beyond_max_T: str = ""  # what the op does past max_T that ONNX cannot say ({T}: its T)

    def function_for(self, arguments: Mapping[str, object]) -> str:
        """The function for a call with these arguments (by schema name)."""
        return self.ranged if self.ranged and arguments.get("G") else self.function

    def refusal(self, arguments: Mapping[str, object]) -> str | None:
        """Why a call with these arguments cannot export, or None."""
        T = arguments.get("T")
        if self.max_T is None or not isinstance(T, int) or T <= self.max_T:
            return None
        return f"{self.beyond_max_T.format(T=T)}: compile with T <= {self.max_T} to export"


@dataclass(frozen=True)
class OpSpec:
    """Everything snncc knows about one `snn` op besides its math."""

    op: torch._ops.OpOverload
    role: str  # one of ROLES
    event: str | TorchKernel  # the event backend's handler (by name), or its declared torch-kernel run
    cost: str  # one of COSTS
    nir_left_out: str  # how NIR export lists the op where it leaves it out
    nir: str | None = None  # one of NIR_FORMS where NIR can hold the op; None: never
    onnx: OnnxForm | None = None  # None: never in an exported program (quantizers)
    spike_operands: tuple[SpikeOperand, ...] = ()
    steps: str | None = None  # the argument holding T, for ops that send or hold a train
    rate: bool = False  # a source: its train is a rate code (step gains 1/T, not 2^-(t+1))
    bursts: bool = False  # a source: a payload n stands for |n| spikes (else one graded spike)
    quantizer: torch._ops.OpOverload | None = None  # a source: its quantize op (same arguments)
    dense: torch._ops.OpOverload | None = None  # a synapse: the ATen op on its decoded operands

    @property
    def name(self) -> str:
        return self.op._opname


_SPECS: dict[torch._ops.OpOverload, OpSpec] = {}


def register(spec: OpSpec) -> OpSpec:
    """Add an op's entry (one per op)."""
    if spec.op in _SPECS:
        raise ValueError(f"{spec.op} already has a spec entry")
    _SPECS[spec.op] = spec
    return spec


def unregister(op: torch._ops.OpOverload) -> None:
    """Remove an op's entry (an op registered for a test)."""
    del _SPECS[op]


def spec_of(target) -> OpSpec | None:
    """The entry of a graph target, or None for anything that is not a described snn op."""
    return _SPECS.get(target)


def specs() -> list[OpSpec]:
    return list(_SPECS.values())


def with_role(*roles: str) -> frozenset[torch._ops.OpOverload]:
    """The ops that have one of `roles`."""
    return frozenset(spec.op for spec in _SPECS.values() if spec.role in roles)


def sources() -> frozenset[torch._ops.OpOverload]:
    return with_role(SOURCE)


def synapses() -> frozenset[torch._ops.OpOverload]:
    return with_role(SYNAPSE)


def is_source(target) -> bool:
    spec = spec_of(target)
    return spec is not None and spec.role == SOURCE


def arguments(target: torch._ops.OpOverload, args: tuple, kwargs: Mapping | None = None) -> dict[str, object]:
    """A call's arguments by schema name, defaults filled in (args may be fx Nodes)."""
    kwargs = kwargs or {}
    bound = {}
    for position, argument in enumerate(target._schema.arguments):
        if position < len(args):
            bound[argument.name] = args[position]
        elif argument.name in kwargs:
            bound[argument.name] = kwargs[argument.name]
        elif argument.has_default_value():
            bound[argument.name] = argument.default_value
    return bound


def train_steps(node) -> int | None:
    """T of a call (an fx Node) of an op that sends or holds a spike train, else None."""
    spec = spec_of(node.target)
    if spec is None or spec.steps is None:
        return None
    return arguments(node.target, node.args, node.kwargs).get(spec.steps)


def is_rate_train(node) -> bool:
    """Whether a node's spike train is a rate code (uniform step gains 1/T)."""
    spec = spec_of(node.target)
    return spec is not None and spec.rate


# --- the entries ---------------------------------------------------------------------------

snn = torch.ops.snn
aten = torch.ops.aten
_TABLE_REFINES = "table neurons at T = {T} refine their tables at run time, which the ONNX export does not express"


def _source(op, quantizer, event: str, onnx: OnnxForm, nir_left_out: str, nir: str | None = None,
            rate: bool = False, bursts: bool = False) -> OpSpec:
    return OpSpec(op, SOURCE, event, COST_TRAIN, nir_left_out, nir, onnx, steps="T", rate=rate, bursts=bursts,
                  quantizer=quantizer)


def _quantizer(op) -> OpSpec:
    return OpSpec(op, QUANTIZER, TorchKernel("analog"), COST_NONE,
                  "quantizers (the fused executor's stand-in for a train: never in a program)")


_TRAIN = SpikeOperand(0, 1, "rate")
_PAIR = (SpikeOperand(0, 1, "rate_a"), SpikeOperand(2, 3, "rate_b"))

for _spec in (
    _source(snn.mt_encode.default, snn.mt_quantize.default, "mt_encode", OnnxForm("MtEncode"),
            "multi-threshold neurons (spikes weigh 2^-(t+1) by step; NIR synapses are static)"),
    _source(snn.mr_encode.default, snn.mr_quantize.default, "mr_encode", OnnxForm("MrEncode"),
            "multi-range neurons (graded spikes weighing 2^(j-t-1))"),
    _source(snn.fn_encode.default, snn.fn_quantize.default, "fn_encode",
            OnnxForm("FnEncode", ranged="FnMrEncode", max_T=TABLE_MAX_BITS, beyond_max_T=_TABLE_REFINES),
            "table neurons (a nonlinear function by threshold comparison)"),
    _source(snn.if_encode.default, snn.if_quantize.default, "if_encode", OnnxForm("IfEncode"),
            "IF populations read only by spike x spike products", nir=NIR_IF_POPULATION, rate=True, bursts=True),
    _quantizer(snn.mt_quantize.default),
    _quantizer(snn.mr_quantize.default),
    _quantizer(snn.fn_quantize.default),
    _quantizer(snn.if_quantize.default),
    OpSpec(snn.decode.default, DECODER, "decode", COST_NONE, "decoders of spike trains into analog tensors",
           onnx=OnnxForm("Decode"), spike_operands=(_TRAIN,)),
    OpSpec(snn.spike_linear.default, SYNAPSE, "spike_linear", COST_LINEAR, "synapses fed by multi-threshold trains",
           nir=NIR_SYNAPSE, onnx=OnnxForm("SpikeLinear"), spike_operands=(SpikeOperand(0, None, "rate"),),
           dense=aten.linear.default),
    OpSpec(snn.spike_matmul.default, SYNAPSE, "spike_matmul", COST_MATMUL,
           "spike x spike matrix products (attention)", onnx=OnnxForm("SpikeMatMul"), spike_operands=_PAIR,
           dense=aten.matmul.default),
    OpSpec(snn.spike_mul.default, SYNAPSE, "spike_mul", COST_ELEMENTWISE,
           "spike x spike elementwise products (gates, squares)", onnx=OnnxForm("SpikeMul"), spike_operands=_PAIR,
           dense=aten.mul.Tensor),
    OpSpec(snn.spike_normalize.default, NORMALIZER, "spike_normalize", COST_NORMALIZE,
           "floating-point normaliser neurons (softmax and norm denominators)", onnx=OnnxForm("SpikeNormalize"),
           steps="T"),
    OpSpec(snn.qcfs.default, ACTIVATION, TorchKernel("analog"), COST_NONE,
           "QCFS activations (an ANN op: ifencode turns them into IF neurons)", onnx=OnnxForm("Qcfs")),
):
    register(_spec)


# --- coverage: every registry against every entry -------------------------------------------


def _schema_gaps(spec: OpSpec) -> list[str]:
    """What an entry says that its op's schema contradicts."""
    schema = spec.op._schema.arguments
    names = [argument.name for argument in schema]
    kinds = {argument.name: str(argument.type) for argument in schema}
    gaps = [f"{spec.op}: int argument '{name}' has no bound in INT_BOUNDS"
            for name, kind in kinds.items() if kind == "int" and name not in INT_BOUNDS]
    if spec.role not in ROLES or spec.cost not in COSTS or spec.nir not in (None, *NIR_FORMS):
        gaps.append(f"{spec.op}: unknown role '{spec.role}', cost '{spec.cost}' or NIR form '{spec.nir}'")
    if spec.steps is not None and kinds.get(spec.steps) != "int":
        gaps.append(f"{spec.op}: its T argument '{spec.steps}' is not an int argument")
    if spec.role == SOURCE and spec.steps is None:
        gaps.append(f"{spec.op}: a source without a T argument")
    for operand in spec.spike_operands:
        if operand.position >= len(names) or kinds[names[operand.position]] != "Tensor":
            gaps.append(f"{spec.op}: spike operand {operand.position} is not a Tensor argument")
        if operand.rate_flag not in kinds:
            gaps.append(f"{spec.op}: no rate flag '{operand.rate_flag}'")
    if spec.role in READERS and not spec.spike_operands:
        gaps.append(f"{spec.op}: a {spec.role} without spike operands")
    if spec.role == SYNAPSE and (spec.cost not in SYNAPSE_COSTS or spec.dense is None):
        gaps.append(f"{spec.op}: a synapse needs a synapse cost and a dense form for the fused lowering")
    if spec.quantizer is not None:
        quantizer = spec_of(spec.quantizer)
        same = [(a.name, str(a.type)) for a in spec.quantizer._schema.arguments] == list(kinds.items())
        if quantizer is None or quantizer.role != QUANTIZER or not same:
            gaps.append(f"{spec.op}: its quantizer {spec.quantizer} is no described quantizer with its arguments")
    return gaps


def event_gaps(handlers: Collection[str]) -> list[str]:
    """Entries whose event handler `handlers` (the event backend's, by name) lacks."""
    gaps = []
    for spec in specs():
        if isinstance(spec.event, TorchKernel):
            if spec.event.counted_as not in ("train", "analog"):
                gaps.append(f"{spec.op}: the event backend cannot count a torch kernel as '{spec.event.counted_as}'")
        elif spec.event not in handlers:
            gaps.append(f"{spec.op}: no event handler '{spec.event}'")
    return gaps


def onnx_gaps(functions: Collection[str]) -> list[str]:
    """Entries that can appear in an exported program whose ONNX function `functions` lacks."""
    gaps = []
    for spec in specs():
        if spec.onnx is None:
            if spec.role != QUANTIZER:
                gaps.append(f"{spec.op}: can appear in an exported program but has no ONNX form")
            continue
        for function in (spec.onnx.function, spec.onnx.ranged):
            if function is not None and function not in functions:
                gaps.append(f"{spec.op}: no ONNX function '{function}'")
    return gaps


def nir_gaps(forms: Collection[str]) -> list[str]:
    """Entries NIR export neither supports (in `forms`) nor refuses with a named reason."""
    gaps = []
    for spec in specs():
        if spec.nir is not None and spec.nir not in forms:
            gaps.append(f"{spec.op}: NIR export has no '{spec.nir}' form")
        if not spec.nir_left_out:
            gaps.append(f"{spec.op}: no reason for NIR export to give where it leaves the op out")
    return gaps


def cost_gaps(costs: Collection[str]) -> list[str]:
    """Entries whose cost model `costs` (the profiler's, by name) lacks."""
    return [f"{spec.op}: no profiler cost model '{spec.cost}'" for spec in specs() if spec.cost not in costs]


def spec_gaps() -> list[str]:
    """Entries that contradict their op's schema or each other."""
    return [gap for spec in specs() for gap in _schema_gaps(spec)]


def coverage_gaps(*, event_handlers: Collection[str], onnx_functions: Collection[str], nir_forms: Collection[str],
                  cost_models: Collection[str]) -> list[str]:
    """Every way the backends' registries fall short of the entries, one line each."""
    return (spec_gaps() + event_gaps(event_handlers) + onnx_gaps(onnx_functions) + nir_gaps(nir_forms)
            + cost_gaps(cost_models))


def require_covered(where: str, gaps: list[str]) -> None:
    """Raise naming every gap: a backend that misses an op must not load and fall back."""
    if gaps:
        raise RuntimeError(f"{where} does not cover the snn op spec (snncc/ir/spec.py): " + "; ".join(gaps))


require_covered("snncc.ir.spec", spec_gaps())
