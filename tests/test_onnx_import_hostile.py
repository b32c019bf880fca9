"""Hostile ONNX files: every file a user hands snncc is untrusted. Loading one runs no code,
reads and writes nothing outside its folder, allocates within a bound, and whatever is wrong
with it is a snncc error (one line on the CLI), never another exception.

A valid file is exported once per module from the tiny random-weight GPT-2 (and a copy with
external data); each case mutates it (hypothesis draws the mutation: op types, attributes,
initializer dims, data types and bytes, metadata, value names, dropped and duplicated nodes,
external data locations, flipped bytes), writes it in a fresh folder, loads it and runs it
on fake tensors, as torch.export traces it (so a case that builds a huge tensor allocates
nothing, and is refused as tracing would refuse it). The tally
of cases and clean errors is printed when the module ends (run with -s to see it).
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto
from torch._subclasses.fake_tensor import FakeTensorMode

from snncc.errors import ModelError, SnnccError
from snncc.models import load_model
from tests.snncc_process import run_snncc

logging.getLogger("torch._subclasses.fake_tensor").setLevel(logging.CRITICAL)  # it logs every failed op
MARKER = "snncc_hostile_marker"
EXAMPLES = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
TALLY: collections.Counter = collections.Counter()


# --- the valid files, exported once ---------------------------------------------------------


class Files(dict):
    """The valid files' bytes; a short repr, since hypothesis prints its arguments."""

    def __repr__(self) -> str:
        return "<valid ONNX files>"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Files:
    """{'model': bytes of a valid ONNX file, 'external': (model bytes, data bytes) of the same
    model with every initializer in external data}."""
    from snncc.api import compile_graph
    from snncc.backends.onnx import export_onnx
    from tests.conftest import prepared

    folder = tmp_path_factory.mktemp("onnx_base")
    export_onnx(compile_graph(*prepared("tiny-gpt2"), "none"), folder / "m.onnx", "onnx")
    model = onnx.load(str(folder / "m.onnx"))
    onnx.save_model(model, str(folder / "ext.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.onnx.data", size_threshold=0)
    return Files(model=(folder / "m.onnx").read_bytes(),
                 external=((folder / "ext.onnx").read_bytes(), (folder / "ext.onnx.data").read_bytes()))


@pytest.fixture(scope="module", autouse=True)
def tally() -> Iterator[collections.Counter]:
    yield TALLY
    print(f"\nhostile ONNX cases: {TALLY['run']} run, {TALLY['error']} clean errors, {TALLY['loaded']} loaded "
          f"and ran, {TALLY['cli']} through the CLI")


def _log(message: str) -> None:
    if os.environ.get("SNNCC_HOSTILE_LOG"):
        with open(os.environ["SNNCC_HOSTILE_LOG"], "a") as log:
            log.write(message + "\n")


def _proto(data: bytes) -> onnx.ModelProto:
    return onnx.ModelProto.FromString(data)


# --- one case: write, load, run, check --------------------------------------------------------


@contextlib.contextmanager
def _case_folder() -> Iterator[Path]:
    """A fresh folder (inside a parent that must stay empty but for it) as the working directory."""
    with tempfile.TemporaryDirectory() as parent:
        folder = Path(parent) / "case"
        folder.mkdir()
        cwd = os.getcwd()
        os.chdir(folder)
        try:
            yield folder
        finally:
            os.chdir(cwd)
        assert sorted(p.name for p in Path(parent).iterdir()) == ["case"], "something was written beside the case"
        assert not (Path(parent) / MARKER).exists() and not (folder / MARKER).exists(), "code from the file ran"


def _plant_code(folder: Path) -> None:
    """A Python file that writes the marker when imported, as a remote-code tokenizer would."""
    code = f"open({str(folder / MARKER)!r}, 'w').write('ran')\n"
    (folder / "tokenization_evil.py").write_text(code)
    (folder / "evil.py").write_text(code)


def _run(loaded) -> None:
    """The module on token ids with its buffers and input fake, as torch.export traces it: a
    case that builds a huge tensor allocates nothing (real buffers would be computed on)."""
    with torch.no_grad(), FakeTensorMode() as mode:
        buffers = {name: mode.from_tensor(b) for name, b in loaded.module.named_buffers()}
        torch.func.functional_call(loaded.module, buffers, (mode.from_tensor(torch.randint(0, 256, (1, 5))),))


def load_case(model: onnx.ModelProto | bytes, folder: Path, extra: dict[str, bytes] | None = None,
              tokenizer: bool = True) -> str:
    """Write the case into `folder`, load and run it; 'loaded' or 'error' (a SnnccError). Any
    other exception fails the test, and so does a new file in the folder."""
    path = folder / "case.onnx"
    path.write_bytes(model if isinstance(model, bytes) else model.SerializeToString())
    for name, data in (extra or {}).items():
        (folder / name).write_bytes(data)
    if tokenizer and "snncc_tokenizer.json" not in (extra or {}):
        (folder / "snncc_tokenizer.json").write_text(json.dumps({"kind": "bytes"}))
    _plant_code(folder)
    before = sorted(p.name for p in folder.iterdir())
    TALLY["run"] += 1
    try:
        _run(load_model(str(path)))
        outcome = "loaded"
    except SnnccError as exc:
        message = str(exc)
        assert message and "\n" not in message and "Traceback" not in message, message
        _log(message)
        outcome = "error"
    assert sorted(p.name for p in folder.iterdir()) == before, "the load wrote files"
    TALLY[outcome] += 1
    return outcome


def _check(model: onnx.ModelProto | bytes, extra: dict[str, bytes] | None = None) -> str:
    with _case_folder() as folder:
        return load_case(model, folder, extra)


# --- hypothesis: mutations of the valid file --------------------------------------------------

TEXT = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=30)
HUGE_INTS = st.integers(-(2**63), 2**63 - 1)
DIMS = st.lists(st.one_of(st.integers(-3, 70), HUGE_INTS), max_size=20)


