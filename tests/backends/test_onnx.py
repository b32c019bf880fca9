"""ONNX export: each snn-domain function against its kernel, whole programs against the
reference executor in onnxruntime, metadata, dynamic shapes and the refusals."""

from __future__ import annotations

import functools
import logging
import shutil

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from snncc.api import compile_graph, prepare
from snncc.backends.onnx import INPUT_NAME, OnnxRuntimeExecutor, check_onnx, export_onnx, verify_onnx
from snncc.backends.onnx_functions import DOMAIN, OPS, STANDARD_OPSET, function_library, register_schemas
from snncc.errors import ExportError, InputError, ModelError
from snncc.ir.neurons import build_table, mantissa_table, stack_tables
from snncc.ir.ops import execution_mode
from snncc.models import TINY_MODELS, load_model
from tests.conftest import heldout_ids, prepared

snn = torch.ops.snn
logging.getLogger("torch.onnx").setLevel(logging.ERROR)
_FAS_QUICK = "fas,calibrate{layer_steps=3,neuron_steps=3,batches=1}"
_PIPELINES = {"none": "none", "las": "las", "fas": _FAS_QUICK}


def _run_op(name: str, inputs: list[torch.Tensor], attributes: dict, rank: int) -> torch.Tensor:
    """One snn node in a model with its function, checked and run by onnxruntime."""
    register_schemas()
    names = [f"in{i}" for i in range(len(inputs))]
    out_type = TensorProto.INT8 if OPS[name].output[1] == "int8" else TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node(name, names, ["out"], domain=DOMAIN, **attributes)], name,
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.numpy().dtype), list(v.shape))
         for n, v in zip(names, inputs, strict=True)],
        [helper.make_tensor_value_info("out", out_type, [None] * rank)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", STANDARD_OPSET),
                                                   helper.make_opsetid(DOMAIN, 1)],
                              functions=function_library([name]))
    onnx.checker.check_model(model, full_check=True)
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {n: v.numpy() for n, v in zip(names, inputs, strict=True)})[0])


_X = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0)) * 2
_SCALE = torch.rand(7, generator=torch.Generator().manual_seed(1)) + 0.5


@pytest.mark.parametrize("T", [1, 4, 14, 24])
def test_neuron_functions_spike_exactly_as_their_kernels(T):
    assert torch.equal(_run_op("MtEncode", [_X, _SCALE], {"T": T}, 4), snn.mt_encode(_X, _SCALE, T))
    for G in (0, 3, 6):
        x = _X * 10  # reaches the outlier ranges
        assert torch.equal(_run_op("MrEncode", [x, _SCALE], {"T": T, "G": G}, 4), snn.mr_encode(x, _SCALE, T, G))
    theta, membrane = _SCALE * 0.7, _SCALE * 0.35
    for burst in (1, 3):
        assert torch.equal(_run_op("IfEncode", [_X * burst, theta, membrane], {"T": T, "burst": burst}, 4),
                           snn.if_encode(_X * burst, theta, membrane, T, burst))


@pytest.mark.parametrize("T", [6, 14])
def test_table_and_normaliser_functions_equal_their_kernels(T):
    silu = build_table(torch.nn.functional.silu, 4.0, T, (-64.0, 64.0))
    thresholds, codes = stack_tables([silu, build_table(torch.exp, 1.0, T, (-64.0, 64.0))])
    for bucket in (torch.tensor([1]), torch.tensor([0, 1, 1, 0, 1, 0, 0])):
        expected = snn.fn_encode(_X, thresholds, codes, bucket, T)
        assert torch.equal(_run_op("FnEncode", [_X, thresholds, codes, bucket], {"T": T}, 4), expected)
    G = 6  # multi-range codes: SiLU's beyond its range, exp's small values
    thresholds, codes = stack_tables([build_table(torch.nn.functional.silu, 0.25, T, (-64.0, 64.0), G),
                                      build_table(torch.exp, 2.0 ** (1 - G), T, (-64.0, 64.0), G)])
    for bucket in (torch.tensor([1]), torch.tensor([0, 1, 1, 0, 1, 0, 0])):
        expected = snn.fn_encode(_X * 3, thresholds, codes, bucket, T, G)
        assert torch.equal(_run_op("FnMrEncode", [_X * 3, thresholds, codes, bucket], {"T": T, "G": G}, 4), expected)
    a = torch.rand(2, 5, 1) * 10.0 ** torch.randint(-8, 8, (2, 5, 1)).float()  # any scale
    for power in (-1.0, -0.5):
        thresholds, codes = stack_tables([mantissa_table(power, T)])
        got = _run_op("SpikeNormalize", [_X[:2], a, thresholds, codes], {"power": power, "T": T}, 3)
        assert torch.equal(got, snn.spike_normalize(_X[:2], a, power, thresholds, codes, T))


