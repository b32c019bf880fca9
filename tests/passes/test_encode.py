"""encode pass: numeric bound, structure, and graphs it must leave alone."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

from snncc.api import compile_graph, prepare
from snncc.ir.analysis import ANALOG_MATMULS, matmul_operands
from snncc.passes.encode import EncodePass
from snncc.pipeline import parse_pipeline
from tests.conftest import assert_left_alone, compiled, heldout_ids, no_synapse_model, prepared

snn = torch.ops.snn


def _targets(gm: fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


class _OneLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(256, 32)
        self.proj = torch.nn.Linear(32, 16)

    def forward(self, input_ids):
        return self.proj(torch.tanh(self.embed(input_ids)) * 3.0)


@pytest.mark.parametrize("T", [2, 6, 12, 20])
def test_single_linear_meets_the_documented_bound(T):
    """|y - y_ann| <= |W| (r 2^-T), r = headroom * recorded max, for inputs inside r."""
    model = _OneLinear()
    loaded, ann, ctx = prepare(model, calib_tokens=4096)
    program = compile_graph(loaded, ann, ctx, "encode", T)
    ids = ctx.batches[0][:, :64]  # inside the calibrated ranges by construction
    with torch.no_grad():
        y_ann = model(ids)
        y = program(ids)
    x_name = next(n for n in ann.graph.nodes if n.target == torch.ops.aten.linear.default).args[0].name
    r = ctx.stats[x_name].absmax.reshape(-1) * EncodePass.headroom
    bound = model.proj.weight.abs() @ (r * 2.0**-T)
    assert ((y - y_ann).abs() <= bound * (1 + 1e-4) + 1e-6).all()


def test_structure_every_matmul_becomes_a_spike_op(tiny_name):
    ann = prepared(tiny_name)[1]
    before = _targets(ann)
    program = compiled(tiny_name, "encode", 8)
    after = _targets(program.graph_module)
    assert not any(t in ANALOG_MATMULS for t in after)
    linears = sum(t in (torch.ops.aten.linear.default, torch.ops.aten.addmm.default) for t in before)
    matmuls = sum(t == torch.ops.aten.matmul.default for t in before)
    assert after.count(snn.spike_linear.default) == linears
    assert after.count(snn.spike_matmul.default) == matmuls
    # One encoder per distinct tensor (q, k and v of Llama share their normalised input).
    sites = [n for n in ann.graph.nodes if n.target in ANALOG_MATMULS]
    linear_inputs = {matmul_operands(n)[0] for n in sites if n.target != torch.ops.aten.matmul.default}
    matmul_inputs = {a for n in sites if n.target == torch.ops.aten.matmul.default for a in n.args[:2]}
    assert after.count(snn.mt_encode.default) == len(linear_inputs) + len(matmul_inputs)
    assert program.info.coverage["coverage"] == 1.0
    encoders = [n for n in program.graph_module.graph.nodes if n.target == snn.mt_encode.default]
    assert all(n.meta["snn"]["T"] == 8 and n.meta["created_by"] == "encode" for n in encoders)


def test_ann_graph_is_left_untouched(tiny_name):
    loaded, ann, ctx = prepared(tiny_name)
    code = ann.code
    compile_graph(loaded, ann, ctx, "encode", 4)
    assert ann.code == code


def test_graph_without_matmuls_is_left_alone():
    _, ann, ctx = no_synapse_model()  # silu(x) * 2
    [encode] = parse_pipeline("encode", 8)
    assert_left_alone(encode, ann, ctx)


def test_error_shrinks_as_T_grows(tiny_name):
    loaded = prepared(tiny_name)[0]
    ids = heldout_ids(tiny_name)
    with torch.no_grad():
        ref = loaded.module(ids)
    errors = []
    for T in (4, 8, 16):
        out = compiled(tiny_name, "encode", T)(ids)
        errors.append(float((out - ref).abs().mean()))
    assert errors[0] > errors[1] > errors[2], errors
