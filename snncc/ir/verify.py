"""The IR spec, checked between passes, and the spike-driven coverage report.

Invariants: every call is an ATen op, an op described in snncc.ir.spec or a Python
size/getitem helper; every spike operand of a synapse or decoder comes from a spike source,
with the rate flag of the code that source sends; all spike trains share one T.
Coverage is the share of data-dependent matmul MACs whose operands are all spike trains:
every matmul-like ATen op no pass lowered (fused attention, einsum, convolutions included)
counts as analog, and a site whose MACs cannot be counted makes coverage unknown, not 100%.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from snncc.errors import PipelineError
from snncc.ir.analysis import (
    ANALOG_MATMULS,
    DATA_MOVEMENT,
    FUSED_ATTENTION,
    LINEAR_TARGETS,
    MATMUL_TARGETS,
    data_dependent_nodes,
    is_python_builtin,
    matmul_like,
    matmul_operands,
    matmul_sites,
    propagate_shapes,
)
from snncc.ir.spec import COST_ELEMENTWISE, SOURCE, arguments, is_rate_train, is_source, spec_of, train_steps

aten = torch.ops.aten


class VerificationError(PipelineError):
    """The graph breaks an IR invariant."""


def _namespace(target) -> str | None:
    return getattr(target, "namespace", None)


def verify(gm: fx.GraphModule) -> None:
    """Raise VerificationError naming the first node that breaks an IR invariant."""
    steps: set[int] = set()
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        where = f"node '{node.name}' ({node.meta.get('source') or 'top level'})"
        if node.op != "call_function":
            raise VerificationError(f"{where}: unsupported node kind '{node.op}'")
        spec = spec_of(node.target)
        if not (spec is not None or _namespace(node.target) == "aten" or is_python_builtin(node.target)):
            raise VerificationError(f"{where}: unknown op {node.target}")
        if spec is None:
            continue
        if spec.role == SOURCE:
            steps.add(train_steps(node))
        _check_spike_operands(node, spec, where)
    if len(steps) > 1:
        raise VerificationError(f"spike trains with different T in one program: {sorted(steps)}")


def _check_spike_operands(node: fx.Node, spec, where: str) -> None:
    """Each spike operand comes from a source, and its rate flag says what code that source sends
    (a rate train read with MT gains, or the reverse, decodes to the wrong values)."""
    bound = arguments(node.target, node.args, node.kwargs)
    names = [argument.name for argument in node.target._schema.arguments]
    for operand in spec.spike_operands:
        train = bound.get(names[operand.position])
        if not (isinstance(train, fx.Node) and is_source(train.target)):
            raise VerificationError(f"{where}: operand {operand.position} of {node.target} is not a spike train")
        if bool(bound.get(operand.rate_flag)) != is_rate_train(train):
            code = "a rate code" if is_rate_train(train) else "not a rate code"
            raise VerificationError(f"{where}: {operand.rate_flag}={bool(bound.get(operand.rate_flag))} but "
                                    f"'{train.name}' ({train.target}) is {code}")


@dataclass
class AnalogSite:
    """A matmul that still multiplies analog values, and why (macs None: not countable)."""

    node: str
    source: str
    op: str
    macs: int | None
    reason: str


@dataclass
class CoverageReport:
    """Spike-driven coverage at a reference input shape, with every analog site listed."""

    input_shape: tuple[int, ...]
    spiking_macs: int = 0
    analog_macs: int = 0
    analog_sites: list[AnalogSite] = field(default_factory=list)
    analog_ops: list[AnalogSite] = field(default_factory=list)  # non-matmul arithmetic left analog
    position_only: list[str] = field(default_factory=list)
    unknown_sites: list[str] = field(default_factory=list)  # matmul sites whose MACs are unknown

    @property
    def coverage(self) -> float | None:
        """None when some matmul's MACs are unknown: the share cannot be stated honestly."""
        if self.unknown_sites:
            return None
        total = self.spiking_macs + self.analog_macs
        return self.spiking_macs / total if total else 1.0

    def to_dict(self) -> dict:
        return {"input_shape": list(self.input_shape), "coverage": self.coverage,
                "spiking_macs": self.spiking_macs, "analog_macs": self.analog_macs,
                "unknown_sites": list(self.unknown_sites),
                "analog_sites": [vars(s) for s in self.analog_sites],
                "analog_ops": [vars(s) for s in self.analog_ops],
                "position_only": self.position_only}


