"""Stages: a traced model cut into the prologue, one graph per decoder block, and the epilogue,
and the compiled stages joined back into one program graph.

A block-by-block compile (snncc.blockwise) holds one stage's weights at a time. Each stage
is a graph of its own whose inputs are the values it reads from earlier stages (the hidden
state, RoPE tables, masks) under the names they have in the whole graph, so calibration
statistics, which are keyed by node name, mean the same in a stage as in the whole model.
An input that the whole graph computes from shapes only (a causal mask, a RoPE table) is
marked `input_independent`, so analyses see it as the constant it is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.fx as fx

from snncc.ir.analysis import data_dependent_nodes
from snncc.ir.rewrite import get_tensor, set_tensor

# A decoder (or encoder) block's module path: layers.3, h.3, layer.3, blocks.3.
_BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")


@dataclass
class Stage:
    """One part of the model: its graph reads `inputs` and returns the tuple `outputs`."""

    name: str
    graph_module: fx.GraphModule
    inputs: list[str]
    outputs: list[str]


def block_index(node: fx.Node) -> int | None:
    """The decoder block a node was traced from, or None outside every block."""
    match = _BLOCK.search(node.meta.get("source", ""))
    return int(match.group(1)) if match else None


def _stage_of_nodes(graph: fx.Graph) -> dict[fx.Node, int]:
    """Stage 0 is the prologue, stage b + 1 block b, the last the epilogue. A node outside
    every block goes to the earliest stage its inputs allow, or to the epilogue where it
    comes after the last block's nodes; get_attr nodes are copied to every stage that reads them."""
    nodes = list(graph.nodes)
    blocks = {i: b for i, n in enumerate(nodes) if n.op == "call_function" and (b := block_index(n)) is not None}
    position = {b: i + 1 for i, b in enumerate(sorted(set(blocks.values())))}
    last, after_blocks = len(position) + 1, max(blocks, default=len(nodes))
    stage: dict[fx.Node, int] = {}
    for i, node in enumerate(nodes):
        earliest = max((stage[a] for a in node.all_input_nodes if a.op != "get_attr"), default=0)
        if node.op == "output" or i > after_blocks:
            stage[node] = last
        elif i in blocks:
            stage[node] = max(position[blocks[i]], earliest)
        else:
            stage[node] = earliest
    return stage


def split_stages(gm: fx.GraphModule) -> list[Stage]:
    """Cut `gm` into stages (see the module docstring). The stages' tensors are gm's own,
    shared (no copy)."""
    graph = gm.graph
    stage = _stage_of_nodes(graph)
    count = max(stage.values()) + 1
    dependent = data_dependent_nodes(graph)
    consumers: dict[fx.Node, set[int]] = {}
    for node in graph.nodes:
        for arg in node.all_input_nodes:
            if arg.op != "get_attr":
                consumers.setdefault(arg, set()).add(stage[node])
    stages = []
    for s in range(count):
        new = fx.Graph()
        root = torch.nn.Module()
        env: dict[fx.Node, fx.Node] = {}
        members = [n for n in graph.nodes if stage[n] == s and n.op not in ("get_attr", "output")]
        inputs = [a for a in graph.nodes if a.op != "get_attr" and stage[a] < s and s in consumers.get(a, ())]
        for value in inputs:
            # (Graph.placeholder would snake_case the name)
            env[value] = new.create_node("placeholder", value.name, name=value.name)
            env[value].meta.update(value.meta)
            if value not in dependent:
                env[value].meta["input_independent"] = True
        for node in members:
            for arg in node.all_input_nodes:
                if arg.op == "get_attr" and arg not in env:
                    env[arg] = new.get_attr(arg.target)
                    env[arg].meta.update(arg.meta)
                    set_tensor(root, arg.target, get_tensor(gm, arg))
            env[node] = new.node_copy(node, env.__getitem__)
        if s == count - 1:
            outputs = []
            new.output((fx.node.map_arg(graph.output_node().args[0], env.__getitem__),))
        else:
            outputs = [n for n in members if any(c > s for c in consumers.get(n, ()))]
            new.output(tuple(env[n] for n in outputs))
        name = "prologue" if s == 0 else "epilogue" if s == count - 1 else f"block {s - 1}"
        own_inputs = [n for n in members if n.op == "placeholder"]  # the model's inputs, in the prologue
        stages.append(Stage(name, fx.GraphModule(root, new), [v.name for v in own_inputs + inputs],
                            [n.name for n in outputs]))
    return stages


def last_readers(stages: list) -> dict[str, int]:
    """For each value passed between stages (anything with `inputs` names), the index of the
    last stage that reads it: after that stage the value can be dropped."""
    return {name: i for i, stage in enumerate(stages) for name in stage.inputs}


