"""Op inventory: which ATen ops a model uses, where, and which pipelines lower them."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import torch.fx as fx

from snncc.ir.analysis import DATA_MOVEMENT, data_dependent_nodes


def _pattern(path: str) -> str:
    return re.sub(r"\.\d+(?=\.|$)", ".*", path) or "(top level)"


def _op_name(target) -> str:
    return str(target).removesuffix(".default")


def graph_inventory(gm: fx.GraphModule) -> dict:
    """Rows of (op, count, source modules, status per pipeline) for every call in the graph."""
    from snncc import passes as _passes  # noqa: F401  (registers the passes)
    from snncc.pipeline import PASSES, PIPELINES

    columns = {name: set().union(*(PASSES[p].lowers for p in seq)) for name, seq in PIPELINES.items()}
    columns.update({name: set(cls.lowers) for name, cls in sorted(PASSES.items())})
    dependent = data_dependent_nodes(gm.graph)
    counts: dict = defaultdict(int)
    sources: dict = defaultdict(set)
    position_only: dict = defaultdict(bool)
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        counts[node.target] += 1
        sources[node.target].add(_pattern(node.meta.get("source", "")))
        position_only[node.target] |= node not in dependent
    rows = []
    for target, count in sorted(counts.items(), key=lambda kv: (-kv[1], _op_name(kv[0]))):
        if getattr(target, "namespace", None) == "snn":
            kind = "spiking"
        elif target in DATA_MOVEMENT or not getattr(target, "namespace", None):
            kind = "data movement"
        elif all(n not in dependent for n in gm.graph.nodes if n.op == "call_function" and n.target == target):
            kind = "position-only"
        else:
            kind = "arithmetic"
        status = {}
        for column, lowered in columns.items():
            if kind != "arithmetic":
                status[column] = kind
            else:
                status[column] = "lowered" if target in lowered else "ANALOG"
        rows.append({"op": _op_name(target), "count": count, "kind": kind,
                     "sources": sorted(sources[target]), "status": status})
    unlowerable = [r for r in rows if r["kind"] == "arithmetic" and "lowered" not in r["status"].values()]
    return {"ops": rows, "pipelines": list(columns),
            "no_pass_lowers": [{"op": r["op"], "sources": r["sources"]} for r in unlowerable]}


def model_inventory(model: str, progress: bool | None = None) -> dict:
    """Trace `model` (no calibration) and inventory its ANN graph; `progress` (snncc.progress;
    None: on a terminal) shows the load and the trace on stderr."""
    from snncc.api import load_and_trace

    loaded, ann = load_and_trace(model, progress=progress)
    inventory = graph_inventory(ann)
    inventory["model"] = loaded.name
    return inventory


def artifact_inventory(path: Path) -> dict:
    """Inventory of a compiled artifact's graph, with its manifest facts."""
    import snncc
    from snncc.artifact import artifact_versions

    program = snncc.load(path)
    info = program.info
    inventory = graph_inventory(program.graph_module)
    inventory.update(model=info.model, pipeline=info.pipeline, T=info.T, coverage=info.coverage.get("coverage"),
                     manifest={"task": info.task, "weights": info.dtype, "max_positions": info.max_positions,
                               "vocab_size": info.vocab_size, "coverage": info.coverage,
                               "passes": [{"name": r["name"], "seconds": r["seconds"]} for r in info.passes],
                               "remaining": info.remaining, "calibration": info.calibration,
                               "budget": info.precision.get("budget"), **artifact_versions(path)})
    return inventory
