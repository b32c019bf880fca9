"""ifencode pass: signed IF (and burst) neurons that reproduce QCFS sites exactly."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from snncc.api import compile_graph
from snncc.errors import PipelineError
from snncc.ir.ops import if_spikes, qcfs_levels
from snncc.passes.ifencode import IfEncodePass
from tests.conftest import assert_left_alone, compiled, heldout_ids, prepared

snn = torch.ops.snn


@given(T=st.integers(1, 32), seed=st.integers(0, 2**16), spread=st.floats(0.1, 4.0))
@settings(max_examples=60, deadline=None)
def test_if_neuron_with_constant_input_reproduces_qcfs_at_T_equal_L(T, seed, spread):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 12, generator=generator) * spread
    lam = torch.rand(12, generator=generator) + 0.05  # one threshold per channel
    spikes = snn.if_encode(x, lam, lam / 2, T)
    assert set(spikes.unique().tolist()) <= {-1, 0, 1}
    assert torch.equal(spikes.sum(0).float(), qcfs_levels(x, lam, T))
    decoded, quantized = snn.decode(spikes, lam, rate=True), snn.qcfs(x, lam, T)
    if T & (T - 1) == 0:  # 1/T is exact in float32: the same number, bit for bit
        assert torch.equal(decoded, quantized)
    else:
        torch.testing.assert_close(decoded, quantized, rtol=1e-6, atol=1e-7)


@given(T=st.integers(1, 32), seed=st.integers(0, 2**16))
@settings(max_examples=40, deadline=None)
def test_if_spike_count_is_floor_of_charge_plus_initial_membrane(T, seed):
    """For |u| <= 1 and m(0) in [0, 1), the membrane stays in [0, 1): n = floor(T u + m(0))."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.rand(500, generator=generator, dtype=torch.float64) * 2 - 1
    m0 = torch.rand(500, generator=generator, dtype=torch.float64) * 0.999
    count = sum(s.long() for s in if_spikes(u, torch.ones_like(u), m0, T))
    assert torch.equal(count, torch.floor(T * u + m0).long())


@given(T=st.integers(1, 16), burst=st.sampled_from([1, 2, 4]), seed=st.integers(0, 2**16))
@settings(max_examples=40, deadline=None)
def test_burst_neurons_reproduce_qcfs_with_burst_times_T_levels(T, burst, seed):
    """A burst neuron (threshold lambda / B, v(0) = theta / 2) fed a constant current codes
    exactly QCFS with L = B T levels, clipping included (B a power of two, so that lambda / B
    is exact in float32 and no tie can round apart)."""
    generator = torch.Generator().manual_seed(seed)
    x = (torch.rand(500, generator=generator) * 2 - 1) * 3
    lam = torch.rand(500, generator=generator) + 0.25
    theta = lam / burst
    count = snn.if_encode(x, theta, theta / 2, T, burst).long().sum(0)
    assert torch.equal(count, qcfs_levels(x, lam, burst * T).long())
    decoded = snn.decode(snn.if_encode(x, theta, theta / 2, T, burst), theta, rate=True)
    torch.testing.assert_close(decoded, snn.qcfs(x, lam, burst * T), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("burst", [1, 3])
def test_if_neurons_saturate_at_burst_spikes_per_step(burst):
    x = torch.tensor([-50.0, -1.0, 3.0, 100.0])
    spikes = snn.if_encode(x, torch.tensor(1.0), torch.tensor(0.5), 4, burst)
    assert spikes.abs().max() == burst
    assert spikes.sum(0).tolist() == [-4 * burst, -4, min(3 * 4, 4 * burst), 4 * burst]


@pytest.mark.parametrize(("L", "T"), [(8, 8), (8, 4), (16, 8), (12, 4)])
def test_ifencode_at_burst_times_T_equal_L_changes_nothing_the_qcfs_model_computes(L, T):
    """burst=0 picks B = L / T: the IF neurons run the fine-tuned QCFS model as it is, in T
    steps; every QCFS site becomes one IF population and no site is left."""
    ids = torch.randint(0, 200, (1, 24))
    qcfs_model = compiled("tiny-llama", f"fold,qcfs{{L={L}}}", 8)  # qcfs has no T
    snn_model = compiled("tiny-llama", f"fold,qcfs{{L={L}}},ifencode", T)
    bursts = {n.args[4] for n in snn_model.graph_module.graph.nodes if n.target == snn.if_encode.default}
    assert bursts == {L // T}
    targets = Counter(n.target for n in snn_model.graph_module.graph.nodes)
    assert targets[snn.qcfs.default] == 0
    assert targets[snn.if_encode.default] == sum(n.target == snn.qcfs.default
                                                 for n in qcfs_model.graph_module.graph.nodes)
    assert torch.equal(qcfs_model(ids), snn_model(ids))


def test_a_graph_without_qcfs_sites_is_left_alone():
    _, ann, ctx = prepared("tiny-llama")
    assert_left_alone(IfEncodePass(T=8), ann, ctx)


@pytest.mark.parametrize("L", [2, 4])
def test_ifencode_spread_keeps_the_qcfs_levels_at_T_above_L(L):
    """spread=true at T = 8 > L: threshold lambda T / L, at most one spike per step; within
    the clip range each neuron sends QCFS's level as its spike count (<= L spikes), where
    plain neurons at the same T send a finer code and more spikes."""
    loaded, ann, ctx = prepared("tiny-llama")
    spread = compiled("tiny-llama", f"fold,qcfs{{L={L}}},ifencode{{spread=true}}", 8)
    plain = compiled("tiny-llama", f"fold,qcfs{{L={L}}},ifencode", 8)
    gm = spread.graph_module
    encoders = [n for n in gm.graph.nodes if n.target == snn.if_encode.default]
    assert encoders and all(tuple(n.args[3:]) == (8, 1) for n in encoders)
    for n in encoders:
        lam = next(iter(n.users)).meta["qcfs"]["lambda"]
        theta, v0 = getattr(gm, n.args[1].target), getattr(gm, n.args[2].target)
        assert torch.allclose(theta, lam * 8 / L) and torch.allclose(v0, theta / 2)
    lam = torch.tensor(0.7, dtype=torch.float64)
    x = torch.linspace(-1, 1, 401, dtype=torch.float64) * lam
    count = sum(if_spikes(x, lam * 8 / L, lam * 4 / L, 8)).double()
    assert torch.equal(count, qcfs_levels(x, lam, L).double()) and count.abs().max() == L
    ids = heldout_ids("tiny-llama")[:1, :32]
    assert spread.profile(ids).totals()["spikes_per_neuron"] < plain.profile(ids).totals()["spikes_per_neuron"]
    with pytest.raises(PipelineError, match="spread=true"):
        compile_graph(loaded, ann, ctx, "fold,qcfs,ifencode{spread=true,burst=2}", 8)
