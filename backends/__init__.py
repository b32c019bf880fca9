"""Backends that run a spiking program: the dense reference executor and the event backend."""

from __future__ import annotations

import torch
import torch.fx as fx

from snncc.errors import InputError

BACKENDS = ("reference", "event")


def create_executor(gm: fx.GraphModule, backend: str = "reference", device: str | torch.device = "cpu",
                    mode: str = "fused", progress: bool = False):
    """An object that runs `gm` on token ids: `executor(input_ids) -> outputs`."""
    if backend == "reference":
        from snncc.backends.reference import ReferenceExecutor

        return ReferenceExecutor(gm, device, mode)
    if backend == "event":
        from snncc.backends.event import EventBackend

        if torch.device(device).type != "cpu":
            raise InputError(f"the event backend runs on the CPU, not '{device}': use --device cpu")
        return EventBackend(gm, progress)
    raise InputError(f"unknown backend '{backend}': use one of {', '.join(BACKENDS)}")
