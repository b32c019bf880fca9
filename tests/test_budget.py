"""Per-channel precision: the sensitivity, the allocation, range factors in the passes, budgets."""

from __future__ import annotations

import pytest
import torch

from snncc import allocation, sensitivity
from snncc.budget import Budget, compile_within_budget, default_budget, folded_ann, simulate, takes_default
from snncc.errors import PipelineError
from snncc.ir.match import through_identity
from snncc.models import CAUSAL_LM, ENCODER
from snncc.pipeline import Pipeline
from snncc.profile import profile_graph
from tests.conftest import heldout_ids, prepared

T, G = 12, 6


def _synthetic(seed: int = 0, sites: int = 4, channels: int = 8) -> sensitivity.Sensitivity:
    """Sites whose channels differ in sensitivity by orders of magnitude: distortion 4^k w,
    operations falling by one per digit dropped."""
    generator = torch.Generator().manual_seed(seed)
    made = []
    for index in range(sites):
        weight = torch.exp(torch.randn(channels, generator=generator, dtype=torch.float64) * 3)
        k = torch.arange(T, dtype=torch.float64)[:, None]
        made.append(sensitivity.SiteSensitivity(f"site{index}", True, weight * 4.0**k, (T - k).expand(T, channels)
                                                * 100.0))
    return sensitivity.Sensitivity(made, T, G, tokens=10, objective="kl", ann_macs=10_000)


@pytest.mark.parametrize("text, message", [
    ("top5=0.9", "unknown key"), ("top1=high", "not a number"), ("top1=1.5", "out of range"),
    ("ppl=0.99", "out of range"), ("kl=nan", "out of range"), ("energy=0.5,top1=0.99", "alone"), ("", "at least"),
])
def test_bad_budgets_are_refused_on_one_line(text, message):
    with pytest.raises(PipelineError, match=message):
        Budget.parse(text)


def test_the_default_budget_is_the_fidelity_targets_where_the_model_allows_one():
    free = 20 * 2**30
    budget, why = default_budget(CAUSAL_LM, 135_000_000, 48, free)
    assert budget.limits == {"top1": 0.995, "ppl": 1.005} and "default" in why
    assert default_budget(ENCODER, 22_000_000, 48, free)[0].limits == {"cosine": 0.9999}
    # A 7B model's whole-model backward does not fit; one batch leaves nothing to check on.
    budget, why = default_budget(CAUSAL_LM, 6_700_000_000, 48, free)
    assert budget is None and "7" in why and "20.0 GiB available" in why
    budget, why = default_budget(CAUSAL_LM, 135_000_000, 1, free)
    assert budget is None and "2 calibration batches" in why
    assert default_budget("seq2seq", 135_000_000, 48, free)[0] is None


def test_only_plain_las_without_T_takes_the_default_budget():
    assert takes_default("las", None) and takes_default(" las ", None)
    assert not takes_default("las", 14)  # -T asks for uniform steps
    assert not takes_default("fas", None) and not takes_default("las,nonlinear{ranges=6}", None)
    assert not takes_default(Pipeline.parse("las", None), None)  # parsed already: its T is set


def test_budget_margins_are_applied_on_the_right_side():
    budget = Budget.parse("top1=0.995,ppl=1.005")
    assert budget.met({"top1_agreement": 0.9961, "ppl_ratio": 1.0039})
    assert not budget.met({"top1_agreement": 0.9955, "ppl_ratio": 1.0})  # within the margin below
    assert budget.met({"top1_agreement": 0.9955, "ppl_ratio": 1.0}, margin=False)
    assert not budget.met({"top1_agreement": 0.999, "ppl_ratio": 1.0045})
    kl = Budget.parse("kl=1e-3")
    assert kl.met({"kl_per_token": 4e-4}) and not kl.met({"kl_per_token": 6e-4})


def test_allocation_meets_the_divergence_and_beats_uniform_and_per_site():
    measured = _synthetic()
    for digits in range(4, T):
        uniform = allocation.uniform(measured, digits)
        limit = uniform.distortion / measured.tokens
        per_channel = allocation.within_distortion(measured, limit)
        per_site = allocation.within_distortion(measured, limit, per_channel=False)
        assert per_channel.distortion <= uniform.distortion * (1 + 1e-9)
        assert per_channel.sops <= per_site.sops <= uniform.sops
    assert allocation.within_distortion(measured, 1e3).sops < allocation.within_distortion(measured, 1e-3).sops


def test_allocation_within_operations_keeps_to_them():
    measured = _synthetic(seed=1)
    full = allocation.uniform(measured, T).sops
    for share in (0.3, 0.5, 0.8):
        plan = allocation.within_sops(measured, share * full)
        assert plan.sops <= share * full
        # a plan with more operations allowed is no more divergent
        assert allocation.within_sops(measured, (share + 0.1) * full).distortion <= plan.distortion
    factors = plan.range_factors()
    assert all(torch.equal(factors[name], 2.0 ** k.double().float()) for name, k in plan.dropped.items())


