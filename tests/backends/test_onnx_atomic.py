"""ONNX export writes land all or nothing: a model and its external data file appear together
or not at all, and a failed export leaves earlier files as they were and no temporaries.

The program is replaced by a one-MatMul model (export_onnx's own translation is tested in
test_onnx.py); only the writing is under test here, so each test takes well under a second.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import snncc.backends.onnx as onnx_backend
from snncc.backends.onnx import export_onnx

WEIGHT = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)


def _tiny_model():
    """An onnx_ir model with one weight, standing in for a translated program."""
    import onnx_ir

    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
                              [numpy_helper.from_array(WEIGHT, "w")])
    return onnx_ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


@pytest.fixture(autouse=True)
def tiny_translation(monkeypatch):
    monkeypatch.setattr(onnx_backend, "to_onnx", lambda program, fmt="onnx", progress=False: _tiny_model())


def _weight(path: Path) -> np.ndarray:
    model = onnx.load(str(path))  # reads the external data file, if any, beside the model
    return numpy_helper.to_array(model.graph.initializer[0])


def test_external_data_lands_beside_the_model(tmp_path):
    report = export_onnx(None, tmp_path / "m.onnx", external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]  # no temporaries left
    assert report.external_data == tmp_path / "m.onnx.data" and report.external_data.stat().st_size >= WEIGHT.nbytes
    assert np.array_equal(_weight(tmp_path / "m.onnx"), WEIGHT)


def test_an_export_without_external_data_is_one_file(tmp_path):
    export_onnx(None, tmp_path / "m.onnx", external_data=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert np.array_equal(_weight(tmp_path / "m.onnx"), WEIGHT)


# os.replace calls of an export with external data, in order: scratch data -> its temporary,
# scratch model -> its temporary, data temporary -> data file, model temporary -> model file.
@pytest.mark.parametrize("failing_call", [1, 2, 3, 4])
def test_a_failed_write_leaves_earlier_files_and_no_temporaries(tmp_path, monkeypatch, failing_call):
    (tmp_path / "m.onnx").write_bytes(b"old model")
    (tmp_path / "m.onnx.data").write_bytes(b"old data")
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == failing_call:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="No space"):
        export_onnx(None, tmp_path / "m.onnx", external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert (tmp_path / "m.onnx").read_bytes() == b"old model" and (tmp_path / "m.onnx.data").read_bytes() == b"old data"


def test_without_hard_links_the_previous_data_file_is_copied_and_restored(tmp_path, monkeypatch):
    (tmp_path / "m.onnx").write_bytes(b"old model")
    (tmp_path / "m.onnx.data").write_bytes(b"old data")
    real_replace = os.replace

    def no_link(src, dst):
        raise OSError(1, "Operation not permitted")

    def replace(src, dst):
        if Path(dst) == tmp_path / "m.onnx":
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "link", no_link)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="No space"):
        export_onnx(None, tmp_path / "m.onnx", external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert (tmp_path / "m.onnx.data").read_bytes() == b"old data"


def test_a_failed_model_move_removes_a_new_data_file(tmp_path, monkeypatch):
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == tmp_path / "m.onnx":
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="No space"):
        export_onnx(None, tmp_path / "m.onnx", external_data=True)
    assert not any(tmp_path.iterdir())


def test_the_data_file_is_in_place_before_the_model(tmp_path, monkeypatch):
    real_replace, placed = os.replace, []

    def replace(src, dst):
        real_replace(src, dst)
        if Path(dst).parent == tmp_path and not Path(dst).name.startswith("."):
            placed.append(Path(dst).name)

    monkeypatch.setattr(os, "replace", replace)
    export_onnx(None, tmp_path / "m.onnx", external_data=True)
    assert placed == ["m.onnx.data", "m.onnx"]


def test_a_failed_save_writes_nothing(tmp_path, monkeypatch):
    import onnx_ir

    def save(model, path, external_data=None):
        Path(path).write_bytes(b"half a model")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx_ir, "save", save)
    with pytest.raises(OSError):
        export_onnx(None, tmp_path / "m.onnx", external_data=True)
    assert not any(tmp_path.iterdir())
