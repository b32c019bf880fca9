"""calibrate pass: IF thresholds and initial membranes learnt through time, nothing else touched."""

from __future__ import annotations

import pytest
import torch

from snncc.api import compile_graph
from snncc.errors import PipelineError
from snncc.ir.rewrite import copy_graph_module
from snncc.passes.calibrate import CalibratePass
from tests.conftest import assert_left_alone, compiled, prepared

snn = torch.ops.snn


def _if_graph():
    """tiny-llama with IF neurons at fas's L = 16 and T = 8, not yet calibrated (shared)."""
    return compiled("tiny-llama", "fold,qcfs{L=16},ifencode", 8).graph_module


@pytest.mark.parametrize(("T", "burst"), [(4, 1), (8, 0), (4, 2)])
def test_calibration_does_not_raise_and_off_L_lowers_the_calibration_loss(tiny_name, T, burst):
    loaded, ann, ctx = prepared(tiny_name)
    spec = f"fas,ifencode{{burst={burst}}},calibrate{{layer_steps=15,neuron_steps=15,batches=2}}"
    program = compile_graph(loaded, ann, ctx, spec, T, debug=True)
    report = next(p["report"] for p in program.info.passes if p["name"] == "calibrate")
    assert report["check_batches"] == 4  # states are judged on batches the training never saw
    assert report["after"]["check_loss"] <= report["before"]["check_loss"]
    if (burst or 16 // T) * T != 16:  # B T = L (fas's L = 16) starts at QCFS exactly; elsewhere a code mismatch
        assert report["after"]["loss"] < 0.95 * report["before"]["loss"], report
        assert report["after"]["check_loss"] < 0.95 * report["before"]["check_loss"], report


def test_calibrate_refuses_bad_options():
    loaded, ann, ctx = prepared("tiny-llama")
    with pytest.raises(PipelineError, match="check_every"):
        compile_graph(loaded, ann, ctx, "fas,calibrate{check_every=0}", 8)


def test_calibrate_changes_only_the_if_thresholds_and_initial_membranes():
    _, _, ctx = prepared("tiny-llama")
    gm = copy_graph_module(_if_graph())
    code, before = gm.code, {name: t.clone() for name, t in gm.state_dict().items()}
    neurons = {a.target for n in gm.graph.nodes if n.target == snn.if_encode.default for a in n.args[1:3]}
    result = CalibratePass(T=8, layer_steps=2, neuron_steps=2, batches=1, check=1).run(gm, ctx)
    assert result.modified and result.report["sites"] == len(neurons) // 2
    result.graph_module.recompile()
    assert result.graph_module.code == code  # no op appears or disappears
    after = result.graph_module.state_dict()
    assert set(after) == set(before)
    assert {name for name, t in after.items() if not torch.equal(t, before[name])} <= neurons


def test_calibrate_leaves_alone_a_graph_without_if_neurons_and_any_graph_at_zero_steps():
    _, ann, ctx = prepared("tiny-llama")
    assert_left_alone(CalibratePass(T=8), ann, ctx)
    assert_left_alone(CalibratePass(T=8, layer_steps=0, neuron_steps=0), _if_graph(), ctx)
