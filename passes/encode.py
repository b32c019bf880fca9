"""encode: every input of every linear layer and activation-activation matmul becomes a
T-step multi-threshold (MT) spike train with per-channel ranges from calibration.

    aten.linear(x, W, b)  ->  snn.spike_linear(snn.mt_encode(x, r, T), W * r, b)
    aten.addmm(b, x, W)   ->  snn.spike_linear(snn.mt_encode(x, r, T), (W * r[:, None]).T, b)
    aten.matmul(a, b)     ->  snn.spike_matmul(snn.mt_encode(a, ra, T), ra, snn.mt_encode(b, rb, T), rb)

r is the per-input-channel max |x| recorded on the calibration text, times `headroom`
(default 16: four guard bits). Measured on SmolLM2, held-out text exceeds the calibrated
per-channel maxima by up to 40x in rare channels; clipping those costs far more than four
bits of resolution, and guard bits that stay zero fire no spikes. For linear layers r folds
into the weight columns, so the spikes are unit events. For a spike x spike product the
ranges keep every static dim (per head and channel) and stay in the code.

Error bound per encoded value: |x - x_hat| <= r * 2^-T for |x| <= r (half that away from the
range's top); values beyond r clip to r * (1 - 2^-T).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from snncc.calibration import CalibrationContext
from snncc.errors import PipelineError
from snncc.ir.analysis import (
    LINEAR_TARGETS,
    MATMUL_TARGETS,
    activation_product,
    data_dependent_nodes,
    matmul_operands,
    weight_linear,
)
from snncc.ir.ops import is_rate_train, train_steps
from snncc.ir.rewrite import add_constant, drop_unused_constants, get_tensor, replace_node
from snncc.pipeline import POSITIVE, STANDARD_T, Domain, Pass, PassResult, option, register_pass

snn = torch.ops.snn
_RANGE_FLOOR = 1e-6  # relative to the tensor's largest range: channels that never fired in calibration


def rate_flags(**trains: fx.Node) -> dict[str, bool]:
    """Keyword flags for a synapse op: which of its trains are rate codes (IF neurons)."""
    return {key: True for key, spikes in trains.items() if is_rate_train(spikes)}


def calib_name(node: fx.Node) -> str:
    """The tensor whose calibration statistics describe `node`: the ANN node it replaced."""
    return node.meta.get("calib_name", node.name)


def calibrated_absmax(ctx: CalibrationContext, node: fx.Node) -> torch.Tensor:
    """node's per-channel max |x| on the calibration text, refused where NaN or inf: a range
    made from it would code nothing (and NaN cannot be rounded to a table's power of two)."""
    stats = ctx.stats.get(calib_name(node))
    if stats is None:
        raise PipelineError(f"no calibration range for '{node.name}': the ANN never computed it")
    if not bool(torch.isfinite(stats.absmax).all()):
        kind = "NaN" if bool(torch.isnan(stats.absmax).any()) else "inf"
        raise PipelineError(f"the calibration range of '{node.name}' is {kind}: the model computes {kind} there on "
                            "the calibration text (an overflow or a broken weight upstream); fix the model or "
                            "give other --calib text")
    return stats.absmax


class Encoders:
    """The MT encoders of one pass: one per (tensor, range layout), with ranges from
    calibration. A tensor that is already a decoded spike train (a nonlinear neuron's
    output) is read as that train, not encoded again."""

    def __init__(self, gm: fx.GraphModule, ctx: CalibrationContext, T: int, headroom: float,
                 floor: float, created_by: str, outlier_ranges: int = 0):
        self.gm, self.ctx, self.T, self.G = gm, ctx, T, outlier_ranges
        self.headroom, self.floor, self.created_by = headroom, floor, created_by
        self.made: dict[tuple[str, bool], tuple[fx.Node, fx.Node]] = {}

    def is_train(self, x: fx.Node) -> bool:
        return x.target == snn.decode.default and train_steps(x.args[0]) == self.T

    def operands(self, node: fx.Node, dependent: set[fx.Node]) -> list[tuple[fx.Node, bool]]:
        """The activation operands a synapse at `node` reads, each with its range layout
        (per last dim for linear layers and products, per static dim for matmuls)."""
        if weight_linear(node):
            x = matmul_operands(node)[0]
            return [(x, True)] if x in dependent else []
        if node.target in MATMUL_TARGETS:
            return [(a, False) for a in matmul_operands(node) if a in dependent]
        product = activation_product(node, dependent)
        return [(a, True) for a in dict.fromkeys(product)] if product else []

    def require(self, nodes) -> None:
        """Record the calibration ranges of every node these encoders will be asked for."""
        self.ctx.require({calib_name(x) for x in nodes if not self.is_train(x)}, self.gm)

    def __call__(self, x: fx.Node, before: fx.Node, per_last_dim: bool) -> tuple[fx.Node, fx.Node]:
        """(spike train, range) of x, inserted before `before` the first time it is asked for."""
        if self.is_train(x):
            return x.args[0], x.args[1]
        key = (x.name, per_last_dim)
        if key not in self.made:
            r = self.range_of(x, per_last_dim)
            r_node = add_constant(self.gm, f"{x.name}_range", r, before)
            with self.gm.graph.inserting_before(before):
                if self.G:
                    spikes = self.gm.graph.call_function(snn.mr_encode.default, (x, r_node, self.T, self.G))
                else:
                    spikes = self.gm.graph.call_function(snn.mt_encode.default, (x, r_node, self.T))
            spikes._rename(f"{x.name}_spikes")
            spikes.meta.update(source=x.meta.get("source", ""), created_by=self.created_by,
                               snn={"code": "mr" if self.G else "mt", "T": self.T, "ranges": self.G + 1,
                                    "range": tuple(r.shape)})
            self.made[key] = (spikes, r_node)
        return self.made[key]

    def range_of(self, x: fx.Node, per_last_dim: bool) -> torch.Tensor:
        """x's calibrated range (max |x| per channel, times headroom) in the encoder's layout."""
        r = calibrated_absmax(self.ctx, x)
        if per_last_dim:
            r = r.reshape(-1, r.shape[-1]).amax(0)
        return (r.clamp(min=float(r.max()) * max(self.floor, _RANGE_FLOOR) + 1e-12) * self.headroom).float()


@register_pass
@dataclass
class EncodePass(Pass):
    name = "encode"
    stage = 50
    summary = "matmul inputs -> T-step multi-threshold spike trains (per-channel calibrated ranges)"
    lowers = frozenset(LINEAR_TARGETS | MATMUL_TARGETS)

    T: int = STANDARD_T
    headroom: float = option(16.0, POSITIVE)  # below 1 clips values calibration saw
    floor: float = option(0.0, Domain(0, 1))  # a share of the tensor's largest channel range

    def run(self, gm: fx.GraphModule, ctx: CalibrationContext) -> PassResult:
        graph = gm.graph
        dependent = data_dependent_nodes(graph)
        encode = Encoders(gm, ctx, self.T, self.headroom, self.floor, self.name)
        encode.require(a for n in graph.nodes if n in dependent and n.target in self.lowers
                       for a in matmul_operands(n) if a in dependent)
        modified = False
        for node in list(graph.nodes):
            if node.op != "call_function" or node not in dependent:
                continue
            if weight_linear(node):
                new = self._lower_linear(gm, node, encode)
            elif node.target in MATMUL_TARGETS:
                a, b = matmul_operands(node)
                sa, ra = encode(a, node, per_last_dim=False)
                sb, rb = encode(b, node, per_last_dim=False)
                with graph.inserting_before(node):
                    new = graph.call_function(snn.spike_matmul.default, (sa, ra, sb, rb),
                                              rate_flags(rate_a=sa, rate_b=sb))
            else:
                continue
            replace_node(node, new, self.name)
            modified = True
        drop_unused_constants(gm)
        return PassResult(gm, modified)

    def _lower_linear(self, gm: fx.GraphModule, node: fx.Node, encode) -> fx.Node:
        x, w_node = matmul_operands(node)
        if w_node.op != "get_attr":
            raise PipelineError(f"'{node.name}' ({node.meta.get('source')}): weight operand "
                                f"'{w_node.name}' is computed, not a parameter; encode cannot fold it")
        weight = get_tensor(gm, w_node)
        if node.target == torch.ops.aten.linear.default:
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        elif node.target == torch.ops.aten.addmm.default:
            bias, weight = node.args[0], weight.t()
        else:
            bias, weight = None, weight.t()
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            raise PipelineError(f"'{node.name}': addmm with alpha/beta is not supported by encode")
        spikes, r_node = encode(x, node, per_last_dim=True)
        folded = add_constant(gm, f"{w_node.target}_folded", weight * get_tensor(gm, r_node), node)
        with gm.graph.inserting_before(node):
            return gm.graph.call_function(snn.spike_linear.default, (spikes, folded, bias), rate_flags(rate=spikes))
