"""nonlinear pass: which ops become neurons, on every tiny model, and its error bound."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

from snncc.calibration import CalibrationContext
from snncc.ir.match import NONLINEAR_OPS
from snncc.passes.nonlinear import NonlinearPass
from tests.conftest import assert_left_alone, compiled, heldout_ids, prepared

aten = torch.ops.aten
snn = torch.ops.snn
_FLOAT_NONLINEAR = NONLINEAR_OPS | {aten.rsqrt.default, aten.reciprocal.default, aten.layer_norm.default,
                                    aten.pow.Tensor_Scalar}


def _targets(program) -> list:
    return [n.target for n in program.graph_module.graph.nodes if n.op == "call_function"]


def _max_error(name: str, spec: str, T: int) -> float:
    ann = prepared(name)[1]
    ids = heldout_ids(name, 256)
    program = compiled(name, spec, T)
    with torch.no_grad():
        return float((program(ids) - ann(ids)).abs().max())


def test_every_activation_and_norm_becomes_a_neuron(tiny_name):
    program = compiled(tiny_name, "nonlinear", 16)
    targets = _targets(program)
    leftover = [t for t in targets if t in _FLOAT_NONLINEAR - {aten.pow.Tensor_Scalar}]
    assert not leftover, leftover
    assert snn.fn_encode.default in targets  # the FFN activation
    assert snn.spike_normalize.default in targets  # the norms


def test_gpt2_tanh_gelu_chain_is_one_neuron_per_layer():
    """GELU written as 0.5 x (1 + tanh(c (x + 0.044715 x^3))): the whole chain is one f."""
    program = compiled("tiny-gpt2", "nonlinear", 12)
    targets = _targets(program)
    assert targets.count(snn.fn_encode.default) == 2  # two layers
    assert aten.tanh.default not in targets


def test_neurons_share_tables_across_layers():
    gm = compiled("tiny-llama", "nonlinear", 12).graph_module
    tables = {n.args[1].target for n in gm.graph.nodes if n.target == snn.fn_encode.default}
    assert len(tables) <= 2  # one table set per distinct range set, not one per layer


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert", "tiny-opt"])
def test_error_is_small_and_falls_as_T_grows(name):
    errors = [_max_error(name, "nonlinear", T) for T in (8, 12, 16)]
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 1e-3


class _Polynomial(torch.nn.Module):
    """x^2 + 3x: products and sums only, which `ffn` lowers, no function for a table neuron."""

    def forward(self, x):
        return aten.add.Tensor(aten.pow.Tensor_Scalar(x, 2), aten.mul.Tensor(x, 3.0))


def test_a_polynomial_chain_is_left_to_ffn():
    assert_left_alone(NonlinearPass(), fx.symbolic_trace(_Polynomial()), CalibrationContext([], "none"))
