"""NIR export: the parts of a spiking program the Neuromorphic Intermediate Representation
can say, and a named list of what it cannot.

NIR describes populations of neurons joined by static synapses. In a compiled program that is
the rate-coded integrate-and-fire neurons of `fas` and the linear layers they feed. Each
signed IF population (snn.if_encode: m += x; +1 at m >= theta, -1 at m < 0, reset by
subtraction, m(0) = v0) becomes NIR primitives with the same discrete-time dynamics:

    input -> I (membrane, r = 1, starts at 0: m - v0)
    I -> Threshold(theta - v0)                 up spikes
    I -> Scale(-1) -> Threshold(v0)            down spikes (m < 0)
    up -> Scale(-theta) -> I,  down -> Scale(theta) -> I      reset by subtraction
    up -> Affine(W / T, b / T);  down -> Scale(-1) -> Affine  (signed spikes, rate gain 1/T)
    Affine -> I (the synapse's membrane: its value after T steps) -> output

Recurrent edges carry the previous step's spikes, as in nirtorch. NIR's Threshold fires on
v > theta where the IF neuron fires on m >= theta, so the two differ only when a membrane
lands exactly on its threshold. Everything else (MT and multi-range codes, whose spikes weigh
2^-(t+1) by step; table neurons; spike x spike products; normalisers; the analog tensor ops
between layers) has no NIR form: `to_nir` lists it by kind and count, and refuses a program
with nothing to export.
"""

from __future__ import annotations

import collections
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.fx as fx

from snncc.errors import ExportError, require
from snncc.ir.analysis import capture, matmul_sites, propagate_shapes
from snncc.ir.ops import execution_mode
from snncc.ir.rewrite import get_tensor
from snncc.ir.spec import NIR_IF_POPULATION, NIR_SYNAPSE, nir_gaps, require_covered, spec_of
from snncc.numerics import EXPORT_TOLERANCES, Comparison, compare, worst
from snncc.pipeline import DEFAULT_T
from snncc.progress import bar, phase
from snncc.version import __version__

ATOL, RTOL = EXPORT_TOLERANCES["nir"]  # verify_nir's default tolerance, at every synapse output
_BURST = "burst IF populations (several spikes per step; NIR's Threshold sends one)"
_FORMS = (NIR_IF_POPULATION, NIR_SYNAPSE)  # the NIR forms this module builds (snncc.ir.spec)
require_covered("snncc.backends.nir", nir_gaps(_FORMS))


@dataclass
class NirExport:
    """A NIR graph and an account of what went in and what was left out."""

    graph: object  # nir.NIRGraph
    populations: dict[str, str] = field(default_factory=dict)  # population -> its if_encode node
    synapses: dict[str, tuple[str, str]] = field(default_factory=dict)  # synapse -> (population, fx node)
    left_out: collections.Counter = field(default_factory=collections.Counter)  # reason -> count
    exported_macs: int = 0
    spiking_macs: int = 0

    def summary(self) -> str:
        share = self.exported_macs / self.spiking_macs if self.spiking_macs else 0.0
        left = "; ".join(f"{count} {reason}" for reason, count in self.left_out.most_common())
        return (f"NIR holds {len(self.populations)} IF populations and {len(self.synapses)} synapses "
                f"({100 * share:.1f}% of the spike-driven MACs); not expressible in NIR, left out: {left}")


def _name(node: fx.Node) -> str:
    return re.sub(r"\W", "_", node.name)


def _tensor(gm: fx.GraphModule, node) -> torch.Tensor | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return get_tensor(gm, node).detach().double()
    return None


