"""The `.snn` artifact: one zip with the graph (JSON), weights (safetensors), tokenizer and a
manifest (format version, versions, pipeline, T, calibration summary, SHA-256 of each member);
a program stopped part-way adds what the passes after it need (snncc.resume): calibration
batches and ranges (resume.safetensors) and node shapes and names (the manifest's `resume`).

An artifact is shared like a checkpoint, so loading treats it as untrusted input: member
names come from a fixed set and their sizes are checked in the zip directory before anything
is read; the graph resolves ops only through `snncc.ir.opset`'s table and takes node names,
input names and keyword names only as Python identifiers and attribute targets only as names
of its own tensors, so no string from the file reaches FX's code generator unchecked; values
decode through fixed tables; table-neuron tables are checked before a kernel indexes them;
the tokenizer is written into a private temporary folder under checked flat names and loaded
without remote code. Anything wrong is one `ArtifactError`. Writes are atomic.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import keyword
import math
import re
import stat
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import torch.fx as fx

from snncc.atomic import atomic_file, commit_file
from snncc.errors import ArtifactError, ArtifactNotFoundError, SnnccError, first_line
from snncc.ir.analysis import matmul_sites
from snncc.ir.ops import MAX_T
from snncc.ir.opset import op_name, resolve_op
from snncc.ir.rewrite import set_tensor
from snncc.ir.spec import INT_BOUNDS
from snncc.ir.storage import STORAGE_DTYPES
from snncc.models import CAUSAL_LM, ENCODER
from snncc.program import ProgramInfo, SpikingProgram
from snncc.progress import phase
from snncc.resumable_zip import ResumableZip
from snncc.resume import ResumeState
from snncc.shards import (
    MAX_SHARDS,
    SHARD_MEMBER,
    map_shards,
    member_sha256,
    plan_shards,
    shard_name,
    storage_key,
    write_shard,
)
from snncc.tokenizer import load_tokenizer
from snncc.version import __version__

FORMAT = "snncc-artifact"
# 2: weights in safetensors shards (snncc.shards) indexed by the manifest, mapped on load;
# 1: one weights.safetensors member, read whole (still read).
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)

# What a member may take, checked in the zip directory before it is read.
MAX_MEMBERS = 64 + MAX_SHARDS
MAX_JSON_BYTES = {"manifest.json": 64 * 2**20, "graph.json": 1024 * 2**20}
MAX_TOKENIZER_BYTES = 256 * 2**20  # all tokenizer files together
MAX_NODES = 2_000_000
MAX_NESTING = 16  # lists in lists in a node's arguments
MAX_NAME = 512  # characters of a node, tensor or input name
MAX_TEXT = 4096  # characters of a string in the manifest or node metadata
MAX_POSITIONS = 2**20
MAX_LITERAL_ELEMENTS = 2**31  # elements a size list or arange in the graph may ask for
FIXED_MEMBERS = ("manifest.json", "graph.json")
V1_WEIGHTS = "weights.safetensors"
RESUME_MEMBER = "resume.safetensors"  # a program stopped part-way: calibration batches and ranges
MAX_BATCHES = 2**16  # calibration batches a program stopped part-way may carry
MAX_PASSES = 64  # names in the manifest's list of passes still to run
_PASS_NAME = re.compile(r"[A-Za-z_][\w-]{0,63}")
TOKENIZER_PREFIX = "tokenizer/"
_TOKENIZER_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


# --- graph <-> JSON ----------------------------------------------------------------------


def _target_name(target) -> str:
    name = op_name(target)
    if name is None:
        raise ArtifactError(f"cannot save a graph that calls {target!r}: artifacts hold only the ops in "
                            "snncc.ir.opset (what snncc's passes and frontends emit)")
    return name


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


_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool)}
_LAYOUTS = {"strided": torch.strided}
_MEMORY_FORMATS = {"contiguous_format": torch.contiguous_format, "preserve_format": torch.preserve_format}
_DEVICES = ("cpu", "cuda")
_VALUE_TABLES = {"dtype": _DTYPES, "layout": _LAYOUTS, "memory_format": _MEMORY_FORMATS}


def _decode(value, nodes: dict[str, fx.Node], where: str, depth: int = 0):
    """A node argument from JSON: plain values, earlier nodes, lists and the fixed tables."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if not isinstance(value, dict) or len(value) != 1 or depth > MAX_NESTING:
        raise ArtifactError(f"{where}: malformed argument")
    (kind, payload), = value.items()
    if kind == "node":
        if not isinstance(payload, str) or payload not in nodes:
            raise ArtifactError(f"{where}: refers to a node that is not defined before it")
        return nodes[payload]
    if kind in ("list", "tuple") and isinstance(payload, list):
        items = [_decode(v, nodes, where, depth + 1) for v in payload]
        return items if kind == "list" else tuple(items)
    if kind == "device" and payload in _DEVICES:
        return torch.device(payload)
    if kind in _VALUE_TABLES and isinstance(payload, str) and payload in _VALUE_TABLES[kind]:
        return _VALUE_TABLES[kind][payload]
    raise ArtifactError(f"{where}: unknown argument kind or value {str(kind)[:40]!r}")


