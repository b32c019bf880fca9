"""Execution lowering for the reference executor's fused mode.

Where every reader of a spike train is a synapse or a decoder, the train need not exist:
its readers only need what it decodes to, which each source's quantize op computes in one
pass (bit-identical for T <= 24, tested):

    mt_encode(x, r, T)                       ->  mt_quantize(x, r, T)          (unit-range value)
    mr_encode(x, r, T, G)                    ->  mr_quantize(x, r, T, G)
    fn_encode(x, thresholds, codes, b, T)    ->  fn_quantize(x, thresholds, codes, b, T)

    spike_linear(s, W, b)           ->  aten.linear(q, W, b)
    spike_matmul(sa, ra, sb, rb)    ->  aten.matmul(qa * ra, qb * rb)
    spike_mul(sa, ra, sb, rb)       ->  aten.mul(qa * ra, qb * rb)
    decode(s, r)                    ->  aten.mul(q, r)

The program's own graph keeps its spike trains for profiling, the event backend and export.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from snncc.ir.ops import FUSABLE_MAX_T, SPIKE_SYNAPSES, train_steps
from snncc.ir.rewrite import copy_graph_module

snn = torch.ops.snn
aten = torch.ops.aten

QUANTIZERS = {snn.mt_encode.default: snn.mt_quantize.default, snn.mr_encode.default: snn.mr_quantize.default,
              snn.fn_encode.default: snn.fn_quantize.default, snn.if_encode.default: snn.if_quantize.default}
_READERS = SPIKE_SYNAPSES | {snn.decode.default}


def _fused(graph: fx.Graph, node: fx.Node, q: dict[fx.Node, fx.Node]) -> fx.Node | None:
    """The dense equivalent of a synapse or decoder whose trains are all quantized, or None."""
    call = graph.call_function
    if node.target == snn.spike_linear.default and node.args[0] in q:
        return call(aten.linear.default, (q[node.args[0]], *node.args[1:]))
    if node.target == snn.decode.default and node.args[0] in q:
        return call(aten.mul.Tensor, (q[node.args[0]], node.args[1]))
    if node.target in (snn.spike_matmul.default, snn.spike_mul.default) and node.args[0] in q and node.args[2] in q:
        sa, ra, sb, rb = node.args
        a_hat, b_hat = call(aten.mul.Tensor, (q[sa], ra)), call(aten.mul.Tensor, (q[sb], rb))
        op = aten.matmul.default if node.target == snn.spike_matmul.default else aten.mul.Tensor
        return call(op, (a_hat, b_hat))
    return None


def fuse_for_execution(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` in which trains read only by synapses and decoders are replaced by
    their decoded values."""
    fused = copy_graph_module(gm)
    graph = fused.graph
    quantized: dict[fx.Node, fx.Node] = {}
    for source in list(graph.nodes):
        if source.target not in QUANTIZERS or train_steps(source) > FUSABLE_MAX_T:
            continue
        if not all(user.target in _READERS for user in source.users):
            continue
        with graph.inserting_after(source):
            quantized[source] = graph.call_function(QUANTIZERS[source.target], source.args)
    for node in list(graph.nodes):
        if node.target not in _READERS:
            continue
        with graph.inserting_before(node):
            new = _fused(graph, node, quantized)
        if new is not None:
            node.replace_all_uses_with(new)
            graph.erase_node(node)
    graph.eliminate_dead_code()
    fused.recompile()
    return fused