def _if_population(nodes: dict, edges: list, name: str, theta: np.ndarray, v0: np.ndarray) -> None:
    """The NIR nodes and edges of one signed IF population (see the module docstring)."""
    import nir

    ones = np.ones_like(theta)
    nodes[f"{name}__input"] = nir.Input(input_type={"input": np.array(theta.shape)})
    nodes[f"{name}__membrane"] = nir.I(r=ones)
    nodes[f"{name}__up"] = nir.Threshold(threshold=theta - v0)
    nodes[f"{name}__invert"] = nir.Scale(scale=-ones)
    nodes[f"{name}__down"] = nir.Threshold(threshold=v0)
    nodes[f"{name}__reset_up"] = nir.Scale(scale=-theta)
    nodes[f"{name}__reset_down"] = nir.Scale(scale=theta.copy())
    nodes[f"{name}__down_sign"] = nir.Scale(scale=-ones)
    edges += [(f"{name}__input", f"{name}__membrane"), (f"{name}__membrane", f"{name}__up"),
              (f"{name}__membrane", f"{name}__invert"), (f"{name}__invert", f"{name}__down"),
              (f"{name}__up", f"{name}__reset_up"), (f"{name}__reset_up", f"{name}__membrane"),
              (f"{name}__down", f"{name}__reset_down"), (f"{name}__reset_down", f"{name}__membrane"),
              (f"{name}__down", f"{name}__down_sign")]


def _synapse(nodes: dict, edges: list, name: str, population: str, weight: np.ndarray, bias: np.ndarray,
             T: int) -> None:
    import nir

    nodes[f"{name}__affine"] = nir.Affine(weight=weight / T, bias=bias / T)
    nodes[f"{name}__accumulate"] = nir.I(r=np.ones(weight.shape[0]))
    nodes[f"{name}__output"] = nir.Output(output_type={"output": np.array([weight.shape[0]])})
    edges += [(f"{population}__up", f"{name}__affine"), (f"{population}__down_sign", f"{name}__affine"),
              (f"{name}__affine", f"{name}__accumulate"), (f"{name}__accumulate", f"{name}__output")]


def _nir_form(node) -> str | None:
    spec = spec_of(node.target) if isinstance(node, fx.Node) else None
    return None if spec is None else spec.nir


def _add_population(gm: fx.GraphModule, node: fx.Node, spec, macs: dict, nodes: dict, edges: list,
                    export: NirExport) -> None:
    """One IF population (args x, threshold, membrane, T, burst) and the synapses it feeds, or
    its reason to be left out."""
    readers = [u for u in node.users if _nir_form(u) == NIR_SYNAPSE]
    theta, v0 = _tensor(gm, node.args[1]), _tensor(gm, node.args[2])
    if node.args[4:5] not in ((), (1,)):
        export.left_out[_BURST] += 1
        return
    if not readers or theta is None or v0 is None or theta.dim() != 1:
        export.left_out[spec.nir_left_out] += 1
        return
    population = _name(node)
    v0 = theta * (v0 / theta).clamp(0.0, 1.0)
    _if_population(nodes, edges, population, theta.numpy(), v0.numpy())
    export.populations[population] = node.name
    for reader in readers:
        weight, bias = _tensor(gm, reader.args[1]), _tensor(gm, reader.args[2])
        bias = torch.zeros(weight.shape[0], dtype=torch.float64) if bias is None else bias
        _synapse(nodes, edges, _name(reader), population, weight.numpy(), bias.numpy(), node.args[3])
        export.synapses[_name(reader)] = (population, reader.name)
        export.exported_macs += macs.get(reader, 0)