def _pick(data, items):
    return items[data.draw(st.integers(0, len(items) - 1))]


def _rename_op(model, data):
    _pick(data, model.graph.node).op_type = data.draw(st.one_of(TEXT, st.sampled_from(
        ["Loop", "If", "Scan", "Hardmax", "Add", "Constant", "MatMul", "Split"])))


def _mutate_attribute(model, data):
    node = _pick(data, [n for n in model.graph.node if n.attribute])
    attribute = _pick(data, node.attribute)
    kind = data.draw(st.sampled_from(["type", "ints", "int", "name", "graph"]))
    if kind == "type":
        attribute.type = data.draw(st.integers(0, 15))
    elif kind == "ints":
        attribute.type = onnx.AttributeProto.INTS
        attribute.ints[:] = data.draw(st.lists(HUGE_INTS, max_size=5))
    elif kind == "int":
        attribute.type = onnx.AttributeProto.INT
        attribute.i = data.draw(HUGE_INTS)
    elif kind == "name":
        attribute.name = data.draw(st.sampled_from(["axis", "axes", "perm", "to", "value", "value_ints", "epsilon"]))
    else:
        attribute.type = onnx.AttributeProto.GRAPH
        attribute.g.CopyFrom(onnx.helper.make_graph([], "sub", [], []))


def _mutate_initializer(model, data):
    tensor = _pick(data, model.graph.initializer)
    kind = data.draw(st.sampled_from(["dims", "dtype", "raw", "typed", "external"]))
    if kind == "dims":
        tensor.dims[:] = data.draw(DIMS)
    elif kind == "dtype":
        tensor.data_type = data.draw(st.integers(-1, 30))
    elif kind == "raw":
        tensor.raw_data = data.draw(st.binary(max_size=64))
    elif kind == "typed":
        tensor.ClearField("raw_data")
        tensor.float_data[:] = data.draw(st.lists(st.floats(width=32), max_size=8))
    else:
        tensor.data_location = TensorProto.EXTERNAL
        del tensor.external_data[:]
        tensor.external_data.add(key="location", value=data.draw(st.one_of(TEXT, st.sampled_from(LOCATIONS))))


def _mutate_metadata(model, data):
    key = data.draw(st.sampled_from(["snncc.max_positions", "snncc.task", "snncc.T"]))
    value = data.draw(st.one_of(TEXT, st.integers().map(str), st.sampled_from(["1e9", "-5", "0", "٣", "99999999999"])))
    del model.metadata_props[:]
    model.metadata_props.add(key=key, value=value)


