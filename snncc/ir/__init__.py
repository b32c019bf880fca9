"""The spiking IR: the `snn` op set, analysis, printer and verifier."""

from snncc.ir import ops  # noqa: F401  (registers torch.ops.snn.*)
