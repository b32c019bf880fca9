"""The verifier refuses graphs that break an IR invariant, naming the node, and accepts a valid one."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx

import snncc.ir  # noqa: F401  (registers torch.ops.snn.*)
from snncc.ir.verify import VerificationError, verify

aten = torch.ops.aten
snn = torch.ops.snn


def _graph(build) -> fx.GraphModule:
    """A GraphModule over one input `x` (8 channels), a weight and a range, built by `build`."""
    root = torch.nn.Module()
    root.weight = torch.nn.Parameter(torch.randn(4, 8))
    root.scale = torch.nn.Parameter(torch.ones(8))
    graph = fx.Graph()
    x = graph.placeholder("x")
    weight, scale = graph.get_attr("weight"), graph.get_attr("scale")
    graph.output(build(graph, x, weight, scale))
    return fx.GraphModule(root, graph)


def _encode(graph, x, scale, T=8):
    return graph.call_function(snn.mt_encode.default, (x, scale, T))


def test_a_valid_spiking_graph_passes():
    gm = _graph(lambda g, x, w, r: g.call_function(snn.spike_linear.default, (_encode(g, x, r), w, None)))
    verify(gm)
    assert torch.isfinite(gm(torch.randn(2, 8))).all()


def test_a_synapse_reading_an_analog_tensor_is_refused():
    gm = _graph(lambda g, x, w, r: g.call_function(snn.spike_linear.default, (x, w, None)))
    with pytest.raises(VerificationError, match="operand 0 of snn.spike_linear.default is not a spike train"):
        verify(gm)


def test_a_rate_flag_that_contradicts_its_source_is_refused():
    gm = _graph(lambda g, x, w, r: g.call_function(snn.spike_linear.default, (_encode(g, x, r), w, None),
                                                    {"rate": True}))
    with pytest.raises(VerificationError, match="rate=True but .* is not a rate code"):
        verify(gm)


def test_two_values_of_T_in_one_program_are_refused():
    def build(g, x, w, r):
        a = g.call_function(snn.spike_linear.default, (_encode(g, x, r, T=8), w, None))
        b = g.call_function(snn.spike_linear.default, (_encode(g, x, r, T=12), w, None))
        return g.call_function(aten.add.Tensor, (a, b))

    with pytest.raises(VerificationError, match=r"different T in one program: \[8, 12\]"):
        verify(_graph(build))


def test_an_op_outside_aten_and_snn_is_refused():
    gm = _graph(lambda g, x, w, r: g.call_function(torch.sin, (x,)))
    with pytest.raises(VerificationError, match="unknown op"):
        verify(gm)


def test_a_module_call_is_refused():
    gm = _graph(lambda g, x, w, r: g.call_method("relu", (x,)))
    with pytest.raises(VerificationError, match="unsupported node kind 'call_method'"):
        verify(gm)


def test_python_size_helpers_are_allowed():
    gm = _graph(lambda g, x, w, r: g.call_function(aten.mul.Tensor, (x, g.call_function(operator.mul, (2, 3)))))
    verify(gm)
