"""Hostile artifacts: a valid tiny `.snn` edited as an attacker would, with the manifest's
SHA-256 sums recomputed so integrity checks pass. Loading (and running what loads) must never
run code (a marker file never appears), never write outside its target, and fail with one
`SnnccError`; through the CLI, with one `snncc: error:` line and no traceback.

Every case is counted by kind; `pytest -s tests/test_artifact_hostile.py` prints the counts.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import snncc
from snncc.api import compile_graph
from snncc.cli import main
from snncc.errors import SnnccError
from tests.conftest import prepared

MARKER = "snncc_hostile_marker"
SHARD = "weights/shard-00001.safetensors"  # a tiny program's weights fit one shard
OUTCOMES: collections.Counter = collections.Counter()
# Examples per generated test: 30 keeps the fast tier fast; SNNCC_HOSTILE_EXAMPLES=300 runs a deeper search.
EXAMPLES = int(os.environ.get("SNNCC_HOSTILE_EXAMPLES", "30"))
FEW = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.fixture(scope="module", autouse=True)
def _print_counts():
    yield
    cases = sum(v for k, v in OUTCOMES.items() if not k.startswith("("))
    print(f"\nhostile artifacts: {cases} cases: " + ", ".join(f"{k} {v}" for k, v in sorted(OUTCOMES.items())))


@functools.cache
def valid_members() -> dict[str, bytes]:
    """The members of a valid `las` artifact of tiny-llama (manifest included)."""
    loaded, ann, ctx = prepared("tiny-llama")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "valid.snn"
        compile_graph(loaded, ann, ctx, "las", 6).save(path)
        with zipfile.ZipFile(path) as archive:
            return {name: archive.read(name) for name in archive.namelist()}


@pytest.fixture
def valid() -> dict[str, bytes]:
    return valid_members()


def write(path: Path, members: dict[str, bytes], rehash: bool = True,
          compression: int = zipfile.ZIP_STORED) -> Path:
    """An artifact with these members; `rehash` recomputes the manifest's sums (what an
    attacker does so the integrity check passes)."""
    members = dict(members)
    if rehash:
        manifest = json.loads(members["manifest.json"])
        manifest["sha256"] = {n: hashlib.sha256(d).hexdigest() for n, d in members.items() if n != "manifest.json"}
        members["manifest.json"] = json.dumps(manifest).encode()
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def attempt(path: Path, kind: str) -> str:
    """Load the artifact and run what loads, through the API and through `snncc run`; the API's
    outcome, after checking that no code ran, nothing appeared beside the artifact and the CLI
    either ran or printed one error line."""
    before = set(path.parent.iterdir())
    try:
        program = snncc.load(path)
        program(torch.tensor([[1, 2, 3]]))
        outcome = "loaded"
    except SnnccError:
        outcome = "clean error"
    except (RuntimeError, IndexError, ValueError, TypeError) as exc:  # raised by torch while running
        outcome = "runtime error" if "program" in locals() else f"UNCLEAN {type(exc).__name__}"
    cli = cli_outcome(path)
    assert not (path.parent / MARKER).exists() and not (Path.cwd() / MARKER).exists(), "code from the artifact ran"
    assert set(path.parent.iterdir()) == before, "loading wrote files beside the artifact"
    OUTCOMES[f"{kind}: {outcome}"] += 1
    OUTCOMES[f"(every case) snncc run: {cli}"] += 1
    assert not outcome.startswith("UNCLEAN"), outcome
    return outcome


def cli_outcome(path: Path) -> str:
    """`snncc run` on the artifact: 'ran', or 'one error line' (anything else fails the test)."""
    result = CliRunner().invoke(main, ["run", str(path), "--prompt", "ab", "--max-new-tokens", "1"])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    if result.exit_code == 0:
        return "ran"
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("snncc: error:") and "Traceback" not in result.output, \
        result.output
    return "one error line"


def graph_rows(members: dict[str, bytes]) -> list[dict]:
    return json.loads(members["graph.json"])


def with_graph(members: dict[str, bytes], rows: list[dict]) -> dict[str, bytes]:
    return {**members, "graph.json": json.dumps(rows).encode()}


def with_manifest(members: dict[str, bytes], edit) -> dict[str, bytes]:
    manifest = json.loads(members["manifest.json"])
    edit(manifest)
    return {**members, "manifest.json": json.dumps(manifest).encode()}


def first(rows: list[dict], op: str) -> dict:
    return next(r for r in rows if r["op"] == op)


TOUCH = f"__import__('os').system('touch {MARKER}')"
INJECTIONS = [f"x={TOUCH}", f"x):\n    {TOUCH}\ndef f(x", f'a"); {TOUCH}; ("', f"a\n{TOUCH}", "__class__",
              "training", "print", "", "a b", "1x", "torch", "a.__dict__"]


def test_the_valid_artifact_loads_and_runs(tmp_path, valid):
    assert attempt(write(tmp_path / "a.snn", valid), "valid") == "loaded"


@pytest.mark.parametrize("text", INJECTIONS)
@pytest.mark.parametrize("where", ["placeholder target", "node name", "get_attr target", "kwargs key"])
def test_code_in_names_never_runs(tmp_path, valid, where, text):
    rows = graph_rows(valid)
    if where == "placeholder target":
        first(rows, "placeholder")["target"] = text
    elif where == "node name":
        rows[len(rows) // 2]["name"] = text
    elif where == "get_attr target":
        first(rows, "get_attr")["target"] = text
    else:
        first(rows, "call_function")["kwargs"] = {text: 1}
    outcome = attempt(write(tmp_path / "a.snn", with_graph(valid, rows)), f"name injection ({where})")
    if not text.isidentifier():  # an odd but plain name ('__class__', 'print') may load, harmlessly
        assert outcome == "clean error"


@pytest.mark.parametrize("target", [
    "operator.attrgetter", "operator.call", "operator.methodcaller", "operator.setitem", "builtins.eval",
    "os.system", "aten.from_file.default", "aten.save.default", "aten._load_for_mobile.default",
    "aten.empty.memory_format", "snn.nonexistent.default", "aten.linear", "aten", "", "operator.getitem.x",
])
def test_ops_outside_the_table_are_refused(tmp_path, valid, target):
    rows = graph_rows(valid)
    first(rows, "call_function")["target"] = target
    assert attempt(write(tmp_path / "a.snn", with_graph(valid, rows)), "op outside the table") == "clean error"


@pytest.mark.parametrize("value", [{"dtype": "load"}, {"dtype": "__builtins__"}, {"device": "file:///etc"},
                                   {"layout": "sparse_coo_bogus"}, {"memory_format": "x"}, {"module": "os"},
                                   {"node": "nonexistent"}, {"list": [{"list": [{"list": "deep"}]}]}])
def test_values_decode_only_from_fixed_tables(tmp_path, valid, value):
    rows = graph_rows(valid)
    row = first(rows, "call_function")
    row["args"] = {"tuple": [value]}
    assert attempt(write(tmp_path / "a.snn", with_graph(valid, rows)), "value outside the tables") == "clean error"


@pytest.mark.parametrize("name", ["tokenizer/../../escaped.txt", "/tmp/absolute.txt", "tokenizer/sub/dir.txt",
                                  "tokenizer/.hidden", "../escaped.txt", "tokenizer/", "evil.py", "tokenizer/a\\b"])
def test_member_names_outside_the_fixed_set_are_refused(tmp_path, valid, name):
    target = tmp_path / "inner" / "a.snn"
    target.parent.mkdir()
    outcome = attempt(write(target, {**valid, name: b"payload"}), "member name")
    assert outcome == "clean error"
    assert not list(tmp_path.rglob("escaped.txt")) and not Path("/tmp/absolute.txt").exists()


def test_tokenizer_code_is_never_imported(tmp_path, valid):
    """A tokenizer config that asks for a class from a shipped Python file (auto_map)."""
    code = f"import os\nos.system('touch {tmp_path / MARKER}')\n".encode()
    config = {"auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]},
              "tokenizer_class": "EvilTokenizer"}
    members = {**valid, "tokenizer/tokenization_evil.py": code,
               "tokenizer/tokenizer_config.json": json.dumps(config).encode(),
               "tokenizer/snncc_tokenizer.json": json.dumps({"kind": "huggingface"}).encode()}
    assert attempt(write(tmp_path / "a.snn", members), "tokenizer auto_map") == "clean error"


def test_compressed_bombs_are_refused_before_reading(tmp_path, valid):
    """A deflated member declaring far more bytes than the file holds is never decompressed."""
    path = write(tmp_path / "bomb.snn", {**valid, "graph.json": b" " * (64 * 2**20)},
                 compression=zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 2**20
    assert attempt(path, "compression bomb") == "clean error"


@pytest.mark.parametrize("edit", [
    lambda m: m.update(format_version="1"), lambda m: m.pop("info"), lambda m: m["info"].update(T=10**9),
    lambda m: m["info"].update(max_positions=-1), lambda m: m["info"].update(task="exec"),
    lambda m: m["info"].update(extra=1), lambda m: m["info"].update(vocab_size=True),
    lambda m: m["weights"].update(aliases={"x": "nonexistent"}), lambda m: m["weights"].update(aliases=[1]),
    lambda m: m["weights"].update(shards=2), lambda m: m["weights"]["weight_map"].update(made_up=SHARD),
    lambda m: m["weights"]["weight_map"].popitem(), lambda m: m.pop("weights"),
    lambda m: m["info"].update(dtype="int8"),
    lambda m: m["info"]["coverage"].update(analog_sites=[{"name": "made_up"}]),
    lambda m: m["info"].update(generation={"eos_token_id": [10**9], "pad_token_id": None}),
    lambda m: m["info"].update(generation={"eos_token_id": list(range(10**4)), "pad_token_id": 0}),
    lambda m: m["info"].update(generation={"eos_token_id": 2, "pad_token_id": 0}),
    lambda m: m["info"].update(generation={"eos_token_id": [2], "pad_token_id": True}),
    lambda m: m["info"].update(generation={"eos_token_id": [2], "pad_token_id": 0, "run": "x"}),
])
def test_malformed_manifest_fields_are_one_error(tmp_path, valid, edit):
    assert attempt(write(tmp_path / "a.snn", with_manifest(valid, edit)), "manifest field") == "clean error"


def test_coverage_cannot_be_overstated(tmp_path, valid):
    """An `encode`-less program claiming 100% coverage: its graph has analog matmuls."""
    loaded, ann, ctx = prepared("tiny-llama")
    compile_graph(loaded, ann, ctx, "none", 6).save(tmp_path / "ann.snn")
    with zipfile.ZipFile(tmp_path / "ann.snn") as archive:
        members = {name: archive.read(name) for name in archive.namelist()}

    def claim_full(manifest):
        manifest["info"]["coverage"].update(coverage=1.0, analog_sites=[], analog_macs=0)

    assert attempt(write(tmp_path / "lie.snn", with_manifest(members, claim_full)), "coverage claim") == "clean error"
    assert attempt(write(tmp_path / "honest.snn", members), "coverage claim") == "loaded"


def _table_tensors(members: dict[str, bytes]) -> list[tuple[str, str, str]]:
    """(thresholds, codes, bucket) stored tensor names of every table neuron in the graph."""
    rows = graph_rows(members)
    targets = {r["name"]: r["target"] for r in rows if r["op"] == "get_attr"}
    aliases = json.loads(members["manifest.json"])["weights"]["aliases"]
    tables = []
    for row in rows:
        if row["op"] == "call_function" and row["target"].startswith(("snn.fn_encode", "snn.fn_quantize")):
            names = [targets[arg["node"]] for arg in row["args"]["tuple"][1:4]]
            tables.append(tuple(aliases.get(n, n) for n in names))
    return tables


@pytest.mark.parametrize("edit", ["bucket", "thresholds", "codes"])
def test_malformed_tables_never_reach_the_kernels(tmp_path, valid, edit):
    """Unsorted thresholds, short codes or out-of-range buckets would make the compiled lookup
    read out of bounds."""
    import safetensors.torch

    tensors = safetensors.torch.load(valid[SHARD])
    tables = set(_table_tensors(valid))  # layers share tables: edit each once
    assert tables
    for thresholds, codes, bucket in tables:
        if edit == "bucket":
            tensors[bucket] = torch.full_like(tensors[bucket], 10**6)
        elif edit == "thresholds":
            tensors[thresholds] = tensors[thresholds].flip(-1).contiguous()
        else:
            tensors[codes] = tensors[codes][:, :3].contiguous()
    members = {**valid, SHARD: safetensors.torch.save(tensors)}
    assert attempt(write(tmp_path / f"{edit}.snn", members), "neuron tables") == "clean error"


def _shard_with_header(valid: dict[str, bytes], edit) -> dict[str, bytes]:
    """The valid artifact with its shard's safetensors header edited (data bytes kept)."""
    blob = valid[SHARD]
    length = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + length])
    edit(header)
    encoded = json.dumps(header).encode()
    return {**valid, SHARD: len(encoded).to_bytes(8, "little") + encoded + blob[8 + length:]}


