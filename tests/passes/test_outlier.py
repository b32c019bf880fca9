"""outlier pass: multi-range neurons on every synapse input, and what they buy."""

from __future__ import annotations

import torch

from snncc.api import compile_graph
from tests.conftest import heldout_ids, prepared

snn = torch.ops.snn


def test_every_synapse_input_gets_a_multi_range_neuron():
    loaded, ann, ctx = prepared("tiny-llama")
    program = compile_graph(loaded, ann, ctx, "outlier,encode", 12)
    gm = program.graph_module
    sources = {n.args[0].target for n in gm.graph.nodes if n.target == snn.spike_linear.default}
    assert sources == {snn.mr_encode.default}
    assert program.info.coverage["coverage"] == 1.0


def test_outlier_ranges_beat_headroom_at_the_same_T():
    """A normal range at the calibrated max plus outlier ranges: finer steps than 16x
    headroom and no clipping of what calibration did not see."""
    loaded, ann, ctx = prepared("tiny-llama")
    ids = heldout_ids("tiny-llama", 256)
    errors = {}
    for spec in ("encode", "outlier,encode"):
        program = compile_graph(loaded, ann, ctx, spec, 10)
        with torch.no_grad():
            errors[spec] = float((program(ids) - ann(ids)).abs().mean())
    assert errors["outlier,encode"] < errors["encode"] / 4, errors


def test_debug_sites_list_outlier_channels_and_ranges():
    from snncc.passes.outlier import OutlierPass

    loaded, ann, ctx = prepared("tiny-llama")
    from snncc.ir.rewrite import copy_graph_module

    p = OutlierPass(T=12)
    p.run(copy_graph_module(ann), ctx)
    assert p.sites and all(s.ranges == 7 and s.range_max >= s.range_min > 0 for s in p.sites)