def _mutate_names(model, data):
    node = _pick(data, model.graph.node)
    names = [n for other in model.graph.node for n in other.output] + [i.name for i in model.graph.initializer]
    kind = data.draw(st.sampled_from(["input", "output", "duplicate-output", "node-name", "graph-output"]))
    if kind == "input" and node.input:
        node.input[data.draw(st.integers(0, len(node.input) - 1))] = data.draw(st.one_of(TEXT, st.sampled_from(names)))
    elif kind == "output":
        node.output[0] = data.draw(TEXT)
    elif kind == "duplicate-output":
        node.output[0] = _pick(data, names)
    elif kind == "node-name":
        node.name = _pick(data, model.graph.node).name
    else:
        model.graph.output[0].name = data.draw(st.one_of(TEXT, st.sampled_from(names)))


def _drop_or_duplicate_node(model, data):
    index = data.draw(st.integers(0, len(model.graph.node) - 1))
    node = onnx.NodeProto()
    node.CopyFrom(model.graph.node[index])
    if data.draw(st.booleans()):
        del model.graph.node[index]
    else:
        model.graph.node.insert(data.draw(st.integers(0, len(model.graph.node))), node)


def _mutate_input_dims(model, data):
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for dim in dims:
        dim.dim_value = data.draw(st.integers(0, 2**62))
    model.graph.input[0].type.tensor_type.elem_type = data.draw(st.sampled_from([1, 7, 8, 0]))


MUTATIONS: dict[str, Callable] = {
    "op type": _rename_op, "attribute": _mutate_attribute, "initializer": _mutate_initializer,
    "metadata": _mutate_metadata, "names": _mutate_names, "drop/duplicate node": _drop_or_duplicate_node,
    "input dims": _mutate_input_dims,
}


@pytest.mark.parametrize("kind", list(MUTATIONS))
def test_a_mutated_file_loads_or_fails_cleanly(base, kind):
    @EXAMPLES
    @given(data=st.data())
    def case(data):
        model = _proto(base["model"])
        MUTATIONS[kind](model, data)
        _check(model)

    case()


@EXAMPLES
@given(data=st.data())
def test_flipped_bytes_load_or_fail_cleanly(base, data):
    raw = bytearray(base["model"])
    for _ in range(data.draw(st.integers(1, 8))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(raw))))
    _check(bytes(raw[:cut]))


LOCATIONS = ["../../etc/passwd", "/etc/passwd", "a/../../x", "../case/ext.onnx.data", "link.data", "missing.data",
             "", "ext.onnx.data\x00.txt", "dir", "//etc/passwd", "./../etc/hostname"]


@EXAMPLES
@given(data=st.data())
def test_external_data_never_leaves_the_folder(base, data):
    model_bytes, data_bytes = base["external"]
    model = _proto(model_bytes)
    tensor = _pick(data, [t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL])
    entries = {e.key: e.value for e in tensor.external_data}
    entries["location"] = data.draw(st.sampled_from(LOCATIONS))
    kind = data.draw(st.sampled_from(["location", "offset", "length"]))
    if kind == "offset":
        entries["offset"] = data.draw(st.one_of(TEXT, HUGE_INTS.map(str)))
        entries["location"] = "ext.onnx.data"
    elif kind == "length":
        entries["length"] = data.draw(st.one_of(TEXT, HUGE_INTS.map(str)))
        entries["location"] = "ext.onnx.data"
    del tensor.external_data[:]
    for key, value in entries.items():
        tensor.external_data.add(key=key, value=value)
    with _case_folder() as folder:
        os.symlink("/etc/passwd", folder / "link.data")
        (folder / "dir").mkdir()
        outcome = load_case(model, folder, {"ext.onnx.data": data_bytes})
    assert kind != "location" or outcome == "error"


# --- hand-written cases: one per attack -------------------------------------------------------


