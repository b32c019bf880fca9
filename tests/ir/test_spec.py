"""snncc.ir.spec: every backend covers every described op (and a registry missing one fails
the check), and a new elementwise neuron op runs everywhere from its kernel, its spec entry
and its ONNX body alone (docs/adding-an-op.md), with no backend edited."""

from __future__ import annotations

import onnx
import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

from snncc.backends.event import _HANDLERS, EventBackend
from snncc.backends.nir import _FORMS
from snncc.backends.onnx import export_onnx, verify_onnx
from snncc.backends.onnx_functions import DOMAIN, DOMAIN_VERSION, INT8, INT64, OPS, SnnOp
from snncc.backends.reference import ReferenceExecutor
from snncc.ir.spec import (
    COST_TRAIN,
    QUANTIZER,
    SOURCE,
    OnnxForm,
    OpSpec,
    TorchKernel,
    coverage_gaps,
    register,
    require_covered,
    spec_of,
    specs,
    unregister,
)
from snncc.ir.verify import VerificationError, verify
from snncc.models import CAUSAL_LM
from snncc.profile import _COSTS, profile_graph
from snncc.program import ProgramInfo, SpikingProgram
from snncc.tokenizer import ByteTokenizer

snn = torch.ops.snn
aten = torch.ops.aten


def _registries() -> dict:
    return {"event_handlers": _HANDLERS, "onnx_functions": OPS, "nir_forms": _FORMS, "cost_models": _COSTS}


def test_every_backend_covers_every_op():
    assert coverage_gaps(**_registries()) == []
    for spec in specs():
        if spec.role == SOURCE and spec.quantizer is not None:  # the fused lowering's quantizer
            assert spec_of(spec.quantizer).role == QUANTIZER, spec.op


@pytest.mark.parametrize(("registry", "missing", "op"), [
    ("event_handlers", "mr_encode", "snn.mr_encode.default"),
    ("onnx_functions", "FnMrEncode", "snn.fn_encode.default"),
    ("nir_forms", "synapse", "snn.spike_linear.default"),
    ("cost_models", "matmul", "snn.spike_matmul.default"),
])
def test_a_registry_missing_an_entry_fails_the_check(registry, missing, op):
    registries = _registries()
    incomplete = [name for name in registries[registry] if name != missing]
    gaps = coverage_gaps(**(registries | {registry: incomplete}))
    assert len(gaps) == 1 and op in gaps[0] and missing in gaps[0]
    with pytest.raises(RuntimeError, match=missing):
        require_covered("a backend", gaps)


def test_every_onnx_function_takes_its_ops_arguments():
    """The export passes an op's tensor arguments as the function's inputs and its other
    arguments as the attributes of the same name (backends/onnx.py)."""
    for spec in specs():
        if spec.onnx is None:
            continue
        schema = spec.op._schema.arguments
        tensors = [a for a in schema if a.type.isSubtypeOf(torch._C.OptionalType.ofTensor())]
        others = {a.name.lower() for a in schema} - {a.name.lower() for a in tensors}
        for name in filter(None, (spec.onnx.function, spec.onnx.ranged)):
            assert len(OPS[name].inputs) == len(tensors), name
            assert {attribute.lower() for attribute, _ in OPS[name].attributes} <= others, name


# --- a new elementwise neuron op: its kernel, its entry, its ONNX body -----------------------


@torch.library.custom_op("snn_test::sign_encode", mutates_args=())
def sign_encode(x: torch.Tensor, T: int) -> torch.Tensor:
    """Rate-coded sign neurons: each fires sign(x) at every step, so its train decodes to sign(x)."""
    return torch.sign(x).to(torch.int8).expand(T, *x.shape).contiguous()


@sign_encode.register_fake
def _(x, T):
    return x.new_empty((T, *x.shape), dtype=torch.int8)


def _sign_encode_body(b, x, T):
    sign = b.op("Unsqueeze", b.cast(b.op("Sign", x), INT8), b.constant([0], INT64))
    shape = b.op("Concat", b.op("Reshape", T, b.constant([1], INT64)), b.op("Shape", x), axis=0)
    return b.op("Expand", sign, shape)


SIGN_ENCODE = OpSpec(torch.ops.snn_test.sign_encode.default, SOURCE, TorchKernel("train"), COST_TRAIN,
                     "sign neurons (a test op)", onnx=OnnxForm("SignEncode"), steps="T", rate=True)
SIGN_ENCODE_ONNX = SnnOp("SignEncode", "Rate-coded sign neurons: sign(X) at each of T steps.", (("X", "float"),),
                         ("spikes", "int8"), (("T", "int"),), _sign_encode_body)


