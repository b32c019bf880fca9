"""portable: the analog float32 ops whose result depends on the runtime (sums: the order of
summation; cos, sin, exp, ...: the math library's rounding) compute in float64 and round to
float32 once, so torch, onnxruntime and the event backend run the same program.

    aten.mean.dim(x, dims, keepdim)   ->  to_float32(aten.mean.dim(to_float64(x), dims, keepdim))
    aten.sum.dim_IntList, aten.cos, aten.sin, aten.exp, ...   likewise

Why it matters: a neuron turns a one-ulp difference in its input into a different spike
whenever the input sits near a threshold, and through 30 layers that grows: before this
pass, ONNX exports of `las` programs differed visibly from the reference, traced to
ReduceMean and to RoPE's cos and sin (measured: benchmarks/RESULTS.md). In float64 these
round to the same float32 value on any runtime but for exact ties, as the synapses'
membranes do in the reference executor's exact mode. Only float32 inputs change; the ops
are few (norm statistics, softmax row sums, position tables), so the cost is negligible.
The input is cast explicitly rather than through a reduction's `dtype` argument:
torch.onnx translates mean(x, dtype=float64) as a float32 ReduceMean followed by a Cast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from snncc.calibration import CalibrationContext
from snncc.pipeline import Pass, PassResult, register_pass

aten = torch.ops.aten
RUNTIME_DEPENDENT = frozenset({
    aten.mean.dim, aten.sum.dim_IntList,  # summation order
    aten.cos.default, aten.sin.default, aten.exp.default, aten.log.default, aten.tanh.default,  # libm rounding
    aten.sigmoid.default, aten.erf.default, aten.rsqrt.default, aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor,
})


def _is_float32(node) -> bool:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(value, torch.Tensor) and value.dtype == torch.float32


@register_pass
@dataclass
class PortablePass(Pass):
    name = "portable"
    stage = 55
    summary = "analog sums and transcendental ops in float64, rounded once: the same result on every runtime"

    def run(self, gm: fx.GraphModule, ctx: CalibrationContext) -> PassResult:
        graph = gm.graph
        sites = [n for n in graph.nodes if n.target in RUNTIME_DEPENDENT and not n.kwargs.get("dtype")
                 and _is_float32(n.args[0])]
        for node in sites:
            with graph.inserting_before(node):
                wide = graph.call_function(aten._to_copy.default, (node.args[0],), {"dtype": torch.float64})
            node.update_arg(0, wide)
            with graph.inserting_after(node):
                rounded = graph.call_function(aten._to_copy.default, (node,), {"dtype": torch.float32})
            node.replace_all_uses_with(rounded, delete_user_cb=lambda user, keep=rounded: user is not keep)
            for new in (wide, rounded):
                new.meta["source"] = node.meta.get("source", "")
        gm.recompile()
        return PassResult(gm, bool(sites))
