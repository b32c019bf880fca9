"""outlier pass: multi-range neurons on every synapse input, and what they buy."""

from __future__ import annotations

import torch

from snncc.ir.rewrite import copy_graph_module
from snncc.passes.outlier import OutlierPass
from tests.conftest import assert_left_alone, compiled, heldout_ids, no_synapse_model, prepared

snn = torch.ops.snn


def test_every_synapse_input_gets_a_multi_range_neuron():
    program = compiled("tiny-llama", "outlier,encode", 12)
    gm = program.graph_module
    sources = {n.args[0].target for n in gm.graph.nodes if n.target == snn.spike_linear.default}
    assert sources == {snn.mr_encode.default}
    assert program.info.coverage["coverage"] == 1.0


def test_outlier_ranges_beat_headroom_at_the_same_T():
    """A normal range at the calibrated max plus outlier ranges: finer steps than 16x
    headroom and no clipping of what calibration did not see."""
    ann = prepared("tiny-llama")[1]
    ids = heldout_ids("tiny-llama", 256)
    errors = {}
    for spec in ("encode", "outlier,encode"):
        program = compiled("tiny-llama", spec, 10)
        with torch.no_grad():
            errors[spec] = float((program(ids) - ann(ids)).abs().mean())
    assert errors["outlier,encode"] < errors["encode"] / 4, errors


def test_debug_sites_list_outlier_channels_and_ranges():
    _, ann, ctx = prepared("tiny-llama")
    result = OutlierPass(T=12).run(copy_graph_module(ann), ctx)
    decoded = {n.name for n in result.graph_module.graph.nodes if n.target == snn.decode.default}
    assert result.sites and {s.node for s in result.sites} == decoded
    assert all(s.ranges == 7 and s.range_max >= s.range_min > 0 for s in result.sites)


def test_a_graph_without_synapses_is_left_alone():
    _, ann, ctx = no_synapse_model()
    assert_left_alone(OutlierPass(T=12), ann, ctx)
