"""ffn: every elementwise product of two activations becomes an exact spike x spike product.

    aten.mul(a, b)   ->  snn.spike_mul(train(a), ra, train(b), rb)      (gated FFN: SiLU(g) * up)
    aten.pow(a, 2)   ->  snn.spike_mul(train(a), ra, train(a), ra)      (the squares of a norm)

train(a) is the nonlinear neuron's own train where a is one (SiLU(g) after `nonlinear`),
else an MT encoder with per-channel calibrated ranges, as in `encode`. The product of the
two codes is exact (partial sums: every step multiplies a spike by a stored sum), so the
only error is each operand's code. Products with a constant or a position-only table
(RoPE's cos and sin) are synaptic gains, not products of activations, and stay.

Before spiking, the pass is the identity on the ANN: it changes no arithmetic except the
products it lowers (tested). Norm weights fold into the linear layers in `fold`, which
must run before norms are decomposed; `las` runs it first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from snncc.calibration import CalibrationContext
from snncc.ir.analysis import activation_product, data_dependent_nodes
from snncc.ir.encoders import Encoders, rate_flags
from snncc.ir.rewrite import drop_unused_constants, replace_node
from snncc.pipeline import POSITIVE, STANDARD_T, Pass, PassResult, option, register_pass

aten = torch.ops.aten
snn = torch.ops.snn


@register_pass
@dataclass
class FfnPass(Pass):
    name = "ffn"
    stage = 45
    summary = "activation x activation products (gated FFN, norm squares) -> exact spike x spike products"
    lowers = frozenset({aten.mul.Tensor, aten.pow.Tensor_Scalar})

    T: int = STANDARD_T
    headroom: float = option(16.0, POSITIVE)

    def run(self, gm: fx.GraphModule, ctx: CalibrationContext) -> PassResult:
        dependent = data_dependent_nodes(gm.graph)
        products = {n: ops for n in gm.graph.nodes if (ops := activation_product(n, dependent))}
        encode = Encoders(gm, ctx, self.T, self.headroom)
        encode.require(x for ops in products.values() for x in ops)
        for node, (a, b) in products.items():
            sa, ra = encode(a, node, per_last_dim=True)
            sb, rb = encode(b, node, per_last_dim=True)
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(snn.spike_mul.default, (sa, ra, sb, rb), rate_flags(rate_a=sa, rate_b=sb))
            replace_node(node, new)
        drop_unused_constants(gm)
        return PassResult(gm, bool(products))