def _expect_error(model, *words: str, extra: dict[str, bytes] | None = None) -> str:
    with _case_folder() as folder, pytest.raises(SnnccError) as caught:
        path = folder / "case.onnx"
        path.write_bytes(model if isinstance(model, bytes) else model.SerializeToString())
        for name, data in (extra or {}).items():
            (folder / name).write_bytes(data)
        if "snncc_tokenizer.json" not in (extra or {}) and "tokenizer.json" not in (extra or {}):
            (folder / "snncc_tokenizer.json").write_text(json.dumps({"kind": "bytes"}))
        _plant_code(folder)
        TALLY["run"] += 1
        _run(load_model(str(path)))
    TALLY["error"] += 1
    message = str(caught.value)
    _log(message)
    assert "\n" not in message
    for word in words:
        assert word.lower() in message.lower(), message
    return message


def _first(model, op_type: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.op_type == op_type)


def _big_initializer(model) -> TensorProto:
    return max(model.graph.initializer, key=lambda t: len(t.raw_data))


def test_the_valid_file_loads_runs_and_traces(base):
    from snncc.frontend import trace

    with _case_folder() as folder:
        assert load_case(_proto(base["model"]), folder) == "loaded"
        assert trace(load_model(str(folder / "case.onnx"))) is not None


def test_the_valid_external_data_file_loads(base):
    model_bytes, data_bytes = base["external"]
    assert _check(model_bytes, {"ext.onnx.data": data_bytes}) == "loaded"


@pytest.mark.parametrize("location", ["sub/ext.onnx.data", "inner_link.data"])
def test_external_data_inside_the_folder_loads(base, location):
    model_bytes, data_bytes = base["external"]
    model = _proto(model_bytes)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    with _case_folder() as folder:
        (folder / "sub").mkdir()
        (folder / "sub" / "ext.onnx.data").write_bytes(data_bytes)
        os.symlink("sub/ext.onnx.data", folder / "inner_link.data")  # a link that stays inside is fine
        assert load_case(model, folder) == "loaded"


@pytest.mark.parametrize("location", ["../../etc/passwd", "/etc/passwd", "link.data"])
def test_external_data_outside_the_folder_is_refused(base, location):
    model = _proto(base["external"][0])
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    with _case_folder() as folder:
        os.symlink("/etc/passwd", folder / "link.data")
        with pytest.raises(ModelError, match="outside the model's folder"):
            (folder / "case.onnx").write_bytes(model.SerializeToString())
            (folder / "snncc_tokenizer.json").write_text(json.dumps({"kind": "bytes"}))
            TALLY["run"] += 1
            load_model(str(folder / "case.onnx"))
        TALLY["error"] += 1


def test_the_file_size_is_checked_before_parsing(base, monkeypatch):
    import snncc.onnx_import as onnx_import

    monkeypatch.setattr(onnx_import, "MAX_MODEL_BYTES", 1000)
    monkeypatch.setattr(onnx, "load", lambda *a, **k: pytest.fail("parsed a file over the cap"))
    _expect_error(base["model"], "bytes", "external data")


def test_a_huge_declared_initializer_is_refused_before_allocating(base):
    model = _proto(base["model"])
    tensor = _big_initializer(model)
    tensor.dims[:] = [2**40, 2**20]
    _expect_error(model, tensor.name, "declares")


def test_declared_and_stored_bytes_must_agree(base):
    model = _proto(base["model"])
    tensor = _big_initializer(model)
    tensor.raw_data = tensor.raw_data[:-4]
    _expect_error(model, tensor.name, "stores")


def test_an_unreadable_data_type_is_refused(base):
    model = _proto(base["model"])
    tensor = _big_initializer(model)
    tensor.data_type = TensorProto.STRING
    _expect_error(model, tensor.name, "STRING")


@pytest.mark.parametrize("value", ["lots", "", "-1", "1e9", "99999999999", "٣"])
def test_bad_max_positions_metadata_is_refused(base, value):
    model = _proto(base["model"])
    for prop in model.metadata_props:
        if prop.key == "snncc.max_positions":
            prop.value = value
    _expect_error(model, "snncc.max_positions")


def test_a_huge_declared_input_length_is_refused(base):
    model = _proto(base["model"])
    del model.metadata_props[:]
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 2**40
    _expect_error(model, "input_ids", "length")


def test_an_unknown_op_names_its_node(base):
    model = _proto(base["model"])
    node = _first(model, "MatMul")
    node.op_type = "os.system"
    _expect_error(model, "os.system", node.name)


