"""ffn pass: every activation x activation product becomes an exact spike x spike product."""

from __future__ import annotations

import torch

from snncc.ir.analysis import activation_product, data_dependent_nodes
from snncc.passes.ffn import FfnPass
from tests.conftest import assert_left_alone, compiled, heldout_ids, no_synapse_model, prepared

snn = torch.ops.snn


def test_gated_ffn_and_norm_squares_become_spike_products():
    gm = compiled("tiny-llama", "nonlinear,ffn", 16).graph_module
    dependent = data_dependent_nodes(gm.graph)
    assert not [n for n in gm.graph.nodes if activation_product(n, dependent)]
    products = [n for n in gm.graph.nodes if n.target == snn.spike_mul.default]
    # per layer: SiLU(gate) * up and two RMSNorm squares; plus the final norm's square
    assert len(products) == 2 * 3 + 1
    gated = [n for n in products if n.args[0].target == snn.fn_encode.default]
    assert len(gated) == 2  # the SiLU neuron's own train is the gate operand


def test_products_with_constants_and_position_tables_stay():
    """RoPE multiplies by cos/sin tables of the positions: a gain, not a product."""
    ann = prepared("tiny-llama")[1]

    def rope_products(graph):
        return sum(n.target == torch.ops.aten.mul.Tensor and "rotary" not in str(n.meta.get("source"))
                   and "self_attn" in str(n.meta.get("source")) for n in graph.nodes)

    gm = compiled("tiny-llama", "ffn", 16).graph_module
    assert rope_products(gm.graph) == rope_products(ann.graph) > 0


def test_spike_product_error_is_the_operand_code_error():
    """spike_mul multiplies the two codes exactly: ffn on its own only adds encoding error,
    which falls with T."""
    ann = prepared("tiny-llama")[1]
    ids = heldout_ids("tiny-llama", 256)
    errors = []
    for T in (8, 12, 16):
        program = compiled("tiny-llama", "ffn", T)
        with torch.no_grad():
            errors.append(float((program(ids) - ann(ids)).abs().max()))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-2


def test_ffn_before_spiking_is_the_ann():
    """With every product's operands at T = 32 (codes exact to float32), ffn's graph
    computes the ANN's function: the rewrite itself changes nothing."""
    ann = prepared("tiny-llama")[1]
    ids = heldout_ids("tiny-llama", 256)
    program = compiled("tiny-llama", "ffn", 24)
    with torch.no_grad():
        assert torch.allclose(program(ids), ann(ids), atol=1e-4, rtol=1e-4)


def test_products_with_a_constant_only_are_left_alone():
    _, ann, ctx = no_synapse_model()  # silu(x) * 2
    assert_left_alone(FfnPass(), ann, ctx)
