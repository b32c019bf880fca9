"""The one exception type users see: a message that names the problem and what to do."""


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
