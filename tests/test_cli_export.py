"""`snncc export` in-process with click's runner: the bundle it writes reads back, a
verification beyond its tolerance fails in one line with the files kept, and a NIR export that
cannot succeed is refused before the compile, naming a pipeline that exports.

The program comes from the shared tiny-model fixtures (cli._program replaced), so no test
compiles or calibrates more than they do."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

import snncc.backends.onnx as onnx_backend
import snncc.cli as cli
from snncc.backends.nir import refusal
from snncc.numerics import EXPORT_TOLERANCES
from snncc.onnx_import import load_onnx
from snncc.pipeline import Pipeline
from tests.conftest import compiled


def _invoke(*args: str):
    return CliRunner().invoke(cli.main, list(args), catch_exceptions=False)


def test_a_verification_beyond_the_tolerance_fails_in_one_line_and_the_bundle_stays(tmp_path, monkeypatch):
    """tiny-bert's ANN: an encoder, whose ONNX import finds no tokenizer unless one is beside it.
    onnxruntime's output is moved by 1e-2, beyond the default tolerance wherever |reference| < 90."""
    monkeypatch.setattr(cli, "_program", lambda *args, **kwargs: compiled("tiny-bert", "none"))
    run = onnx_backend.OnnxRuntimeExecutor.__call__
    monkeypatch.setattr(onnx_backend.OnnxRuntimeExecutor, "__call__", lambda self, ids: run(self, ids) + 1e-2)
    out = tmp_path / "bundle" / "model.onnx"
    result = _invoke("export", "tiny-bert", "--passes", "none", "--verify-tokens", "8", "-o", str(out))
    assert result.exit_code == 1, result.output
    (line,) = result.stderr.splitlines()
    atol, rtol = EXPORT_TOLERANCES["onnx"]
    assert line.startswith("snncc: error: verification failed: onnxruntime")
    assert "by up to 1.00e-02 (max abs error" in line, line
    assert f"--atol {atol:g} + --rtol {rtol:g}" in line and "relax --atol/--rtol" in line and "stay" in line
    assert sorted(p.name for p in out.parent.iterdir()) == ["README.md", "model.onnx", "model.snncc.json",
                                                            "snncc_tokenizer.json"]
    meta = json.loads((out.parent / "model.snncc.json").read_text())
    check = meta["verification"]
    assert check["passed"] is False and check["mismatched"] > 0 and check["tokens"] == 8
    assert (check["atol"], check["rtol"]) == (atol, rtol) and 0.99e-2 < check["max_abs_error"] < 1.01e-2
    assert meta["inputs"][0]["name"] == "input_ids" and meta["outputs"][0]["shape"][-1] == 64
    assert load_onnx(out).task == "encoder"  # the round trip: `compile` and `inspect` read the tokenizer beside it


@pytest.mark.parametrize(("passes", "T", "spec"), [("las", None, "fas,qcfs{L=8,multirange=0}"),
                                                   ("fas", None, "fas,qcfs{L=8,multirange=0}"),
                                                   ("fas", "4", "fas,qcfs{L=4,multirange=0}")])
def test_a_nir_export_that_cannot_succeed_is_refused_before_the_compile(tmp_path, monkeypatch, passes, T, spec):
    monkeypatch.setattr(cli, "_program", lambda *args, **kwargs: pytest.fail("compiled before refusing"))
    result = _invoke("export", "tiny-llama", "--passes", passes, *(["-T", T] if T else []), "--format", "nir",
                     "-o", str(tmp_path / "m.nir"))
    assert result.exit_code == 2 and not any(tmp_path.iterdir())
    (line,) = result.stderr.splitlines()
    assert "NIR" in line and re.findall(r'the pipeline "([^"]+)"', line) == [spec], line
    for steps in (T and int(T), None):  # the named pipeline exports at the same -T and without one
        assert refusal(Pipeline.parse(spec, steps)) is None