# calib_name: the ANN tensor whose calibration range stands for the node (passes after a stop read it).
_KEPT_META = ("source", "created_by", "snn", "calib_name")


def graph_to_json(graph: fx.Graph) -> list[dict]:
    """Every node with its op, target, arguments and the metadata worth keeping."""
    rows = []
    for n in graph.nodes:
        target = n.target if n.op in ("placeholder", "get_attr", "output") else _target_name(n.target)
        rows.append({"name": n.name, "op": n.op, "target": target, "args": _encode(n.args),
                     "kwargs": {k: _encode(v) for k, v in n.kwargs.items()},
                     "meta": {k: n.meta[k] for k in _KEPT_META if k in n.meta}})
    return rows


def _identifier(value, where: str) -> str:
    """A Python identifier that is not a keyword: the only names FX's code generator gets."""
    if not (isinstance(value, str) and len(value) <= MAX_NAME and value.isidentifier()
            and value.isascii() and not keyword.iskeyword(value)):
        raise ArtifactError(f"{where}: {str(value)[:60]!r} is not a valid name")
    return value


_MODULE_ATTRIBUTES = frozenset(dir(torch.nn.Module()))  # a tensor named 'training' or 'to' would shadow them


def _tensor_name(value, where: str) -> str:
    """A dotted tensor path: identifiers or indices, none private or dunder."""
    if not isinstance(value, str) or len(value) > MAX_NAME or not value:
        raise ArtifactError(f"{where}: {str(value)[:60]!r} is not a valid tensor name")
    for part in value.split("."):
        if not (part.isdigit() and part.isascii()) and (_identifier(part, where).startswith("_")
                                                          or part in _MODULE_ATTRIBUTES):
            raise ArtifactError(f"{where}: {value[:60]!r} is not a valid tensor name")
    return value


def _text(value, where: str) -> str:
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise ArtifactError(f"{where}: expected a text of at most {MAX_TEXT} characters")
    return value


def _meta(meta, where: str) -> dict:
    """The node metadata kept in artifacts (provenance and neuron notes), checked by type."""
    if not isinstance(meta, dict) or not set(meta) <= set(_KEPT_META):
        raise ArtifactError(f"{where}: malformed metadata")
    checked = {key: _text(meta[key], where) for key in ("source", "created_by") if key in meta}
    if "calib_name" in meta:
        checked["calib_name"] = _identifier(meta["calib_name"], where)
    if "snn" in meta:
        notes = meta["snn"]
        if not isinstance(notes, dict) or len(notes) > 64:
            raise ArtifactError(f"{where}: malformed neuron notes")
        checked["snn"] = {_text(k, where): _note(v, where) for k, v in notes.items()}
    return checked


def _note(value, where: str):
    if isinstance(value, list) and len(value) <= 64 and all(isinstance(v, (int, float, str)) for v in value):
        return tuple(value)
    if value is None or isinstance(value, (bool, int, float)) or (isinstance(value, str) and len(value) <= MAX_TEXT):
        return value
    raise ArtifactError(f"{where}: malformed neuron note")


_ARANGES = {torch.ops.aten.arange.default, torch.ops.aten.arange.start, torch.ops.aten.arange.start_step}


def _check_literals(target, args: tuple, kwargs: dict, where: str) -> None:
    """Bound what literal arguments can ask for: snn ops' T, G and burst by their schema names,
    and every size list (or arange) at MAX_LITERAL_ELEMENTS elements."""
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "snn":
        schema = target._schema.arguments
        named = {a.name: v for a, v in zip(schema, args, strict=False)} | kwargs
        for name, (low, high) in INT_BOUNDS.items():
            value = named.get(name)
            if value is not None and not (isinstance(value, int) and low <= value <= high):
                raise ArtifactError(f"{where}: {name}={str(value)[:20]} is out of {low}..{high}")
    for value in (*args, *kwargs.values()):
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) for v in value):
            if math.prod(abs(v) for v in value) > MAX_LITERAL_ELEMENTS:
                raise ArtifactError(f"{where}: a size of {math.prod(abs(v) for v in value):.3g} elements")
    if target in _ARANGES:
        numbers = [v for v in args if isinstance(v, (int, float))]
        if any(not math.isfinite(v) or abs(v) > MAX_LITERAL_ELEMENTS for v in numbers):
            raise ArtifactError(f"{where}: arange over more than {MAX_LITERAL_ELEMENTS} values")


