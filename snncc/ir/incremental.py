"""Incremental (KV-cached) execution: a step graph that computes only the new tokens' rows.

In a causal decoder every op treats each position's row on its own, except attention: its
right-hand matmul operands (keys, values) span every position so far. From a program graph,
`incremental_graph` builds

    step(input_ids, past_length, *past) -> (output, *present)

which runs the per-position ops on the new tokens only and, at each attention matmul,
appends the new rows of its right operand to the cached ones (`past` -> `present`). What
is cached is whatever that operand is in the graph that runs: a spike train in unrolled
mode, its decoded value in fused mode. Position tables and masks do not depend on the
token values: they are computed for the whole length and read at the new rows.

Which axes are sequence axes comes from two fake-tensor shape propagations at different
lengths (an axis whose size changes with the length); which of a score tensor's two
sequence axes holds the new rows (queries) and which all positions (keys) comes from the
matmul that made it, carried through broadcasting ops by right-alignment.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from snncc.errors import InputError
from snncc.ir.analysis import data_dependent_nodes, propagate_shapes, shape_of
from snncc.ir.rewrite import copy_graph_module

aten = torch.ops.aten
snn = torch.ops.snn

NEW_ROWS, ALL_ROWS = "new", "all"
_PROBE_BATCH, _PROBE_LENGTHS = 2, (5, 7)
# matmul-like ops and the index of their right operand
_MATMUL_RIGHT = {aten.matmul.default: 1, aten.bmm.default: 1, snn.spike_matmul.default: 2}
# ops that combine values along their `dim` axes (reductions, scans, sorts)
_ALONG_AXES = {
    "sum", "mean", "amax", "amin", "max", "min", "prod", "var", "std", "var_mean", "logsumexp", "norm",
    "linalg_vector_norm", "argmax", "argmin", "any", "all", "cumsum", "cumprod", "cummax", "cummin",
    "softmax", "_softmax", "log_softmax", "_log_softmax", "sort", "argsort", "topk", "diff", "flip", "roll",
}
_SYM_OPS = {operator.add, operator.sub, operator.mul, operator.floordiv, operator.neg}


class CacheError(InputError):
    """The program's graph has a pattern the KV cache cannot split by position."""


def extend_cache(past: torch.Tensor | None, new: torch.Tensor, axis: int) -> torch.Tensor:
    """The cached rows followed by the new ones (just the new ones on the first call)."""
    return new if past is None else torch.cat([past, new], dim=axis)


def new_positions(input_ids: torch.Tensor, past_length: torch.Tensor) -> torch.Tensor:
    """The positions of the new tokens, after past_length (a 0-d tensor) earlier ones."""
    return past_length + torch.arange(input_ids.shape[1], device=input_ids.device)


def write_cache(cache: torch.Tensor, new: torch.Tensor, axis: int, input_ids: torch.Tensor,
                past_length: torch.Tensor) -> torch.Tensor:
    """The new rows written into a preallocated cache at their positions, in place: the cache
    keeps its shape and address from token to token, which CUDA graphs need."""
    return cache.index_copy_(axis, new_positions(input_ids, past_length), new)


def read_new_rows(table: torch.Tensor, axis: int, input_ids: torch.Tensor, past_length: torch.Tensor) -> torch.Tensor:
    """A position table's rows at the new tokens' positions."""
    return table.index_select(axis, new_positions(input_ids, past_length))


def incremental_graph(gm: fx.GraphModule, static: bool = False) -> tuple[fx.GraphModule, list[str]]:
    """The step graph of a causal program and the names of the tensors it caches (in the
    order of `past`/`present`). Raises CacheError where positions mix outside attention.

    static: the caches are preallocated (`past` holds them, their length fixed, the rows
    from past_length + the new tokens on unused) and past_length is a 0-d int64 tensor, so
    a step's shapes stay the same from token to token: what CUDA graphs replay. Attention
    spans the whole cache; the causal mask, built for the cache's length, hides the unused
    rows (they must hold finite values: zeros)."""
    step = copy_graph_module(gm)
    graph = step.graph
    lengths = _sequence_axes(step)
    dependent = data_dependent_nodes(graph)
    roles = _row_roles(graph, lengths, dependent)
    input_ids = next(n for n in graph.nodes if n.op == "placeholder")
    with graph.inserting_after(input_ids):
        past_length = graph.placeholder("past_length")
    cached = _insert_cache(graph, lengths, roles, dependent, past_length)
    if static:
        _write_into_static_caches(graph, cached, input_ids, past_length)
        first_past, axis = cached[0][1].args[0], cached[0][1].args[2]
        with graph.inserting_after(cached[-1][1].args[0]):  # after the last placeholder
            cache_length = graph.call_function(aten.sym_size.int, (first_past, axis))
        read_rows = (read_new_rows, (input_ids, past_length))
        _read_tables_at_new_rows(graph, lengths, roles, dependent, read_rows)
        _size_tables_for_all_rows(graph, lengths, dependent, lambda size: cache_length)
    else:
        _read_tables_at_new_rows(graph, lengths, roles, dependent, (aten.slice.Tensor, (past_length,)))
        _size_tables_for_all_rows(graph, lengths, dependent,
                                  lambda size: graph.call_function(operator.add, (size, past_length)))
    output = graph.output_node()
    output.args = ((output.args[0], *(present for _, present in cached)),)
    graph.lint()
    step.recompile()
    return step, [node.name for node, _ in cached]


