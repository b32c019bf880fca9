"""Coverage never overstates: every matmul-like op no pass lowered is analog, with its MACs
counted from shapes, and a site whose MACs cannot be counted makes coverage unknown."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

import snncc
import snncc.ir.verify as verify_module
from snncc.api import compile_graph
from snncc.frontend import trace
from snncc.ir.verify import coverage_report, format_coverage
from snncc.models import load_model
from snncc.profile import profile_graph
from tests.conftest import prepared

aten = torch.ops.aten


class MatmulZoo(torch.nn.Module):
    """One of each matmul-like op a traced model may keep: conv, einsum, baddbmm, a matmul
    between two activations, fused attention."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(256, 8)
        self.conv = torch.nn.Conv1d(8, 8, 3, padding=1)
        self.w = torch.nn.Parameter(torch.randn(8, 8))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        y = self.conv(x.transpose(1, 2)).transpose(1, 2)
        z = torch.einsum("bld,de->ble", y, self.w)
        scores = x @ z.transpose(1, 2)
        values = torch.baddbmm(scores, z, x.transpose(1, 2))
        return F.scaled_dot_product_attention(x[:, None], z[:, None], values[:, None])[:, 0]


class SdpaBlock(torch.nn.Module):
    """Linear projections around a fused attention op that no pass lowers."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(256, 16)
        self.qkv = torch.nn.Linear(16, 48)
        self.head = torch.nn.Linear(16, 256)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.embed(input_ids)).unsqueeze(1).chunk(3, dim=-1)
        return self.head(F.scaled_dot_product_attention(q, k, v, is_causal=True).squeeze(1))


def test_every_matmul_like_op_is_analog_with_its_macs():
    report = coverage_report(trace(load_model(MatmulZoo())), (1, 16))
    macs = {site.op: site.macs for site in report.analog_sites}
    assert macs == {
        str(aten.conv1d.default): 16 * 8 * (8 * 3),  # out positions x channels, times in x kernel
        str(aten.einsum.default): 16 * 8 * 8,
        str(aten.baddbmm.default): 16 * 16 * 8,
        str(aten.matmul.default): 16 * 16 * 8,  # activation x activation
        str(aten.scaled_dot_product_attention.default): 16 * 16 * (8 + 16),  # QK^T + PV
    }
    assert report.coverage == 0.0 and report.analog_macs == sum(macs.values())
    assert not any("attention" in op.op or "einsum" in op.op for op in report.analog_ops)


def test_fused_attention_left_in_a_program_is_reported_analog():
    program = snncc.compile(SdpaBlock(), passes="encode", T=8, calib_tokens=256)
    coverage = program.info.coverage
    linear_macs = 128 * (16 * 48 + 16 * 256)
    attention_macs = 128 * 128 * (16 + 16)
    assert coverage["spiking_macs"] == linear_macs and coverage["analog_macs"] == attention_macs
    assert coverage["coverage"] == linear_macs / (linear_macs + attention_macs) < 1.0
    [site] = coverage["analog_sites"]
    assert site["op"] == str(aten.scaled_dot_product_attention.default)
    assert "attn_implementation='eager'" in site["reason"]


def test_uncountable_macs_make_coverage_unknown(monkeypatch):
    gm = trace(load_model(SdpaBlock()))
    monkeypatch.setattr(verify_module, "propagate_shapes", lambda gm, shape: None)  # no shapes recorded
    report = coverage_report(gm)
    assert report.coverage is None and len(report.unknown_sites) == 3
    assert report.to_dict()["coverage"] is None
    assert format_coverage(report.to_dict()) == "unknown (3 matmul sites with uncountable MACs)"


def test_elementwise_spike_products_do_not_inflate_coverage():
    """las lowers the same matmuls as encode plus elementwise products (spike_mul); those are
    no matmul MACs, so both programs count the same spike-driven MACs."""
    loaded, ann, ctx = prepared("tiny-llama")
    las = compile_graph(loaded, ann, ctx, "las", 8).info.coverage
    encode = compile_graph(loaded, ann, ctx, "encode", 8).info.coverage
    assert las["coverage"] == encode["coverage"] == 1.0
    assert las["spiking_macs"] == encode["spiking_macs"]


class _Int8Weights(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(256, 32))
        self.register_buffer("w", torch.randint(-8, 8, (16, 32), dtype=torch.int8))
        self.register_buffer("scales", torch.ones(16))


def _quantized_matmul_graph() -> fx.GraphModule:
    """input_ids -> embedding -> an int8-weight matmul that no MAC formula covers."""
    graph = fx.Graph()
    ids = graph.placeholder("input_ids")
    x = graph.call_function(aten.embedding.default, (graph.get_attr("table"), ids))
    x = graph.call_function(aten.view.default, (x, [-1, 32]))
    w, scales = graph.get_attr("w"), graph.get_attr("scales")
    graph.output(graph.call_function(aten._weight_int8pack_mm.default, (x, w, scales)))
    return fx.GraphModule(_Int8Weights(), graph)


def test_a_matmul_op_without_a_mac_formula_is_reported_unknown_not_zero():
    gm = _quantized_matmul_graph()
    report = coverage_report(gm, (1, 8))
    assert report.coverage is None and report.unknown_sites == ["_weight_int8pack_mm_default"]
    [site] = report.analog_sites
    assert site.macs is None and "cannot count its MACs" in site.reason
    totals = profile_graph(gm, torch.tensor([[1, 2, 3]])).totals()
    assert totals["energy_ratio"] is None and totals["unknown_mac_sites"] == 1
