"""NaN and inf propagate the same way on every backend: a neuron whose input has no code
poisons its train (snncc.ir.ops), so the reference executor in every mode, the event backend
and onnxruntime give NaN at the same outputs, and never turn NaN into finite codes."""

from __future__ import annotations

import functools
import logging

import pytest
import torch

from snncc.api import compile_graph
from snncc.backends.event import EventBackend
from snncc.backends.onnx import OnnxRuntimeExecutor, export_onnx
from snncc.backends.reference import ReferenceExecutor
from snncc.ir.ops import POISON, execution_mode
from snncc.ir.rewrite import add_constant, copy_graph_module, get_tensor
from snncc.ir.spec import is_source
from snncc.program import SpikingProgram
from tests.conftest import heldout_ids, prepared

snn = torch.ops.snn
aten = torch.ops.aten
logging.getLogger("torch.onnx").setLevel(logging.ERROR)
NAN, INF = float("nan"), float("inf")
_SPECS = {"las": "las", "fas": "fas,calibrate{layer_steps=0,neuron_steps=0}"}


@functools.cache
def _program(pipeline: str) -> SpikingProgram:
    loaded, ann, ctx = prepared("tiny-llama")
    return compile_graph(loaded, ann, ctx, _SPECS[pipeline])


def _ids() -> torch.Tensor:
    return heldout_ids("tiny-llama")[:2, :12].clone()


def _outputs(program: SpikingProgram, gm: torch.fx.GraphModule, ids: torch.Tensor, tmp_path) -> dict:
    """The logits of every backend for the program `gm` (a variant of `program`'s graph)."""
    outputs = {mode: ReferenceExecutor(gm, "cpu", mode)(ids) for mode in ("fused", "unrolled", "exact")}
    outputs["event"] = EventBackend(gm)(ids)
    path = tmp_path / "model.onnx"
    export_onnx(SpikingProgram(gm, program.info, program.tokenizer), path, "onnx-snn")
    outputs["onnxruntime"] = OnnxRuntimeExecutor(path)(ids)
    return outputs


def _assert_same_nan(outputs: dict, expected: torch.Tensor) -> None:
    """Every backend: NaN exactly where `expected` (a mask of the logits) says, finite elsewhere."""
    for backend, logits in outputs.items():
        assert torch.equal(torch.isnan(logits), expected), (backend, torch.isnan(logits).any(-1).nonzero().tolist())
        assert torch.isfinite(logits[~expected]).all(), backend


def _poison_input_of_last_encoder(gm: torch.fx.GraphModule,
                                  values: dict[int, tuple[int, float]]) -> torch.fx.GraphModule:
    """A copy of gm in which the input of its last encoder (the LM head's) gets, wherever the
    token is token, the value (NaN or inf) added in the channel of `values[token]`."""
    gm = copy_graph_module(gm)
    source = [n for n in gm.graph.nodes if is_source(n.target)][-1]
    ids = next(n for n in gm.graph.nodes if n.op == "placeholder")
    x = poisoned = source.args[0]
    for i, (token, (channel, value)) in enumerate(values.items()):
        offset = torch.zeros(x.meta["val"].shape[-1])
        offset[channel] = value
        constant = add_constant(gm, f"poison_{i}", offset, source)
        with gm.graph.inserting_before(source):
            hit = gm.graph.call_function(aten.unsqueeze.default,
                                         (gm.graph.call_function(aten.eq.Scalar, (ids, token)), -1))
            added = gm.graph.call_function(aten.where.ScalarOther, (hit, constant, 0.0))
            poisoned = gm.graph.call_function(aten.add.Tensor, (poisoned, added))
    source.replace_input_with(x, poisoned)
    gm.recompile()
    return gm


# fas's IF neurons in the slow tier: the fast tier's budget (las covers every other neuron)
@pytest.mark.parametrize("pipeline", ["las", pytest.param("fas", marks=pytest.mark.slow)])
def test_nan_and_inf_into_an_encoder_give_nan_at_the_same_outputs_on_every_backend(pipeline, tmp_path):
    program = _program(pipeline)
    ids = _ids()
    values = {int(ids[1, 5]): (2, NAN), int(ids[0, 7]): (1, INF), int(ids[0, 2]): (0, -INF)}
    gm = _poison_input_of_last_encoder(program.graph_module, values)
    rows = sum(ids == token for token in values).bool()
    assert 3 <= int(rows.sum()) < ids.numel()
    outputs = _outputs(program, gm, ids, tmp_path)
    _assert_same_nan(outputs, rows.unsqueeze(-1).expand(outputs["fused"].shape))  # whole rows: never a finite code


