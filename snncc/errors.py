"""The one exception type users see: a message that names the problem and what to do."""


def first_line(exc: BaseException) -> str:
    """The first line of a library's exception message (or its type): enough to name the cause
    inside a one-line snncc error."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


class SnnccError(Exception):
    """A user-facing error; the CLI prints it on one line and exits non-zero."""


class ModelError(SnnccError):
    """The model cannot be found, loaded or traced."""


class PipelineError(SnnccError):
    """A pass name, pass option, pass order or pass run is wrong."""


class ArtifactError(SnnccError):
    """A compiled artifact is missing, corrupt, or from an incompatible format."""


class InputError(SnnccError):
    """User data (text, prompt, token ids, T) is unusable."""


class ExportError(SnnccError):
    """A program cannot be exported to the requested format."""


class NumericsError(SnnccError):
    """A model, program or training run computes NaN or inf where numbers are reported."""
