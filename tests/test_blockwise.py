"""Block-by-block compile (snncc.blockwise, snncc.ir.stages): the same program as the
whole-model compile, one stage's weights at a time."""

from __future__ import annotations

import pytest
import torch
from conftest import heldout_ids, prepared

from snncc.api import compile_graph
from snncc.blockwise import StageWeights, compile_stages, runs_by_block
from snncc.calibration import CalibrationContext
from snncc.errors import PipelineError
from snncc.ir.stages import join_stages, split_stages
from snncc.models import TINY_MODELS
from snncc.pipeline import Pipeline


def test_stages_run_in_turn_and_joined_equal_the_ann(tiny_name):
    _, ann, ctx = prepared(tiny_name)
    stages = split_stages(ann)
    assert [s.name for s in stages][:2] == ["prologue", "block 0"] and stages[-1].name == "epilogue"
    assert len(stages) == 4  # the tiny models have 2 blocks
    x = heldout_ids(tiny_name)[:2]
    values = {"input_ids": x}
    for stage in stages:
        out = stage.graph_module(*[values[name] for name in stage.inputs])
        values.update(zip(stage.outputs, out, strict=stage is not stages[-1]))
    assert torch.equal(out[0], ann(x))
    assert torch.equal(join_stages(stages)(x), ann(x))


def test_position_tables_enter_a_block_as_input_independent(tiny_name):
    _, ann, _ = prepared(tiny_name)
    block = split_stages(ann)[1].graph_module
    flags = {n.name: bool(n.meta.get("input_independent")) for n in block.graph.nodes if n.op == "placeholder"}
    hidden = [name for name, independent in flags.items() if not independent]
    assert len(hidden) == 1  # the hidden state; sizes, masks and position tables are constants per length
    assert any(flags.values())


@pytest.mark.parametrize(("name", "spec"), [*[(name, "las") for name in TINY_MODELS], ("tiny-llama", "encode"),
                                             *[pytest.param(name, "encode", marks=pytest.mark.slow)
                                               for name in TINY_MODELS[1:]]])
def test_block_by_block_is_the_whole_model_program_bit_for_bit(name, spec):
    """las on every tiny model in the fast tier; encode on the others in the slow tier."""
    loaded, ann, ctx = prepared(name)
    whole = compile_graph(loaded, ann, _fresh(ctx, ann), spec, by_block=False)
    blocks = compile_graph(loaded, ann, _fresh(ctx, ann), spec)  # records its ranges block by block
    x = heldout_ids(name)
    assert torch.equal(blocks(x), whole(x))
    coverage = {key: value for key, value in blocks.info.coverage.items() if key != "analog_ops"}
    assert coverage == {key: value for key, value in whole.info.coverage.items() if key != "analog_ops"}
    assert _ops(blocks.info.coverage) == _ops(whole.info.coverage)  # node names may differ
    assert [r["name"] for r in blocks.info.passes] == [r["name"] for r in whole.info.passes]


def test_a_context_holding_every_range_compiles_without_running_the_batches(monkeypatch):
    """A budget search compiles many times with one context: after the first compile the
    blocks have every range they need, and compile to the same program without the batches."""
    loaded, ann, ctx = prepared("tiny-llama")
    reused = _fresh(ctx, ann)
    first = compile_graph(loaded, ann, reused, "las")
    assert not any(reused.unrecorded(stage.graph_module) for stage in split_stages(ann))
    runs = []
    original = CalibrationContext.record_all

    def counted(self, *args, **kwargs):
        runs.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CalibrationContext, "record_all", counted)
    second = compile_graph(loaded, ann, reused, "las")
    assert runs == []
    x = heldout_ids("tiny-llama")
    assert torch.equal(second(x), first(x))
    assert _fresh(ctx, ann).unrecorded(split_stages(ann)[1].graph_module)  # a fresh context does run them


def test_a_context_lacking_a_range_a_pass_asks_for_runs_the_batches():
    """GPT-2's LayerNorm tables ask, on demand, for their centred inputs, which an `encode`
    compile never records: a `las` compile after it must still run the batches to get them."""
    loaded, ann, ctx = prepared("tiny-gpt2")
    reused = _fresh(ctx, ann)
    compile_graph(loaded, ann, reused, "encode")
    assert any(reused.unrecorded(stage.graph_module) for stage in split_stages(ann))
    x = heldout_ids("tiny-gpt2")
    after_encode = compile_graph(loaded, ann, reused, "las")
    assert torch.equal(after_encode(x), compile_graph(loaded, ann, _fresh(ctx, ann), "las")(x))


def _fresh(ctx: CalibrationContext, ann) -> CalibrationContext:
    """A context with the same batches and nothing recorded yet."""
    fresh = CalibrationContext(ctx.batches, ctx.source)
    fresh.attach(ann)
    return fresh


def _ops(coverage: dict) -> list:
    return sorted((op["op"], op["macs"], op["reason"]) for op in coverage["analog_ops"])


def test_passes_that_run_the_whole_ann_stay_on_the_whole_model_path():
    assert runs_by_block(Pipeline.parse("las")) and runs_by_block(Pipeline.parse("encode"))
    assert not runs_by_block(Pipeline.parse("fas"))


class _Recorder(StageWeights):
    def __init__(self):
        self.events = []

    def load(self, stage):
        self.events.append(("load", stage.name))

    def release(self, stage, program):
        self.events.append(("release", stage.name))


def test_one_stage_is_loaded_at_a_time():
    _, ann, ctx = prepared("tiny-llama")
    recorder = _Recorder()
    compile_stages(ann, ctx, Pipeline.parse("encode"), weights=recorder)
    names = [s.name for s in split_stages(ann)]
    assert recorder.events == [(event, name) for name in names for event in ("load", "release")]


def test_a_block_refuses_ranges_from_a_pass_graph():
    _, ann, ctx = prepared("tiny-llama")
    block = split_stages(ann)[1].graph_module
    context = CalibrationContext([], "text", ann_only=True)
    context.attach(block)
    with pytest.raises(PipelineError, match="not an ANN tensor"):
        context.require({"made_by_a_pass"}, block)