@pytest.fixture
def sign_op(monkeypatch):
    register(SIGN_ENCODE)
    monkeypatch.setitem(OPS, "SignEncode", SIGN_ENCODE_ONNX)
    try:
        yield SIGN_ENCODE.op
    finally:
        unregister(SIGN_ENCODE.op)
        if onnx.defs.has("SignEncode", DOMAIN):
            onnx.defs.deregister_schema("SignEncode", DOMAIN_VERSION, DOMAIN)


T = 4
_W = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
_B = torch.randn(3, generator=torch.Generator().manual_seed(1))
_SCALE = torch.rand(8, generator=torch.Generator().manual_seed(2)) + 0.5
_X = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(3))
_X[0, 0, :3] = 0.0  # silent neurons too


def _sign_program(op, rate: bool = True) -> fx.GraphModule:
    """x -> sign neurons -> (a synaptic layer, a decoder)."""
    root = torch.nn.Module()
    root.weight, root.bias, root.scale = (torch.nn.Parameter(t, requires_grad=False) for t in (_W, _B, _SCALE))
    graph = fx.Graph()
    x = graph.placeholder("x")
    spikes = graph.call_function(op, (x, T))
    flags = {"rate": True} if rate else {}
    weight, bias, scale = (graph.get_attr(name) for name in ("weight", "bias", "scale"))
    out = graph.call_function(snn.spike_linear.default, (spikes, weight, bias), flags)
    decoded = graph.call_function(snn.decode.default, (spikes, scale), flags)
    graph.output((out, decoded))
    return fx.GraphModule(root, graph)


def _expected() -> tuple[torch.Tensor, torch.Tensor]:
    return F.linear(torch.sign(_X), _W, _B), torch.sign(_X) * _SCALE


def test_a_new_neuron_op_passes_the_verifier_with_its_rate_flags(sign_op):
    verify(_sign_program(sign_op))
    with pytest.raises(VerificationError, match="rate"):  # its spec says it sends a rate code
        verify(_sign_program(sign_op, rate=False))


@pytest.mark.parametrize("mode", ["fused", "unrolled", "exact"])
def test_a_new_neuron_op_runs_in_the_reference_executor(sign_op, mode):
    out, decoded = ReferenceExecutor(_sign_program(sign_op), mode=mode)(_X)
    expected_out, expected_decoded = _expected()
    torch.testing.assert_close(out, expected_out)
    torch.testing.assert_close(decoded, expected_decoded)


def test_a_new_neuron_op_runs_and_counts_in_the_event_backend_and_profiler(sign_op):
    gm = _sign_program(sign_op)
    backend = EventBackend(gm)
    out, decoded = backend(_X)
    expected_out, expected_decoded = _expected()
    torch.testing.assert_close(out, expected_out)
    torch.testing.assert_close(decoded, expected_decoded)
    fired = int(torch.count_nonzero(torch.sign(_X)))
    encoder = next(n.name for n in gm.graph.nodes if n.target == sign_op)
    linear = next(n.name for n in gm.graph.nodes if n.target == snn.spike_linear.default)
    assert backend.counts.spikes_per_step[encoder] == [fired] * T
    assert backend.counts.sops == {linear: fired * T * _W.shape[0]}
    profile = profile_graph(gm, _X, mode="exact")
    assert profile.spikes == backend.counts.totals()["spikes"] == fired * T
    assert {row.node: row.sops for row in profile.layers} == backend.counts.sops


def _sign_token_program(op) -> SpikingProgram:
    """Token ids -> embedding -> sign neurons -> a synaptic layer: a program ONNX export takes."""
    root = torch.nn.Module()
    root.table = torch.nn.Parameter(torch.randn(16, 8, generator=torch.Generator().manual_seed(4)), False)
    root.weight, root.bias = torch.nn.Parameter(_W, False), torch.nn.Parameter(_B, False)
    graph = fx.Graph()
    ids = graph.placeholder("input_ids")
    x = graph.call_function(aten.embedding.default, (graph.get_attr("table"), ids))
    spikes = graph.call_function(op, (x, T))
    weight, bias = graph.get_attr("weight"), graph.get_attr("bias")
    graph.output(graph.call_function(snn.spike_linear.default, (spikes, weight, bias), {"rate": True}))
    info = ProgramInfo("sign-test", CAUSAL_LM, "none", T, max_positions=8, vocab_size=16)
    return SpikingProgram(fx.GraphModule(root, graph), info, ByteTokenizer())


@pytest.mark.parametrize("fmt", ["onnx-snn", "onnx"])
def test_a_new_neuron_op_exports_to_onnx_with_its_body(sign_op, tmp_path, fmt):
    """The export translates it by its spec entry and runs its function body in onnxruntime."""
    program = _sign_token_program(sign_op)
    path = tmp_path / "sign.onnx"
    export_onnx(program, path, fmt)
    ids = torch.randint(0, 16, (2, 8), generator=torch.Generator().manual_seed(5))
    assert verify_onnx(program, path, ids).max_relative_error <= 1e-6
