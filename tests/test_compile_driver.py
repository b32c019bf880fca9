"""The compile driver: a pipeline stopped after a pass and continued from its artifact equals the
one-shot compile bit for bit; what it refuses; the graph dump; what a partial artifact may hold."""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import re
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import snncc
from snncc import cli
from snncc.api import compile_graph
from snncc.cli import main
from snncc.debug import GraphDump
from snncc.errors import ArtifactError, PipelineError
from snncc.pipeline import DEFAULT_T, PASSES, PIPELINES, STANDARD_T, Pipeline
from snncc.resume import RUN_THE_ANN
from tests.conftest import prepared

MODEL, T = "tiny-llama", 8
IDS = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(0))


@functools.cache
def one_shot_logits() -> torch.Tensor:
    """Logits of tiny-llama compiled with `las` in one go, saved and loaded."""
    with torch.no_grad():
        return _saved(compile_graph(*prepared(MODEL), "las", T), Path(_tmp()) / "one-shot.snn")(IDS)


@functools.cache
def _tmp() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="snncc-driver-")


def _saved(program, path: Path):
    program.save(path)
    return snncc.load(path)


def _cli(*args: str, code: int = 0):
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == code, result.output
    return result


def _partial(stop_after: str, path: Path) -> Path:
    compile_graph(*prepared(MODEL), "las", T, stop_after=stop_after).save(path)
    return path


@pytest.mark.parametrize("stop_after", ["nonlinear", "encode"])
def test_a_compile_stopped_and_continued_equals_the_one_shot_compile(tmp_path, stop_after):
    partial = snncc.load(_partial(stop_after, tmp_path / "partial.snn"))
    ran = PIPELINES["las"][:PIPELINES["las"].index(stop_after) + 1]
    assert [r["name"] for r in partial.info.passes] == list(ran)
    assert partial.info.remaining == list(PIPELINES["las"][len(ran):])
    with torch.no_grad():
        assert partial(IDS).shape == one_shot_logits().shape  # a runnable program on its own
    full = _saved(snncc.compile(tmp_path / "partial.snn", "las", T, start_after=stop_after), tmp_path / "full.snn")
    assert full.info.remaining == [] and full.resume is None
    assert [r["name"] for r in full.info.passes] == list(PIPELINES["las"])
    with torch.no_grad():
        assert torch.equal(full(IDS), one_shot_logits())


def test_the_cli_splits_after_fold_dumps_each_pass_and_equals_the_one_shot_compile(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "_prepare", lambda model, calib, tokens: prepared(model, tokens))  # traced once
    part, full = tmp_path / "part.snn", tmp_path / "full.snn"
    out = _cli("compile", MODEL, "-T", str(T), "--calib-tokens", "1024", "--eval-tokens", "0", "--stop-after", "fold",
               "-o", str(part), "--dump", str(tmp_path / "first")).stdout
    assert "stopped after fold, to run: nonlinear, attention" in out
    _cli("compile", str(part), "-T", str(T), "--eval-tokens", "0", "--start-after", "fold", "-o", str(full),
         "--dump", str(tmp_path / "rest"))
    assert sorted(p.name for p in (tmp_path / "first").iterdir()) == ["00-input.txt", "01-fold.txt"]
    rest = sorted(p.name for p in (tmp_path / "rest").iterdir())
    assert rest == ["00-input.txt", "02-nonlinear.txt", "03-attention.txt", "04-outlier.txt", "05-ffn.txt",
                    "06-encode.txt", "07-portable.txt"]
    # The continuation starts from the graph the first part ended with, shapes restored.
    assert (tmp_path / "rest" / "00-input.txt").read_text() == (tmp_path / "first" / "01-fold.txt").read_text()
    assert "snn.spike_linear" in (tmp_path / "rest" / "06-encode.txt").read_text()
    assert "snn.spike_linear" not in (tmp_path / "rest" / "05-ffn.txt").read_text()
    with torch.no_grad():
        assert torch.equal(snncc.load(full)(IDS), one_shot_logits())


