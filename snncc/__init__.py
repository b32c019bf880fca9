"""snncc: compile transformer LLMs into spiking neural networks.

    prog = snncc.compile("smollm2-135m", passes="encode", T=16)
    logits = prog(input_ids)
    prog.save("out.snn"); prog = snncc.load("out.snn")
"""

__version__ = "0.1.0"

from snncc.api import compile, load  # noqa: E402,A004
from snncc.errors import SnnccError  # noqa: E402
from snncc.program import SpikingProgram  # noqa: E402

__all__ = ["compile", "load", "SnnccError", "SpikingProgram", "__version__"]