@pytest.fixture(scope="module")
def tiny_sensitivity():
    loaded, ann, ctx = prepared("tiny-llama")
    folded = folded_ann(ann, ctx)
    return folded, ctx, sensitivity.measure(folded, ctx, ctx.batches[:2], T, G)


def test_sensitivity_covers_every_synapse_input_and_grows_with_digits_dropped(tiny_sensitivity):
    folded, _, measured = tiny_sensitivity
    linears = [n for n in folded.graph.nodes if n.target == torch.ops.aten.linear.default]
    names = {site.name for site in measured.sites}
    inputs = {through_identity(n.args[0]).name for n in linears}
    assert inputs <= names  # every linear layer's input (before its casts)
    assert len(names) > len(inputs)  # and the QK^T / PV operands
    for site in measured.sites:
        total_d, total_s = site.distortion.flatten(1).sum(1), site.sops.flatten(1).sum(1)
        assert total_s[0] > total_s[-1] and bool((total_s[1:] <= total_s[:-1]).all())
        assert total_d[-1] > 10 * total_d[0]


def test_predicted_divergence_tracks_the_simulated_one(tiny_sensitivity):
    """The second-order sum over sites against the divergence of the ANN run with every site's
    real code, on the same text: within a factor of 3 over three orders of magnitude."""
    folded, ctx, measured = tiny_sensitivity
    references = [folded(ids) for ids in ctx.batches[:2]]
    for digits in (5, 7, 9):
        plan = allocation.uniform(measured, digits)
        simulated = simulate(folded, ctx, plan, G, ctx.batches[:2], references, causal=True)["kl_per_token"]
        predicted = plan.distortion / measured.tokens
        assert predicted / 3 < simulated < predicted * 3, (digits, predicted, simulated)


def test_range_factors_silence_the_leading_steps():
    """A site whose range is 2^k larger sends nothing in its first k steps (k digits fewer)."""
    loaded, ann, ctx = prepared("tiny-llama")
    from snncc.api import compile_graph

    names = [name for name, _ in sensitivity.synapse_sites(folded_ann(ann, ctx))]
    ctx.range_factors = {name: torch.tensor(8.0) for name in names}
    try:
        program = compile_graph(loaded, ann, ctx, "las", T)
    finally:
        ctx.range_factors = {}
    profile = profile_graph(program.graph_module, heldout_ids("tiny-llama")[:1])
    trains = [n.name for n in program.graph_module.graph.nodes if n.target == torch.ops.snn.mr_encode.default]
    steps = {name: profile.spikes_per_step[name] for name in trains}
    # A value below r 2^-3 has NAF digits from step 2 on (one above its binary length); only
    # held-out values beyond the calibrated range fire earlier.
    silent = [name for name, counts in steps.items() if sum(counts[:2]) <= 0.001 * sum(counts)]
    assert len(silent) == len(names)  # every site, and not the product operands (up_proj's output)


def test_budget_compile_meets_a_divergence_budget_on_held_out_calibration_text():
    loaded, ann, ctx = prepared("tiny-llama")
    from snncc.api import compile_graph

    pipeline = Pipeline.parse("las", T)
    budget = Budget.parse("kl=2e-3")
    program = compile_within_budget(ann, ctx, pipeline, budget, loaded.task,
                                    lambda c: compile_graph(loaded, ann, c, pipeline))
    precision = program.info.precision
    assert precision["met_on_check"] and precision["check"]["kl_per_token"] <= 2e-3 * 0.5
    assert precision["plan"]["mean_digits"] < T  # it dropped digits where it could
    assert precision["check_tokens"] > 0 and precision["fit_tokens"] > 0
    cheaper = compile_within_budget(ann, ctx, pipeline, Budget.parse("kl=2e-2"), loaded.task,
                                    lambda c: compile_graph(loaded, ann, c, pipeline))
    assert cheaper.info.precision["check_energy_ratio"] < precision["check_energy_ratio"]
    assert precision["programs_compiled"] >= 1 and precision["seconds"]["compile_and_check"] > 0
    assert cheaper.info.precision["seconds"]["sensitivity"] < 1  # measured once, for the first budget
    assert ctx.range_factors == {}  # the plan does not stay on the caller's context


def test_a_model_too_big_for_a_budget_compiles_uniform_and_says_why(monkeypatch):
    import types

    import psutil

    from snncc.api import compile_graph

    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=2**20))
    loaded, ann, ctx = prepared("tiny-llama")
    program = compile_graph(loaded, ann, ctx, "las", budget="default")
    assert program.T == 14 and program.info.precision["default"]
    assert "whole model with gradients" in program.info.precision["why"] and "plan" not in program.info.precision