def to_nir(program) -> NirExport:
    """The NIR graph of the program's IF populations and the synapses they feed."""
    nir = require("nir", "NIR export")

    gm = program.graph_module
    nodes: dict = {}
    edges: list = []
    export = NirExport(graph=None)
    propagate_shapes(gm, (1, 128))
    macs = {site.node: site.macs for site in matmul_sites(gm) if site.spiking}
    export.spiking_macs = sum(macs.values())
    for node in gm.graph.nodes:
        spec = spec_of(node.target) if node.op == "call_function" else None
        if spec is not None and spec.nir == NIR_IF_POPULATION:
            _add_population(gm, node, spec, macs, nodes, edges, export)
        elif spec is not None and spec.nir == NIR_SYNAPSE:
            if _nir_form(node.args[0]) != NIR_IF_POPULATION:
                export.left_out[spec.nir_left_out] += 1
            elif node.args[0].name not in export.populations.values():
                export.left_out["synapses fed by IF populations left out"] += 1
        elif spec is not None:
            export.left_out[spec.nir_left_out] += 1
        elif node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            export.left_out[f"analog {node.target.__name__.split('.')[0]} ops"] += 1
    if not export.populations and export.left_out[_BURST]:
        raise ExportError(_burst_refusal(f"all {export.left_out[_BURST]} IF populations of this program send bursts",
                                         program.T))
    if not export.populations:
        raise ExportError("nothing in this program can be expressed in NIR, which has rate-coded neurons and static "
                          f"synapses only ({program.info.pipeline!r} uses "
                          f"{', '.join(r for r, _ in export.left_out.most_common(3))}, ...): {_advice(program.T)}")
    # strings only: HDF5 gives numbers back as numpy scalars, and a reason with a '/' in it would
    # become a nested group as a key
    export.graph = nir.NIRGraph(nodes=nodes, edges=edges,
                                metadata={"snncc.version": __version__, "snncc.model": program.info.model,
                                          "snncc.pipeline": program.info.pipeline, "snncc.T": str(program.T),
                                          "snncc.left_out": json.dumps(dict(export.left_out))})
    return export


def exporting_pipeline(T: int) -> str:
    """A pipeline whose programs NIR takes, at T steps and at fas's default T alike: FAS with a
    plain IF neuron at every synapse input (one spike per step: B = max(1, round(L / T)) is 1
    for L = min(T, 8) at both)."""
    return f"fas,qcfs{{L={min(T, DEFAULT_T['fas'])},multirange=0}}"


def _advice(T: int) -> str:
    return (f'compile with the pipeline "{exporting_pipeline(T)}" (FAS\'s plain IF neuron at every synapse input) '
            'or "fas,ifencode{burst=1}" (plain neurons, a coarser code) to export IF neurons and the linear layers '
            'they feed')


def _burst_refusal(what: str, T: int) -> str:
    return f"NIR's thresholds send one spike per step and {what} (T < the QCFS levels L): {_advice(T)}"


def refusal(pipeline) -> str | None:
    """The refusal to_nir gives every program of `pipeline` (a snncc.pipeline.Pipeline) where
    its passes alone decide it, so that no compile is spent on a program NIR cannot take: no
    IF neurons (no qcfs and ifencode passes), or IF neurons that all send bursts. None: only
    the compiled program can tell."""
    passes = {p.name: p for p in pipeline.passes}
    if "qcfs" not in passes or "ifencode" not in passes:
        return (f"nothing a program of the pipeline '{pipeline.spec}' holds can be expressed in NIR, which has "
                "rate-coded neurons and static synapses only: it makes no IF neurons (no qcfs and ifencode passes); "
                + _advice(pipeline.T))
    ifencode = passes["ifencode"]
    burst = ifencode.burst or max(1, round(passes["qcfs"].L / ifencode.T))  # as the ifencode pass picks it
    if burst > 1:
        return _burst_refusal(f"the IF neurons of the pipeline '{pipeline.spec}' at T = {ifencode.T} send bursts "
                              f"of {burst} spikes", pipeline.T)
    return None


def write_nir(export: NirExport, path: str | Path, progress: bool | None = None) -> None:
    """Write the graph (HDF5, nir.write) atomically; `progress` (snncc.progress; None: on a
    terminal) shows it on stderr."""
    nir = require("nir", "NIR export")

    from snncc.atomic import atomic_file

    with phase(f"writing {Path(path).name}", progress, f"wrote {Path(path).name}"), atomic_file(Path(path)) as tmp:
        nir.write(str(tmp), export.graph)


# --- running a NIR synapse with nirtorch ---------------------------------------------------


class _Integrator(torch.nn.Module):
    """nir.I in discrete time (dt = 1): v += r * input."""

    def __init__(self, r: np.ndarray):
        super().__init__()
        self.register_buffer("r", torch.from_numpy(np.asarray(r, dtype=np.float64)))

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None):
        v = x * self.r if state is None else state + x * self.r
        return v, v


