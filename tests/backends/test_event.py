"""Event backend: same outputs and exact same counts as the reference, and no dense matmul."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from snncc.api import compile_graph
from snncc.backends.event import EventBackend, SpikeEvents
from snncc.ir.ops import execution_mode, step_gains
from snncc.profile import profile_graph
from tests.conftest import compiled, heldout_ids, prepared

aten = torch.ops.aten
_DENSE_MATMULS = {aten.mm.default, aten.bmm.default, aten.addmm.default, aten.matmul.default,
                  aten.linear.default, aten.baddbmm.default, aten.dot.default, aten.mv.default}


# fas with a short calibration: per-channel thresholds and initial membranes, quickly.
_FAS_QUICK = "fas,calibrate{layer_steps=3,neuron_steps=3,batches=1}"


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("pipeline", "T"), [("encode", 4), ("encode", 12), ("las", 6), ("las", 12),
                                             (_FAS_QUICK, 8), (_FAS_QUICK, 4)])
def test_event_outputs_and_counts_equal_the_reference(tiny_name, pipeline, T):
    program = compiled(tiny_name, pipeline, T)
    ids = heldout_ids(tiny_name)[:2, :48]
    with execution_mode("exact"):
        reference = program.graph_module(ids)
    backend = EventBackend(program.graph_module)
    out = backend(ids)
    relative = float((out - reference).abs().max() / reference.abs().max())
    assert relative <= 1e-5
    profile = profile_graph(program.graph_module, ids, mode="exact")
    assert backend.counts.totals()["spikes"] == profile.spikes
    assert backend.counts.sops == {row.node: row.sops for row in profile.layers if row.kind != "analog"}
    assert backend.counts.totals()["analog_macs"] == profile.analog_macs == 0


def test_per_step_spike_counts_match_the_dense_train():
    loaded, ann, ctx = prepared("tiny-llama")
    program = compile_graph(loaded, ann, ctx, "encode", 8)
    ids = heldout_ids("tiny-llama")[:1, :32]
    backend = EventBackend(program.graph_module)
    backend(ids)
    encoder = next(n for n in program.graph_module.graph.nodes if n.target == torch.ops.snn.mt_encode.default)
    trains = {}

    class Grab(torch.fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            if n is encoder:
                trains["dense"] = result
            return result

    with execution_mode("exact"):
        Grab(program.graph_module).run(ids)
    per_step = [int(torch.count_nonzero(step)) for step in trains["dense"]]
    assert backend.counts.spikes_per_step[encoder.name] == per_step


def test_event_backend_does_no_dense_matmul():
    loaded, ann, ctx = prepared("tiny-gpt2")
    program = compile_graph(loaded, ann, ctx, "encode", 6)
    log = _OpLog()
    with log:
        EventBackend(program.graph_module)(heldout_ids("tiny-gpt2")[:1, :16])
    assert not (log.ops & _DENSE_MATMULS), log.ops & _DENSE_MATMULS


def test_spike_events_round_trip_to_the_dense_train():
    train = torch.tensor([[[1, 0, -1]], [[0, 0, 1]]], dtype=torch.int8)
    steps = [(torch.nonzero(t.reshape(-1)).squeeze(1), t.reshape(-1)[t.reshape(-1) != 0].long()) for t in train]
    events = SpikeEvents(train.shape[1:], steps, step_gains(2))
    assert events.count() == 3 and torch.equal(events.dense(), train)
