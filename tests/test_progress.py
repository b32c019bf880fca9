"""Progress on stderr (snncc.progress): each long phase shows its own label where progress is on,
and nothing shows where it is left to its default and stderr is not a terminal."""

from __future__ import annotations

import ast
import io
import os
from pathlib import Path

import pytest

import snncc
from snncc.api import compile_graph, prepare
from snncc.backends.event import EventBackend, EventExecutor
from snncc.progress import bar, enabled, phase
from tests.conftest import compiled, heldout_ids
from tests.snncc_process import run_snncc

ROOT = Path(__file__).resolve().parents[1]
# What a progress display draws (tqdm's bar, a phase's ellipsis), never in a quiet run's stderr.
_DRAWN = ("%|", "…", "loading tiny-llama", "tracing tiny-llama", "recording calibration activations", "compiling",
          "passes:")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_enabled_follows_the_flag_and_for_none_the_terminal(monkeypatch):
    assert enabled(True) and not enabled(False)
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert not enabled(None)
    monkeypatch.setattr("sys.stderr", _Terminal())
    assert enabled(None)


def test_phase_shows_its_label_and_how_long_it_took(capsys):
    with phase("loading a thing", True, "loaded a thing"):
        pass
    with phase("quiet", None):  # pytest's stderr is no terminal
        pass
    err = capsys.readouterr().err
    assert "loading a thing…" in err
    assert "loaded a thing in " in err
    assert "quiet" not in err


def test_a_terminal_that_reports_no_size_still_gets_the_bar(monkeypatch):
    """A pseudo-terminal never sized (0 x 0: `script` in the background) would get nothing from tqdm."""
    terminal = _Terminal()
    terminal.fileno = lambda: 2
    monkeypatch.setattr("sys.stderr", terminal)
    monkeypatch.setattr("snncc.progress.os.get_terminal_size", lambda fd: os.terminal_size((0, 0)))
    for _ in bar(range(3), desc="counting", leave=True):
        pass
    assert "counting: 100%" in terminal.getvalue()


def test_phase_that_fails_leaves_no_closing_line(capsys):
    with pytest.raises(ValueError), phase("failing", True, "failed"):
        raise ValueError("no")
    assert "failed in" not in capsys.readouterr().err


def test_compile_save_and_load_show_every_phase(tmp_path, capfd):
    loaded, ann, ctx = prepare("tiny-llama", calib_tokens=64, progress=True)
    compile_graph(loaded, ann, ctx, "fold,encode", by_block=False)  # whole model: a bar over the passes
    program = compile_graph(loaded, ann, ctx, "fold", save_to=tmp_path / "p.snn")  # block by block
    snncc.load(tmp_path / "p.snn", progress=True)
    program.save(tmp_path / "q.snn", progress=True)
    err = capfd.readouterr().err
    for label in ("loading tiny-llama", "loaded tiny-llama in", "tracing tiny-llama", "traced tiny-llama in",
                  "passes:", "encode", "recording calibration activations", "compiling:", "pass fold",
                  "wrote p.snn in", "loading p.snn", "loaded p.snn in", "saving q.snn", "saved q.snn in"):
        assert label in err, label
    assert "calibrating" not in err  # the calibrate pass's label, not the recording's


def test_progress_left_to_its_default_is_quiet_off_a_terminal(tmp_path, capfd):
    program = snncc.compile("tiny-llama", passes="none", calib_tokens=64, save_to=tmp_path / "p.snn")
    snncc.load(tmp_path / "p.snn")
    program.generate_text("ab", 2)
    err = capfd.readouterr().err
    assert not [drawn for drawn in _DRAWN if drawn in err], err


def test_no_two_bars_share_a_label():
    """Every tqdm bar's `desc` (its leading text where it is an f-string) is its own."""
    labels: dict[str, str] = {}
    for folder in ("snncc", "passes", "backends"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                for keyword in getattr(node, "keywords", []) if isinstance(node, ast.Call) else []:
                    if keyword.arg == "desc":
                        label = _leading_text(keyword.value)
                        assert label not in labels, f"{path.name} and {labels[label]} both label a bar {label!r}"
                        labels[label] = path.name
    assert "recording calibration activations" in labels
    assert "calibrating" not in labels


def _leading_text(value: ast.expr) -> str:
    if isinstance(value, ast.JoinedStr):
        value = value.values[0]
    return value.value if isinstance(value, ast.Constant) else ast.unparse(value)


def test_event_backend_counts_each_spiking_op_once_per_run_and_keeps_quiet_while_generating(tmp_path, capfd):
    program = compiled("tiny-llama", "encode", 4)
    ids = heldout_ids("tiny-llama")[:1, :8]
    backend = EventBackend(program.graph_module, progress=True)
    backend(ids)
    ops = len(EventExecutor(program.graph_module).spiking)
    err = capfd.readouterr().err
    assert "event-driven run" in err and f"/{ops} [" in err  # the run's ops, each once (not ops x T)
    program.save(tmp_path / "p.snn", progress=False)
    event = snncc.load(tmp_path / "p.snn", backend="event", progress=True)
    capfd.readouterr()
    event.generate_text("ab", 2, progress=True)
    err = capfd.readouterr().err
    assert "generating" in err and "event-driven run" not in err  # one bar for the loop, none per token


@pytest.mark.parametrize("model", ["tiny-gpt2", pytest.param("smollm2-135m", marks=pytest.mark.slow)])
def test_a_piped_command_prints_nothing_on_stderr(tmp_path, model):
    """No bar, status line or library warning when stderr is no terminal: transformers' own bars
    while it loads (GGUF conversion, weights) and the tiny models' config warnings included."""
    result = run_snncc(tmp_path, "inspect", model)
    assert result.returncode == 0 and result.stderr == ""
