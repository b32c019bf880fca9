"""End to end on every tiny model: the `none` pipeline is the ANN, `encode` keeps fidelity,
programs survive save/load, and fused and unrolled execution agree."""

from __future__ import annotations

import pytest
import torch

import snncc
from snncc.api import compile_graph
from snncc.calibration import HELDOUT_TEXT, read_text, token_chunks
from snncc.evaluate import evaluate
from snncc.ir.ops import execution_mode
from snncc.models import CAUSAL_LM
from tests.conftest import heldout_ids, prepared


def test_none_pipeline_reproduces_the_ann_exactly(tiny_name):
    loaded, ann, ctx = prepared(tiny_name)
    program = compile_graph(loaded, ann, ctx, "none", 16)
    chunks = token_chunks(loaded.tokenizer, read_text(HELDOUT_TEXT), 64, 256)
    result = evaluate(program, loaded.module, chunks)
    assert result["max_abs_err" if loaded.task != CAUSAL_LM else "max_abs_logit_err"] == 0.0
    if loaded.task == CAUSAL_LM:
        assert result["ppl_ratio"] == 1.0 and result["top1_agreement"] == 1.0
    else:
        assert result["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert program.info.coverage["coverage"] == 0.0
    assert len(program.info.coverage["analog_sites"]) > 0


def test_encode_T16_keeps_fidelity_on_heldout_text(tiny_name):
    loaded, ann, ctx = prepared(tiny_name)
    program = compile_graph(loaded, ann, ctx, "encode", 16)
    chunks = token_chunks(loaded.tokenizer, read_text(HELDOUT_TEXT), 128, 1024)
    result = evaluate(program, loaded.module, chunks)
    if loaded.task == CAUSAL_LM:
        assert result["top1_agreement"] >= 0.99
        assert abs(result["ppl_ratio"] - 1) <= 0.01
    else:
        assert result["cosine"] >= 0.999
    assert result["coverage"] == 1.0


def test_dynamic_length_one_program_serves_every_length(tiny_name):
    loaded, ann, ctx = prepared(tiny_name)
    program = compile_graph(loaded, ann, ctx, "encode", 12)
    for length in (1, 2, 37, loaded.max_positions):
        ids = torch.randint(0, 256, (2, length))
        assert program(ids).shape == loaded.module(ids).shape


def test_save_and_load_round_trip(tiny_name, tmp_path):
    loaded, ann, ctx = prepared(tiny_name)
    program = compile_graph(loaded, ann, ctx, "encode", 8)
    path = tmp_path / "prog.snn"
    program.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["prog.snn"]
    again = snncc.load(path)
    ids = heldout_ids(tiny_name)[:2]
    assert torch.equal(again(ids), program(ids))
    assert again.info == program.info
    assert again.tokenizer.encode("Hello") == program.tokenizer.encode("Hello")


@pytest.mark.parametrize("passes, T", [("encode", 24), ("las", 20)])
def test_unrolled_execution_matches_fused(tiny_name, passes, T):
    """Given the same spikes the two modes agree to float rounding (tests/ir). Over a whole
    program, that rounding can flip a downstream code by one LSB (r * headroom * 2^-T), so
    the outputs must agree to 1e-4 of their range at these T (measured for las, with its
    multi-range and table neurons, spike x spike products and normalisers: 8e-7 to 1.3e-5)."""
    loaded, ann, ctx = prepared(tiny_name)
    program = compile_graph(loaded, ann, ctx, passes, T)
    ids = heldout_ids(tiny_name)[:1, :64]
    fused = program(ids)
    with execution_mode("unrolled"):
        unrolled = program.graph_module(ids)
    assert float((unrolled - fused).abs().max() / fused.abs().max()) <= 1e-4


def test_profile_counts_are_consistent(tiny_name):
    loaded, ann, ctx = prepared(tiny_name)
    program = compile_graph(loaded, ann, ctx, "encode", 8)
    ids = heldout_ids(tiny_name)[:1, :64]
    profile = program.profile(ids)
    totals = profile.totals()
    assert 0 < totals["spikes_per_neuron"] <= 8
    assert totals["analog_macs"] == 0 and totals["sops"] > 0
    assert totals["ann_macs"] == sum(layer.ann_macs for layer in profile.layers)
    for layer in profile.layers:
        assert 0 <= layer.firing_rate <= 1
        if layer.kind == "spike_linear":  # each input spike reaches every output neuron once
            assert layer.sops == layer.spikes_in * (layer.ann_macs // layer.neurons_in)


def test_memory_aware_energy_counts_sram_traffic_per_event():
    """One synapse site of 100 SOPs over 10 neurons at T = 4, against 50 ANN MACs, in the
    45 nm FP32 table (MAC 4.6 pJ, AC 0.9 pJ) with 32-bit words at 10 pJ per 64-bit SRAM
    access (5 pJ a word): per SOP AC + 3 words, per neuron step AC + 2 words, per MAC MAC + 1 word."""
    from snncc.profile import ENERGY_TABLES, LayerProfile, Profile

    profile = Profile(layers=[LayerProfile("n", "s", "spike_linear", neurons_in=10, sops=100, ann_macs=50, T=4)],
                      neurons=10, T=4, energy=ENERGY_TABLES["45nm"])
    assert profile.memory_energy_snn_pj == pytest.approx(100 * (0.9 + 15) + 40 * (0.9 + 10))
    assert profile.memory_energy_ann_pj == pytest.approx(50 * (4.6 + 5))
    assert profile.memory_energy_ratio == pytest.approx(2026 / 480)
    assert profile.energy_ratio == pytest.approx(100 * 0.9 / (50 * 4.6))  # the arithmetic convention, unchanged
    int8 = Profile(layers=profile.layers, neurons=10, T=4, energy=ENERGY_TABLES["45nm-int8"])
    assert int8.memory_energy_ann_pj == pytest.approx(50 * (0.23 + 1.25))  # 8-bit words
    profile.unknown_sites.append("an analog matmul")
    assert profile.memory_energy_ratio is None and profile.totals()["memory_energy_ratio"] is None


def test_api_accepts_a_plain_module_and_refuses_float_input():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(256, 16)
            self.head = torch.nn.Linear(16, 256)

        def forward(self, input_ids):
            return self.head(torch.relu(self.embed(input_ids)))

    program = snncc.compile(Tiny(), passes="encode", T=8, calib_tokens=512)
    assert program(torch.tensor([[1, 2, 3]])).shape == (1, 3, 256)
    with pytest.raises(snncc.SnnccError, match="integer token ids"):
        program(torch.tensor([[float("nan"), 1.0]]))
    with pytest.raises(snncc.SnnccError, match="token ids must lie in"):
        program(torch.tensor([[300]]))


def test_programs_do_not_share_modules_with_the_ann():
    """Converting a program (dtype, device) must never touch the user's model or the ANN graph."""
    loaded, ann, ctx = prepared("tiny-llama")
    program = compile_graph(loaded, ann, ctx, "none", 8)
    program.graph_module.to(torch.float64)
    assert {t.dtype for t in ann.state_dict().values()} == {torch.float32}
    assert {p.dtype for p in loaded.module.parameters()} == {torch.float32}