def _node_row(row, index: int) -> tuple[str, str, object, object, dict, dict]:
    if not isinstance(row, dict) or not {"name", "op", "target"} <= set(row) \
            or not set(row) <= {"name", "op", "target", "args", "kwargs", "meta"}:
        raise ArtifactError(f"graph node {index}: malformed row")
    name = _identifier(row["name"], f"graph node {index}")
    kwargs = row.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise ArtifactError(f"graph node '{name}': malformed keyword arguments")
    return name, row["op"], row["target"], row.get("args", {"tuple": []}), kwargs, row.get("meta", {})


def graph_from_json(rows, tensor_names: set[str], max_inputs: int = 1) -> fx.Graph:
    """Rebuild an FX graph from `graph_to_json` rows, taking ops only from snncc.ir.opset,
    names only as identifiers and attribute targets only from `tensor_names`. A program has
    one input; a compiled block kept by snncc.parts has up to `max_inputs`."""
    if not isinstance(rows, list) or not 0 < len(rows) <= MAX_NODES:
        raise ArtifactError(f"the graph is not a list of at most {MAX_NODES} nodes")
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    for index, row in enumerate(rows):
        name, op, target, raw_args, raw_kwargs, meta = _node_row(row, index)
        where = f"graph node '{name}'"
        if name in nodes:
            raise ArtifactError(f"{where}: the name is used twice")
        args = _decode(raw_args, nodes, where)
        kwargs = {_identifier(k, where): _decode(v, nodes, where) for k, v in raw_kwargs.items()}
        if not isinstance(args, tuple):
            raise ArtifactError(f"{where}: malformed arguments")
        if op == "placeholder" and target == name and not args and not kwargs \
                and len(graph.find_nodes(op="placeholder")) < max_inputs:
            pass  # the input's name is its node's, which FX's namespace checks below
        elif op == "get_attr" and not args and not kwargs:
            if not isinstance(target, str) or target not in tensor_names:
                raise ArtifactError(f"{where}: reads a tensor the artifact does not hold")
            target = _tensor_name(target, where)
        elif op == "call_function" and isinstance(target, str) and resolve_op(target) is not None:
            target = resolve_op(target)
            _check_literals(target, args, kwargs, where)
        elif op == "output" and index == len(rows) - 1 and len(args) == 1 and not kwargs:
            target = "output"
        else:
            raise ArtifactError(f"{where}: a {str(op)[:20]!r} node with target {str(target)[:60]!r} is not "
                                "allowed here (unknown op, misplaced input or output, or bad arguments)")
        node = graph.create_node(op, target, args, kwargs, name=name)
        if node.name != name:  # FX renamed it: a Python builtin or a name FX reserves
            raise ArtifactError(f"{where}: the name is reserved")
        node.meta.update(_meta(meta, where))
        nodes[name] = node
    if rows[-1].get("op") != "output" or not graph.find_nodes(op="placeholder"):
        raise ArtifactError("the graph must have one input and end with its output")
    return graph


# --- weights -------------------------------------------------------------------------------