def join_stages(stages: list[Stage]) -> fx.GraphModule:
    """One graph that runs the (compiled) stages in order: each stage's inputs wired to the
    values of the same name that earlier stages return, its tensors registered on one root
    (a name two stages use for different tensors is renamed in the later one)."""
    graph = fx.Graph()
    root = torch.nn.Module()
    values: dict[str, fx.Node] = {}
    tensors: dict[str, torch.Tensor] = {}
    result = None
    for index, stage in enumerate(stages):
        env: dict[fx.Node, fx.Node] = {}
        for node in stage.graph_module.graph.nodes:
            if node.op == "placeholder":
                if node.name not in values:
                    if index:
                        raise ValueError(f"stage '{stage.name}' reads '{node.name}', which no earlier stage returns")
                    values[node.name] = graph.create_node("placeholder", node.name, name=node.name)
                    values[node.name].meta.update(node.meta)
                env[node] = values[node.name]
            elif node.op == "get_attr":
                tensor = get_tensor(stage.graph_module, node)
                target = _free_target(node.target, tensor, tensors)
                tensors[target] = tensor
                env[node] = graph.get_attr(target)
                env[node].meta.update(node.meta)
            elif node.op == "output":
                returned = fx.node.map_arg(node.args[0], env.__getitem__)
                if index == len(stages) - 1:
                    result = returned[0]
                else:
                    values.update(zip(stage.outputs, returned, strict=True))
            else:
                env[node] = graph.node_copy(node, env.__getitem__)
    graph.output(result)
    for target, tensor in tensors.items():
        set_tensor(root, target, tensor)
    return fx.GraphModule(root, graph)


def _free_target(target: str, tensor: torch.Tensor, taken: dict[str, torch.Tensor]) -> str:
    """`target`, or `target_N` where an earlier stage registered another tensor under it."""
    candidate, i = target, 1
    while candidate in taken and taken[candidate] is not tensor:
        candidate, i = f"{target}_{i}", i + 1
    return candidate


def repeat_block(stages: list[Stage], count: int) -> list[Stage]:
    """The stages of a model of `count` identical blocks, from the stages of its one-block
    twin (prologue, block 0, epilogue): block i is block 0 with its layer index, node names,
    tensor names and sources renumbered, reading the hidden state block i - 1 returns and
    sharing the prologue's other values (masks, RoPE tables). One trace serves every block."""
    prologue, block, epilogue = stages
    hidden = _hidden_input(block)
    blocks = [block] + [_renumbered(block, index, hidden) for index in range(1, count)]
    last = {block.outputs[0]: blocks[-1].outputs[0]}
    epilogue = Stage(epilogue.name, _rewired(epilogue.graph_module, last),
                     [last.get(name, name) for name in epilogue.inputs], epilogue.outputs)
    return [prologue, *blocks, epilogue]


_BLOCK_NAME = re.compile(r"(^|_)(layers|layer|h|blocks|block)_0(?=_|$)")
_BLOCK_PATH = re.compile(r"((?:^|\.)(?:layers|layer|h|blocks|block))\.0(?=\.|$)")


def _renamed(name: str, index: int) -> str:
    """A block-0 node's name in block `index`: `layers_0_mlp` -> `layers_3_mlp`; a name without
    the block's path (an unnamed getitem) gets a suffix."""
    if index == 0:
        return name
    renamed, found = _BLOCK_NAME.subn(rf"\g<1>\g<2>_{index}", name, count=1)
    return renamed if found else f"{name}_block{index}"


def _repathed(path: str, index: int) -> str:
    """A block-0 module path or tensor name in block `index`: `model.layers.0.mlp` -> `model.layers.3.mlp`."""
    return _BLOCK_PATH.sub(rf"\g<1>.{index}", path, count=1)


def _hidden_input(block: Stage) -> str:
    """Block 0's hidden state: its one data-dependent input (block 0 returns one value)."""
    dependent = [n.name for n in block.graph_module.graph.nodes
                 if n.op == "placeholder" and not n.meta.get("input_independent")]
    if len(dependent) != 1 or len(block.outputs) != 1:
        raise ValueError(f"a block must read one hidden state and return one; block 0 reads {len(dependent)} "
                         f"and returns {len(block.outputs)} values")
    return dependent[0]


def _renumbered(block: Stage, index: int, hidden: str) -> Stage:
    """Block 0 as block `index`: fresh meta tensors under renumbered names (its weights are
    read when the block is compiled), its hidden state block index - 1's output."""
    previous = _renamed(block.outputs[0], index - 1)
    graph = fx.Graph()
    root = torch.nn.Module()
    env: dict[fx.Node, fx.Node] = {}
    for node in block.graph_module.graph.nodes:
        if node.op == "placeholder":
            name = previous if node.name == hidden else node.name
            env[node] = graph.create_node("placeholder", name, name=name)
            env[node].meta.update(node.meta)
        elif node.op == "get_attr":
            target = _repathed(node.target, index)
            tensor = get_tensor(block.graph_module, node)
            set_tensor(root, target, torch.empty_like(tensor, device="meta") if tensor.is_meta else tensor)
            env[node] = graph.get_attr(target)
            env[node].meta.update(node.meta)
        elif node.op == "output":
            graph.output(fx.node.map_arg(node.args[0], env.__getitem__))
        else:
            env[node] = graph.node_copy(node, env.__getitem__)
            env[node]._rename(_renamed(node.name, index))
            env[node].meta["source"] = _repathed(node.meta.get("source", ""), index)
    inputs = [previous if name == hidden else name for name in block.inputs]
    return Stage(f"block {index}", fx.GraphModule(root, graph), inputs, [_renamed(block.outputs[0], index)])


def _rewired(gm: fx.GraphModule, names: dict[str, str]) -> fx.GraphModule:
    """`gm` with the inputs `names` lists renamed (the epilogue reading the last block)."""
    for node in gm.graph.nodes:
        if node.op == "placeholder" and node.name in names:
            node.target = names[node.name]
            node._rename(names[node.name])
    gm.recompile()
    return gm