def test_graph_dump_names_files_by_pass_position(tmp_path):
    compile_graph(*prepared(MODEL), "fold,encode", T, instrument=GraphDump(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00-input.txt", "01-fold.txt", "02-encode.txt"]
    assert "snn.mt_encode" in (tmp_path / "02-encode.txt").read_text()
    assert "snn.mt_encode" not in (tmp_path / "00-input.txt").read_text()


@pytest.mark.parametrize("args, words", [
    (["--stop-after", "bogus"], ["stop after 'bogus'", "fold, nonlinear"]),
    (["--passes", "encode", "--stop-after", "fold"], ["no such pass in 'encode'"]),
    (["--passes", "fas", "--stop-after", "fold"], ["'qcfs' runs after it", "teacher"]),
    (["--start-after", "fold"], ["give its .snn file"]),
])
def test_refusals_before_any_model_loads(args, words):
    result = _cli("compile", MODEL, *args, code=2)
    _one_error_line(result, words)


@pytest.mark.parametrize("args, words", [
    (["-T", str(T), "--start-after", "fold"], ["ran fold, nonlinear", "start after nonlinear"]),
    (["-T", "12", "--start-after", "nonlinear"], ["'nonlinear' ran with T=8", "gives it T=12"]),
    (["--start-after", "nonlinear"], [f"gives it T={DEFAULT_T['las']}"]),
    (["-T", str(T), "--passes", "fas", "--start-after", "nonlinear"], ["'fas' does not begin with them"]),
    (["-T", str(T), "--start-after", "nonlinear", "--stop-after", "fold"], ["must come after nonlinear"]),
    (["-T", str(T), "--start-after", "nonlinear", "--calib-tokens", "512"], ["--calib-tokens", "artifact carries"]),
    (["-T", str(T)], ["is a compiled program", "--start-after PASS"]),
])
def test_a_continuation_that_does_not_match_the_artifact_is_refused(tmp_path, args, words):
    part = _partial("nonlinear", tmp_path / "part.snn")
    _one_error_line(_cli("compile", str(part), *args, "--eval-tokens", "0", code=2), words)


def test_a_complete_program_cannot_be_continued(tmp_path):
    path = tmp_path / "full.snn"
    compile_graph(*prepared(MODEL), "fold,encode", T).save(path)
    with pytest.raises(PipelineError, match="is complete"):
        snncc.compile(path, "fold,encode", T, start_after="fold")


def _one_error_line(result, words: list[str]) -> None:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("snncc: error:") and "Traceback" not in result.output, result.output
    for word in words:
        assert word in lines[0], lines[0]


def test_the_pipeline_is_parsed_once_with_its_default_T():
    assert Pipeline.parse("las").T == DEFAULT_T["las"] and Pipeline.parse("fold,encode").T == STANDARD_T
    assert Pipeline.parse("fold,encode", 6).steps == 6 and Pipeline.parse("none").steps == 0
    assert Pipeline.parse("fold").steps == STANDARD_T  # no pass with a T: the spec's own


# --- what a partial artifact may hold --------------------------------------------------------


@functools.cache
def _partial_members() -> dict[str, bytes]:
    path = _partial("attention", Path(_tmp()) / "members.snn")
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def _edited(path: Path, edit) -> Path:
    """The partial artifact with its manifest edited and its sums recomputed (as an attacker would)."""
    members = dict(_partial_members())
    manifest = json.loads(members["manifest.json"])
    edit(manifest, members)
    manifest["sha256"] = {n: hashlib.sha256(d).hexdigest() for n, d in members.items() if n != "manifest.json"}
    members["manifest.json"] = json.dumps(manifest).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def _without_state(manifest, members):
    del members["resume.safetensors"]


def _tensors(members, **changes):
    import safetensors.torch

    tensors = safetensors.torch.load(members["resume.safetensors"])
    members["resume.safetensors"] = safetensors.torch.save({**tensors, **changes})


def _first_range(members) -> str:
    import safetensors.torch

    return next(k for k in safetensors.torch.load(members["resume.safetensors"]) if k.startswith("range."))


@pytest.mark.parametrize("edit, message", [
    (_without_state, "disagree"),
    (lambda m, _: m["info"].update(remaining=[]), "disagree"),
    (lambda m, _: m["info"].update(remaining=["bad name!"]), "passes still to run"),
    (lambda m, _: m["resume"]["shapes"].update(not_a_node="float32[seq]"), "node shapes or names"),
    (lambda m, _: m["resume"]["reserved_names"].append("print('x')"), "not a valid name"),
    (lambda m, _: m["resume"]["name_counts"].update(add=-1), "name counts"),
    (lambda m, members: _tensors(members, **{"batch.0": torch.full((1, 8), 10**6)}), "token ids"),
    (lambda m, members: _tensors(members, **{"batch.7000": torch.zeros(1, 8, dtype=torch.long)}), "numbered"),
    (lambda m, members: _tensors(members, **{_first_range(members): -torch.ones(3)}), "calibration range"),
])
def test_a_tampered_partial_artifact_is_refused(tmp_path, edit, message):
    with pytest.raises(ArtifactError, match=message):
        snncc.load(_edited(tmp_path / "tampered.snn", edit))


def test_a_shape_that_the_graph_does_not_compute_stops_the_continuation(tmp_path):
    def wrong_shape(manifest, _):
        name = next(n for n, shape in manifest["resume"]["shapes"].items() if shape.startswith("float32[batch"))
        manifest["resume"]["shapes"][name] = "float64[batch, seq, 3]"

    path = _edited(tmp_path / "tampered.snn", wrong_shape)
    with pytest.raises(PipelineError, match="was float64\\[batch, seq, 3\\] when it was saved"):
        snncc.compile(path, "las", T, start_after="attention")


def test_the_passes_kept_before_any_stop_are_those_that_read_the_ann():
    """A pass that runs the ANN (ctx.teacher, ctx.ann) cannot run after a stop (resume.RUN_THE_ANN)."""
    readers = {name for name, cls in PASSES.items()
               if re.search(r"ctx\.(teacher|ann)\b", inspect.getsource(sys.modules[cls.__module__]))}
    assert readers == RUN_THE_ANN
