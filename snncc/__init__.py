"""snncc: compile transformer LLMs into spiking neural networks.

    prog = snncc.compile("smollm2-135m", passes="encode", T=16)
    logits = prog(input_ids)
    prog.save("out.snn"); prog = snncc.load("out.snn")
"""

from snncc.api import compile, load  # noqa: A004
from snncc.errors import SnnccError
from snncc.program import SpikingProgram
from snncc.version import __version__

__all__ = ["compile", "load", "SnnccError", "SpikingProgram", "__version__"]
