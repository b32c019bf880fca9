"""Small graph-editing helpers shared by passes: constants in, dead constants out."""

from __future__ import annotations

import hashlib
import re

import torch
import torch.fx as fx

from snncc.ir.ops import tensor_bytes


def readable_name(node: fx.Node) -> str:
    """`layers_3_mlp_down_proj_linear`: the source module path, then the op."""
    op = getattr(node.target, "__name__", str(node.target)).split(".")[0]
    base = re.sub(r"^model_", "", node.meta.get("source", "").replace(".", "_"))
    return f"{base}_{op}" if base else op


def replace_node(old: fx.Node, new: fx.Node) -> None:
    """Put `new` in place of `old`: it takes over old's users, source and calibration name,
    gets a readable name, and `old` is erased."""
    new.meta.update(source=old.meta.get("source", ""), calib_name=old.meta.get("calib_name", old.name))
    if "val" in old.meta and "val" not in new.meta:
        new.meta["val"] = old.meta["val"]
    new._rename(readable_name(new))
    old.replace_all_uses_with(new)
    old.graph.erase_node(old)


def get_tensor(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    """The tensor behind a get_attr node."""
    owner = gm
    *path, leaf = node.target.split(".")
    for part in path:
        owner = getattr(owner, part)
    return getattr(owner, leaf)


def add_constant(gm: fx.GraphModule, name: str, tensor: torch.Tensor, before: fx.Node) -> fx.Node:
    """Register `tensor` as a buffer on the root module and return a get_attr node for it."""
    name = re.sub(r"\W", "_", name)
    candidate, i = name, 1
    while hasattr(gm, candidate):
        candidate, i = f"{name}_{i}", i + 1
    gm.register_buffer(candidate, tensor.detach().contiguous())
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(candidate)


def drop_unused_constants(gm: fx.GraphModule) -> None:
    """Erase dead nodes, then delete parameters and buffers no get_attr node reads."""
    gm.graph.eliminate_dead_code()
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in [n for n, _ in gm.named_parameters()] + [n for n, _ in gm.named_buffers()]:
        if name not in used:
            *path, leaf = name.split(".")
            owner = gm.get_submodule(".".join(path)) if path else gm
            delattr(owner, leaf)


def set_tensor(root: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Register `tensor` as buffer `name` (dotted path), creating container modules on the way."""
    *path, leaf = name.split(".")
    owner = root
    for part in path:
        if not hasattr(owner, part):
            owner.add_module(part, torch.nn.Module())
        owner = getattr(owner, part)
    owner._parameters.pop(leaf, None)  # a traced model's parameter becomes a buffer (no gradients)
    owner.register_buffer(leaf, tensor)


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of the graph over a fresh module tree that shares the tensors (no data copied):
    passes edit the copy, and moving it to another device leaves the original where it is."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    root = torch.nn.Module()
    for node in graph.nodes:
        if node.op == "get_attr":
            set_tensor(root, node.target, get_tensor(gm, node).detach())  # a buffer, not a shared Parameter
    return fx.GraphModule(root, graph)


def rewired_copy(gm: fx.GraphModule, sites: list[tuple[fx.Node, fx.Node]], fn) -> fx.GraphModule:
    """A copy of gm in which, for each (node, input) of `sites`, node i's value is fn(input, i):
    a way to run a graph with some sites swapped for Python code (calibration, probes)."""
    copy = copy_graph_module(gm)
    nodes = {n.name: n for n in copy.graph.nodes}
    for i, (node, value) in enumerate(sites):
        old = nodes[node.name]
        with copy.graph.inserting_before(old):
            new = copy.graph.call_function(fn, (nodes[value.name], i))
        old.replace_all_uses_with(new)
    copy.graph.eliminate_dead_code()
    copy.recompile()
    return copy


def first_reader(x: fx.Node) -> fx.Node:
    """Where a node computed from x goes: right after x (after the inputs, if x is one),
    before every reader of x."""
    after = x.next
    while after.op == "placeholder":
        after = after.next
    return after


def contents_digest(gm: fx.GraphModule, *tensors: torch.Tensor) -> str:
    """A hash of the graph's nodes and the values of its tensors and of `tensors`: equal
    digests, equal computation (a cache key that outlives the graph object)."""
    digest = hashlib.blake2b(str(gm.graph).encode(), digest_size=16)
    named = sorted(gm.state_dict().items()) + [(f"extra{i}", t) for i, t in enumerate(tensors)]
    for name, tensor in named:
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor_bytes(tensor))
    return digest.hexdigest()
