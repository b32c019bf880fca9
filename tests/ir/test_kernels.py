"""The compiled CPU kernels (snncc/ir/kernels.cpp) equal the PyTorch chains they replace, bit for bit."""

from __future__ import annotations

import pytest
import torch

import snncc.ir.ops as ops
from snncc.api import compile_graph
from snncc.ir.kernels import _compiled
from tests.conftest import prepared

pytestmark = pytest.mark.skipif(_compiled() is None, reason="the C++ kernels cannot be built here")
snn = torch.ops.snn

SPECIALS = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45, -1e-45, 1e-38, 3e38, -3e38, 0.5, -0.5,
            2 / 3, 1.0, 1e6]


def awkward_values(n: int, spread: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Random float32 values over many orders of magnitude, with the special ones."""
    generator = torch.Generator().manual_seed(seed)
    magnitudes = spread * 10 ** (torch.rand(n, generator=generator) * 12 - 8)
    signs = torch.randint(0, 2, (n,), generator=generator) * 2 - 1
    return torch.cat([(magnitudes * signs).float(), torch.tensor(SPECIALS)])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal float32 tensors bit for bit (NaN == NaN, -0 != +0)."""
    return a.dtype == b.dtype == torch.float32 and torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("T", [4, 8, 14, 16, 22])
@pytest.mark.parametrize("G", [0, 3, 6])
def test_mr_quantize_kernel(T, G):
    u = awkward_values(50_000)
    assert same_bits(ops._mr_quantize_float32(u, T, G), ops._mr_quantize_torch(u, T, G))  # kernel vs chain


def _without_kernels(monkeypatch, fn):
    with monkeypatch.context() as patch:
        patch.setattr(ops, "kernels_for", lambda *args: None)
        return fn()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_table_neurons_kernel(name, monkeypatch):
    """Every table neuron of a `las` program (shared and per-channel tables) and its
    normalisers' mantissa tables give the same codes through the kernel and through PyTorch
    (but at NaN, which lies in no interval: its code is never sent, the train is poisoned)."""
    loaded, ann, ctx = prepared(name)
    gm = compile_graph(loaded, ann, ctx, "las", 16).graph_module
    tables = [n for n in gm.graph.nodes if n.target in (snn.fn_encode.default, snn.spike_normalize.default)]
    assert tables
    for node in tables:
        if node.target == snn.fn_encode.default:
            thresholds, codes, bucket = (getattr(gm, a.target) for a in node.args[1:4])
            channels = bucket.numel()
            finite = thresholds[torch.isfinite(thresholds)]
            x = torch.cat([awkward_values(4000 * channels, float(finite.abs().max())),
                           finite[torch.randint(0, finite.numel(), (4000 * channels,))]])
            x = x[: x.numel() // channels * channels].view(-1, channels)
            x = x[~torch.isnan(x).any(-1)]
            run = lambda x=x, t=thresholds, c=codes, b=bucket: (ops.table_codes(x, t, c, b, 16),  # noqa: E731
                                                                ops.table_codes(x, t, c, b, 16, scale=2.0**-16))
        else:
            thresholds, codes = (getattr(gm, a.target) for a in node.args[3:5])
            a = awkward_values(20_000, 100.0).abs()
            a = a[~torch.isnan(a)]
            run = lambda a=a, t=thresholds, c=codes, p=node.args[2]: ops.normalizer_codes(a, p, t, c, 16)  # noqa: E731
        expected = _without_kernels(monkeypatch, run)
        assert all(torch.equal(got, want) for got, want in zip(_as_tuple(run()), _as_tuple(expected), strict=True))


def _as_tuple(value):
    return value if isinstance(value, tuple) else (value,)


def test_fused_program_with_and_without_kernels(monkeypatch):
    loaded, ann, ctx = prepared("tiny-llama")
    program = compile_graph(loaded, ann, ctx, "las", 16)
    ids = torch.randint(0, 200, (2, 33))
    with ops.execution_mode("fused"):
        expected = _without_kernels(monkeypatch, lambda: program(ids))
        assert torch.equal(program(ids), expected)


@pytest.mark.parametrize("T", [4, 8, 14, 16, 22])
@pytest.mark.parametrize("G", [0, 3, 6])
def test_mr_encode_kernel(T, G, monkeypatch):
    x = awkward_values(19_985).view(-1, 10)
    scale = torch.rand(10) + 0.1
    expected = _without_kernels(monkeypatch, lambda: snn.mr_encode(x, scale, T, G))
    assert torch.equal(snn.mr_encode(x, scale, T, G), expected)


@pytest.mark.parametrize("T", [4, 14, 16, 22])
@pytest.mark.parametrize("G", [0, 3])
def test_mr_spike_counts_kernel_counts_the_trains_non_zero_steps(T, G, monkeypatch):
    x = awkward_values(19_985).view(-1, 10)
    scale = torch.rand(10) + 0.1
    counts = ops.mr_spike_counts(x, scale, T, G)
    assert counts.dtype == torch.int8 and counts.shape == x.shape
    assert torch.equal(counts, snn.mr_encode(x, scale, T, G).ne(0).sum(0, dtype=torch.int8))
    assert torch.equal(_without_kernels(monkeypatch, lambda: ops.mr_spike_counts(x, scale, T, G)), counts)
    assert int(counts.max()) > 1  # the random values do use several digits


@pytest.mark.parametrize("T", [1, 8, 16, 29])
def test_signed_digits_kernel(T, monkeypatch):
    k = torch.randint(-(2**T) + 1, 2**T, (5000,))
    k[:3] = torch.tensor([0, 2**T - 1, -(2**T) + 1])
    expected = _without_kernels(monkeypatch, lambda: ops.signed_code_digits(k, T))
    assert torch.equal(ops.signed_code_digits(k, T), expected)


def test_a_failed_build_leaves_the_pytorch_path_with_a_warning(monkeypatch, caplog):
    import torch.utils.cpp_extension as extension

    from snncc.ir import kernels

    def no_compiler(**_):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(extension, "load", no_compiler)
    kernels._compiled.cache_clear()
    try:
        with caplog.at_level("WARNING"):
            assert kernels.kernels_for(torch.zeros(3)) is None
        assert "could not be built (no compiler here)" in caplog.text
        assert torch.equal(snn.mr_quantize(torch.tensor([0.3, -2.0]), torch.tensor(1.0), 8, 2),
                           ops._mr_quantize_torch(torch.tensor([0.3, -2.0]), 8, 2))
    finally:
        kernels._compiled.cache_clear()
