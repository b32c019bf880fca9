"""Reference executor: runs a spiking program's FX graph with the `snn` reference kernels.

Batched over time inside each kernel, on CPU or CUDA. `mode="fused"` decodes a spike train
once before a synaptic layer (exact by linearity); `mode="unrolled"` does one synaptic
matmul per time step, as a time-stepped machine would. Both give the same outputs.
`compiled=True` runs the graphs through torch.compile (snncc.backends.compiled): the same
outputs bit for bit, the neurons fused with the ops around them, the first call of each shape
slower (it compiles).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx as fx

from snncc.backends.compiled import compile_graph_module
from snncc.backends.fuse import fuse_for_execution
from snncc.errors import InputError
from snncc.ir.incremental import incremental_graph
from snncc.ir.ops import execution_mode


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch device, refusing CUDA with a clear error where none is present."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device '{device}' requested but no CUDA GPU is available here: use the CPU (device 'cpu')")
    return dev


class ReferenceExecutor:
    """Owns a graph on one device and runs it without autograd."""

    def __init__(self, gm: fx.GraphModule, device: str | torch.device = "cpu", mode: str = "fused",
                 compiled: bool = False):
        self.device = resolve_device(device)
        self.gm = _place_on(gm, self.device)  # the program itself: spike trains and all
        self.mode = mode
        self.compiled = compiled
        self._runnable = fuse_for_execution(self.gm) if mode == "fused" else self.gm
        self._forward = compile_graph_module(self._runnable) if compiled else self._runnable
        self._step: fx.GraphModule | None = None  # built on the first cached step
        self._compiled_step: Callable | None = None  # the step graph compiled, for decoding
        self._cached: list[str] = []  # the tensors the step graph caches, in `past` order

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), execution_mode(self.mode):
            return self._forward(input_ids.to(self.device))

    def step(self, input_ids: torch.Tensor, past: list[torch.Tensor] | None,
             past_length: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Outputs for `input_ids`, the tokens after `past_length` earlier ones whose
        attention keys and values are cached in `past` (None: no earlier tokens); returns the
        outputs of the new tokens and the cache extended by them (snncc.ir.incremental)."""
        if self._step is None:
            self._step, self._cached = incremental_graph(self._runnable)
            # dynamic: one compile serves every cache length (else one per token)
            self._compiled_step = compile_graph_module(self._step, dynamic=True) if self.compiled else None
        # The prompt pass runs once per generation, at a new length each time: eagerly. The
        # decoding steps, one token per sequence each, run compiled.
        step = self._step if past is None or self._compiled_step is None else self._compiled_step
        if past is None:
            past = [None] * len(self._cached)
        elif step is self._compiled_step:
            # torch.compile guards on strides: the eager prompt pass and the compiled steps lay
            # their caches out differently, which would cost a second compile at the next token
            past = [tensor.contiguous() for tensor in past]
        with torch.no_grad(), execution_mode(self.mode):
            output, *present = step(input_ids.to(self.device), past_length, *past)
        return output, present


def _place_on(gm: fx.GraphModule, device: torch.device) -> fx.GraphModule:
    """Move weights to `device` and point tensor factories (arange, zeros...) at it too."""
    point_factories_at(gm, device)
    return gm.to(device)


def point_factories_at(gm: fx.GraphModule, device: torch.device) -> None:
    """Make the tensors `gm` creates (arange, zeros, traced rotary tables...) on `device`."""
    changed = False
    for node in gm.graph.nodes:
        if isinstance(node.kwargs.get("device"), torch.device) and node.kwargs["device"] != device:
            node.update_kwarg("device", device)
            changed = True
        for i, arg in enumerate(node.args):  # aten.to.device(x, device, dtype): traced rotary tables
            if isinstance(arg, torch.device) and arg != device:
                node.update_arg(i, device)
                changed = True
    if changed:
        gm.recompile()
