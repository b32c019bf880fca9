"""Execution lowering for the reference executor's fused mode.

Where every reader of an MT spike train is a synapse, the train need not exist: a synaptic
layer only needs what it decodes to, which `snn.mt_quantize` computes in one pass.

    snn.spike_linear(snn.mt_encode(x, r, T), W, b)  ->  aten.linear(snn.mt_quantize(x, r, T), W, b)
    snn.spike_matmul(mt_encode(a, ra, T), ra, mt_encode(b, rb, T), rb)
        ->  aten.matmul(mt_quantize(a, ra, T) * ra, mt_quantize(b, rb, T) * rb)

The result is bit-identical to the fused kernels (tested); the program's own graph keeps its
spike trains for profiling, the event backend and export.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from snncc.ir.ops import FUSABLE_MAX_T, SPIKE_SYNAPSES
from snncc.ir.rewrite import copy_graph_module

snn = torch.ops.snn
aten = torch.ops.aten


def _only_synapses_read(encoder: fx.Node) -> bool:
    return all(user.target in SPIKE_SYNAPSES for user in encoder.users)


def fuse_for_execution(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` in which trains read only by synapses are replaced by their decoded values."""
    fused = copy_graph_module(gm)
    graph = fused.graph
    decoded: dict[fx.Node, fx.Node] = {}
    for encoder in list(graph.nodes):
        if encoder.target != snn.mt_encode.default or encoder.args[2] > FUSABLE_MAX_T:
            continue
        if not _only_synapses_read(encoder):
            continue
        with graph.inserting_after(encoder):
            decoded[encoder] = graph.call_function(snn.mt_quantize.default, encoder.args)
    for node in list(graph.nodes):
        if node.target == snn.spike_linear.default and node.args[0] in decoded:
            with graph.inserting_before(node):
                new = graph.call_function(aten.linear.default, (decoded[node.args[0]], *node.args[1:]))
        elif node.target == snn.spike_matmul.default and node.args[0] in decoded and node.args[2] in decoded:
            sa, ra, sb, rb = node.args
            with graph.inserting_before(node):
                a_hat = graph.call_function(aten.mul.Tensor, (decoded[sa], ra))
                b_hat = graph.call_function(aten.mul.Tensor, (decoded[sb], rb))
                new = graph.call_function(aten.matmul.default, (a_hat, b_hat))
        else:
            continue
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    fused.recompile()
    return fused
