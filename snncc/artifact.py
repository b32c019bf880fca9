"""The `.snn` artifact: one zip with the graph (JSON), weights (safetensors), tokenizer and a
manifest (format version, versions, pipeline, T, calibration summary, SHA-256 of each member).

Writes are atomic (temporary file, then rename); loads check the format version and every
checksum and refuse anything else with one clear error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import operator
import tempfile
import zipfile
from pathlib import Path

import safetensors.torch
import torch
import torch.fx as fx

import snncc
from snncc.atomic import atomic_file
from snncc.errors import ArtifactError
from snncc.ir.rewrite import set_tensor
from snncc.program import ProgramInfo, SpikingProgram
from snncc.tokenizer import load_tokenizer

FORMAT = "snncc-artifact"
FORMAT_VERSION = 1
_PY_NAMESPACES = {"_operator": operator, "operator": operator}


# --- graph <-> JSON ----------------------------------------------------------------------


def _target_name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    if getattr(target, "__module__", None) in _PY_NAMESPACES:
        return f"operator.{target.__name__}"
    raise ArtifactError(f"cannot save a graph that calls {target!r}: only aten, snn and operator calls are allowed")


def _resolve_target(name: str):
    namespace, *rest = name.split(".")
    if namespace == "operator" and len(rest) == 1 and hasattr(operator, rest[0]):
        return getattr(operator, rest[0])
    if namespace in ("aten", "snn") and len(rest) == 2:
        try:
            return getattr(getattr(getattr(torch.ops, namespace), rest[0]), rest[1])
        except AttributeError:
            pass
    raise ArtifactError(f"the artifact's graph calls unknown op '{name}': it needs a newer snncc or is corrupt")


def _encode(value):
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return {"tuple" if isinstance(value, tuple) else "list": [_encode(v) for v in value]}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": value.type}
    if isinstance(value, (torch.layout, torch.memory_format)):
        return {type(value).__name__: str(value).removeprefix("torch.")}
    raise ArtifactError(f"cannot save graph argument {value!r} of type {type(value).__name__}")


def _decode(value, nodes: dict[str, fx.Node]):
    if not isinstance(value, dict):
        return value
    (kind, payload), = value.items()
    if kind == "node":
        return nodes[payload]
    if kind in ("list", "tuple"):
        items = [_decode(v, nodes) for v in payload]
        return items if kind == "list" else tuple(items)
    if kind == "device":
        return torch.device(payload)
    if kind in ("dtype", "layout", "memory_format"):
        return getattr(torch, payload)
    raise ArtifactError(f"unknown value kind '{kind}' in the artifact's graph")


_KEPT_META = ("source", "created_by", "snn")


def graph_to_json(graph: fx.Graph) -> list[dict]:
    """Every node with its op, target, arguments and the metadata worth keeping."""
    rows = []
    for n in graph.nodes:
        target = n.target if n.op in ("placeholder", "get_attr", "output") else _target_name(n.target)
        rows.append({"name": n.name, "op": n.op, "target": target, "args": _encode(n.args),
                     "kwargs": {k: _encode(v) for k, v in n.kwargs.items()},
                     "meta": {k: n.meta[k] for k in _KEPT_META if k in n.meta}})
    return rows


def graph_from_json(rows: list[dict]) -> fx.Graph:
    """Rebuild an FX graph from `graph_to_json` rows, resolving only known op namespaces."""
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    for row in rows:
        args = _decode(row["args"], nodes)
        kwargs = {k: _decode(v, nodes) for k, v in row["kwargs"].items()}
        op = row["op"]
        if op == "placeholder":
            node = graph.placeholder(row["target"])
        elif op == "get_attr":
            node = graph.get_attr(row["target"])
        elif op == "output":
            node = graph.output(args[0])
        elif op == "call_function":
            node = graph.call_function(_resolve_target(row["target"]), tuple(args), kwargs)
        else:
            raise ArtifactError(f"unknown node kind '{op}' in the artifact's graph")
        node._rename(row["name"])
        meta = dict(row.get("meta", {}))
        if isinstance(meta.get("snn"), dict) and "range" in meta["snn"]:
            meta["snn"]["range"] = tuple(meta["snn"]["range"])
        node.meta.update(meta)
        nodes[row["name"]] = node
    return graph


# --- weights -------------------------------------------------------------------------------


def _weights_bytes(gm: fx.GraphModule) -> tuple[bytes, dict[str, str]]:
    """Safetensors bytes of unique tensors, plus aliases for tensors that share storage."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in gm.state_dict().items():
        storage = tensor.untyped_storage().data_ptr()
        key = (storage, tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()))
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = tensor.detach().cpu().contiguous().clone()
    return safetensors.torch.save(unique), aliases


