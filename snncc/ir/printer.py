"""A readable listing of a (spiking) graph: one line per node with shape, code and provenance."""

from __future__ import annotations

import torch
import torch.fx as fx

from snncc.ir.analysis import shape_of


def _target_name(node: fx.Node) -> str:
    if node.op == "call_function":
        name = str(node.target)
        return name.removesuffix(".default")
    return node.op


def _arg(a) -> str:
    if isinstance(a, fx.Node):
        return f"%{a.name}"
    if isinstance(a, (list, tuple)):
        return "[" + ", ".join(_arg(x) for x in a) + "]"
    return repr(a)


def format_node(node: fx.Node) -> str:
    """`%name = op(args) : shape  # source {code} [pass]`"""
    if node.op == "placeholder":
        text = f"%{node.name} = input"
    elif node.op == "get_attr":
        text = f"%{node.name} = param {node.target}"
    elif node.op == "output":
        return f"return {_arg(node.args[0])}"
    else:
        args = [_arg(a) for a in node.args] + [f"{k}={_arg(v)}" for k, v in node.kwargs.items()]
        text = f"%{node.name} = {_target_name(node)}({', '.join(args)})"
    shape = shape_of(node)
    if shape is None and isinstance(node.meta.get("val"), torch.Tensor):
        shape = tuple(node.meta["val"].shape)
    if shape is not None:
        text += " : (" + ", ".join(str(d) for d in shape) + ")"
    notes = []
    if node.meta.get("source"):
        notes.append(node.meta["source"])
    if node.meta.get("snn"):
        notes.append("{" + ", ".join(f"{k}={v}" for k, v in node.meta["snn"].items()) + "}")
    if node.meta.get("created_by"):
        notes.append(f"[{node.meta['created_by']}]")
    return text + ("  # " + " ".join(notes) if notes else "")


def format_graph(gm: fx.GraphModule, include_params: bool = False) -> str:
    """The whole graph, parameters folded away unless asked for."""
    lines = [format_node(n) for n in gm.graph.nodes if include_params or n.op != "get_attr"]
    return "\n".join(lines) + "\n"