def cache_axes(step: fx.GraphModule) -> list[int]:
    """The sequence axis of each cached tensor of a step graph, in `past` order (that of
    the outputs after the first: extend_cache or write_cache calls)."""
    return [node.args[2] for node in step.graph.output_node().args[0][1:]]


def _sequence_axes(gm: fx.GraphModule) -> dict[fx.Node, tuple[int, ...]]:
    """For each tensor node, the axes whose size changes with the sequence length."""
    shapes = []
    for length in _PROBE_LENGTHS:
        propagate_shapes(gm, (_PROBE_BATCH, length))
        shapes.append({node: shape_of(node) for node in gm.graph.nodes})
    axes = {}
    for node in gm.graph.nodes:
        short, long = shapes[0][node], shapes[1][node]
        if short is not None and long is not None:
            axes[node] = tuple(i for i, (a, b) in enumerate(zip(short, long, strict=True)) if a != b)
    return axes


def _right_aligned(roles: dict[int, str], rank_from: int, rank_to: int) -> dict[int, str]:
    """Axis roles of a rank_from tensor moved onto the axes a broadcast aligns them with."""
    offset = rank_to - rank_from
    return {axis + offset: role for axis, role in roles.items() if axis + offset >= 0}


def _row_roles(graph: fx.Graph, axes: dict[fx.Node, tuple[int, ...]],
               dependent: set[fx.Node]) -> dict[fx.Node, dict[int, str]]:
    """For each token-dependent tensor, what each sequence axis holds in the step graph: the
    new rows, or all rows so far (the key axis of attention scores)."""
    roles: dict[fx.Node, dict[int, str]] = {}
    for node in graph.nodes:
        seq = axes.get(node, ())
        if node in dependent:
            _refuse_mixing_rows(node, roles)
        if node not in dependent or not seq:
            continue
        if len(seq) == 1:
            roles[node] = {seq[0]: NEW_ROWS}
            continue
        rank = len(shape_of(node))
        if len(seq) == 2 and node.target in _MATMUL_RIGHT and set(seq) == {rank - 2, rank - 1}:
            roles[node] = {rank - 2: NEW_ROWS, rank - 1: ALL_ROWS}
            continue
        scored = [arg for arg in node.all_input_nodes if len(roles.get(arg, {})) == 2]
        if len(seq) != 2 or not scored:
            raise CacheError(f"the KV cache cannot tell query from key positions at node '{node.name}' "
                             f"({node.target}): generate without the KV cache (cache=False)")
        roles[node] = _right_aligned(roles[scored[0]], len(shape_of(scored[0])), rank)
    return roles


def _reduced_axes(node: fx.Node) -> list[int]:
    """The axes of its first input an op sums, scans or sorts along: its `dim` argument, or
    a matmul's contracted axis."""
    rank = len(shape_of(node.args[0]) or ()) if node.args and isinstance(node.args[0], fx.Node) else 0
    if not rank:
        return []
    if node.target in _MATMUL_RIGHT:
        return [rank - 1]
    if not isinstance(node.target, torch._ops.OpOverload) or node.target.__name__.split(".")[0] not in _ALONG_AXES:
        return []
    names = [argument.name for argument in node.target._schema.arguments]
    name = "dim" if "dim" in names else "dims"
    position = names.index(name)
    dims = node.args[position] if position < len(node.args) else node.kwargs.get(name)
    dims = [] if dims is None else [dims] if isinstance(dims, int) else list(dims)
    return [d % rank for d in dims]


