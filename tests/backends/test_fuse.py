"""Fused execution lowering: bit-identical to the fused kernels, and the program keeps its trains."""

from __future__ import annotations

import pytest
import torch

from snncc.api import compile_graph
from snncc.backends.fuse import fuse_for_execution
from snncc.ir.ops import execution_mode
from tests.conftest import heldout_ids, prepared

snn = torch.ops.snn


@pytest.mark.parametrize("T", [3, 16, 24])
def test_fused_lowering_is_bit_identical(tiny_name, T):
    loaded, ann, ctx = prepared(tiny_name)
    program = compile_graph(loaded, ann, ctx, "encode", T)
    ids = heldout_ids(tiny_name)[:2]
    with execution_mode("fused"):
        with_trains = program.graph_module(ids)
    assert torch.equal(program(ids), with_trains)


def test_lowering_removes_trains_but_leaves_the_program_alone():
    loaded, ann, ctx = prepared("tiny-llama")
    program = compile_graph(loaded, ann, ctx, "encode", 8)
    fused = fuse_for_execution(program.graph_module)
    targets = [n.target for n in fused.graph.nodes]
    assert snn.mt_encode.default not in targets and snn.spike_linear.default not in targets
    assert snn.mt_quantize.default in targets
    assert snn.mt_encode.default in [n.target for n in program.graph_module.graph.nodes]
    assert program.profile(heldout_ids("tiny-llama")[:1, :32]).spikes > 0


def test_trains_beyond_float32_exactness_are_not_fused():
    loaded, ann, ctx = prepared("tiny-gpt2")
    program = compile_graph(loaded, ann, ctx, "encode", 28)
    fused = fuse_for_execution(program.graph_module)
    assert snn.mt_encode.default in [n.target for n in fused.graph.nodes]
