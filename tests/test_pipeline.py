"""Pipeline specs, the pass registry, order checks and the PassManager's contracts."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from snncc import passes  # noqa: F401
from snncc.calibration import CalibrationContext
from snncc.errors import PipelineError
from snncc.ir.rewrite import copy_graph_module
from snncc.pipeline import PASSES, Pass, PassManager, PassResult, Pipeline, check_T_given_once, parse_pipeline
from tests.conftest import prepared

aten = torch.ops.aten


def test_pipeline_names_and_pass_lists_parse():
    assert parse_pipeline("none", 16) == []
    [encode] = parse_pipeline("encode", 12)
    assert encode.name == "encode" and encode.T == 12
    [encode] = parse_pipeline(" encode{T=8, headroom=2.5} ", 16)
    assert (encode.T, encode.headroom) == (8, 2.5)


@pytest.mark.parametrize("spec, message", [
    ("bogus", "unknown pass or pipeline 'bogus'"),
    ("encode,bogus", "passes: attention, calibrate, encode, ffn, fold, ifencode, nonlinear, outlier, portable, qcfs"),
    ("encode,encode", "appears twice"),
    ("encode{bogus=1}", "has no option 'bogus'"),
    ("encode{headroom=abc}", "must be of type float"),
    ("encode{T=0}", "bad T=0"),
    ("encode{T", "cannot parse"),
    ("", "empty pipeline"),
])
def test_bad_specs_are_refused_with_a_clear_message(spec, message):
    with pytest.raises(PipelineError, match=message):
        parse_pipeline(spec, 16)


@pytest.mark.parametrize("spec, message", [
    ("encode{headroom=nan}", "encode: option headroom=nan is out of range: it must be finite and > 0"),
    ("encode{headroom=inf}", "encode: option headroom=inf is out of range: it must be finite and > 0"),
    ("encode{headroom=-1}", "encode: option headroom=-1.0 is out of range: it must be finite and > 0"),
    ("encode{headroom=0}", "encode: option headroom=0.0 is out of range"),
    ("encode{floor=1.5}", "encode: option floor=1.5 is out of range: it must be finite and in 0..1"),
    ("ffn{headroom=-inf}", "ffn: option headroom=-inf is out of range"),
    ("nonlinear{headroom=nan}", "nonlinear: option headroom=nan is out of range"),
    ("nonlinear{ranges=7}", "nonlinear: option ranges=7 is out of range: it must be in 0..6"),
    ("attention{ranges=-1}", "attention: option ranges=-1 is out of range: it must be in 0..6"),
    ("outlier{G=7}", "outlier: option G=7 is out of range: it must be in 0..6"),
    ("outlier{headroom=nan}", "outlier: option headroom=nan is out of range"),
    ("qcfs{multirange=nan}", "qcfs: option multirange=nan is out of range: it must be finite and >= 0"),
    ("qcfs{multirange=-1}", "qcfs: option multirange=-1.0 is out of range"),
    ("qcfs{lr=nan}", "qcfs: option lr=nan is out of range: it must be finite and > 0"),
    ("qcfs{lr=0}", "qcfs: option lr=0.0 is out of range"),
    ("qcfs{lambda_lr=inf}", "qcfs: option lambda_lr=inf is out of range"),
    ("qcfs{L=0}", "qcfs: option L=0 is out of range: it must be >= 1"),
    ("qcfs{steps=-5}", "qcfs: option steps=-5 is out of range: it must be >= 0"),
    ("qcfs{mode=half}", "qcfs: option mode=half is out of range: it must be one of lambda, full"),
    ("qcfs,ifencode{burst=128}", "ifencode: option burst=128 is out of range: it must be in 0..127"),
    ("qcfs,ifencode{burst=-1}", "ifencode: option burst=-1 is out of range"),
    ("qcfs,ifencode,calibrate{lr=nan}", "calibrate: option lr=nan is out of range"),
    ("qcfs,ifencode,calibrate{batches=0}", "calibrate: option batches=0 is out of range: it must be >= 1"),
    ("qcfs,ifencode,calibrate{check_every=0}", "calibrate: option check_every=0 is out of range"),
    ("qcfs,ifencode,calibrate{kl_weight=-1}", "calibrate: option kl_weight=-1.0 is out of range"),
    ("fas,qcfs{multirange=nan}", "qcfs: option multirange=nan is out of range"),
    ("encode{T=40}", "bad T=40"),
])
def test_out_of_range_options_are_refused_in_one_line(spec, message):
    with pytest.raises(PipelineError) as caught:
        parse_pipeline(spec, 16)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value), str(caught.value)


def test_options_are_checked_however_a_pass_is_made():
    with pytest.raises(PipelineError, match="headroom=nan"):
        PASSES["encode"](headroom=float("nan"))


@pytest.mark.parametrize("T", [0, -3, 33, 1.5, True])
def test_bad_T_is_refused(T):
    with pytest.raises(PipelineError, match="bad T"):
        parse_pipeline("encode", T)


@dataclass
class _Late(Pass):
    name = "late-test"
    stage = 10  # must run before encode (stage 50)
    summary = "test pass"

    def run(self, gm, ctx):
        return PassResult(gm, False)


@dataclass
class _Liar(Pass):
    name = "liar-test"
    stage = 90
    summary = "claims no change but adds a constant to the graph"

    def run(self, gm, ctx):
        gm.register_buffer("sneaky", torch.zeros(1))
        with gm.graph.inserting_before(gm.graph.output_node()):
            gm.graph.get_attr("sneaky")
        return PassResult(gm, False)


def test_order_between_stages_is_checked(monkeypatch):
    monkeypatch.setitem(PASSES, "late-test", _Late)
    assert [p.name for p in parse_pipeline("late-test,encode", 8)] == ["late-test", "encode"]
    with pytest.raises(PipelineError, match="'late-test' must run before 'encode'"):
        parse_pipeline("encode,late-test", 8)


def test_debug_mode_catches_a_pass_that_lies_about_modified():
    _, ann, ctx = prepared("tiny-llama")
    with pytest.raises(PipelineError, match="reported modified=False"):
        PassManager([_Liar()], debug=True).run(copy_graph_module(ann), ctx)


@dataclass
class _Thief(Pass):
    name = "thief-test"
    stage = 90
    summary = "removes every SiLU but declares nothing in lowers"

    def run(self, gm, ctx):
        for node in [n for n in gm.graph.nodes if n.target == aten.silu.default]:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        return PassResult(gm, True)


@dataclass
class _DeclaredThief(_Thief):
    name = "declared-thief-test"
    lowers = frozenset({aten.silu.default})


def test_debug_mode_catches_a_pass_that_removes_ops_it_does_not_declare():
    _, ann, ctx = prepared("tiny-llama")
    with pytest.raises(PipelineError, match=r"'thief-test' removed every aten\.silu\.default from the graph, but its "
                                            r"`lowers` does not declare it"):
        PassManager([_Thief()], debug=True).run(copy_graph_module(ann), ctx)
    PassManager([_Thief()]).run(copy_graph_module(ann), ctx)  # only debug mode checks
    gm = PassManager([_DeclaredThief()], debug=True).run(copy_graph_module(ann), ctx)
    assert not any(n.target == aten.silu.default for n in gm.graph.nodes)


@dataclass
class _Hoarder(Pass):
    name = "hoarder-test"
    stage = 90
    summary = "remembers the last graph's size"

    def run(self, gm, ctx):
        self.seen = len(gm.graph.nodes)
        return PassResult(gm, False)


def test_debug_mode_catches_a_pass_that_keeps_state():
    _, ann, ctx = prepared("tiny-llama")
    with pytest.raises(PipelineError, match="'hoarder-test' changed its own fields while running"):
        PassManager([_Hoarder()], debug=True).run(copy_graph_module(ann), ctx)


@dataclass
class _Maker(Pass):
    name = "maker-test"
    stage = 90
    summary = "adds x + 1 and x + 2 before the output, naming a creator for the second"

    def run(self, gm, ctx):
        x = next(n for n in gm.graph.nodes if n.op == "placeholder")
        with gm.graph.inserting_before(gm.graph.output_node()):
            gm.graph.call_function(aten.add.Scalar, (x, 1))
            gm.graph.call_function(aten.add.Scalar, (x, 2)).meta["created_by"] = "maker-test (second)"
        return PassResult(gm, True)


def test_the_manager_stamps_each_new_node_with_the_pass_that_made_it():
    _, ann, ctx = prepared("tiny-llama")
    gm = copy_graph_module(ann)
    existing = set(gm.graph.nodes)
    [nonlinear] = parse_pipeline("nonlinear", 8)
    gm = PassManager([nonlinear, _Maker()]).run(gm, ctx)
    made = {n: n.meta.get("created_by") for n in gm.graph.nodes if n not in existing}
    assert not any("created_by" in n.meta for n in gm.graph.nodes if n in existing)
    assert set(made.values()) == {"nonlinear", "maker-test", "maker-test (second)"}
    assert sum(creator == "nonlinear" for creator in made.values()) > 10  # neurons, tables, decoders


@pytest.mark.parametrize("spec", ["nonlinear{ranges=2}", "attention{ranges=2}", "outlier"])
def test_a_pass_instance_runs_twice_as_two_fresh_ones_do(spec):
    """Passes keep nothing between runs: one instance run on tiny-llama and then on tiny-gpt2
    gives on each what a fresh instance gives."""
    [shared] = parse_pipeline(spec, 8)
    for name in ("tiny-llama", "tiny-gpt2"):
        _, ann, ctx = prepared(name)
        [fresh] = parse_pipeline(spec, 8)
        again, once = shared.run(copy_graph_module(ann), ctx), fresh.run(copy_graph_module(ann), ctx)
        for result in (again, once):
            result.graph_module.recompile()
        assert again.graph_module.code == once.graph_module.code
        mine, theirs = again.graph_module.state_dict(), once.graph_module.state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
        assert again.sites == once.sites and again.report == once.report


def test_a_failing_pass_names_the_passes_already_run():
    @dataclass
    class _Boom(Pass):
        name = "boom"
        stage = 95
        summary = "fails"

        def run(self, gm, ctx):
            raise RuntimeError("kaput")

    _, ann, ctx = prepared("tiny-llama")
    [encode] = parse_pipeline("encode", 4)
    with pytest.raises(PipelineError, match="pass 'boom' failed .*kaput.*already run: encode"):
        PassManager([encode, _Boom()]).run(copy_graph_module(ann), ctx)


def test_context_records_each_required_tensor_once_per_batch():
    _, ann, _ = prepared("tiny-llama")
    ctx = CalibrationContext(prepared("tiny-llama")[2].batches, "test")
    ctx.attach(ann)
    names = [n.name for n in ann.graph.nodes if n.target == torch.ops.aten.silu.default]
    ctx.require(names)
    # one run of the ANN records every activation any later pass may ask for
    linear_inputs = [n.args[0].name for n in ann.graph.nodes if n.target == torch.ops.aten.linear.default]
    assert set(names) | set(linear_inputs) <= set(ctx.stats) and ctx.tokens >= 1000
    assert all(s.samples == len(ctx.batches) for s in ctx.stats.values())
    before = {name: s.absmax.clone() for name, s in ctx.stats.items()}
    ctx.require(names)  # already recorded: no second run
    assert all(ctx.stats[n].samples == len(ctx.batches) and torch.equal(ctx.stats[n].absmax, before[n]) for n in names)


def test_one_context_compiles_twice_as_two_fresh_ones_do():
    """Tensors a pass records from its own graph depend on that run (its T): a second compile
    through the same context must record them afresh (it reused T = 14's before)."""
    from snncc.api import compile_graph, prepare
    from snncc.ir.ops import execution_mode

    ids = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))
    fresh = compile_graph(*prepare("tiny-opt", calib_tokens=1024), "las", 8)
    loaded, ann, ctx = prepare("tiny-opt", calib_tokens=1024)
    compile_graph(loaded, ann, ctx, "las", 14)
    again = compile_graph(loaded, ann, ctx, "las", 8)
    with torch.no_grad(), execution_mode("exact"):
        assert torch.equal(again.graph_module(ids), fresh.graph_module(ids))


def test_a_T_given_beside_a_pass_s_own_T_is_refused():
    check_T_given_once(Pipeline.parse("las", 12), 12)  # a pipeline's passes take the T given
    check_T_given_once(Pipeline.parse("encode{T=8}", 8), 8)  # the same T twice: no doubt
    check_T_given_once(Pipeline.parse("encode{T=8}", None), None)  # no T given: the pass's own
    with pytest.raises(PipelineError, match="T=12 was given and pass 'encode' sets its own T=8"):
        check_T_given_once(Pipeline.parse("encode{T=8}", 12), 12)
