"""The ONNX export bundle: the model, its tokenizer (where snncc's ONNX frontend reads it),
metadata and a README land in the model's folder together, or nothing changes there; other
files in the folder stay.

The program's translation is replaced by a one-MatMul model, as in test_onnx_atomic.py (the
translation is tested in test_onnx.py, the verification through the CLI in
tests/test_cli_export.py), so each test takes well under a second.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

import snncc.backends.bundle as bundle_module
import snncc.backends.onnx as onnx_backend
from snncc.backends.bundle import README_MARK, export_bundle
from snncc.errors import ExportError
from snncc.models import CAUSAL_LM
from snncc.onnx_import import _tokenizer_beside
from snncc.program import ProgramInfo
from snncc.tokenizer import ByteTokenizer, HFTokenizer
from tests.backends.test_onnx_atomic import _tiny_model

BUNDLE = ["README.md", "model.onnx", "model.snncc.json", "snncc_tokenizer.json"]


@pytest.fixture(autouse=True)
def tiny_translation(monkeypatch):
    monkeypatch.setattr(onnx_backend, "to_onnx", lambda program, fmt="onnx", progress=None: _tiny_model())


def _program(tokenizer=None):
    info = ProgramInfo("tiny-llama", CAUSAL_LM, "las", 14, 128, 256, coverage={"coverage": 0.875})
    return SimpleNamespace(info=info, tokenizer=tokenizer or ByteTokenizer())


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_the_bundle_lands_beside_the_model_with_its_metadata(tmp_path):
    bundle = export_bundle(_program(), tmp_path / "out" / "model.onnx")
    folder = tmp_path / "out"
    assert sorted(p.name for p in folder.iterdir()) == BUNDLE  # no temporaries left
    assert bundle.files[-1] == folder / "model.onnx"  # the model moves in last
    meta = json.loads((folder / "model.snncc.json").read_text())
    assert meta == bundle.metadata
    assert {k: meta[k] for k in ("model", "task", "pipeline", "T", "coverage", "format", "max_positions")} == {
        "model": "tiny-llama", "task": CAUSAL_LM, "pipeline": "las", "T": 14, "coverage": 0.875, "format": "onnx",
        "max_positions": 128}
    assert meta["opsets"] == {"": 18} and meta["verification"] is None and meta["snncc_version"]
    assert meta["inputs"] == [{"name": "x", "dtype": "float32", "shape": [1, 64], "meaning": ""}]
    assert meta["files"] == {"model": "model.onnx", "external_data": None, "metadata": "model.snncc.json"}
    readme = (folder / "README.md").read_text()
    assert readme.startswith(README_MARK) and "model.onnx" in readme and "not run at export" in readme


def test_a_hugging_face_tokenizer_is_found_where_the_onnx_frontend_reads_it(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = models.WordLevel({"[UNK]": 0, "spikes": 1, "not": 2, "numbers": 3}, unk_token="[UNK]")
    backend = Tokenizer(words)
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = HFTokenizer(PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]"))
    export_bundle(_program(tokenizer), tmp_path / "model.onnx")
    assert {"tokenizer.json", "snncc_tokenizer.json"} <= {p.name for p in tmp_path.iterdir()}
    found = _tokenizer_beside(tmp_path / "model.onnx", CAUSAL_LM, 4)
    assert isinstance(found, HFTokenizer) and found.encode("spikes not numbers") == [1, 2, 3]


def test_other_files_and_a_readme_snncc_did_not_write_stay(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "README.md").write_text("# my project\n")
    (tmp_path / "model.onnx").write_bytes(b"an older export")
    bundle = export_bundle(_program(), tmp_path / "model.onnx")
    assert bundle.readme_kept == tmp_path / "README.md"
    assert (tmp_path / "README.md").read_text() == "# my project\n" and (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / "model.onnx").read_bytes() != b"an older export"
    (tmp_path / "README.md").unlink()
    export_bundle(_program(), tmp_path / "model.onnx")  # snncc's own README is rewritten by the next export
    assert (tmp_path / "README.md").read_text().startswith(README_MARK)
    assert export_bundle(_program(), tmp_path / "model.onnx").readme_kept is None


def test_a_failed_move_puts_the_previous_bundle_back(tmp_path, monkeypatch):
    export_bundle(_program(), tmp_path / "model.onnx")
    (tmp_path / "notes.txt").write_text("mine")
    before = _contents(tmp_path)
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == tmp_path / "model.onnx" and ".snncc-tmp" in str(src) and "previous" not in str(src):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="No space"):
        export_bundle(_program(), tmp_path / "model.onnx")
    assert _contents(tmp_path) == before  # the metadata and README already moved are put back


def test_a_failed_check_writes_nothing_and_never_outside_the_folder(tmp_path, monkeypatch):
    folder = tmp_path / "out"
    folder.mkdir()

    def refuse(path, progress=None):
        raise ExportError("the exported model fails onnx.checker")

    monkeypatch.setattr(bundle_module, "check_onnx", refuse)
    with pytest.raises(ExportError):
        export_bundle(_program(), folder / "model.onnx")
    assert list(tmp_path.iterdir()) == [folder] and not any(folder.iterdir())


def test_a_model_named_as_a_bundle_file_is_refused(tmp_path):
    with pytest.raises(ExportError, match="snncc_tokenizer.json"):
        export_bundle(_program(), tmp_path / "snncc_tokenizer.json")
    assert not any(tmp_path.iterdir())


def test_the_metadata_is_plain_json(tmp_path):
    export_bundle(_program(), tmp_path / "model.onnx")
    text = (tmp_path / "model.snncc.json").read_text()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in the metadata"))
    assert "np." not in text