def format_coverage(coverage: dict) -> str:
    """A coverage dict's share as text: 'unknown' (with why) instead of a number it cannot back."""
    if coverage.get("coverage") is None:
        unknown = len(coverage.get("unknown_sites", []))
        return f"unknown ({unknown} matmul sites with uncountable MACs)" if unknown else "unknown"
    return f"{100 * coverage['coverage']:.2f}%"


def _analog_reason(node: fx.Node) -> str:
    op = str(node.target).removesuffix(".default")
    if node.target in FUSED_ATTENTION:
        return (f"fused attention: no pass lowers {op}; load the model with attn_implementation='eager' "
                "so attention is explicit matmuls")
    if node.target not in ANALOG_MATMULS:
        return f"no pass lowers {op} and snncc cannot count its MACs: coverage is unknown"
    if node.target not in LINEAR_TARGETS | MATMUL_TARGETS:
        return f"no pass in the pipeline lowers {op}"
    activation, weight = matmul_operands(node)
    if weight.op == "get_attr":
        return f"input '{activation.name}' is analog (no pass in the pipeline encoded it)"
    return f"operands '{activation.name}' and '{weight.name}' are analog (no pass encoded them)"


_ACCUMULATIONS = {aten.add.Tensor, aten.sub.Tensor, aten.neg.default, aten.mean.dim, aten.sum.dim_IntList,
                  aten.add.Scalar, aten.sub.Scalar, aten.rsub.Scalar, aten.cumsum.default}
_GAINS = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar}
_COMPARISONS = {aten.amax.default, aten.max.dim, aten.maximum.default}


def analog_op_reason(node: fx.Node, dependent: set[fx.Node]) -> str:
    """Why a non-matmul op on activations is not a spiking op, in one phrase."""
    op = str(node.target).removesuffix(".default")
    if node.target in _ACCUMULATIONS:
        return "membrane accumulation: adds and subtracts membrane potentials, no multiply"
    if node.target in _GAINS and sum(a in dependent for a in node.all_input_nodes) <= 1:
        return "constant gain: scales a membrane by a fixed or position-only value (RoPE, norm weight, 1/sqrt(d))"
    if node.target in _COMPARISONS:
        return "winner-take-all comparison (softmax row max): no arithmetic"
    return f"no pass in the pipeline lowers {op}"


def coverage_report(gm: fx.GraphModule, input_shape: tuple[int, ...] = (1, 128)) -> CoverageReport:
    """Measure spike-driven coverage for an input of `input_shape` (shapes only, no compute)."""
    propagate_shapes(gm, input_shape)
    report = CoverageReport(tuple(input_shape))
    for site in matmul_sites(gm):
        if site.spiking and spec_of(site.node.target).cost == COST_ELEMENTWISE:
            continue  # elementwise: its analog counterpart (aten.mul) is no matmul either
        if site.macs is None:
            report.unknown_sites.append(site.node.name)
        if site.spiking:
            report.spiking_macs += site.macs or 0
        else:
            report.analog_macs += site.macs or 0
            report.analog_sites.append(AnalogSite(site.node.name, site.node.meta.get("source", ""),
                                                  str(site.node.target), site.macs,
                                                  _analog_reason(site.node)))
    dependent = data_dependent_nodes(gm.graph)
    for n in gm.graph.nodes:
        if n.op != "call_function" or _namespace(n.target) != "aten":
            continue
        if n not in dependent:
            if matmul_like(n.target):
                report.position_only.append(n.name)
        elif not matmul_like(n.target) and n.target not in DATA_MOVEMENT:
            op = str(n.target).removesuffix(".default")
            report.analog_ops.append(AnalogSite(n.name, n.meta.get("source", ""), op, 0,
                                                analog_op_reason(n, dependent)))
    return report


__all__ = ["verify", "coverage_report", "format_coverage", "CoverageReport", "VerificationError"]