def _with_embedding(gm: torch.fx.GraphModule, weight: torch.Tensor) -> torch.fx.GraphModule:
    """A copy of gm whose embedding reads `weight` (its own tensor: a tied LM head keeps the old one)."""
    gm = copy_graph_module(gm)
    embedding = next(n for n in gm.graph.nodes if n.target == aten.embedding.default)
    embedding.replace_input_with(embedding.args[0], add_constant(gm, "nan_embedding", weight, embedding))
    gm.recompile()
    return gm


# fas's IF neurons in the slow tier: the fast tier's budget (las covers every other neuron)
@pytest.mark.parametrize("pipeline", ["las", pytest.param("fas", marks=pytest.mark.slow)])
def test_a_nan_weight_gives_nan_where_the_ann_does_on_every_backend(pipeline, tmp_path):
    """A NaN in the embedding row of a token only the second sequence holds: every backend's
    logits are NaN exactly where the ANN's are (the second sequence), the first stays finite."""
    program = _program(pipeline)
    ids = _ids()
    token = int(ids[1, 8])
    ids[0][ids[0] == token] = (token + 1) % 256
    gm = program.graph_module
    table = next(n for n in gm.graph.nodes if n.target == aten.embedding.default).args[0]
    weight = get_tensor(gm, table).clone()  # the program's tensors are shared with the cached ANN
    weight[token, 3] = NAN
    with torch.no_grad():
        expected = torch.isnan(_with_embedding(prepared("tiny-llama")[1], weight)(ids))
    assert expected[1].any() and not expected[0].any()
    _assert_same_nan(_outputs(program, _with_embedding(gm, weight), ids, tmp_path), expected)


_U = torch.tensor([[0.3, NAN, -INF, INF, -0.7, 0.0]])


@pytest.mark.parametrize("T", [4, 8, 23])
def test_linear_code_neurons_poison_nan_and_inf_and_decode_to_nan(T):
    scale = torch.ones(6)
    bad = ~torch.isfinite(_U)
    trains = {"mt": snn.mt_encode(_U, scale, T), "mr": snn.mr_encode(_U * 40, scale, T, 6),
              "if": snn.if_encode(_U, scale, scale / 2, T, 2)}
    for name, train in trains.items():
        assert torch.equal(train[0] == POISON, bad), name
        assert not train[1:, bad].any(), name  # silent after the poison spike
        for mode in ("fused", "unrolled", "exact"):
            with execution_mode(mode):
                decoded = snn.decode(train, scale, name == "if")
            assert torch.equal(torch.isnan(decoded), bad), (name, mode)
    quantized = {"mt": snn.mt_quantize(_U, scale, T), "mr": snn.mr_quantize(_U * 40, scale, T, 6),
                 "if": snn.if_quantize(_U, scale, scale / 2, T, 2)}
    for name, value in quantized.items():
        assert torch.equal(torch.isnan(value), bad), name


def test_table_neurons_poison_nan_and_code_inf_as_their_limit():
    from snncc.ir.neurons import build_table, stack_tables

    T = 8
    thresholds, codes = stack_tables([build_table(torch.exp, 1.0, T, (-64.0, 64.0))])
    x = torch.tensor([[-INF, NAN, 0.0, -3.0]])
    bucket = torch.tensor([0])
    train = snn.fn_encode(x, thresholds, codes, bucket, T)
    assert train[0, 0, 1] == POISON and not train[1:, 0, 1].any()
    value = snn.fn_quantize(x, thresholds, codes, bucket, T)
    assert torch.isnan(value[0, 1]) and value[0, 0] == 0  # exp(-inf) = 0: masked attention scores
    assert torch.equal(torch.isnan(snn.decode(train, torch.ones(1))), torch.isnan(x))


def test_a_finite_value_whose_ratio_to_the_range_overflows_still_clips():
    x, scale = torch.tensor([3e38, -3e38]), torch.tensor([0.37, 0.37])
    assert torch.equal(snn.mt_quantize(x, scale, 8), torch.tensor([255 / 256, -255 / 256]))
    assert torch.isfinite(snn.mr_quantize(x, scale, 8, 6)).all()
    assert not (snn.mt_encode(x, scale, 8) == POISON).any() and not (snn.mr_encode(x, scale, 8, 6) == POISON).any()


def test_profile_and_event_backend_count_a_poison_spike_as_one_event():
    """int8 -128 has no int8 absolute value: counted as a burst it would sum as -128."""
    from snncc.ir.ops import burst_sizes

    step = torch.tensor([POISON, 3, -2, 0, 1], dtype=torch.int8)
    assert burst_sizes(step).tolist() == [1, 3, 2, 0, 1]