class _Threshold(torch.nn.Module):
    """nir.Threshold: 1 where the input exceeds the threshold."""

    def __init__(self, threshold: np.ndarray):
        super().__init__()
        self.register_buffer("threshold", torch.from_numpy(np.asarray(threshold, dtype=np.float64)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x > self.threshold).to(x.dtype)


class _Scale(torch.nn.Module):
    def __init__(self, scale: np.ndarray):
        super().__init__()
        self.register_buffer("scale", torch.from_numpy(np.asarray(scale, dtype=np.float64)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def _affine(node) -> torch.nn.Linear:
    """nir.Affine as a Linear layer. (nirtorch 2.6's default mapping leaves the bias at its
    random initial value: it assigns `weight.bias`, not `bias`.)"""
    layer = torch.nn.Linear(node.weight.shape[1], node.weight.shape[0])
    layer.weight.data = torch.from_numpy(np.asarray(node.weight, dtype=np.float64))
    layer.bias.data = torch.from_numpy(np.asarray(node.bias, dtype=np.float64))
    return layer


def synapse_graph(graph, synapse: str):
    """The NIR subgraph of one synapse and its presynaptic population (one input, one output):
    what nirtorch runs."""
    nir = require("nir", "running a NIR graph")

    population = next(src.removesuffix("__up") for src, dst in graph.edges
                      if dst == f"{synapse}__affine" and src.endswith("__up"))
    keep = {n for n in graph.nodes if n.startswith(f"{population}__") or n.startswith(f"{synapse}__")}
    return nir.NIRGraph(nodes={n: graph.nodes[n] for n in graph.nodes if n in keep},
                        edges=[(a, b) for a, b in graph.edges if a in keep and b in keep])


def run_synapse(graph, synapse: str, currents: torch.Tensor, T: int) -> torch.Tensor:
    """Drive a synapse's population with constant currents (..., C) for T steps in nirtorch
    (float64) and return the synapse's accumulated output."""
    nir = require("nir", "running a NIR graph")
    nirtorch = require("nirtorch", "running a NIR graph")

    node_map = {nir.I: lambda n: _Integrator(n.r), nir.Threshold: lambda n: _Threshold(n.threshold),
                nir.Scale: lambda n: _Scale(n.scale), nir.Affine: _affine}
    module = nirtorch.nir_to_torch(synapse_graph(graph, synapse), node_map, dtype=torch.float64)
    state, out = None, None
    with torch.no_grad():
        for _ in range(T):
            out, state = module(currents.double(), state)
    return out


def verify_nir(program, export: NirExport, path: str | Path, input_ids: torch.Tensor, atol: float = ATOL,
               rtol: float = RTOL, progress: bool | None = None) -> Comparison:
    """Read the file back with nir, run every synapse in it with nirtorch on the currents the
    program's IF populations receive for input_ids, and compare the synapse outputs with the
    reference executor's (exact mode) within atol + rtol |reference| (snncc.numerics.Comparison).
    `progress` (snncc.progress; None: on a terminal) shows each step on stderr."""
    nir = require("nir", "verifying a NIR export")
    require("nirtorch", "verifying a NIR export")  # run_synapse runs each synapse in it

    graph = nir.read(str(path))
    if set(graph.nodes) != set(export.graph.nodes) or sorted(graph.edges) != sorted(export.graph.edges):
        raise ExportError(f"the NIR file '{path}' read back differs from the graph written")
    wanted = {name for _, name in export.synapses.values()}
    nodes = {node.name: node for node in program.graph_module.graph.nodes}
    wanted |= {nodes[name].args[0].args[0].name for name in wanted}
    with phase("running the reference executor (exact)", progress, "ran the reference executor"), \
            execution_mode("exact"):
        values = capture(program.graph_module, wanted, program.check_input(input_ids))
    comparisons = []
    for synapse, (_, fx_name) in bar(export.synapses.items(), desc="running the NIR synapses with nirtorch",
                                     progress=progress, total=len(export.synapses), unit="synapse"):
        encoder = nodes[fx_name].args[0]
        currents = values[encoder.args[0].name]
        out = run_synapse(graph, synapse, currents.reshape(-1, currents.shape[-1]), encoder.args[3])
        comparisons.append(compare(out, values[fx_name].reshape(out.shape), atol, rtol))
    return worst(comparisons)
