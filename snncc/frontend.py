"""Frontend: torch.export a model into an ATen-level FX GraphModule (the "ANN graph").

The sequence length (and batch) are dynamic, so one traced graph serves every length up to
the model's maximum. Nodes are renamed after the module they come from
(`layers_3_mlp_down_proj_linear`) and carry that path in `node.meta["source"]`.
"""

from __future__ import annotations

import logging
import re

import torch
import torch.fx as fx
from torch.export import Dim

from snncc.errors import ModelError, first_line
from snncc.ir.rewrite import readable_name
from snncc.ir.stages import join_stages, repeat_block, split_stages
from snncc.models import LoadedModel, one_block_twin

log = logging.getLogger(__name__)

# Graph noise torch.export leaves for runtime checks; the executor does not need them.
_DROPPED_TARGETS = {torch.ops.aten._assert_tensor_metadata.default}
EXAMPLE_SHAPE = (2, 8)  # batch 2 and length 8 keep export from specialising either to 1
MAX_BATCH = 1024


def source_of(node: fx.Node) -> str:
    """The dotted path of the innermost module a node was traced from ('' at top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return node.meta.get("source", "")
    path = list(stack.values())[-1][0]
    if path.startswith("_empty_nn_module_stack"):  # export's placeholder for top-level code
        return ""
    path = re.sub(r"^(L__self__\.?|model\.)", "", path)  # drop the OutputOnly wrapper prefix
    return path


def _clean(gm: fx.GraphModule) -> fx.GraphModule:
    """Plain codegen, single-tensor output, no export guards, readable node names."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
        elif node.op == "call_function" and node.target in _DROPPED_TARGETS and not node.users:
            graph.erase_node(node)
    output = graph.output_node()
    result = output.args[0]
    while isinstance(result, (tuple, list)) and len(result) == 1:
        result = result[0]
    output.args = (result,)
    graph.eliminate_dead_code()  # e.g. BERT's pooler when only the hidden states are returned
    for node in graph.nodes:
        node.meta["source"] = source_of(node)
        if node.op == "call_function":
            node._rename(readable_name(node))
    graph._codegen = fx.graph.CodeGen()
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    gm.recompile()
    return gm


def _dynamic_dims(max_positions: int, auto: bool) -> dict:
    """The input's dynamic (batch, sequence) dims: named, or AUTO (guards kept as runtime checks)."""
    if auto:
        return {"input_ids": {0: Dim.AUTO(min=1, max=MAX_BATCH), 1: Dim.AUTO(min=1, max=max_positions)}}
    return {"input_ids": {0: Dim("batch", min=1, max=MAX_BATCH), 1: Dim("seq", min=1, max=max_positions)}}


def _export(module: torch.nn.Module, max_positions: int,
            tries: tuple[bool, ...] = (False, True)) -> torch.export.ExportedProgram:
    """torch.export with a dynamic (batch, sequence) input. Named dims first; where torch
    cannot prove a guard the model raises on them (torch 2.11 on transformers' attention masks:
    min(64 s, 192 s) == 64 s), AUTO dims. Either way both dims must come out dynamic: a program
    traced for one shape would silently refuse others."""
    example = torch.randint(0, 2, EXAMPLE_SHAPE)
    for auto in tries:
        try:
            exported = torch.export.export(module, (example,), dynamic_shapes=_dynamic_dims(max_positions, auto))
            break
        except torch._dynamo.exc.UserError:
            if auto == tries[-1]:
                raise
    user_input = exported.graph_signature.user_inputs[0]
    shape = next(n for n in exported.graph.nodes if n.name == user_input).meta["val"].shape
    if any(isinstance(size, int) for size in shape):
        raise ModelError(f"torch.export fixed the input shape to {tuple(shape)}; snncc needs batch and length dynamic")
    return exported


def _meta_to_cpu(gm: fx.GraphModule) -> None:
    """A model traced on the meta device (weights left in its checkpoint) built its position
    tables and masks on the meta device too: point those at the CPU, where its weights go."""
    meta, cpu = torch.device("meta"), torch.device("cpu")
    for node in gm.graph.nodes:
        if node.kwargs.get("device") == meta:
            node.update_kwarg("device", cpu)
        for i, arg in enumerate(node.args):
            if arg == meta:
                node.update_arg(i, cpu)
    gm.recompile()


def trace(model: LoadedModel) -> fx.GraphModule:
    """Export `model` with a dynamic (batch, sequence) input and return the ANN graph. A model
    read lazily from a checkpoint whose blocks are alike is traced with one block, which then
    serves every block (snncc.ir.stages.repeat_block): the same graph, in a fraction of the time."""
    twin = one_block_twin(model)
    if twin is not None:
        stages = split_stages(_traced(twin))
        if len(stages) == 3:
            gm = join_stages(repeat_block(stages, model.module.model.config.num_hidden_layers))
            log.info("traced %s from one block: %d nodes", model.name, len(gm.graph.nodes))
            return gm
    gm = _traced(model)
    log.info("traced %s: %d nodes", model.name, len(gm.graph.nodes))
    return gm


def _traced(model: LoadedModel) -> fx.GraphModule:
    try:
        with torch.no_grad():
            exported = _export(model.module, model.max_positions)
    except Exception as exc:
        raise ModelError(f"torch.export could not trace '{model.name}': {first_line(exc)}") from exc
    gm = _clean(exported.module())
    if model.weights is not None:
        _meta_to_cpu(gm)
    return gm