# --- save / load ---------------------------------------------------------------------------


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ArtifactWriter:
    """Writes an artifact atomically, weights shard by shard (snncc.shards). `finish` writes
    what is not stored yet (the weights, the graph, tokenizer and manifest). The file appears at
    `path` only when the `with` block ends without an error, after `finish`.

        with ArtifactWriter(path) as writer:
            writer.finish(program)

    `partial`: a zip that a block-by-block compile has written its blocks' shards into as they
    finished (snncc.parts), named to the writer with `add_stored`; it is finished in place and
    moved to `path`, so no weight is written twice.
    """

    def __init__(self, path: Path, partial: ResumableZip | None = None):
        self.path = Path(path)
        self._partial = partial
        self._stack = contextlib.ExitStack()
        self._stored: dict[str, torch.Tensor] = {}  # name -> the tensor the shards hold under it
        self._weight_map: dict[str, str] = {}
        self._sums: dict[str, str] = {}
        self._finished = False

    def __enter__(self) -> ArtifactWriter:
        if self._partial is not None:
            self._archive = self._partial.archive
            self._stack.callback(self._commit_partial)
        else:
            self._tmp = self._stack.enter_context(atomic_file(self.path))
            self._archive = self._stack.enter_context(zipfile.ZipFile(self._tmp, "w", zipfile.ZIP_STORED,
                                                                      allowZip64=True))
        return self

    def __exit__(self, kind, value, traceback) -> bool:
        unfinished = kind is None and not self._finished
        if unfinished:
            kind, value = RuntimeError, RuntimeError("unfinished")
        if kind is not None and self._partial is not None:
            self._stack.pop_all()  # the partial zip stays as the compile's parts left it
        suppressed = self._stack.__exit__(kind, value, traceback)
        if unfinished:
            raise ArtifactError(f"{self.path}: the artifact was not finished; nothing was written")
        return suppressed

    def _commit_partial(self) -> None:
        self._partial.close()
        commit_file(self._partial.path, self.path)

    def add_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Store `tensors` as one shard."""
        name = shard_name(len({*self._weight_map.values()}) + 1)
        self._sums[name] = write_shard(self._archive, name, tensors)
        self._stored_as(name, tensors)

    def add_stored(self, name: str, sha256: str, tensors: dict[str, torch.Tensor]) -> None:
        """Name a shard the partial zip holds already; `tensors` are the program's views of it,
        so `finish` knows them stored."""
        self._sums[name] = sha256
        self._stored_as(name, tensors)

    def _stored_as(self, shard: str, tensors: dict[str, torch.Tensor]) -> None:
        self._weight_map.update(dict.fromkeys(tensors, shard))
        self._stored.update(tensors)

    def finish(self, program: SpikingProgram) -> None:
        """Write what `program` has that is not stored yet, its graph, tokenizer and manifest."""
        tensors = program.graph_module.state_dict(keep_vars=True)  # the tensors themselves, not detached copies
        pending = {name: t for name, t in tensors.items() if self._stored.get(name) is not t}
        stored_by_key = {storage_key(t): name for name, t in self._stored.items()}
        aliases = {name: stored_by_key[storage_key(t)] for name, t in pending.items()
                   if storage_key(t) in stored_by_key}
        shards, more_aliases = plan_shards({n: t for n, t in pending.items() if n not in aliases})
        for names in shards:
            self.add_weights({n: pending[n] for n in names})
        aliases.update(more_aliases)
        members = {"graph.json": json.dumps(graph_to_json(program.graph_module.graph)).encode()}
        with tempfile.TemporaryDirectory() as tok_dir:
            program.tokenizer.save(Path(tok_dir))
            for file in sorted(Path(tok_dir).iterdir()):
                members[f"tokenizer/{file.name}"] = file.read_bytes()
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "snncc_version": __version__,
            "torch_version": torch.__version__, "info": dataclasses.asdict(program.info),
            "weights": {"shards": len({*self._weight_map.values()}), "aliases": aliases,
                        "weight_map": {n: shard for n, shard in self._weight_map.items() if n in tensors}},
        }
        if program.resume is not None:
            members[RESUME_MEMBER] = _resume_tensors(program.resume)
            manifest["resume"] = {"shapes": program.resume.shapes, "reserved_names": program.resume.reserved_names,
                                  "name_counts": program.resume.name_counts}
        for name, data in members.items():
            self._archive.writestr(name, data)
            self._sums[name] = _sha256(data)
        manifest["sha256"] = self._sums
        self._archive.writestr("manifest.json", json.dumps(manifest, indent=1, default=str))
        self._finished = True


def save_program(program: SpikingProgram, path: Path, progress: bool | None = None) -> None:
    """Write `program` to `path` atomically; an existing file is replaced only on success.
    Weights go in shard by shard, so saving holds one shard's bytes at a time. `progress`
    (snncc.progress; None: on a terminal) shows the save on stderr."""
    with phase(f"saving {path.name}", progress, f"saved {path.name}"), ArtifactWriter(path) as writer:
        writer.finish(program)


def _member_cap(name: str, archive_bytes: int) -> int:
    """The most bytes member `name` may hold, or 0 if snncc never writes such a member."""
    if name in MAX_JSON_BYTES:
        return MAX_JSON_BYTES[name]
    if name in (V1_WEIGHTS, RESUME_MEMBER) or SHARD_MEMBER.fullmatch(name):
        return archive_bytes
    flat = name.removeprefix(TOKENIZER_PREFIX)
    return MAX_TOKENIZER_BYTES if name != flat and _TOKENIZER_FILE.fullmatch(flat) else 0


def _checked_directory(archive: zipfile.ZipFile, path: Path) -> list[zipfile.ZipInfo]:
    """The zip directory's entries, each a member snncc writes, stored (not compressed, so
    what is read is what the directory declares) and within its size cap."""
    infos = archive.infolist()
    names = [info.filename for info in infos]
    if len(infos) > MAX_MEMBERS or len(set(names)) != len(names):
        raise ArtifactError(f"'{path}' has {len(infos)} members or repeated names: not a snncc artifact")
    archive_bytes = path.stat().st_size
    tokenizer_bytes = 0
    for info in infos:
        cap = _member_cap(info.filename, archive_bytes)
        if not cap or info.is_dir() or stat.S_ISLNK(info.external_attr >> 16):
            raise ArtifactError(f"'{path}' has a member snncc never writes: {info.filename[:80]!r}")
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1 or info.file_size != info.compress_size:
            raise ArtifactError(f"'{path}': member '{info.filename}' is compressed or encrypted; snncc writes "
                                "stored members only")
        tokenizer_bytes += info.file_size if info.filename.startswith(TOKENIZER_PREFIX) else 0
        if info.file_size > cap or tokenizer_bytes > MAX_TOKENIZER_BYTES:
            raise ArtifactError(f"'{path}': member '{info.filename}' declares {info.file_size} bytes, over "
                                "what such a member may hold")
    missing = set(FIXED_MEMBERS) - set(names)
    if missing:
        raise ArtifactError(f"'{path}' lacks {', '.join(sorted(missing))}: not a complete snncc artifact")
    return infos


def _json(data: bytes, name: str):
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ArtifactError(f"member '{name}' is not valid JSON ({first_line(exc)})") from None


def _read_members(path: Path) -> tuple[dict, dict[str, bytes], list[zipfile.ZipInfo]]:
    """The manifest, the other members' bytes, and the weight shards' directory entries (they
    are mapped, not read: snncc.shards); checksums are checked apart (`_check_sums`), so
    hashing can run beside the parsing."""
    if not path.exists():
        raise ArtifactNotFoundError(f"artifact '{path}' does not exist: compile a model and save it there")
    if not path.is_file():
        raise ArtifactError(f"artifact '{path}' is not a regular file")
    try:
        with zipfile.ZipFile(path) as archive:
            infos = _checked_directory(archive, path)
            shards = [info for info in infos if SHARD_MEMBER.fullmatch(info.filename)]
            members = {info.filename: archive.read(info) for info in infos if info not in shards}
    except SnnccError:
        raise  # _checked_directory's own message (a SnnccError is also a ValueError)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError,
            RuntimeError) as exc:
        raise ArtifactError(f"'{path}' is not a readable snncc artifact ({first_line(exc)}): "
                            "recompile its model") from None
    manifest = _json(members.pop("manifest.json"), "manifest.json")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"'{path}' is not a snncc artifact (no '{FORMAT}' manifest)")
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise ArtifactError(f"'{path}' has artifact format {str(version)[:20]}; this snncc reads formats "
                            f"{', '.join(map(str, READABLE_VERSIONS))}: recompile it with this snncc")
    if (version == 1) != (V1_WEIGHTS in members) or (version == 1 and shards):
        raise ArtifactError(f"the artifact '{path}' is corrupt: its weights are not stored as format {version} "
                            "stores them")
    expected = manifest.get("sha256")
    if not isinstance(expected, dict) or set(expected) != set(members) | {i.filename for i in shards}:
        raise ArtifactError(f"the artifact '{path}' is corrupt: its members do not match its manifest; "
                            "recompile it")
    return manifest, members, shards


def _check_sums(path: Path, manifest: dict, members: dict[str, bytes], shards: list[zipfile.ZipInfo]) -> None:
    """Every member's SHA-256 against the manifest (shards read in chunks): damage, not
    tampering (anyone can recompute them), so nothing else relies on them."""
    computed = {name: _sha256(data) for name, data in members.items()}
    computed.update({info.filename: member_sha256(path, info) for info in shards})
    for name, digest in computed.items():
        if digest != manifest["sha256"][name]:
            raise ArtifactError(f"the artifact '{path}' is corrupt: checksum mismatch in '{name}'; recompile it")


# --- the manifest's facts ------------------------------------------------------------------

_INFO_FIELDS = {"model": str, "task": str, "pipeline": str, "T": int, "max_positions": int, "vocab_size": int,
                "passes": list, "calibration": dict, "coverage": dict, "remaining": list, "dtype": str,
                "precision": dict, "generation": dict}
# Absent from artifacts written before programs could stop part-way, store weights in bf16,
# compile to a budget, or stop generating where their model does.
_OPTIONAL_INFO = {"remaining", "dtype", "precision", "generation"}
MAX_EOS_IDS = 64


def _program_info(info) -> ProgramInfo:
    """The manifest's ProgramInfo, every field of its type and in its range."""
    if not isinstance(info, dict) or not set(_INFO_FIELDS) - _OPTIONAL_INFO <= set(info) <= set(_INFO_FIELDS):
        raise ArtifactError("the manifest's program info is malformed")
    info = {"remaining": [], "dtype": "float32", "precision": {}, "generation": {}, **info}
    for key, kind in _INFO_FIELDS.items():
        if not isinstance(info[key], kind) or isinstance(info[key], bool):
            raise ArtifactError(f"the manifest's {key} is not a {kind.__name__}")
    for key in ("model", "pipeline"):
        _text(info[key], f"the manifest's {key}")
    bounds = {"T": (0, MAX_T), "max_positions": (1, MAX_POSITIONS), "vocab_size": (1, 2**31 - 1)}
    for key, (low, high) in bounds.items():
        if not low <= info[key] <= high:
            raise ArtifactError(f"the manifest's {key} = {info[key]} is out of {low}..{high}")
    if info["dtype"] not in STORAGE_DTYPES:
        raise ArtifactError(f"the manifest's weight dtype {info['dtype'][:40]!r} is not one of "
                            f"{', '.join(STORAGE_DTYPES)}")
    if info["task"] not in (CAUSAL_LM, ENCODER):
        raise ArtifactError(f"the manifest's task {info['task'][:40]!r} is neither {CAUSAL_LM} nor {ENCODER}")
    if not all(isinstance(record, dict) for record in info["passes"]):
        raise ArtifactError("the manifest's pass records are malformed")
    remaining = info["remaining"]
    if len(remaining) > MAX_PASSES or not all(isinstance(n, str) and _PASS_NAME.fullmatch(n) for n in remaining):
        raise ArtifactError("the manifest's list of passes still to run is malformed")
    _check_generation(info["generation"], info["vocab_size"])
    return ProgramInfo(**info)


