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
from snncc.ir.incremental import cache_axes, incremental_graph
from snncc.ir.ops import execution_mode


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch device, refusing CUDA with a clear error where none is present."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device '{device}' requested but no CUDA GPU is available here: use the CPU (device 'cpu')")
    return dev


STATIC_CACHE_MIN_LENGTH = 64  # the shortest preallocated cache: few buckets for short generations


class ReferenceExecutor:
    """Owns a graph on one device and runs it without autograd."""

    def __init__(self, gm: fx.GraphModule, device: str | torch.device = "cpu", mode: str = "fused",
                 compiled: bool = False, static_cache: bool | None = None):
        self.device = resolve_device(device)
        self.gm = _place_on(gm, self.device)  # the program itself: spike trains and all
        self.mode = mode
        self.compiled = compiled
        # decoding steps on preallocated caches, so their shapes stay fixed: compiled on CUDA,
        # each cache length's step is a CUDA graph replayed token after token
        self.static_cache = compiled and self.device.type == "cuda" if static_cache is None else static_cache
        self._cuda_graphs = self.static_cache and compiled and self.device.type == "cuda"
        self._runnable = fuse_for_execution(self.gm) if mode == "fused" else self.gm
        self._forward = compile_graph_module(self._runnable) if compiled else self._runnable
        self._step: fx.GraphModule | None = None  # built on the first cached step
        self._decode: Callable | None = None  # the graph that runs the decoding steps
        self._cached: list[str] = []  # the tensors the step graph caches, in `past` order
        self._cache_axes: list[int] = []  # their sequence axes
        self.max_cache_length: int | None = None  # the most positions a static cache gets (the model's)

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), execution_mode(self.mode):
            return self._forward(input_ids.to(self.device))

    def step(self, input_ids: torch.Tensor, past: list[torch.Tensor] | None,
             past_length: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Outputs for `input_ids`, the tokens after `past_length` earlier ones whose
        attention keys and values are cached in `past` (None: no earlier tokens); returns the
        outputs of the new tokens and the cache extended by them (snncc.ir.incremental): with
        static caches, caches that hold them and unused rows after."""
        if self._step is None:
            self._build_steps()
        input_ids = input_ids.to(self.device)
        with torch.no_grad(), execution_mode(self.mode):
            # The prompt pass runs once per generation, at a new length each time: eagerly.
            if past is None:
                output, *present = self._step(input_ids, past_length, *[None] * len(self._cached))
            elif self.static_cache:
                present = self._static_caches(past, past_length + input_ids.shape[1])
                position = torch.tensor(past_length, device=self.device)
                if self._cuda_graphs:
                    torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs may be overwritten
                output = self._decode(input_ids, position, *present)[0]  # the caches are written in place
                output = output.clone() if self._cuda_graphs else output  # a replay reuses its output memory
            else:
                # torch.compile guards on strides: the eager prompt pass and the compiled steps lay
                # their caches out differently, which would cost a second compile at the next token
                past = [tensor.contiguous() for tensor in past] if self.compiled else past
                output, *present = self._decode(input_ids, past_length, *past)
        return output, present

    def _build_steps(self) -> None:
        """The step graph, and the one decoding steps run: compiled where asked (dynamic
        shapes: one compile serves every cache length; static caches: one per length bucket)."""
        self._step, self._cached = incremental_graph(self._runnable)
        self._cache_axes = cache_axes(self._step)
        if self.static_cache:
            self._decode = incremental_graph(self._runnable, static=True)[0]
            if self.compiled:
                self._decode = compile_graph_module(self._decode, dynamic=False, cuda_graphs=self._cuda_graphs)
        else:
            self._decode = compile_graph_module(self._step, dynamic=True) if self.compiled else self._step

    def _static_caches(self, past: list[torch.Tensor], needed: int) -> list[torch.Tensor]:
        """`past` as preallocated caches that hold `needed` rows: themselves where they do
        (the caches of an earlier decoding step), else copied into zeroed caches of the next
        power-of-two length (at least STATIC_CACHE_MIN_LENGTH, at most max_cache_length), so a step's shapes, and its
        CUDA graph, change only when the cache grows into the next length."""
        if past[0].shape[self._cache_axes[0]] >= needed:  # a prompt pass's caches hold just the rows so far
            return past
        bucket = max(STATIC_CACHE_MIN_LENGTH, 1 << (needed - 1).bit_length())
        bucket = max(needed, min(bucket, self.max_cache_length or bucket))
        caches = []
        for tensor, axis in zip(past, self._cache_axes, strict=True):
            shape = list(tensor.shape)
            shape[axis] = bucket
            cache = tensor.new_zeros(shape)
            cache.narrow(axis, 0, tensor.shape[axis]).copy_(tensor)
            if self._cuda_graphs:
                torch._dynamo.mark_static_address(cache)  # a CUDA graph writes it in place
            caches.append(cache)
        return caches


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
