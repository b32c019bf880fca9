"""The compiled reference executor (snncc.backends.compiled) gives the eager executor's
outputs bit for bit: each neuron op's PyTorch definition under torch.compile equals the
eager op, and whole programs (forward and cached steps) equal the eager executor."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import snncc.ir.ops as ops
from snncc.api import compile_graph
from snncc.backends import create_executor
from snncc.backends.compiled import TableNeuron, compilable_graph, inductor_options
from snncc.backends.reference import ReferenceExecutor
from snncc.errors import InputError
from tests.conftest import heldout_ids, prepared
from tests.ir.test_kernels import awkward_values
from tests.ir.test_kernels import same_bits as _same_bits

snn = torch.ops.snn


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit, NaN payloads aside: Inductor's vector code may return a NaN with
    other payload bits than eager (0x7fffffff for 0x7fc00000), which IEEE gives no meaning and
    every reader takes as NaN. -0 and +0 still differ."""
    canonical = torch.tensor(float("nan"), device=a.device)
    return _same_bits(torch.where(torch.isnan(a), canonical, a), torch.where(torch.isnan(b), canonical, b))


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                               reason="no CUDA GPU on this machine"))]


def compiled(fn):
    return torch.compile(fn, dynamic=False, options=inductor_options())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.slow  # each case compiles: 13 s on two cores with a cold cache
@pytest.mark.parametrize(("T", "G"), [(8, 0), (14, 3), (22, 6)])
def test_multi_range_quantizer_compiled_equals_eager(T, G, device):
    x = awkward_values(19_985).view(-1, 4).to(device)  # 20,000 with the special values
    scale = torch.tensor([0.5, 1.0, 3.0, 1e-3], device=device)
    assert same_bits(compiled(ops.multi_range_value)(x, scale, T, G), snn.mr_quantize(x, scale, T, G))
    assert same_bits(compiled(ops.multi_threshold_value)(x, scale, T), snn.mt_quantize(x, scale, T))


@pytest.mark.slow  # four compiles: about 20 s on two cores
@pytest.mark.parametrize("device", DEVICES)
def test_table_neurons_and_normalisers_compiled_equal_eager(device):
    """Every table neuron (shared and per-channel tables, direct and guided lookups) and
    normaliser of a `las` program, lowered to a TableNeuron and compiled, equals its custom
    op on awkward inputs."""
    loaded, ann, ctx = prepared("tiny-llama")
    gm = ReferenceExecutor(compile_graph(loaded, ann, ctx, "las", 14).graph_module, device)._runnable
    lowered = compilable_graph(gm)
    neurons = dict(lowered.named_children())
    originals = {n.name: n for n in gm.graph.nodes if n.target in (snn.fn_quantize.default,
                                                                   snn.spike_normalize.default)}
    assert originals and all(f"neuron_{name}" in neurons for name in originals)  # every one lowered
    checked = set()
    for name, node in originals.items():
        neuron: TableNeuron = neurons[f"neuron_{name}"]
        key = (node.target, neuron.channels, neuron.power, neuron._direct_fields is not None)
        if key in checked:  # one of each kind: each compile takes seconds
            continue
        checked.add(key)
        args = [gm.get_buffer(a.target) if hasattr(a, "op") and a.op == "get_attr" else a for a in node.args]
        if node.target == snn.fn_quantize.default:
            x = awkward_values(4000 * neuron.channels, 30.0)[: 4000 * neuron.channels].view(-1, neuron.channels)
            x = x.to(device)
            assert same_bits(compiled(neuron)(x), snn.fn_quantize(x, *args[1:]))
        else:
            x, a = awkward_values(8000)[:8000].view(-1, 8), awkward_values(1000, 100.0)[:1000].abs().view(-1, 1)
            x, a = x.to(device), a.to(device)
            assert same_bits(compiled(neuron)(x, a), snn.spike_normalize(x, a, *args[2:]))
    assert len(checked) >= 3 and any(direct for *_, direct in checked)  # a direct table among them


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-gpt2"])
def test_a_compiled_program_equals_the_eager_one(name):
    """Forward and cached generation steps, bit for bit (one compile of each graph; about a
    minute each on two cores, hence one model: tiny-llama's neurons are compared op by op above,
    and on CUDA in tests/test_cuda.py)."""
    loaded, ann, ctx = prepared(name)
    program = compile_graph(loaded, ann, ctx, "las", 14)
    eager = ReferenceExecutor(program.graph_module, "cpu", "fused")
    fast = ReferenceExecutor(program.graph_module, "cpu", "fused", compiled=True)
    ids = heldout_ids(name)[:2, :40]
    assert same_bits(fast(ids), eager(ids))
    want, past = eager.step(ids, None, 0)
    got, fast_past = fast.step(ids, None, 0)
    assert same_bits(got, want)
    for length in (40, 41):  # two lengths: one dynamic step graph serves both
        token = want[:, -1:].argmax(-1)
        want, past = eager.step(token, past, length)
        got, fast_past = fast.step(token, fast_past, length)
        assert same_bits(got, want)


@pytest.mark.slow  # one compile: about a minute on two cores
def test_compiled_decoding_on_static_caches_equals_the_eager_steps():
    """The decoding step on preallocated caches (which CUDA graphs replay on a GPU), compiled
    with static shapes, gives the eager static step's logits and caches bit for bit."""
    loaded, ann, ctx = prepared("tiny-gpt2")
    program = compile_graph(loaded, ann, ctx, "las", 14)
    eager = ReferenceExecutor(program.graph_module, "cpu", "fused", static_cache=True)
    fast = ReferenceExecutor(program.graph_module, "cpu", "fused", compiled=True, static_cache=True)
    ids = heldout_ids("tiny-gpt2")[:2, :40]
    want, past = eager.step(ids, None, 0)
    fast_past = [tensor.clone() for tensor in past]
    counters.clear()
    for length in (40, 41, 42):
        token = want[:, -1:].argmax(-1)
        want, past = eager.step(token, past, length)
        got, fast_past = fast.step(token, fast_past, length)
        assert same_bits(got, want)
        assert all(same_bits(a, b) for a, b in zip(fast_past, past, strict=True))
    assert counters["stats"]["unique_graphs"] == 1  # one cache length, one graph: no recompile per token


def test_only_the_reference_backend_on_one_device_compiles():
    loaded, ann, ctx = prepared("tiny-llama")
    program = compile_graph(loaded, ann, ctx, "none")
    with pytest.raises(InputError, match="torch.compile runs the reference backend"):
        create_executor(program.graph_module, "event", compiled=True)
    assert program.compile().to("cpu").executor.compiled  # moving it keeps it compiled
    program.place({"": "cpu"})
    with pytest.raises(InputError, match="placed by a device map"):
        program.compile()
