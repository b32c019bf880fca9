"""Optional packages (pyproject.toml's extras): snncc's core runs without them, and a command or
function that needs a missing one fails with one line naming the extra that installs it.

A missing package is simulated in-process (`sys.modules[name] = None` makes its import fail);
the core's independence from them is checked in a child interpreter that blocks them all.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from snncc.cli import main
from snncc.errors import OPTIONAL_PACKAGES, MissingDependencyError, SnnccError, require
from tests.conftest import compiled
from tests.snncc_process import TIMEOUT, snncc_env

REPO = Path(__file__).resolve().parent.parent
HARD = {"torch", "transformers", "accelerate", "psutil", "safetensors", "click", "tqdm"}
EXTRAS = {"onnx", "nir", "plots", "gguf", "kernels"}


def _project() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9._-]+", requirement).group(0).lower()


def _missing(monkeypatch, *modules: str) -> None:
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


def _cli(*args: str):
    """The CLI in-process: (exit code, stderr lines)."""
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stderr.splitlines()


# --- the extras and the table that names them ----------------------------------------------


def test_hard_requirements_are_only_the_core():
    assert {_name(r) for r in _project()["dependencies"]} == HARD


def test_every_optional_package_is_in_the_extra_its_error_names():
    extras = _project()["optional-dependencies"]
    assert EXTRAS <= set(extras)
    for module, (package, extra) in OPTIONAL_PACKAGES.items():
        assert package in {_name(r) for r in extras[extra]}, module
    listed = {_name(r) for extra in EXTRAS for r in extras[extra]}
    assert listed == {package for package, _ in OPTIONAL_PACKAGES.values()} | {"ninja"}
    assert extras["all"] == [f"snncc[{','.join(sorted(EXTRAS, key=list(extras).index))}]"]


def test_the_readme_lists_every_extra_with_its_packages():
    text = (REPO / "README.md").read_text().split("| extra | packages |", 1)[1].split("\n\n", 1)[0]
    rows = [line.strip("|").split(" | ") for line in text.splitlines()[2:]]
    listed = {re.fullmatch(r"`(\w+)`", row[0].strip()).group(1): set(row[1].split(", ")) for row in rows}
    extras = _project()["optional-dependencies"]
    assert listed == {extra: {_name(r) for r in extras[extra]} for extra in EXTRAS}


def test_require_returns_the_module_or_names_the_extra(monkeypatch):
    assert require("onnx", "ONNX export") is importlib.import_module("onnx")
    _missing(monkeypatch, "nirtorch")
    with pytest.raises(MissingDependencyError) as caught:
        require("nirtorch", "running a NIR graph")
    assert str(caught.value) == "running a NIR graph needs nirtorch: pip install 'snncc[nir]'"
    assert isinstance(caught.value, SnnccError) and isinstance(caught.value, ImportError)


def test_a_broken_install_is_named_too(monkeypatch):
    def broken(name, *args, **kwargs):
        raise ImportError("libonnxruntime.so: cannot open shared object file")

    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.raises(MissingDependencyError, match=r"running an ONNX file needs onnxruntime \(installed, but "
                                                     r"importing it fails: libonnxruntime.so.*snncc\[onnx\]"):
        require("onnxruntime", "running an ONNX file")


def test_the_core_imports_and_compiles_without_any_extra(tmp_path):
    blocked = sorted(OPTIONAL_PACKAGES)
    code = textwrap.dedent(f"""
        import sys
        for name in {blocked!r}:
            sys.modules[name] = None
        import torch
        import snncc, snncc.cli, snncc.debug, snncc.profile
        program = snncc.compile("tiny-llama", passes="encode", T=4, calib_tokens=256, progress=False)
        program.save("p.snn")
        print(tuple(snncc.load("p.snn")(torch.tensor([[104, 105]])).shape))
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=snncc_env(), capture_output=True,
                            text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(1, 2, 256)"


# --- through the API -----------------------------------------------------------------------


