"""attention pass: spiking softmax on the edge cases where LAS's code fails, masks, GQA."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

from snncc.ir.verify import verify
from snncc.passes.attention import AttentionPass
from tests.conftest import assert_left_alone

aten = torch.ops.aten
snn = torch.ops.snn


class _Softmax(torch.nn.Module):
    def forward(self, scores, values):
        p = aten.softmax.int(scores, -1)
        return aten.matmul.default(aten.dropout.default(p, 0.0, False), values), p


def _lowered(T: int = 16) -> fx.GraphModule:
    gm = fx.symbolic_trace(_Softmax())
    gm = AttentionPass(T=T).run(gm, None).graph_module
    gm.recompile()
    verify(gm)
    return gm


def _rows(kind: str, length: int) -> torch.Tensor:
    torch.manual_seed(length)
    if kind == "equal":
        return torch.zeros(4, length)
    if kind == "dominant":
        x = torch.randn(4, length)
        x[:, length // 3] = 40.0
        return x
    if kind == "causal":  # HF-style additive mask: finfo.min above the diagonal
        x = torch.randn(length, length) * 3
        return x.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), torch.finfo(torch.float32).min)
    return torch.randn(4, length) * 5


@pytest.mark.parametrize("length", [16, 128, 2000, 2048])
@pytest.mark.parametrize("kind", ["equal", "dominant", "random", "causal"])
def test_softmax_rows_sum_to_one_and_match_the_ann(kind, length):
    if kind == "causal" and length > 128:
        length = 256  # the causal case is a square matrix
    scores = _rows(kind, length)
    values = torch.randn(scores.shape[-1], 8)
    out, p = _lowered()(scores, values)
    p_ann = torch.softmax(scores.double(), -1)
    assert float((p.double().sum(-1) - 1).abs().max()) <= 1e-3
    assert float((p.double() - p_ann).abs().max()) <= 1e-3
    assert torch.allclose(out.double(), p_ann @ values.double(), atol=1e-3)


def test_equal_logits_where_las_rows_sum_to_2_65():
    """LAS's clamped 1/x makes 128 equal logits sum to 2.65; here the sum is 1 within 2^-T."""
    _, p = _lowered(16)(torch.zeros(1, 128), torch.randn(128, 4))
    assert abs(float(p.sum()) - 1) <= 2.0**-15


def test_padding_masked_entries_get_no_probability():
    scores = torch.randn(2, 64)
    scores[:, 40:] = torch.finfo(torch.float32).min
    _, p = _lowered()(scores, torch.randn(64, 4))
    assert float(p[:, 40:].abs().max()) == 0.0


def test_softmax_becomes_exp_neuron_and_normaliser_and_pv_reads_the_exp_train():
    gm = _lowered()
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert aten.softmax.int not in targets
    assert targets.count(snn.fn_encode.default) == 1
    pv = next(n for n in gm.graph.nodes if n.target == aten.matmul.default)
    assert pv.args[0].target == snn.decode.default  # encode turns this into spike_matmul(E, ...)


def test_error_falls_as_T_grows():
    scores, values = torch.randn(8, 512) * 4, torch.randn(512, 16)
    exact = torch.softmax(scores.double(), -1) @ values.double()
    errors = [float((_lowered(T)(scores, values)[0].double() - exact).abs().max()) for T in (6, 10, 14, 18)]
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False)), errors


class _ExpProduct(torch.nn.Module):
    """An exp and a product with V, but no softmax: not attention."""

    def forward(self, scores, values):
        return aten.matmul.default(aten.exp.default(scores), values)


def test_a_graph_without_softmax_is_left_alone():
    assert_left_alone(AttentionPass(), fx.symbolic_trace(_ExpProduct()), None)