def _first_entry(header: dict) -> dict:
    return next(v for k, v in header.items() if k != "__metadata__")


@pytest.mark.parametrize("edit", [
    lambda h: _first_entry(h).update(dtype="F8_E4M3_bogus"), lambda h: _first_entry(h).update(shape=[10**12]),
    lambda h: _first_entry(h).update(data_offsets=[0, 10**15]), lambda h: _first_entry(h).update(shape=[-1]),
    lambda h: _first_entry(h).update(data_offsets=[8, 4]), lambda h: _first_entry(h).update(extra=1),
    lambda h: h.update(overlap={"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}),
    lambda h: h.update({"a.__class__": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}),
])
def test_shard_headers_are_checked_before_any_view(tmp_path, valid, edit):
    """A shard's safetensors header is parsed by snncc (the shard is mapped, not read): bad
    dtypes, sizes, byte ranges outside the data or shared by two tensors are refused."""
    members = _shard_with_header(valid, edit)
    assert attempt(write(tmp_path / "a.snn", members), "shard header") == "clean error"


def test_a_huge_shard_header_length_is_refused(tmp_path, valid):
    members = {**valid, SHARD: (2**62).to_bytes(8, "little") + valid[SHARD][8:]}
    assert attempt(write(tmp_path / "a.snn", members), "shard header") == "clean error"


def test_format_1_artifacts_still_load(tmp_path, valid):
    """Artifacts written before shards (one weights.safetensors, aliases in the manifest)."""
    import safetensors.torch

    manifest = json.loads(valid["manifest.json"])
    weights = manifest.pop("weights")
    manifest.update(format_version=1, aliases=weights["aliases"])
    manifest["info"].pop("dtype")
    members = {name: data for name, data in valid.items() if name != SHARD}
    members["weights.safetensors"] = safetensors.torch.save(safetensors.torch.load(valid[SHARD]))
    members["manifest.json"] = json.dumps(manifest).encode()
    path = write(tmp_path / "v1.snn", members)
    assert attempt(path, "format 1") == "loaded"
    program, current = snncc.load(path), snncc.load(write(tmp_path / "v2.snn", valid))
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(program(ids), current(ids))


def test_literal_sizes_and_steps_are_bounded(tmp_path, valid):
    rows = graph_rows(valid)
    encoder = next(r for r in rows if r["op"] == "call_function" and r["target"].startswith("snn.mr_encode"))
    encoder["args"]["tuple"][2] = 10**9  # T
    assert attempt(write(tmp_path / "T.snn", with_graph(valid, rows)), "literal bounds") == "clean error"
    rows = graph_rows(valid)
    view = next(r for r in rows if r["op"] == "call_function" and r["target"] == "aten.view.default")
    view["args"]["tuple"][1] = {"list": [2**20, 2**20, 2**20]}
    assert attempt(write(tmp_path / "size.snn", with_graph(valid, rows)), "literal bounds") == "clean error"


# --- generated mutations ---------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12)


def _paths(value, prefix=()):
    """Every path into a JSON value (dict keys and list indices)."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


def _replaced(value, path, new):
    if not path:
        return new
    head, *rest = path
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[head] = _replaced(value[head], rest, new)
    return copy


@pytest.mark.slow  # 16 s of generated cases: the hand-written mutations above stay in the fast tier
@FEW
@given(data=st.data())
def test_generated_manifest_mutations(tmp_path_factory, data):
    valid = valid_members()
    manifest = json.loads(valid["manifest.json"])
    manifest.pop("sha256")
    paths = list(_paths(manifest))
    path = data.draw(st.sampled_from(paths[1:]))
    mutated = _replaced(manifest, path, data.draw(JSON_VALUES))
    members = {**valid, "manifest.json": json.dumps(mutated).encode()}
    attempt(write(tmp_path_factory.mktemp("m") / "a.snn", members), "generated manifest mutation")


@FEW
@given(data=st.data())
def test_generated_graph_mutations(tmp_path_factory, data):
    valid = valid_members()
    rows = graph_rows(valid)
    index = data.draw(st.integers(0, len(rows) - 1))
    row_paths = list(_paths(rows[index]))
    path = data.draw(st.sampled_from(row_paths))
    rows[index] = _replaced(rows[index], path, data.draw(JSON_VALUES | st.sampled_from(INJECTIONS)))
    attempt(write(tmp_path_factory.mktemp("g") / "a.snn", with_graph(valid, rows)), "generated graph mutation")


@FEW
@given(data=st.data())
def test_generated_byte_mutations(tmp_path_factory, data):
    """Bytes of any member flipped, cut or extended (rehashed)."""
    valid = valid_members()
    name = data.draw(st.sampled_from(sorted(valid)))
    blob = bytearray(valid[name])
    action = data.draw(st.sampled_from(["flip", "cut", "extend"]))
    if action == "flip" and blob:
        for _ in range(data.draw(st.integers(1, 8))):
            blob[data.draw(st.integers(0, len(blob) - 1))] ^= data.draw(st.integers(1, 255))
    elif action == "cut":
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    else:
        blob += data.draw(st.binary(max_size=64))
    members = {**valid, name: bytes(blob)}
    rehash = name != "manifest.json"
    attempt(write(tmp_path_factory.mktemp("b") / "a.snn", members, rehash=rehash), f"generated bytes ({name})")


@FEW
@given(data=st.data())
def test_generated_zip_damage(tmp_path_factory, data):
    """The zip container itself cut or overwritten at random places."""
    valid = valid_members()
    path = write(tmp_path_factory.mktemp("z") / "a.snn", valid)
    raw = bytearray(path.read_bytes())
    start = data.draw(st.integers(0, len(raw) - 1))
    raw[start:start + 16] = data.draw(st.binary(min_size=1, max_size=16))
    path.write_bytes(bytes(raw))
    attempt(path, "generated zip damage")


# --- through the CLI --------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["placeholder", "operator", "member", "bytes"])
def test_cli_reports_hostile_artifacts_in_one_line(tmp_path, valid, case):
    rows = graph_rows(valid)
    members = dict(valid)
    if case == "placeholder":
        first(rows, "placeholder")["target"] = f"x={TOUCH}"
        members = with_graph(valid, rows)
    elif case == "operator":
        first(rows, "call_function")["target"] = "operator.methodcaller"
        members = with_graph(valid, rows)
    elif case == "member":
        members["tokenizer/../../x.txt"] = b"x"
    else:
        members["graph.json"] = members["graph.json"][:100]
    path = write(tmp_path / "a.snn", members)
    for command in (["inspect", str(path)], ["run", str(path), "--prompt", "ab", "--max-new-tokens", "1"]):
        result = CliRunner().invoke(main, command)
        lines = result.output.strip().splitlines()
        assert result.exit_code != 0 and len(lines) == 1 and lines[0].startswith("snncc: error:"), result.output
        assert "Traceback" not in result.output
        OUTCOMES[f"cli ({case}): one line"] += 1
    assert not (tmp_path / MARKER).exists()
