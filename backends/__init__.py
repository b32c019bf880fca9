"""Backends that run a spiking program: the dense reference executor and the event backend."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.fx as fx

from snncc.errors import InputError

BACKENDS = ("reference", "event")


def create_executor(gm: fx.GraphModule, backend: str = "reference", device: str | torch.device = "cpu",
                    mode: str = "fused", progress: bool | None = None, device_map: str | Mapping | None = None,
                    max_memory: Mapping | None = None, offload_folder: str | Path | None = None,
                    compiled: bool = False):
    """An object that runs `gm` on token ids: `executor(input_ids) -> outputs`. With a
    `device_map`, the reference backend runs it placed by accelerate (snncc.backends.placed).
    `compiled`: the reference backend runs through torch.compile (snncc.backends.compiled)."""
    if compiled and (backend != "reference" or device_map is not None):
        raise InputError("torch.compile runs the reference backend on one device: run without torch.compile, "
                         "or use the reference backend without a device map")
    if device_map is not None:
        return _placed_executor(gm, backend, device, mode, device_map, max_memory, offload_folder)
    if backend == "reference":
        from snncc.backends.reference import ReferenceExecutor

        return ReferenceExecutor(gm, device, mode, compiled)
    if backend == "event":
        from snncc.backends.event import EventBackend

        if torch.device(device).type != "cpu":
            raise InputError(f"the event backend runs on the CPU, not '{device}': use the CPU (device 'cpu')")
        return EventBackend(gm, progress)
    raise InputError(f"unknown backend '{backend}': use one of {', '.join(BACKENDS)}")


def _placed_executor(gm: fx.GraphModule, backend: str, device: str | torch.device, mode: str,
                     device_map: str | Mapping, max_memory: Mapping | None, offload_folder: str | Path | None):
    """A PlacedExecutor, where the backend and device leave the placement to the map."""
    if backend != "reference":
        raise InputError(f"a device map places the reference backend, not the {backend} backend: "
                         "use the reference backend, or no device map")
    if torch.device(device).type != "cpu":
        raise InputError(f"give a device ('{device}') or a device map, not both: the map says where each stage runs")
    from snncc.backends.placed import PlacedExecutor

    return PlacedExecutor(gm, device_map, max_memory, offload_folder, mode)