@pytest.mark.parametrize("rate", [False, True])
def test_synapse_functions_equal_the_exact_mode(rate):
    T = 12
    s = snn.if_encode(_X, _SCALE, _SCALE / 2, T) if rate else snn.mt_encode(_X, _SCALE, T)
    weight, bias = torch.randn(6, 7), torch.randn(6)
    st = s.transpose(-1, -2)
    with execution_mode("exact"):
        expected = {"Decode": snn.decode(s, _SCALE, rate), "SpikeLinear": snn.spike_linear(s, weight, bias, rate),
                    "SpikeMatMul": snn.spike_matmul(s, _SCALE, st, torch.tensor([1.3]), rate, rate),
                    "SpikeMul": snn.spike_mul(s, _SCALE, s, _SCALE, rate, rate)}
    flags = {"rate_A": int(rate), "rate_B": int(rate)}
    got = {"Decode": _run_op("Decode", [s, _SCALE], {"rate": int(rate)}, 3),
           "SpikeLinear": _run_op("SpikeLinear", [s, weight, bias], {"rate": int(rate)}, 3),
           "SpikeMatMul": _run_op("SpikeMatMul", [s, _SCALE, st, torch.tensor([1.3])], flags, 3),
           "SpikeMul": _run_op("SpikeMul", [s, _SCALE, s, _SCALE], flags, 3)}
    for name, value in expected.items():
        assert (got[name] - value).abs().max() <= 1e-6 * value.abs().max(), name


@functools.cache
def _program(name: str, pipeline: str):
    loaded, ann, ctx = prepared(name)
    return compile_graph(loaded, ann, ctx, _PIPELINES[pipeline])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """exported(name, pipeline, fmt) -> (path, report): each export written once per module and
    only read by the tests that share it."""
    folder = tmp_path_factory.mktemp("exports")

    @functools.cache
    def export(name: str, pipeline: str, fmt: str):
        path = folder / f"{name}-{pipeline}-{fmt}.onnx"
        return path, export_onnx(_program(name, pipeline), path, fmt)

    return export


def _slow_unless(fast: tuple[str, ...], name: str, *rest: str):
    """A parameter set for model `name`, in the slow tier unless `name` is one of `fast`."""
    return pytest.param(name, *rest, marks=[pytest.mark.slow] * (name not in fast))


# Every tiny model: las (the pipeline with the most kinds of spiking op) in the function form,
# and the ANN ("none") in the standard form the ONNX frontend reads back. fas in the function
# form and las inlined into the standard opset (slower to build) on every model too. The fast
# tier keeps las in the function form on a decoder and an encoder (tiny-llama, tiny-bert); fas
# and las inlined are in the slow tier, with tiny-llama's fas inlined and tiny-bert's ANN in
# the function form.
_CASES = ([_slow_unless(("tiny-llama", "tiny-bert"), m, "las", "onnx-snn") for m in TINY_MODELS]
          + [(m, "none", "onnx") for m in TINY_MODELS]
          + [_slow_unless((), m, "fas", "onnx-snn") for m in TINY_MODELS]
          + [_slow_unless((), m, "las", "onnx") for m in TINY_MODELS]
          + [pytest.param("tiny-llama", "fas", "onnx", marks=pytest.mark.slow), ("tiny-bert", "none", "onnx-snn")])


@pytest.mark.parametrize(("name", "pipeline", "fmt"), _CASES)
def test_onnxruntime_runs_the_export_as_the_reference_does(exported, name, pipeline, fmt):
    program = _program(name, pipeline)
    path, report = exported(name, pipeline, fmt)
    check_onnx(path)
    model = onnx.load(str(path))
    domains = {node.domain for node in model.graph.node}
    if fmt == "onnx":
        assert domains <= {""} and not model.functions  # standard opset only
    elif pipeline != "none":
        assert DOMAIN in domains and {f.name for f in model.functions} == {n.op_type for n in model.graph.node
                                                                           if n.domain == DOMAIN}
    assert report.bytes == path.stat().st_size and report.external_data is None
    ids = heldout_ids(name)[:2, :40]  # a length the export never saw: the sequence axis is dynamic
    assert verify_onnx(program, path, ids).passed
    assert verify_onnx(program, path, ids[:1, :7]).passed


