"""The exceptions snncc raises: a message that names the problem and what to do.

Every one is a SnnccError, and also the standard exception a Python caller already catches:
ValueError for a wrong model, pipeline, artifact or input, FileNotFoundError for a model,
artifact or file that is not there, ImportError for an optional package that is not installed
(MissingDependencyError). Messages speak of the library's terms (a device, a
pipeline, a device map), never of the command line's options: the CLI adds its own wording."""

import importlib
from types import ModuleType


def first_line(exc: BaseException) -> str:
    """The first line of a library's exception message (or its type): enough to name the cause
    inside a one-line snncc error."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


class SnnccError(Exception):
    """A user-facing error; the CLI prints it on one line and exits non-zero."""


class ModelError(SnnccError, ValueError):
    """The model cannot be loaded or traced."""


class ModelNotFoundError(SnnccError, FileNotFoundError):
    """The model is not a builtin, a file, a directory or a Hugging Face id that can be fetched, or a
    file it needs beside it (its tokenizer) is not there."""


class PipelineError(SnnccError, ValueError):
    """A pass name, pass option, pass order or pass run is wrong."""


class ArtifactError(SnnccError, ValueError):
    """A compiled artifact is corrupt or from an incompatible format."""


class ArtifactNotFoundError(SnnccError, FileNotFoundError):
    """A compiled artifact is not there."""


class InputError(SnnccError, ValueError):
    """User data (text, prompt, token ids, T) or an argument is unusable."""


class InputNotFoundError(SnnccError, FileNotFoundError):
    """A file of user data (calibration or evaluation text) is not there."""


class ExportError(SnnccError, ValueError):
    """A program cannot be exported to the requested format."""


class NumericsError(SnnccError, ValueError):
    """A model, program or training run computes NaN or inf where numbers are reported."""


class MissingDependencyError(SnnccError, ImportError):
    """An optional package a feature needs is not installed; the message names the snncc extra
    that installs it."""


# The optional packages by import name: (the name pip installs, the snncc extra that brings it).
# pyproject.toml's optional-dependencies list the same (tests/test_extras.py holds them equal).
OPTIONAL_PACKAGES = {
    "onnx": ("onnx", "onnx"),
    "onnxscript": ("onnxscript", "onnx"),
    "onnx_ir": ("onnx-ir", "onnx"),
    "onnxruntime": ("onnxruntime", "onnx"),
    "nir": ("nir", "nir"),
    "nirtorch": ("nirtorch", "nir"),
    "matplotlib": ("matplotlib", "plots"),
    "gguf": ("gguf", "gguf"),
}


def require(module: str, feature: str) -> ModuleType:
    """Import the optional package `module` for `feature` (e.g. "ONNX export"), or raise
    MissingDependencyError: "<feature> needs <package>: pip install 'snncc[<extra>]'"."""
    package, extra = OPTIONAL_PACKAGES[module]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        # Installed but broken (a missing library of its own) needs a reinstall all the same.
        missing = isinstance(exc, ModuleNotFoundError) and exc.name == module
        cause = "" if missing else f" (installed, but importing it fails: {first_line(exc)})"
        raise MissingDependencyError(f"{feature} needs {package}{cause}: pip install 'snncc[{extra}]'") from exc