def test_an_attribute_of_the_wrong_type_names_its_node(base):
    model = _proto(base["model"])
    node = _first(model, "Softmax")
    node.attribute[0].CopyFrom(onnx.helper.make_attribute("axis", "minus one"))
    _expect_error(model, node.name, "axis", "INT")


def test_a_name_with_a_newline_stays_on_one_line(base):
    model = _proto(base["model"])
    _first(model, "Add").input[0] = "evil\nTraceback (most recent call last):"
    _expect_error(model, "evil?Traceback")


def test_a_constant_with_external_data_outside_the_folder_is_refused(base):
    model = _proto(base["model"])
    value = onnx.helper.make_tensor("v", TensorProto.FLOAT, [4], [0.0] * 4)
    value.ClearField("float_data")
    value.data_location = TensorProto.EXTERNAL
    value.external_data.add(key="location", value="/etc/passwd")
    model.graph.node.insert(0, onnx.helper.make_node("Constant", [], ["stolen"], name="stolen", value=value))
    _expect_error(model, "stolen", "outside the model's folder")


def test_a_cycle_is_refused(base):
    model = _proto(base["model"])
    last = model.graph.node[-1]
    model.graph.node[0].input.append(last.output[0])
    _expect_error(model, "cycle")


def test_a_value_defined_twice_is_refused(base):
    model = _proto(base["model"])
    model.graph.node[-1].output[0] = model.graph.node[0].output[0]
    _expect_error(model, "already defined")


def test_an_undefined_input_names_its_node(base):
    model = _proto(base["model"])
    node = _first(model, "Add")
    node.input[0] = "r2"
    _expect_error(model, node.name, "'r2'", "no node")


def test_duplicated_graph_outputs_and_initializers_are_refused(base):
    model = _proto(base["model"])
    model.graph.output.append(model.graph.output[0])
    _expect_error(model, "logits", "named twice")
    model = _proto(base["model"])
    model.graph.initializer.append(model.graph.initializer[0])
    _expect_error(model, model.graph.initializer[0].name, "defined twice")


def test_a_missing_graph_output_is_refused(base):
    model = _proto(base["model"])
    model.graph.output[0].name = "nowhere"
    _expect_error(model, "nowhere")


def test_a_subgraph_is_refused(base):
    model = _proto(base["model"])
    model.graph.node[0].attribute.append(onnx.helper.make_attribute("body", onnx.helper.make_graph([], "b", [], [])))
    _expect_error(model, "subgraph")


def test_a_constant_of_shape_bomb_is_refused(base):
    model = _proto(base["model"])
    sizes = onnx.helper.make_node("Constant", [], ["huge_shape"], name="huge_shape",
                                  value=onnx.helper.make_tensor("v", TensorProto.INT64, [3], [2**20, 2**20, 2**10]))
    fill = onnx.helper.make_node("ConstantOfShape", ["huge_shape"], ["filled"], name="fill")
    head = model.graph.node[-1]
    add = onnx.helper.make_node("Add", [head.output[0], "filled"], ["bomb"], name="bomb")
    model.graph.node.extend([sizes, fill, add])
    model.graph.output[0].name = "bomb"
    _expect_error(model, "fill", "elements")


def _append(model, nodes: list, output: str) -> None:
    """`nodes` after the graph, the last one's output the graph's output."""
    model.graph.node.extend(nodes)
    model.graph.output[0].name = output


def test_a_broadcast_bomb_is_refused(base):
    model = _proto(base["model"])
    column = onnx.helper.make_tensor("column", TensorProto.FLOAT, [2**16, 1], [1.0] * 2**16)
    row = onnx.helper.make_tensor("row", TensorProto.FLOAT, [1, 2**16], [1.0] * 2**16)
    model.graph.initializer.extend([column, row])
    _append(model, [onnx.helper.make_node("Add", ["column", "row"], ["outer"], name="outer")], "outer")
    _expect_error(model, "outer", "elements")


