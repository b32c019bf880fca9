"""qcfs pass: QCFS sites before synapse inputs, their sensitivity scan, and fine-tuning."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from snncc.api import compile_graph, prepare
from snncc.errors import PipelineError
from snncc.ir.match import SOFTMAX_TARGETS
from snncc.passes.qcfs import QcfsPass
from snncc.pipeline import PIPELINES, default_T, parse_pipeline
from snncc.plots import plot_finetune
from tests.conftest import assert_left_alone, compiled, heldout_ids, prepared

aten = torch.ops.aten
snn = torch.ops.snn


def _qcfs_report(program) -> dict:
    return next(p["report"] for p in program.info.passes if p["name"] == "qcfs")


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
    assert parse_pipeline("las", None)[1].ranges == 1  # las's tables: ternary digits, one range above
    assert parse_pipeline("las,nonlinear{ranges=0}", None)[1].ranges == 0


def test_the_qcfs_model_nears_the_ann_as_L_grows():
    """Each site rounds its input to one of 2L + 1 levels of its clip range: the model's
    error falls as L grows."""
    ann = prepared("tiny-llama")[1]
    ids = heldout_ids("tiny-llama")[:2, :64]
    with torch.no_grad():
        reference = ann(ids)
    errors = [float((compiled("tiny-llama", f"fold,qcfs{{L={L}}}", 8)(ids) - reference).abs().mean())
              for L in (8, 16, 64)]
    assert errors[0] > errors[1] > errors[2], errors


def test_every_synapse_input_but_trains_to_come_gets_one_site_and_nothing_else_changes():
    """Linear layers read QCFS sites; SiLU outputs (table neurons to come), softmax
    probabilities and norms' squares are not quantized; every other op stays as it was."""
    program = compiled("tiny-llama", "fold,qcfs{L=8}", 8)
    gm = program.graph_module
    sites = [n for n in gm.graph.nodes if n.target == snn.qcfs.default]
    assert len(sites) == _qcfs_report(program)["sites"] > 0
    linears = [n for n in gm.graph.nodes if n.target == aten.linear.default]
    assert linears and all(n.args[0].target == snn.qcfs.default for n in linears)
    quantized = {site.args[0].target for site in sites}
    assert not quantized & ({aten.silu.default, aten.pow.Tensor_Scalar} | SOFTMAX_TARGETS), quantized

    def ops(graph):
        return Counter(n.target for n in graph.nodes if n.op == "call_function" and n.target != snn.qcfs.default)

    assert ops(gm.graph) == ops(compiled("tiny-llama", "fold", 8).graph_module.graph)


class _SiluLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(256, 8)
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, input_ids):
        return self.proj(torch.nn.functional.silu(self.embed(input_ids)))


def test_a_synapse_that_reads_a_table_neuron_to_come_is_left_alone():
    _, ann, ctx = prepare(_SiluLinear(), calib_tokens=256)
    assert_left_alone(QcfsPass(), ann, ctx)


def test_multirange_leaves_the_most_sensitive_sites_to_multi_range_neurons():
    loaded, ann, ctx = prepared("tiny-llama")
    plain = compile_graph(loaded, ann, ctx, "fas,qcfs{multirange=0},calibrate{layer_steps=0,neuron_steps=0}")
    mixed = compile_graph(loaded, ann, ctx, "fas,qcfs{multirange=2},calibrate{layer_steps=0,neuron_steps=0}")
    report = _qcfs_report(mixed)
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
    spec = f"fold,qcfs{{L=2,steps=12,mode=full,lr=1e-4,checkpoint={ckpt}}}"
    first = compile_graph(loaded, ann, ctx, spec)
    report = _qcfs_report(first)["finetune"]
    assert report["steps"] == len(report["losses"]) == 12 and report["kl_last"] < report["kl_first"], report
    assert report["kl_batch0_after"] < report["kl_batch0_before"], report
    assert ckpt.exists() and not plot.exists()  # the pass draws nothing: its caller plots the report
    assert plot_finetune(report, plot) == plot and plot.read_bytes()[:4] == b"\x89PNG"
    assert all(torch.equal(v, ann.state_dict()[k]) for k, v in weights.items())
    resumed = compile_graph(loaded, ann, ctx, spec)
    ids = torch.randint(0, 200, (1, 16))
    assert torch.equal(first(ids), resumed(ids))  # 12 of 12 steps done: the checkpoint is the result
    again = _qcfs_report(resumed)["finetune"]
    assert again["checks"] == report["checks"] and again["kept_step"] == report["kept_step"]  # kept with it
    assert again["losses"] == report["losses"]


def test_finetuning_keeps_the_state_that_does_best_on_held_out_batches():
    """A learning rate that wrecks the model: the held-out loss never beats the start, so
    fine-tuning leaves the graph as it found it; a sane one keeps a state better than the start."""
    loaded, ann, ctx = prepared("tiny-llama")
    untrained = compiled("tiny-llama", "fold,qcfs{L=2}", 8)
    wrecked = compile_graph(loaded, ann, ctx, "fold,qcfs{L=2,steps=4,mode=full,lr=1.0}", 8)
    report = _qcfs_report(wrecked)["finetune"]
    assert report["kept_step"] == 0 and report["check_kl_kept"] == report["check_kl_start"], report
    assert [step for step, _ in report["checks"]] == [0, 4]  # the start, then the last step
    assert report["check_kl_kept"] == min(kl for _, kl in report["checks"])
    assert report["check_batches"] == 4 and report["train_batches"] == len(ctx.batches) - 4
    ids = heldout_ids("tiny-llama")[:1, :32]
    assert torch.equal(untrained(ids), wrecked(ids))
    trained = compile_graph(loaded, ann, ctx, "fold,qcfs{L=2,steps=12,mode=full,lr=1e-4,check=4}")
    report = _qcfs_report(trained)["finetune"]
    assert report["kept_step"] == 12 and report["check_kl_kept"] < report["check_kl_start"], report