def test_onnx_export_names_the_onnx_extra(monkeypatch):
    for module in ("snncc.backends.onnx", "snncc.backends.onnx_functions"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    _missing(monkeypatch, "onnx")
    with pytest.raises(MissingDependencyError, match=re.escape("ONNX export needs onnx: pip install 'snncc[onnx]'")):
        importlib.import_module("snncc.backends.onnx")


@pytest.mark.parametrize(("module", "package"), [("onnxscript", "onnxscript"), ("onnx_ir", "onnx-ir")])
def test_onnx_export_names_the_exporters_packages(monkeypatch, tmp_path, module, package):
    from snncc.backends.onnx import export_onnx

    _missing(monkeypatch, module)
    with pytest.raises(MissingDependencyError, match=re.escape(f"ONNX export needs {package}: pip install "
                                                               "'snncc[onnx]'")):
        export_onnx(compiled("tiny-llama", "encode", 4), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_running_an_onnx_file_names_the_onnx_extra(monkeypatch, tmp_path):
    from snncc.backends.onnx import OnnxRuntimeExecutor

    _missing(monkeypatch, "onnxruntime")
    with pytest.raises(MissingDependencyError, match=re.escape("running an ONNX file needs onnxruntime: "
                                                               "pip install 'snncc[onnx]'")):
        OnnxRuntimeExecutor(tmp_path / "m.onnx")


def test_compiling_an_onnx_file_names_the_onnx_extra(monkeypatch, tmp_path):
    import snncc

    (tmp_path / "m.onnx").write_bytes(b"not read")
    _missing(monkeypatch, "onnx")
    with pytest.raises(MissingDependencyError, match=re.escape("reading an ONNX model needs onnx: "
                                                               "pip install 'snncc[onnx]'")):
        snncc.compile(str(tmp_path / "m.onnx"))


@pytest.mark.parametrize("module", ["nir", "nirtorch"])
def test_nir_export_names_the_nir_extra(monkeypatch, module):
    from snncc.backends.nir import to_nir, verify_nir

    program = compiled("tiny-llama", "encode", 4)
    _missing(monkeypatch, module)
    with pytest.raises(MissingDependencyError, match=re.escape(f"needs {module}: pip install 'snncc[nir]'")):
        verify_nir(program, None, "m.nir", torch.zeros(1, 2, dtype=torch.long))
    if module == "nir":
        with pytest.raises(MissingDependencyError, match=re.escape("NIR export needs nir: pip install 'snncc[nir]'")):
            to_nir(program)


def test_plotting_names_the_plots_extra(monkeypatch, tmp_path):
    from snncc.plots import plot_finetune

    _missing(monkeypatch, "matplotlib")
    with pytest.raises(MissingDependencyError, match=re.escape("plotting needs matplotlib: pip install "
                                                               "'snncc[plots]'")):
        plot_finetune({"losses": [1.0, 0.5]}, tmp_path / "loss.png")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def smollm2_without_gguf(monkeypatch, tmp_path):
    """smollm2-135m's package folder (a stand-in: the test reads no weights) and no gguf."""
    import snncc.models

    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    monkeypatch.setattr(snncc.models, "_package_dir", lambda *_: tmp_path)
    _missing(monkeypatch, "gguf")


def test_the_gguf_builtin_names_the_gguf_extra(smollm2_without_gguf):
    import snncc

    with pytest.raises(MissingDependencyError, match=re.escape("loading smollm2-135m (a GGUF file) needs gguf: "
                                                               "pip install 'snncc[gguf]'")):
        snncc.compile("smollm2-135m")


def test_without_ninja_the_kernels_warning_names_the_kernels_extra(monkeypatch, caplog):
    import torch.utils.cpp_extension as extension

    from snncc.ir import kernels

    # torch's own check, as `load` makes it before building (or loading a cached build)
    monkeypatch.setattr(extension, "is_ninja_available", lambda: False)
    monkeypatch.setattr(extension, "load", lambda **_: extension.verify_ninja_availability())
    kernels._compiled.cache_clear()
    try:
        with caplog.at_level("WARNING"):
            assert kernels.kernels_for(torch.zeros(3)) is None
    finally:
        kernels._compiled.cache_clear()
    assert "Ninja is required" in caplog.text and "pip install 'snncc[kernels]'" in caplog.text


# --- through the CLI: one line, exit 1, before any model is loaded --------------------------


# a pipeline whose programs both formats take (NIR: plain IF neurons, one spike per step)
NIR_PASSES = ("--passes", "fas,qcfs{L=8,multirange=0}", "-T", "8")


def _assert_one_line(code: int, lines: list[str], message: str) -> None:
    assert code == 1, lines
    assert lines == [f"snncc: error: {message}"]


@pytest.mark.parametrize(("fmt", "module", "package", "extra"), [
    ("onnx", "onnx", "onnx", "onnx"), ("onnx-snn", "onnxscript", "onnxscript", "onnx"),
    ("onnx", "onnx_ir", "onnx-ir", "onnx"), ("nir", "nir", "nir", "nir")])
def test_cli_export_names_the_extra(monkeypatch, tmp_path, fmt, module, package, extra):
    _missing(monkeypatch, module)
    code, lines = _cli("export", "tiny-llama", *NIR_PASSES, "--format", fmt, "-o", str(tmp_path / "out"))
    _assert_one_line(code, lines, f"export --format {fmt} needs {package}: pip install 'snncc[{extra}]'")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("fmt", "module", "extra"), [("onnx", "onnxruntime", "onnx"), ("nir", "nirtorch", "nir")])
def test_cli_export_names_the_runtime_its_check_needs(monkeypatch, tmp_path, fmt, module, extra):
    _missing(monkeypatch, module)
    code, lines = _cli("export", "tiny-llama", *NIR_PASSES, "--format", fmt, "-o", str(tmp_path / "out"))
    _assert_one_line(code, lines, f"export's check of the file (--verify-tokens 0 skips it) needs {module}: "
                                  f"pip install 'snncc[{extra}]'")


@pytest.mark.parametrize("command", [["profile", "tiny-llama", "--prompt", "hi"], ["debug", "tiny-llama"],
                                     ["finetune", "tiny-llama", "--checkpoint", "q.pt"]])
def test_cli_plot_names_the_plots_extra(monkeypatch, tmp_path, command):
    monkeypatch.chdir(tmp_path)
    _missing(monkeypatch, "matplotlib")
    code, lines = _cli(*command, "--plot", "out.png")
    _assert_one_line(code, lines, "--plot needs matplotlib: pip install 'snncc[plots]'")
    assert list(tmp_path.iterdir()) == []


def test_cli_compile_names_the_gguf_extra(smollm2_without_gguf):
    code, lines = _cli("compile", "smollm2-135m")
    _assert_one_line(code, lines, "loading smollm2-135m (a GGUF file) needs gguf: pip install 'snncc[gguf]'")


def test_cli_compile_of_an_onnx_file_names_the_onnx_extra(monkeypatch, tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"not read")
    _missing(monkeypatch, "onnx")
    code, lines = _cli("compile", str(tmp_path / "m.onnx"), "--eval-tokens", "0")
    _assert_one_line(code, lines, "reading an ONNX model needs onnx: pip install 'snncc[onnx]'")