def test_shape_arithmetic_cannot_grow_without_bound(base):
    model = _proto(base["model"])
    model.graph.initializer.append(onnx.helper.make_tensor("seed", TensorProto.INT64, [2], [3, 3]))
    nodes, last = [], "seed"
    for i in range(40):  # each Concat doubles the list, each Mul squares the values
        op = "Concat" if i % 2 else "Mul"
        nodes.append(onnx.helper.make_node(op, [last, last], [f"grow{i}"], name=f"grow{i}",
                                           **({"axis": 0} if op == "Concat" else {})))
        last = f"grow{i}"
    _append(model, nodes, last)
    _expect_error(model, "grow", "int64")


def test_not_onnx_at_all_is_refused():
    _expect_error(b"\x08\x07garbage that is not protobuf" * 10, "cannot read")


@pytest.mark.parametrize(("files", "words"), [
    ({"snncc_tokenizer.json": b"{not json"}, ["tokenizer"]),
    ({"snncc_tokenizer.json": b"[1, 2]"}, ["tokenizer"]),
    ({"snncc_tokenizer.json": b'{"kind": "huggingface"}'}, ["tokenizer"]),
    ({"tokenizer.json": b"\xff\xfe garbage"}, ["tokenizer"]),
    ({"tokenizer.json": b'{"model": {"type": "Evil"}}'}, ["tokenizer"]),
    ({"tokenizer.json": b"{}", "tokenizer_config.json": json.dumps(
        {"auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}).encode()}, ["auto_map"]),
])
def test_a_malformed_tokenizer_is_one_line(base, files, words):
    _expect_error(base["model"], *words, extra=files)


def test_a_tokenizer_side_file_that_is_not_a_file_is_refused(base):
    with _case_folder() as folder, pytest.raises(ModelError, match="not a regular file"):
        (folder / "case.onnx").write_bytes(base["model"])
        os.mkfifo(folder / "tokenizer_config.json")  # a loader opening it would block forever
        TALLY["run"] += 1
        load_model(str(folder / "case.onnx"))
    TALLY["error"] += 1


def test_a_huge_tokenizer_file_is_refused_unread(base, monkeypatch):
    import snncc.onnx_import as onnx_import

    monkeypatch.setattr(onnx_import, "MAX_TOKENIZER_BYTES", 100)
    _expect_error(base["model"], "larger than", extra={"snncc_tokenizer.json": b" " * 200 + b'{"kind": "bytes"}'})


# --- through the CLI: one line, no traceback --------------------------------------------------


def _mutated_for_cli(base: dict, kind: str) -> tuple[bytes, dict[str, bytes]]:
    model = _proto(base["model"])
    if kind == "metadata":
        for prop in model.metadata_props:
            if prop.key == "snncc.max_positions":
                prop.value = "lots"
    elif kind == "external":
        tensor = _big_initializer(model)
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        tensor.external_data.add(key="location", value="../../etc/passwd")
    elif kind == "initializer":
        _big_initializer(model).dims[:] = [-1, 3]
    elif kind == "undefined":
        _first(model, "Add").input[0] = "r2"
    elif kind == "shapes":  # well formed, but a node fails as torch.export traces it
        wide = next(t.name for t in model.graph.initializer if t.dims and t.dims[-1] not in (1, 64))
        _first(model, "Add").input[1] = wide
    return model.SerializeToString(), {"snncc_tokenizer.json": b"{not json"} if kind == "tokenizer" else {}


@pytest.mark.parametrize("kind", ["metadata", "external", "initializer", "undefined", "tokenizer", "shapes"])
def test_the_cli_reports_a_hostile_file_in_one_line(base, kind):
    model, extra = _mutated_for_cli(base, kind)
    with _case_folder() as folder:
        (folder / "case.onnx").write_bytes(model)
        (folder / "snncc_tokenizer.json").write_text(json.dumps({"kind": "bytes"}))
        for name, data in extra.items():
            (folder / name).write_bytes(data)
        before = sorted(p.name for p in folder.iterdir())
        TALLY["run"] += 1
        TALLY["cli"] += 1
        result = run_snncc(folder, "compile", "case.onnx", "--passes", "none", "--eval-tokens", "0")
        assert sorted(p.name for p in folder.iterdir()) == before
    shown = f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert result.returncode != 0 and "Traceback" not in result.stderr, shown
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("snncc: error:"), shown
    _log(lines[0])
    TALLY["error"] += 1
