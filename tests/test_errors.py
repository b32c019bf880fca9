"""snncc's exceptions: each is a SnnccError and a standard exception a Python caller catches
(ValueError, FileNotFoundError for what is not there, ImportError for a missing optional
package), and no message the library raises speaks of the command line's options or commands:
that wording belongs to snncc/cli.py."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import snncc
import snncc.ir.incremental  # noqa: F401  (defines CacheError)
import snncc.ir.verify  # noqa: F401  (defines VerificationError)
from snncc import errors
from snncc.calibration import read_text
from snncc.cli import main
from snncc.errors import SnnccError

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("snncc", "backends", "passes")
CLI = ROOT / "snncc" / "cli.py"
STANDARD = (ValueError, FileNotFoundError, ImportError)


def _subclasses(cls: type) -> Iterator[type]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def test_every_error_is_a_snncc_error_and_a_standard_exception():
    public = [cls for cls in vars(errors).values()
              if isinstance(cls, type) and issubclass(cls, SnnccError) and cls is not SnnccError]
    assert {"ModelError", "ModelNotFoundError", "ArtifactNotFoundError", "InputNotFoundError"} <= \
        {cls.__name__ for cls in public}
    for cls in {*public, *_subclasses(SnnccError)}:
        assert issubclass(cls, STANDARD), f"{cls.__name__} is none of {', '.join(s.__name__ for s in STANDARD)}"
    not_found = [cls for cls in public if cls.__name__.endswith("NotFoundError")]
    assert not_found and all(issubclass(cls, FileNotFoundError) for cls in not_found)


def test_a_not_found_error_reads_as_its_message_alone():
    """The CLI prints str(exc): one argument keeps OSError's '[Errno ...]' form out of it."""
    exc = errors.ArtifactNotFoundError("artifact 'x.snn' does not exist")
    assert str(exc) == "artifact 'x.snn' does not exist" and exc.errno is None


# --- no CLI wording in library messages ---------------------------------------------------


def _cli_words() -> re.Pattern:
    """The CLI's long options and its `snncc COMMAND` invocations, read from the click group."""
    options = {opt for command in [main, *main.commands.values()] for param in command.params
               for opt in [*param.opts, *param.secondary_opts] if opt.startswith("--")}
    options |= {"--help", "--version"}
    commands = "|".join(map(re.escape, sorted(main.commands)))
    flags = "|".join(map(re.escape, sorted(options, key=len, reverse=True)))
    return re.compile(rf"(?<![\w-])(?:{flags})(?![\w-])|\bsnncc (?:{commands})\b")


def _texts(node: ast.AST) -> Iterator[str]:
    """The string constants under `node`; an f-string as one text, '{}' for each value."""
    if isinstance(node, ast.JoinedStr):
        yield "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
        return
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        yield node.value
    for child in ast.iter_child_nodes(node):
        yield from _texts(child)


def _raised_texts(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """(line, text) of each string in a `raise X(...)`'s arguments, and in what is assigned in
    the same scope to the names those arguments use (a hint built before the raise)."""
    for scope in ast.walk(tree):
        if not isinstance(scope, ast.Module | ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        assigned: dict[str, list[ast.AST]] = {}
        for node in ast.walk(scope):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        assigned.setdefault(target.id, []).append(node.value)
        for node in ast.walk(scope):
            if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)):
                continue
            parts = [*node.exc.args, *(keyword.value for keyword in node.exc.keywords)]
            names = {name.id for part in parts for name in ast.walk(part) if isinstance(name, ast.Name)}
            parts += [value for name in sorted(names) for value in assigned.get(name, [])]
            for part in parts:
                for text in _texts(part):
                    yield node.lineno, text


def test_library_messages_carry_no_cli_wording():
    pattern = _cli_words()
    assert pattern.search("use --device cpu") and pattern.search("run `snncc compile MODEL -o x`")
    assert not pattern.search("pip install --no-deps x") and not pattern.search("use the CPU (device 'cpu')")
    found = []
    for folder in LIBRARY:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == CLI:
                continue
            for line, text in _raised_texts(ast.parse(path.read_text(encoding="utf-8"))):
                if match := pattern.search(text):
                    found.append(f"{path.relative_to(ROOT)}:{line}: {match.group()!r} in {text!r}")
    assert not found, "CLI wording in library exceptions (say it in library terms):\n" + "\n".join(found)


# --- the API raises the standard types ----------------------------------------------------


def test_loading_a_missing_artifact_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        snncc.load(tmp_path / "missing.snn")
    with pytest.raises(SnnccError):
        snncc.load(tmp_path / "missing.snn")


def test_an_unknown_model_or_text_file_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="unknown model"):
        snncc.compile(str(tmp_path / "no" / "such-model"), passes="fold")
    with pytest.raises(FileNotFoundError, match="does not exist"):  # what compile(calib=...) reads
        read_text(tmp_path / "missing.txt")


def test_an_unknown_pass_is_a_value_error():
    with pytest.raises(ValueError, match="bogus"):  # refused before the model loads
        snncc.compile("tiny-llama", passes="fold,bogus")
    with pytest.raises(ValueError, match="no such pass"):
        snncc.compile("tiny-llama", passes="fold,encode", stop_after="nonlinear")