def _refuse_mixing_rows(node: fx.Node, roles: dict[fx.Node, dict[int, str]]) -> None:
    """Refuse an op that combines positions outside attention (a cumulative sum or mean over
    the sequence): computing it on the new rows alone would be silently wrong."""
    source = node.args[0] if node.args else None
    if source in roles and any(roles[source].get(axis) == NEW_ROWS for axis in _reduced_axes(node)):
        raise CacheError(f"node '{node.name}' ({node.target}) combines values across positions: the KV cache "
                         "cannot split it by token (generate without it, cache=False)")


def _insert_cache(graph: fx.Graph, axes, roles, dependent, past_length: fx.Node) -> list[tuple[fx.Node, fx.Node]]:
    """Route each attention matmul's right operand through `extend_cache`; returns
    (operand, extended) pairs."""
    cached: list[tuple[fx.Node, fx.Node]] = []
    last_placeholder = past_length
    for node in list(graph.nodes):
        index = _MATMUL_RIGHT.get(node.target)
        if index is None or node not in dependent:
            continue
        right = node.args[index]
        if right not in dependent or not axes.get(right):
            continue
        if len(axes[right]) != 1:
            raise CacheError(f"attention operand '{right.name}' has {len(axes[right])} sequence axes: "
                             "the KV cache needs one (generate without it, cache=False)")
        with graph.inserting_after(last_placeholder):
            past = last_placeholder = graph.placeholder(f"past_{right.name}")
        with graph.inserting_after(right):
            extended = graph.call_function(extend_cache, (past, right, axes[right][0]))
        node.replace_input_with(right, extended)
        cached.append((right, extended))
    if not cached:
        raise CacheError("the program has no attention over positions to cache: generate without the KV cache "
                         "(cache=False)")
    return cached


def _write_into_static_caches(graph: fx.Graph, cached: list[tuple[fx.Node, fx.Node]], input_ids: fx.Node,
                              past_length: fx.Node) -> None:
    """Each extend_cache call becomes a write_cache into its preallocated cache."""
    for _, extended in cached:
        past, new, axis = extended.args
        extended.target, extended.args = write_cache, (past, new, axis, input_ids, past_length)


def _read_tables_at_new_rows(graph: fx.Graph, axes, roles, dependent, read_rows) -> None:
    """Where a token-dependent op reads a position table (RoPE angles, a mask, position
    embeddings) on an axis that holds the new rows, read the table at the new rows:
    read_rows is the (target, args) of the call that does, given (table, axis) before args."""
    slices: dict[tuple[fx.Node, int], fx.Node] = {}
    for node in list(graph.nodes):
        if node not in roles:
            continue
        rank = len(shape_of(node))
        for table in node.all_input_nodes:
            if table in dependent or not axes.get(table):
                continue
            aligned = _right_aligned({axis: axis for axis in axes[table]}, len(shape_of(table)), rank)
            for out_axis, table_axis in aligned.items():
                role = roles[node].get(out_axis)
                if role is None:
                    raise CacheError(f"node '{node.name}' ({node.target}) reads the position table "
                                     f"'{table.name}' across positions: generate without the KV cache (cache=False)")
                if role == NEW_ROWS:
                    key = (table, table_axis)
                    if key not in slices:
                        with graph.inserting_after(table):
                            target, args = read_rows
                            slices[key] = graph.call_function(target, (table, table_axis, *args))
                    node.replace_input_with(table, slices[key])


def _size_tables_for_all_rows(graph: fx.Graph, axes, dependent, all_rows) -> None:
    """Position tables are built for the whole length: each sequence size they read (taken
    from the new tokens' tensors) becomes all_rows(size): the node that counts every row
    (past_length added to it, or the static cache's length), made before the first reader."""
    totals: dict[fx.Node, fx.Node] = {}

    def total(size: fx.Node, reader: fx.Node) -> fx.Node:
        """`size` counted over all rows, computed before its first table `reader`."""
        if size not in totals:
            args = tuple(total(a, reader) if isinstance(a, fx.Node) and _is_size(a) else a for a in size.args)
            with graph.inserting_before(reader):
                if size.target == aten.sym_size.int and size.args[1] in axes.get(size.args[0], ()):
                    totals[size] = all_rows(size)
                elif size.target in _SYM_OPS and args != size.args:
                    totals[size] = graph.call_function(size.target, args)
                else:
                    totals[size] = size
        return totals[size]

    for node in list(graph.nodes):
        if node.op != "call_function" or node in dependent or _is_size(node):
            continue
        for size in node.all_input_nodes:
            if _is_size(size) and total(size, node) is not size:
                node.replace_input_with(size, totals[size])


def _is_size(node: fx.Node) -> bool:
    return node.target == aten.sym_size.int or node.target in _SYM_OPS
