"""encode: every input of every linear layer and activation-activation matmul becomes a
T-step multi-threshold (MT) spike train with per-channel ranges from calibration.

    aten.linear(x, W, b)  ->  snn.spike_linear(snn.mt_encode(x, r, T), W * r, b)
    aten.addmm(b, x, W)   ->  snn.spike_linear(snn.mt_encode(x, r, T), (W * r[:, None]).T, b)
    aten.matmul(a, b)     ->  snn.spike_matmul(snn.mt_encode(a, ra, T), ra, snn.mt_encode(b, rb, T), rb)

r is the per-input-channel max |x| recorded on the calibration text, times `headroom`
(default 16: four guard bits). Held-out text exceeds the calibrated per-channel maxima by
far in rare channels (measured: benchmarks/RESULTS.md); clipping those costs more than four
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
from snncc.ir.analysis import LINEAR_TARGETS, MATMUL_TARGETS, data_dependent_nodes, matmul_operands, weight_linear
from snncc.ir.encoders import Encoders, rate_flags
from snncc.ir.rewrite import add_constant, drop_unused_constants, get_tensor, replace_node
from snncc.pipeline import POSITIVE, STANDARD_T, Domain, Pass, PassResult, option, register_pass

snn = torch.ops.snn


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
        encode = Encoders(gm, ctx, self.T, self.headroom, self.floor)
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
            replace_node(node, new)
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
