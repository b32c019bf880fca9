"""qcfs, ifencode and calibrate: IF neurons reproduce QCFS, fine-tuning and calibration learn."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from snncc.api import compile_graph, prepare
from snncc.errors import PipelineError
from snncc.ir.ops import if_spikes, qcfs_levels
from snncc.pipeline import PIPELINES, default_T, parse_pipeline
from tests.conftest import heldout_ids, prepared

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


def test_qcfs_gradients_are_straight_through_inside_the_clip_range():
    x = torch.tensor([-3.0, -0.3, 0.26, 2.5], requires_grad=True)
    lam = torch.tensor(1.0, requires_grad=True)
    snn.qcfs(x, lam, 4).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]
    # d/dlambda: the sign outside, level/L - x/lambda inside (0.26 -> level 1: 0.25 - 0.26)
    expected = -1 + (-0.25 + 0.3) + (0.25 - 0.26) + 1
    assert lam.grad.item() == pytest.approx(expected, abs=1e-6)


def test_fas_pipeline_and_its_default_T():
    assert PIPELINES["fas"] == ("fold", "qcfs", "ifencode", "calibrate", "nonlinear", "attention", "outlier", "ffn",
                                "encode", "portable")
    assert default_T("fas") == 8 and default_T("fas,qcfs{steps=3}") == 8
    passes = parse_pipeline("fas,qcfs{steps=3,mode=full}", None)
    assert [p.name for p in passes] == list(PIPELINES["fas"])
    assert passes[1].steps == 3 and passes[1].mode == "full" and passes[2].T == 8


def test_a_spec_overrides_the_options_a_pipeline_gives_key_by_key():
    by_name = {p.name: p for p in parse_pipeline("fas", None)}
    assert (by_name["nonlinear"].ranges, by_name["nonlinear"].headroom, by_name["attention"].ranges) == (6, 1.0, 6)
    assert (by_name["qcfs"].L, by_name["qcfs"].multirange) == (16, 0.5)
    by_name = {p.name: p for p in parse_pipeline("fas,qcfs{L=8}", None)}
    assert (by_name["qcfs"].L, by_name["qcfs"].multirange) == (8, 0.5)
    by_name = {p.name: p for p in parse_pipeline("fas,nonlinear{headroom=4}", 12)}
    assert (by_name["nonlinear"].ranges, by_name["nonlinear"].headroom, by_name["nonlinear"].T) == (6, 4.0, 12)
    assert parse_pipeline("las", None)[1].ranges == 0  # las's tables keep plain codes


@pytest.mark.parametrize(("T", "burst"), [(4, 1), (8, 0), (4, 2)])
def test_calibration_does_not_raise_and_off_L_lowers_the_calibration_loss(tiny_name, T, burst):
    loaded, ann, ctx = prepared(tiny_name)
    spec = f"fas,ifencode{{burst={burst}}},calibrate{{layer_steps=15,neuron_steps=15,batches=2}}"
    program = compile_graph(loaded, ann, ctx, spec, T)
    report = next(p["report"] for p in program.info.passes if p["name"] == "calibrate")
    assert report["check_batches"] == 4  # states are judged on batches the training never saw
    assert report["after"]["check_loss"] <= report["before"]["check_loss"]
    if (burst or 16 // T) * T != 16:  # B T = L (fas's L = 16) starts at QCFS exactly; elsewhere a code mismatch
        assert report["after"]["loss"] < 0.95 * report["before"]["loss"], report
        assert report["after"]["check_loss"] < 0.95 * report["before"]["check_loss"], report


def test_calibrate_refuses_bad_options():
    loaded, ann, ctx = prepared("tiny-llama")
    with pytest.raises(PipelineError, match="check_every"):
        compile_graph(loaded, ann, ctx, "fas,calibrate{check_every=0}", 8)


@pytest.mark.parametrize(("L", "T"), [(8, 8), (8, 4), (16, 8), (12, 4)])
def test_ifencode_at_burst_times_T_equal_L_changes_nothing_the_qcfs_model_computes(L, T):
    """burst=0 picks B = L / T: the IF neurons run the fine-tuned QCFS model as it is, in T steps."""
    loaded, ann, ctx = prepared("tiny-llama")
    ids = torch.randint(0, 200, (1, 24))
    qcfs_model = compile_graph(loaded, ann, ctx, f"fold,qcfs{{L={L}}}", T)
    snn_model = compile_graph(loaded, ann, ctx, f"fold,qcfs{{L={L}}},ifencode", T)
    bursts = {n.args[4] for n in snn_model.graph_module.graph.nodes if n.target == snn.if_encode.default}
    assert bursts == {L // T}
    assert torch.equal(qcfs_model(ids), snn_model(ids))


@pytest.mark.parametrize("L", [2, 4])
def test_ifencode_spread_keeps_the_qcfs_levels_at_T_above_L(L):
    """spread=true at T = 8 > L: threshold lambda T / L, at most one spike per step; within
    the clip range each neuron sends QCFS's level as its spike count (<= L spikes), where
    plain neurons at the same T send a finer code and more spikes."""
    loaded, ann, ctx = prepared("tiny-llama")
    spread = compile_graph(loaded, ann, ctx, f"fold,qcfs{{L={L}}},ifencode{{spread=true}}", 8)
    plain = compile_graph(loaded, ann, ctx, f"fold,qcfs{{L={L}}},ifencode", 8)
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


def test_multirange_leaves_the_most_sensitive_sites_to_multi_range_neurons():
    loaded, ann, ctx = prepared("tiny-llama")
    plain = compile_graph(loaded, ann, ctx, "fas,qcfs{multirange=0},calibrate{layer_steps=0,neuron_steps=0}")
    mixed = compile_graph(loaded, ann, ctx, "fas,qcfs{multirange=2},calibrate{layer_steps=0,neuron_steps=0}")
    report = next(p["report"] for p in mixed.info.passes if p["name"] == "qcfs")
    chosen = report["multirange"]
    assert 0 < chosen["sites"] < report["sites"] and chosen["max_site_kl"] > 2 * chosen["median_site_kl"]

    def sources(program, target):
        return {n.args[0].name for n in program.graph_module.graph.nodes if n.target == target}

    # every site it names is now a multi-range neuron, not an IF population; nothing is left analog
    assert set(chosen["names"]) <= sources(mixed, snn.mr_encode.default) - sources(mixed, snn.if_encode.default)
    assert set(chosen["names"]) <= sources(plain, snn.if_encode.default)
    assert len(sources(mixed, snn.if_encode.default)) == len(sources(plain, snn.if_encode.default)) - chosen["sites"]
    assert mixed.info.coverage["coverage"] == 1.0


def test_a_recompile_reuses_the_sensitivity_scan_and_a_new_L_does_not(monkeypatch):
    import snncc.passes.qcfs as qcfs_pass

    scans = []
    real = qcfs_pass.site_sensitivities
    monkeypatch.setattr(qcfs_pass, "site_sensitivities", lambda *args: scans.append(1) or real(*args))
    loaded, ann, ctx = prepare("tiny-llama", calib_tokens=512)  # a fresh context: nothing scanned yet
    spec = "fas,qcfs{{L={},multirange=2}},calibrate{{layer_steps=0,neuron_steps=0}}"
    first, again = (compile_graph(loaded, ann, ctx, spec.format(8)) for _ in range(2))
    assert len(scans) == 1
    ids = torch.randint(0, 200, (1, 16))
    assert torch.equal(first(ids), again(ids))
    compile_graph(loaded, ann, ctx, spec.format(16))
    assert len(scans) == 2


def test_qcfs_and_ifencode_refuse_bad_options():
    loaded, ann, ctx = prepared("tiny-llama")
    with pytest.raises(PipelineError, match="multirange=-1"):
        compile_graph(loaded, ann, ctx, "fold,qcfs{multirange=-1}", 8)
    with pytest.raises(PipelineError, match="burst=-1"):
        compile_graph(loaded, ann, ctx, "fold,qcfs,ifencode{burst=-1}", 8)
    for spec in ("fold,nonlinear{ranges=7}", "fold,attention{ranges=-1}"):
        with pytest.raises(PipelineError, match=r"(nonlinear|attention): option ranges=(7|-1) is out of range: it must "
                                                r"be in 0\.\.6"):
            compile_graph(loaded, ann, ctx, spec, 8)


def test_finetuning_lowers_the_distillation_loss_resumes_and_leaves_the_ann_alone(tmp_path):
    loaded, ann, ctx = prepared("tiny-llama")
    weights = {k: v.clone() for k, v in ann.state_dict().items()}
    ckpt, plot = tmp_path / "ft.pt", tmp_path / "loss.png"
    spec = f"fold,qcfs{{L=2,steps=12,mode=full,lr=1e-4,checkpoint={ckpt}"
    first = compile_graph(loaded, ann, ctx, f"{spec},plot={plot}}}")
    report = next(p["report"] for p in first.info.passes if p["name"] == "qcfs")["finetune"]
    assert report["steps"] == 12 and report["kl_last"] < report["kl_first"], report
    assert report["kl_batch0_after"] < report["kl_batch0_before"], report
    assert ckpt.exists() and plot.exists()
    assert all(torch.equal(v, ann.state_dict()[k]) for k, v in weights.items())
    resumed = compile_graph(loaded, ann, ctx, f"{spec}}}")
    ids = torch.randint(0, 200, (1, 16))
    assert torch.equal(first(ids), resumed(ids))  # 12 of 12 steps done: the checkpoint is the result
    again = next(p["report"] for p in resumed.info.passes if p["name"] == "qcfs")["finetune"]
    assert again["checks"] == report["checks"] and again["kept_step"] == report["kept_step"]  # kept with it


def test_finetuning_keeps_the_state_that_does_best_on_held_out_batches():
    """A learning rate that wrecks the model: the held-out loss never beats the start, so
    fine-tuning leaves the graph as it found it; a sane one keeps a state better than the start."""
    loaded, ann, ctx = prepared("tiny-llama")
    untrained = compile_graph(loaded, ann, ctx, "fold,qcfs{L=2}")
    wrecked = compile_graph(loaded, ann, ctx, "fold,qcfs{L=2,steps=4,mode=full,lr=1.0}")
    report = next(p["report"] for p in wrecked.info.passes if p["name"] == "qcfs")["finetune"]
    assert report["kept_step"] == 0 and report["check_kl_kept"] == report["check_kl_start"], report
    assert [step for step, _ in report["checks"]] == [0, 4]  # the start, then the last step
    assert report["check_kl_kept"] == min(kl for _, kl in report["checks"])
    assert report["check_batches"] == 4 and report["train_batches"] == len(ctx.batches) - 4
    ids = heldout_ids("tiny-llama")[:1, :32]
    assert torch.equal(untrained(ids), wrecked(ids))
    trained = compile_graph(loaded, ann, ctx, "fold,qcfs{L=2,steps=12,mode=full,lr=1e-4,check=4}")
    report = next(p["report"] for p in trained.info.passes if p["name"] == "qcfs")["finetune"]
    assert report["kept_step"] == 12 and report["check_kl_kept"] < report["check_kl_start"], report
