"""The CLI's promise when anything is wrong: exactly one `snncc: error:` line, no traceback
(unless -v), exit 2 for a command line refused before any work and 1 for a failure while
working, 130 for Ctrl-C, and no output file written.

Most tests run the CLI in-process with click's runner and make loading a model fail the
test, which shows that the refusal came before the long work; two run `python -m snncc` to
see what a shell sees (real bytes in argv).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import snncc
import snncc.api
from snncc import cli
from snncc.calibration import read_text, text_bytes_for
from snncc.errors import InputError
from tests.snncc_process import HELP_HINT, run_fresh_snncc

PREFIX = "snncc: error:"
BAD_UTF8 = "a\udcffb"  # what click hands over for the bytes b"a\xffb" in argv


class _Loaded(BaseException):
    """Raised where the slow work would start: not an Exception, so the CLI cannot hide it."""


@pytest.fixture
def no_work(monkeypatch, tmp_path):
    """Run in an empty tmp_path where loading a model or artifact fails the test."""

    def loaded(*args, **kwargs):
        raise _Loaded("the command started working before refusing its arguments")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "_prepare", loaded)
    monkeypatch.setattr(snncc, "load", loaded)
    return tmp_path


def _id(value: tuple) -> str | None:
    """A test id from a command line (the words after it add nothing)."""
    return " ".join(value).replace(BAD_UTF8, "<bad utf-8>") if value[0] in cli.main.commands else None


def invoke(*args: str):
    return CliRunner().invoke(cli.main, list(args), catch_exceptions=False)


def assert_one_line(result, code: int, *words: str, folder: Path | None = None,
                    before: set[str] = frozenset()) -> str:
    shown = f"exit {result.exit_code}\n--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    assert result.exit_code == code, shown
    assert "Traceback" not in result.stderr, shown
    lines = result.stderr.splitlines()
    if code == 2 and len(lines) == 2 and HELP_HINT.fullmatch(lines[1]):  # click's hint under a usage error
        lines = lines[:1]
    assert len(lines) == 1 and lines[0].startswith(PREFIX) and lines[0][len(PREFIX):].strip(), shown
    for word in words:
        assert word.lower() in lines[0].lower(), f"no {word!r} in the message\n{shown}"
    if folder is not None:
        assert set(os.listdir(folder)) == set(before), shown
    return lines[0]


# --- 2. option values, devices, prompts and files: refused before any work (exit 2) ------------


@pytest.mark.parametrize(("args", "words"), [
    (("eval", "tiny-llama", "--seq-len", "0"), ("--seq-len", "0")),
    (("eval", "tiny-llama", "--seq-len", "1"), ("--seq-len", "1")),
    (("eval", "tiny-llama", "--seq-len", "-1"), ("--seq-len", "-1")),
    (("eval", "tiny-llama", "--max-tokens", "-4"), ("--max-tokens", "-4")),
    (("compile", "tiny-llama", "--calib-tokens", "-5", "-o", "x.snn"), ("--calib-tokens", "-5")),
    (("compile", "tiny-llama", "--calib-tokens", "1"), ("--calib-tokens",)),
    (("compile", "tiny-llama", "--eval-tokens", "-1", "-o", "x.snn"), ("--eval-tokens", "-1")),
    (("compile", "tiny-llama", "--eval-tokens", "1"), ("--eval-tokens", "0 or at least 2")),
    (("run", "x.snn", "--prompt", "hi", "--max-new-tokens", "-2"), ("--max-new-tokens",)),
    (("export", "x.snn", "-o", "m.onnx", "--verify-tokens", "-1"), ("--verify-tokens",)),
    (("finetune", "tiny-llama", "--checkpoint", "c.pt", "--steps", "0"), ("--steps",)),
    (("finetune", "tiny-llama", "--checkpoint", "a,b.pt"), ("--checkpoint", "a,b.pt", "pass spec")),
    (("compile", "tiny-llama", "--device", "foo", "-o", "x.snn"), ("--device", "foo")),
    (("compile", "tiny-llama", "--device", "meta", "-o", "x.snn"), ("meta", "cpu or cuda")),
    (("eval", "tiny-llama", "--device", "cuda:99"), ("cuda:99",)),
    (("run", "x.snn", "--prompt", "hi", "--device", "foo"), ("--device", "foo")),
    (("profile", "tiny-llama", "--prompt", "hi", "--device", "meta"), ("meta",)),
    (("run", "x.snn", "--prompt", BAD_UTF8), ("--prompt", "UTF-8", "0xff")),
    (("profile", "tiny-llama", "--prompt", BAD_UTF8), ("--prompt", "UTF-8")),
    (("run", "missing.snn", "--prompt", "hi"), ("missing.snn", "does not exist")),
    (("compile", "tiny-llama", "--passes", "encode,bogus"), ("bogus",)),
], ids=lambda value: _id(value))
def test_bad_values_are_refused_before_any_work(no_work, args, words):
    assert_one_line(invoke(*args), 2, *words, folder=no_work)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_refused_before_loading(no_work):
    assert_one_line(invoke("compile", "tiny-llama", "--device", "cuda", "-o", "x.snn"), 2, "CUDA", "not available",
                    folder=no_work)


def _text_files(folder: Path) -> None:
    (folder / "latin1.txt").write_bytes("caf\xe9 cr\xe8me ".encode("latin-1") * 50)
    (folder / "empty.txt").write_text(" \n")


@pytest.mark.parametrize(("args", "words"), [
    (("eval", "tiny-llama", "--text", "latin1.txt"), ("latin1.txt", "UTF-8", "0xe9", "offset 3")),
    (("compile", "tiny-llama", "--calib", "latin1.txt", "-o", "x.snn"), ("latin1.txt", "UTF-8")),
    (("debug", "tiny-llama", "--text", "empty.txt"), ("empty.txt", "empty")),
    (("compile", "tiny-llama", "--calib", "empty.txt"), ("empty.txt", "empty")),
    (("finetune", "tiny-llama", "--checkpoint", "c.pt", "--calib", "missing.txt"), ("missing.txt",)),
], ids=["eval-text-latin1", "calib-latin1", "debug-text-empty", "calib-empty", "finetune-calib-missing"])
def test_unusable_texts_are_refused_before_any_work(no_work, args, words):
    _text_files(no_work)
    before = set(os.listdir(no_work))
    assert_one_line(invoke(*args), 2, *words, folder=no_work, before=before)


# --- output paths: checked before the long work (exit 2) ----------------------------------------


@pytest.mark.parametrize(("args", "words"), [
    (("compile", "tiny-llama", "-o", "/proc/out.snn"), ("-o", "/proc")),
    (("compile", "tiny-llama", "-o", "/dev/null"), ("/dev",)),
    (("compile", "tiny-llama", "-o", "adir"), ("adir", "directory")),
    (("compile", "tiny-llama", "-o", "new/"), ("new/", "not a file name")),
    (("compile", "tiny-llama", "-o", "afile/out.snn"), ("afile", "not a directory")),
    (("export", "tiny-llama", "-o", "/proc/m.onnx"), ("/proc",)),
    (("export", "x.snn", "-o", "/proc/m.onnx"), ("x.snn", "does not exist")),
    (("profile", "tiny-llama", "--prompt", "hi", "--plot", "/proc/p.png"), ("--plot", "/proc")),
    (("debug", "tiny-llama", "--plot", "/sys/p.png"), ("--plot", "/sys")),
    (("debug", "tiny-llama", "--dump", "afile"), ("--dump", "afile", "is a file")),
    (("debug", "tiny-llama", "--dump", "/proc/dump"), ("--dump", "/proc")),
    (("finetune", "tiny-llama", "--checkpoint", "adir"), ("--checkpoint", "directory")),
    (("finetune", "tiny-llama", "--checkpoint", "/proc/c.pt"), ("--checkpoint", "/proc")),
    (("finetune", "tiny-llama", "--checkpoint", "c.pt", "--plot", "afile/p.png"), ("--plot", "not a directory")),
], ids=lambda value: _id(value))
def test_unwritable_outputs_are_refused_before_any_work(no_work, args, words):
    (no_work / "adir").mkdir()
    (no_work / "afile").write_text("in the way")
    before = set(os.listdir(no_work))
    assert_one_line(invoke(*args), 2, *words, folder=no_work, before=before)
    assert os.listdir(no_work / "adir") == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_a_read_only_folder_is_refused(no_work):
    (no_work / "ro").mkdir(mode=0o555)
    assert_one_line(invoke("compile", "tiny-llama", "-o", "ro/out.snn"), 2, "ro/out.snn", "permission", folder=no_work,
                    before={"ro"})


def test_a_folder_the_probe_cannot_write_in_is_refused(no_work, monkeypatch):
    """The probe file catches what permission bits do not show (read-only mounts, quotas, root)."""

    def refuse(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(cli.tempfile, "NamedTemporaryFile", refuse)
    assert_one_line(invoke("compile", "tiny-llama", "-o", "out.snn"), 2, "out.snn", "Read-only file system",
                    folder=no_work)


def test_a_missing_parent_is_allowed_and_the_probe_leaves_nothing(no_work):
    assert cli._check_output_path("sub/dir/out.snn") == Path("sub/dir/out.snn")
    assert os.listdir(no_work) == []


# --- 1. failures while working: one line, exit 1; -v shows the traceback -----------------------


def _compile_raises(monkeypatch, exc: BaseException) -> None:
    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(snncc.api, "compile_graph", fail)


def test_an_unexpected_exception_is_one_line_with_its_type(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _compile_raises(monkeypatch, RuntimeError("boom in a pass\nsecond line of the message"))
    args = ("compile", "tiny-llama", "--calib-tokens", "64", "--eval-tokens", "0", "-o", "out.snn")
    line = assert_one_line(invoke(*args), 1, folder=tmp_path)
    assert line == f"{PREFIX} RuntimeError: boom in a pass"

    verbose = invoke("-v", *args)
    assert verbose.exit_code == 1 and "Traceback" in verbose.stderr and "second line" in verbose.stderr
    assert verbose.stderr.splitlines()[-1] == line and os.listdir(tmp_path) == []


def test_end_of_input_is_an_error_not_an_interruption(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _compile_raises(monkeypatch, EOFError("Ran out of input"))  # torch.load of a truncated file
    line = assert_one_line(invoke("compile", "tiny-llama", "--calib-tokens", "64", "--eval-tokens", "0"), 1)
    assert line == f"{PREFIX} EOFError: Ran out of input"


def test_an_exception_without_a_message_is_named_by_its_type(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _compile_raises(monkeypatch, MemoryError())
    line = assert_one_line(invoke("compile", "tiny-llama", "--calib-tokens", "64", "--eval-tokens", "0"), 1)
    assert line == f"{PREFIX} MemoryError"


def test_ctrl_c_exits_130(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _compile_raises(monkeypatch, KeyboardInterrupt())
    result = invoke("compile", "tiny-llama", "--calib-tokens", "64", "--eval-tokens", "0", "-o", "out.snn")
    assert result.exit_code == 130 and result.stderr == "snncc: interrupted\n" and os.listdir(tmp_path) == []


def test_a_snncc_error_while_working_exits_1(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_one_line(invoke("compile", "no-such-model", "-o", "out.snn"), 1, "no-such-model", folder=tmp_path)


# --- what a shell sees ------------------------------------------------------------------------


def test_invalid_utf8_bytes_in_argv(tmp_path):
    result = run_fresh_snncc(tmp_path, "profile", "tiny-llama", "--prompt", b"caf\xe9")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"{PREFIX} --prompt is not valid UTF-8 (byte 0xe9"), result.stderr


def test_unknown_option_is_a_usage_error(tmp_path):
    result = run_fresh_snncc(tmp_path, "compile", "tiny-llama", "--no-such-option")
    error, hint = result.stderr.splitlines()
    assert result.returncode == 2 and error.startswith(PREFIX) and hint == "Try 'snncc compile -h' for help."


# --- 3. texts: a bounded prefix, strict UTF-8 ---------------------------------------------------


def test_read_text_reads_only_what_the_tokens_need(tmp_path):
    path = tmp_path / "big.txt"
    path.write_bytes(b"spikes " * 300_000 + b"\xff never read")  # 2 MB, invalid past the prefix
    text = read_text(path, 100)
    assert len(text) == text_bytes_for(100) < 2**20  # 64 bytes a token: enough for any tokenizer


def test_read_text_drops_a_character_cut_by_the_prefix(tmp_path):
    limit = text_bytes_for(10)
    path = tmp_path / "cut.txt"
    path.write_bytes(b"a" * (limit - 1) + "\u00e9".encode() + b"tail")  # the 2-byte e-acute straddles the end
    assert read_text(path, 10) == "a" * (limit - 1)


def test_read_text_refuses_invalid_utf8_with_its_offset(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"\xef\xbb\xbfgood text \x80 then more")  # a byte-order mark, then a stray byte
    with pytest.raises(InputError, match=r"byte 0x80 at offset 13"):
        read_text(path)
    path.write_bytes(b"\xef\xbb\xbfgood text")
    assert read_text(path) == "good text"


def test_read_text_refuses_what_is_not_a_regular_file(tmp_path):
    with pytest.raises(InputError, match="not a regular file"):
        read_text(tmp_path)


# --- plots are written atomically ---------------------------------------------------------------


def test_a_plot_that_fails_while_saving_leaves_no_file(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from snncc.plots import _save

    fig = plt.figure()

    def half_then_fail(path, **kwargs):
        Path(path).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    fig.savefig = half_then_fail
    with pytest.raises(OSError):
        _save(fig, tmp_path / "plot.png", dpi=72)
    assert os.listdir(tmp_path) == []
    _save(plt.figure(), tmp_path / "plot.png", dpi=72)
    assert os.listdir(tmp_path) == ["plot.png"] and (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