# --- save / load ---------------------------------------------------------------------------


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_program(program: SpikingProgram, path: Path) -> None:
    """Write `program` to `path` atomically; an existing file is replaced only on success."""
    gm = program.graph_module
    weights, aliases = _weights_bytes(gm)
    members = {"graph.json": json.dumps(graph_to_json(gm.graph)).encode(), "weights.safetensors": weights}
    with tempfile.TemporaryDirectory() as tok_dir:
        program.tokenizer.save(Path(tok_dir))
        for file in sorted(Path(tok_dir).iterdir()):
            members[f"tokenizer/{file.name}"] = file.read_bytes()
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "snncc_version": snncc.__version__,
        "torch_version": torch.__version__, "info": dataclasses.asdict(program.info),
        "aliases": aliases, "sha256": {name: _sha256(data) for name, data in members.items()},
    }
    with atomic_file(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("manifest.json", json.dumps(manifest, indent=1, default=str))
        for name, data in members.items():
            archive.writestr(name, data)


def _read_members(path: Path) -> tuple[dict, dict[str, bytes]]:
    if not path.is_file():
        raise ArtifactError(f"artifact '{path}' does not exist: create it with `snncc compile MODEL -o {path}`")
    try:
        with zipfile.ZipFile(path) as archive:
            manifest = json.loads(archive.read("manifest.json"))
            members = {name: archive.read(name) for name in archive.namelist() if name != "manifest.json"}
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, OSError, zipfile.LargeZipFile) as exc:
        raise ArtifactError(f"'{path}' is not a readable snncc artifact ({exc}): "
                            "recompile it with `snncc compile`") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"'{path}' is not a snncc artifact (no '{FORMAT}' manifest)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"'{path}' has artifact format {manifest.get('format_version')}; this snncc "
                            f"reads format {FORMAT_VERSION}: recompile it with this snncc")
    expected = manifest.get("sha256", {})
    if set(expected) != set(members):
        raise ArtifactError(f"'{path}' is corrupt: its members do not match its manifest; recompile it")
    for name, data in members.items():
        if _sha256(data) != expected[name]:
            raise ArtifactError(f"'{path}' is corrupt: checksum mismatch in '{name}'; recompile it")
    return manifest, members


def load_program(path: Path, device: str = "cpu", backend: str = "reference", progress: bool = False) -> SpikingProgram:
    """Read and check an artifact, rebuild its graph and weights, return a runnable program."""
    manifest, members = _read_members(path)
    tensors = safetensors.torch.load(members["weights.safetensors"])
    root = torch.nn.Module()
    for name, tensor in tensors.items():
        set_tensor(root, name, tensor)
    for name, target in manifest["aliases"].items():
        set_tensor(root, name, tensors[target])
    gm = fx.GraphModule(root, graph_from_json(json.loads(members["graph.json"])))
    with tempfile.TemporaryDirectory() as tok_dir:
        for name, data in members.items():
            if name.startswith("tokenizer/"):
                (Path(tok_dir) / name.removeprefix("tokenizer/")).write_bytes(data)
        tokenizer = load_tokenizer(Path(tok_dir))
    info = ProgramInfo(**manifest["info"])
    return SpikingProgram(gm, info, tokenizer, device=device, backend=backend, progress=progress)


def read_manifest(path: Path) -> dict:
    """The checked manifest of an artifact (for `snncc inspect out.snn`)."""
    return _read_members(path)[0]