def _check_generation(generation: dict, vocab_size: int) -> None:
    """{} or {"eos_token_id": [ids], "pad_token_id": id or null}, every id in the vocabulary."""
    if not generation:
        return
    eos, pad = generation.get("eos_token_id"), generation.get("pad_token_id")

    def is_id(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab_size

    if (set(generation) != {"eos_token_id", "pad_token_id"} or not isinstance(eos, list)
            or len(eos) > MAX_EOS_IDS or not all(map(is_id, eos)) or not (pad is None or is_id(pad))):
        raise ArtifactError("the manifest's generation settings are malformed")


def _check_coverage(gm: fx.GraphModule, coverage: dict) -> None:
    """The manifest's coverage must name exactly the graph's analog matmul sites: an artifact
    cannot claim spikes where its graph computes analog products. (Unknown coverage, None,
    only where analog sites exist: a site whose MACs could not be counted.)"""
    analog = {site.node.name for site in matmul_sites(gm) if not site.spiking}
    sites = coverage.get("analog_sites", [])
    claimed = {site.get("node") for site in sites if isinstance(site, dict)} if isinstance(sites, list) else None
    share = coverage.get("coverage")
    known = isinstance(share, (int, float)) and not isinstance(share, bool) and 0 <= share <= 1
    if claimed != analog or not (known or (share is None and analog)) or (share == 1) != (not analog):
        raise ArtifactError(f"the manifest's coverage does not match its graph ({len(analog)} analog matmul "
                            "sites in the graph): the artifact was edited; recompile it")


# --- what a program stopped part-way carries (snncc.resume) ----------------------------------


def _resume_tensors(state: ResumeState) -> bytes:
    tensors = {f"batch.{i}": batch.detach().cpu().contiguous() for i, batch in enumerate(state.batches)}
    tensors.update({f"range.{name}": r.detach().cpu().contiguous() for name, r in state.ranges.items()})
    return safetensors.torch.save(tensors)


def _resume_state(manifest: dict, data: bytes | None, info: ProgramInfo, graph: fx.Graph) -> ResumeState | None:
    """The state a program stopped part-way carries, every part checked: present exactly when
    passes remain; batches token ids the program takes; ranges non-negative float32 of named
    tensors; shapes and names of the graph's size, shapes only of its nodes."""
    fields = manifest.get("resume")
    if (fields is None) != (data is None) or (data is None) != (not info.remaining):
        raise ArtifactError("the manifest's passes still to run and the artifact's calibration state disagree")
    if data is None:
        return None
    if not isinstance(fields, dict) or set(fields) != {"shapes", "reserved_names", "name_counts"}:
        raise ArtifactError("the manifest's resume state is malformed")
    shapes, reserved, counts = fields["shapes"], fields["reserved_names"], fields["name_counts"]
    nodes = {n.name for n in graph.nodes}
    if not (isinstance(shapes, dict) and set(shapes) <= nodes and isinstance(reserved, list)
            and isinstance(counts, dict) and len(reserved) + len(counts) <= 4 * MAX_NODES):
        raise ArtifactError("the manifest's node shapes or names are malformed")
    for value in shapes.values():
        _text(value, "the manifest's node shapes")
    for name in reserved:
        _identifier(name, "the manifest's node names")
    if not all(isinstance(base, str) and len(base) <= MAX_NAME and isinstance(c, int) and not isinstance(c, bool)
               and 0 <= c < 2**31 for base, c in counts.items()):
        raise ArtifactError("the manifest's node name counts are malformed")
    batches, ranges = _resume_tensors_from(data, info)
    return ResumeState(batches=batches, ranges=ranges, shapes=shapes, reserved_names=reserved, name_counts=counts)


def _resume_tensors_from(data: bytes, info: ProgramInfo) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    try:
        tensors = safetensors.torch.load(data)
    except Exception as exc:  # safetensors raises its own error type for every malformed file
        raise ArtifactError(f"the artifact's calibration state is malformed ({first_line(exc)})") from None
    count = sum(key.startswith("batch.") for key in tensors)
    if not 0 < count <= MAX_BATCHES or any(f"batch.{i}" not in tensors for i in range(count)):
        raise ArtifactError("the artifact's calibration batches are missing or not numbered 0, 1, ...")
    batches = [tensors.pop(f"batch.{i}") for i in range(count)]
    for batch in batches:
        if not (batch.dtype == torch.int64 and batch.dim() == 2 and batch.shape[0] == 1
                and 2 <= batch.shape[1] <= info.max_positions
                and 0 <= int(batch.min()) and int(batch.max()) < info.vocab_size):
            raise ArtifactError("the artifact's calibration batches are not token ids this program takes")
    ranges = {}
    for key, value in tensors.items():
        name = _identifier(key.removeprefix("range."), "the artifact's calibration ranges")
        if not key.startswith("range.") or value.dtype != torch.float32 or value.dim() > 8 or bool((value < 0).any()):
            raise ArtifactError(f"the artifact's calibration range '{name}' is malformed")
        ranges[name] = value
    return batches, ranges


# --- weights and tables --------------------------------------------------------------------


def _mapped_tensors(path: Path, shards: list[zipfile.ZipInfo], index) -> dict[str, torch.Tensor]:
    """A format-2 artifact's weights, mapped from its shards and checked against the manifest's
    index: each tensor in the shard the index names, aliases pointing at stored tensors."""
    if not (isinstance(index, dict) and set(index) == {"shards", "aliases", "weight_map"}
            and isinstance(index["weight_map"], dict) and index["shards"] == len(shards)):
        raise ArtifactError("the manifest's weight index is malformed")
    if sorted(info.filename for info in shards) != [shard_name(i) for i in range(1, len(shards) + 1)]:
        raise ArtifactError("the artifact's weight shards are not numbered 1, 2, ...")
    tensors = {}
    for info in shards:
        mapped = map_shards(path, [info])
        if any(index["weight_map"].get(name) != info.filename for name in mapped):
            raise ArtifactError(f"the manifest's weight index does not list what '{info.filename}' holds")
        tensors.update(mapped)
    if set(index["weight_map"]) != set(tensors):
        raise ArtifactError("the manifest's weight index names tensors no shard holds")
    return _with_aliases(tensors, index["aliases"])


def _with_aliases(tensors: dict[str, torch.Tensor], aliases) -> dict[str, torch.Tensor]:
    """The weights by name (names checked), aliases pointing at them."""
    if not isinstance(aliases, dict) or not all(isinstance(t, str) and t in tensors for t in aliases.values()):
        raise ArtifactError("the manifest's tensor aliases are malformed")
    for name in (*tensors, *aliases):
        _tensor_name(name, "the weights")
    return tensors | {name: tensors[target] for name, target in aliases.items()}


def _tensors(data: bytes, aliases) -> dict[str, torch.Tensor]:
    """The weights by name (safetensors parses them; names checked), aliases pointing at them."""
    try:
        tensors = safetensors.torch.load(data)
    except Exception as exc:  # safetensors raises its own error type for every malformed file
        raise ArtifactError(f"the artifact's weights are malformed ({first_line(exc)})") from None
    return _with_aliases(tensors, aliases)


_TABLE_OPS = {torch.ops.snn.fn_encode.default, torch.ops.snn.fn_quantize.default}


def _check_tables(gm: fx.GraphModule) -> None:
    """Table neurons index their codes by where the membrane lands among the thresholds (in
    compiled kernels, unchecked): thresholds must be sorted float32 rows without NaN, codes
    one longer per row, and buckets valid rows, before any kernel reads them. Layers share
    tables, so each distinct table is checked once."""
    rows_of: dict[tuple[str, str], int] = {}  # (thresholds, codes) checked -> their rows
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _TABLE_OPS:
            continue
        operands = node.args[1:4]
        if not all(isinstance(a, fx.Node) and a.op == "get_attr" for a in operands):
            raise ArtifactError(f"table neuron '{node.name}': its tables must be stored tensors")
        key = (operands[0].target, operands[1].target)
        if key not in rows_of:
            thresholds, codes = _stored(gm, key[0]), _stored(gm, key[1])
            if not (thresholds.dtype == torch.float32 and thresholds.dim() == 2 and thresholds.shape[1] > 0
                    and codes.dtype == torch.int64 and codes.shape == (thresholds.shape[0], thresholds.shape[1] + 1)
                    and _sorted_rows(thresholds.numpy())):
                raise ArtifactError(f"table neuron '{node.name}': its thresholds or codes are malformed")
            rows_of[key] = thresholds.shape[0]
        bucket = _stored(gm, operands[2].target)
        if not (bucket.dtype == torch.int64 and bucket.dim() <= 1 and bucket.numel() > 0
                and 0 <= bucket.numpy().min() and bucket.numpy().max() < rows_of[key]):
            raise ArtifactError(f"table neuron '{node.name}': its buckets name rows its table does not have")


def _sorted_rows(values: np.ndarray) -> bool:
    """Each row non-decreasing and free of NaN (a comparison with NaN is false). In numpy: one
    pass on one thread, where torch wakes its thread pool for a few kilobytes."""
    return bool(np.all(values[:, 1:] >= values[:, :-1])) and not bool(np.isnan(values[:, 0]).any())


def _stored(gm: fx.GraphModule, target: str) -> torch.Tensor:
    owner = gm
    for part in target.split("."):
        owner = getattr(owner, part)
    return owner


def _tokenizer(members: dict[str, bytes]):
    """The artifact's tokenizer, from its flat files written into a private temporary folder."""
    with tempfile.TemporaryDirectory() as tok_dir:
        for name, data in members.items():
            if name.startswith(TOKENIZER_PREFIX):
                (Path(tok_dir) / name.removeprefix(TOKENIZER_PREFIX)).write_bytes(data)
        try:
            return load_tokenizer(Path(tok_dir))
        except SnnccError as exc:
            raise ArtifactError(f"the artifact's tokenizer: {exc}") from None
        except Exception as exc:  # json, transformers and tokenizers raise many types
            raise ArtifactError(f"the artifact's tokenizer cannot be loaded ({type(exc).__name__}: "
                                f"{first_line(exc)})") from None


def load_program(path: Path, device: str = "cpu", backend: str = "reference", progress: bool | None = None,
                 device_map: str | dict | None = None, max_memory: dict | None = None,
                 offload_folder: str | Path | None = None) -> SpikingProgram:
    """Read and check an artifact, rebuild its graph and weights, return a runnable program.
    The checksums are computed in a thread beside the parsing (hashlib releases the GIL), and
    checked before anything runs. `progress` (snncc.progress; None: on a terminal) shows the
    load on stderr, and the event backend's bar over each run."""
    with phase(f"loading {path.name}", progress, f"loaded {path.name}"):
        return _load_program(path, device, backend, progress, device_map, max_memory, offload_folder)


def _load_program(path: Path, device: str, backend: str, progress: bool | None, device_map: str | dict | None,
                  max_memory: dict | None, offload_folder: str | Path | None) -> SpikingProgram:
    manifest, members, shards = _read_members(path)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        sums = pool.submit(_check_sums, path, manifest, members, shards)
        try:
            info = _program_info(manifest.get("info"))
            if manifest["format_version"] == 1:
                tensors = _tensors(members[V1_WEIGHTS], manifest.get("aliases"))
            else:
                tensors = _mapped_tensors(path, shards, manifest.get("weights"))
            graph = graph_from_json(_json(members["graph.json"], "graph.json"), set(tensors))
            resume = _resume_state(manifest, members.get(RESUME_MEMBER), info, graph)
        finally:
            sums.result()  # a damaged file is reported as damaged, whatever the parsing found
    root = torch.nn.Module()
    try:
        for name, tensor in tensors.items():
            set_tensor(root, name, tensor)  # 'a' and 'a.b' both tensors: refused here
        gm = fx.GraphModule(root, graph)
    except Exception as exc:  # tensor paths that clash, a graph FX cannot generate code for
        raise ArtifactError(f"the artifact's graph or tensor names are malformed ({type(exc).__name__}: "
                            f"{first_line(exc)})") from None
    _check_tables(gm)
    _check_coverage(gm, info.coverage)
    program = SpikingProgram(gm, info, _tokenizer(members), device=device, backend=backend, progress=progress,
                             device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)
    program.resume = resume
    return program


def artifact_versions(path: Path) -> dict:
    """The format and versions an artifact was written with (its manifest's, unhashed: for
    showing, after load_program has checked the file)."""
    manifest = _read_members(path)[0]
    return {key: manifest.get(key) for key in ("format_version", "snncc_version", "torch_version")}


def read_manifest(path: Path) -> dict:
    """The checked manifest of an artifact (for `snncc inspect out.snn`)."""
    manifest, members, shards = _read_members(path)
    _check_sums(path, manifest, members, shards)
    return manifest
