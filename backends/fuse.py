"""Execution lowering for the reference executor's fused mode.

Where every reader of a spike train is a synapse or a decoder, the train need not exist:
its readers only need what it decodes to, which each source's quantize op (its `quantizer`
in snncc.ir.spec) computes in one pass from the source's own arguments (bit-identical for
T <= 24, tested):

    mt_encode(x, r, T)              ->  mt_quantize(x, r, T)    (unit-range value; likewise each source)

A reader then becomes its spec's `dense` ATen op on the decoded values (each quantized train
times its range argument, where it has one), its rate flags dropped (a quantizer's value is
already in the code's units); a decoder becomes the decoded value itself:

    spike_linear(s, W, b)           ->  aten.linear(q, W, b)
    spike_matmul(sa, ra, sb, rb)    ->  aten.matmul(qa * ra, qb * rb)
    spike_mul(sa, ra, sb, rb)       ->  aten.mul(qa * ra, qb * rb)
    decode(s, r)                    ->  aten.mul(q, r)

A source without a quantizer keeps its train, and so do its readers. The program's own graph
keeps its spike trains for profiling, the event backend and export.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from snncc.ir.ops import FUSABLE_MAX_T
from snncc.ir.rewrite import copy_graph_module
from snncc.ir.spec import READERS, OpSpec, arguments, spec_of, train_steps

aten = torch.ops.aten


def _is_reader(node: fx.Node) -> bool:
    spec = spec_of(node.target)
    return spec is not None and spec.role in READERS


def _fused(graph: fx.Graph, node: fx.Node, spec: OpSpec, q: dict[fx.Node, fx.Node]) -> fx.Node | None:
    """The dense equivalent of a synapse or decoder whose trains are all quantized, or None."""
    bound = arguments(node.target, node.args, node.kwargs)
    names = [argument.name for argument in node.target._schema.arguments]
    trains = [bound[names[operand.position]] for operand in spec.spike_operands]
    if not all(train in q for train in trains):
        return None
    skipped = {operand.rate_flag for operand in spec.spike_operands}
    decoded = {}
    for operand, train in zip(spec.spike_operands, trains, strict=True):
        value = q[train]
        if operand.scale is not None:
            value = graph.call_function(aten.mul.Tensor, (value, bound[names[operand.scale]]))
            skipped.add(names[operand.scale])
        decoded[names[operand.position]] = value
    if spec.dense is None:  # a decoder: its one decoded train
        (value,) = decoded.values()
        return value
    values = [decoded.get(name, bound.get(name)) for name in names if name not in skipped]
    return graph.call_function(spec.dense, tuple(values))


def fuse_for_execution(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` in which trains read only by synapses and decoders are replaced by
    their decoded values."""
    fused = copy_graph_module(gm)
    graph = fused.graph
    quantized: dict[fx.Node, fx.Node] = {}
    for source in list(graph.nodes):
        spec = spec_of(source.target)
        if spec is None or spec.quantizer is None or train_steps(source) > FUSABLE_MAX_T:
            continue
        if not all(_is_reader(user) for user in source.users):
            continue
        with graph.inserting_after(source):
            quantized[source] = graph.call_function(spec.quantizer, source.args, dict(source.kwargs))
    for node in list(graph.nodes):
        if not _is_reader(node):
            continue
        with graph.inserting_before(node):
            new = _fused(graph, node, spec_of(node.target), quantized)
        if new is not None:
            node.replace_all_uses_with(new)
            graph.erase_node(node)
    graph.eliminate_dead_code()
    fused.recompile()
    return fused