def test_export_metadata_names_and_time_axis(exported):
    program = _program("tiny-llama", "las")
    path, _ = exported("tiny-llama", "las", "onnx-snn")
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["snncc.pipeline"] == "las" and meta["snncc.T"] == str(program.T) and meta["snncc.model"] == "tiny-llama"
    assert meta["snncc.version"] and float(meta["snncc.coverage"]) == 1.0
    assert [i.name for i in model.graph.input] == [INPUT_NAME] and [o.name for o in model.graph.output] == ["logits"]
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "seq"]
    # a spike train is an int8 value with a leading time axis of T
    encoders = [n for n in model.graph.node if n.op_type == "MrEncode"]
    assert encoders and all(a.i == program.T for n in encoders for a in n.attribute if a.name == "T")


@pytest.mark.slow  # an export of its own (11 s)
def test_external_data_is_written_beside_the_model(tmp_path):
    program = _program("tiny-qwen2", "las")
    path = tmp_path / "ext.onnx"
    report = export_onnx(program, path, "onnx", external_data=True)
    assert report.external_data == tmp_path / "ext.onnx.data" and report.external_data.stat().st_size > 0
    check_onnx(path)
    ids = heldout_ids("tiny-qwen2")[:1, :20]
    assert verify_onnx(program, path, ids).passed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.data"]  # no scratch left


def test_export_refuses_what_it_cannot_express(tmp_path):
    loaded, ann, ctx = prepared("tiny-llama")
    program = compile_graph(loaded, ann, ctx, "las", 24)  # tables refine above 2^20 levels at run time
    with pytest.raises(ExportError, match="T <= 20"):
        export_onnx(program, tmp_path / "x.onnx")
    assert not any(tmp_path.iterdir())
    with pytest.raises(InputError, match="unknown ONNX format"):
        export_onnx(_program("tiny-llama", "none"), tmp_path / "x.onnx", "tflite")


def test_onnxruntime_executor_reads_int_ids(exported):
    program = _program("tiny-bert", "none")
    path, _ = exported("tiny-bert", "none", "onnx-snn")
    out = OnnxRuntimeExecutor(path)(torch.tensor([[1, 2, 3]], dtype=torch.int32))
    assert out.shape == (1, 3, program(torch.tensor([[1, 2, 3]])).shape[-1])


# a decoder and an encoder in the fast tier, the other families in the slow tier
@pytest.mark.parametrize("name", [_slow_unless(("tiny-llama", "tiny-bert"), m) for m in TINY_MODELS])
def test_an_onnx_model_compiles_like_its_pytorch_original(tmp_path, exported, name):
    """ONNX frontend: an ANN exported with torch.onnx traces to a graph that computes what the
    PyTorch frontend's graph computes, and `las` compiles it into the same program (the
    tokenizer is found beside the file)."""
    original = _program(name, "none")
    path = tmp_path / "ann.onnx"
    shutil.copyfile(exported(name, "none", "onnx")[0], path)
    original.tokenizer.save(tmp_path)
    loaded, ann, ctx = prepare(str(path), calib_tokens=1024)
    assert loaded.task == original.info.task and loaded.max_positions == original.info.max_positions
    ids = heldout_ids(name)[:2, :33]
    with torch.no_grad():
        expected, got = original.graph_module(ids), ann(ids)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    imported = compile_graph(loaded, ann, ctx, "las", 8)
    reference = compile_graph(*prepare(name, calib_tokens=1024), "las", 8)  # same calibration, fresh context
    assert imported.info.coverage["coverage"] == 1.0
    with torch.no_grad(), execution_mode("exact"):
        expected, got = reference.graph_module(ids), imported.graph_module(ids)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_onnx_frontend_refuses_an_unsupported_op(tmp_path):
    graph = helper.make_graph([helper.make_node("Hardmax", ["input_ids"], ["logits"], name="odd")], "g",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "odd.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(ModelError, match="op 'Hardmax' \\(node 'odd'\\)"):
        load_model(str(path))
