"""accumulate: analog reductions (norm statistics, softmax row sums) add up in float64 and
round to float32 once.

    aten.mean.dim(x, dims, keepdim)        ->  to_float32(aten.mean.dim(to_float64(x), dims, keepdim))
    aten.sum.dim_IntList(x, dims, keepdim) ->  to_float32(aten.sum.dim_IntList(to_float64(x), dims, keepdim))

A reduction is a membrane integrating many inputs. In float32 its value depends on the order
of summation, which differs between torch, onnxruntime and other runtimes, and a neuron
downstream turns a one-ulp difference into a different spike whenever its input sits near a
threshold (measured: ONNX exports of tiny OPT and GPT-2 `las` programs at T = 14 differed
from the reference by 1.5e-4 and 4.3e-4 of the logits' range, all traced to ReduceMean). In
float64 the sum rounds to the same float32 value in any order but for exact ties, as the
synapses' membranes do in the reference executor's exact mode, so every backend runs the
same program. Only float32 reductions of activations change; the cost is negligible. (The
input is cast explicitly rather than through the reduction's `dtype` argument: torch.onnx
translates mean(x, dtype=float64) as a float32 ReduceMean followed by a Cast.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from snncc.calibration import CalibrationContext
from snncc.pipeline import Pass, PassResult, register_pass

aten = torch.ops.aten
REDUCTIONS = (aten.mean.dim, aten.sum.dim_IntList)


def _is_float32(node) -> bool:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(value, torch.Tensor) and value.dtype == torch.float32


@register_pass
@dataclass
class AccumulatePass(Pass):
    name = "accumulate"
    stage = 55
    summary = "analog reductions (norm means, softmax row sums) in float64, rounded once: the same on every backend"

    def run(self, gm: fx.GraphModule, ctx: CalibrationContext) -> PassResult:
        graph = gm.graph
        reductions = [n for n in graph.nodes if n.target in REDUCTIONS and not n.kwargs.get("dtype")
                      and _is_float32(n.args[0])]
        for node in reductions:
            with graph.inserting_before(node):
                wide = graph.call_function(aten._to_copy.default, (node.args[0],), {"dtype": torch.float64})
            node.update_arg(0, wide)
            with graph.inserting_after(node):
                rounded = graph.call_function(aten._to_copy.default, (node,), {"dtype": torch.float32})
            node.replace_all_uses_with(rounded, delete_user_cb=lambda user: user is not rounded)
            for new in (wide, rounded):
                new.meta.update(source=node.meta.get("source", ""), created_by=self.name)
        gm.recompile()
        return PassResult(gm, bool(reductions))
