"""Spiking neurons: table neurons, the multi-range ternary neuron, floating-point
normalisers and the elementwise spike x spike product, over their whole ranges."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from snncc.ir.neurons import (
    DOMAINS,
    FUNCTIONS,
    build_table,
    exp_range,
    exp_table,
    mantissa_table,
    stack_tables,
    table_bits,
    table_neuron,
    table_neuron_error,
)
from snncc.ir.ops import code_digits, execution_mode, range_index, ternary_limit, ternary_max_code

snn = torch.ops.snn

@pytest.mark.parametrize("name", FUNCTIONS)
@settings(max_examples=15, deadline=None)
@given(T=st.integers(4, 18), exponent=st.integers(-1, 5), data=st.data())
def test_table_neuron_is_within_half_a_step(name, T, exponent, data):
    """|neuron(x) - f(x)| <= r 2^-(T+1) wherever |f(x)| is inside the range (the documented
    bound), plus the float32 rounding of x near a threshold."""
    out_range = 2.0**exponent
    lo, hi = DOMAINS.get(name, (-8.0, 8.0))
    x = torch.tensor(data.draw(st.lists(st.floats(lo, hi, width=32), min_size=1, max_size=64)))
    y = table_neuron(name, out_range, T)(x).double()
    ref = FUNCTIONS[name](x.double())
    inside = ref.abs() <= out_range * (1 - 2.0**-T)
    slack = 1e-6 * (1 + x.double().abs())
    assert bool(((y - ref).abs() <= out_range * 2.0 ** -(T + 1) + slack)[inside].all())


@pytest.mark.parametrize("name", FUNCTIONS)
def test_table_neuron_error_falls_as_T_grows(name):
    errors = [table_neuron_error(name, T)[0] for T in (6, 8, 12, 16)]
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False)), errors


def test_table_neuron_sends_binary_spikes_that_decode_to_its_code():
    x = torch.linspace(-6, 6, 1001)
    table = build_table(F.silu, 4.0, 10, (-64.0, 64.0))
    thresholds, codes = stack_tables([table])
    spikes = snn.fn_encode(x, thresholds, codes, torch.zeros(1, dtype=torch.int64), 10)
    assert spikes.dtype == torch.int8 and spikes.shape == (10, 1001)
    assert set(spikes.unique().tolist()) <= {-1, 0, 1}
    fused = snn.fn_quantize(x, thresholds, codes, torch.zeros(1, dtype=torch.int64), 10)
    assert torch.equal(snn.decode(spikes, torch.tensor(1.0)), fused)


@pytest.mark.parametrize(("T", "G"), [(4, 2), (8, 6), (12, 3)])
def test_multi_range_table_sends_the_multi_range_code_of_f(T, G):
    """A table of multi-range codes sends the value mr_encode sends for f(x) (wherever f(x) is
    clear of a level boundary), as the multi-range train of that value: values keep T digits
    relative to their range, and SiLU reaches 2^G times its range, where a plain table clips."""
    r = 0.5
    table = build_table(F.silu, r, T, (-64.0, 64.0), G)
    thresholds, codes = stack_tables([table])
    x = torch.linspace(-8, 30, 20001)
    bucket = torch.zeros(1, dtype=torch.int64)
    spikes = snn.fn_encode(x, thresholds, codes, bucket, T, G)
    value = snn.fn_quantize(x, thresholds, codes, bucket, T, G) * r
    assert torch.equal(snn.decode(spikes, torch.tensor(r)), value)
    assert torch.equal(spikes, snn.mr_encode(value, torch.tensor(r), T, G))
    y = F.silu(x.double())
    below, above = (snn.mr_quantize((y * (1 + d)).float(), torch.tensor(r), T, G) * r for d in (-1e-5, 1e-5))
    clear = below == above
    assert float(clear.float().mean()) > 0.99
    assert torch.equal(value[clear], below[clear])
    assert float(value.max()) > r * 2 ** (G - 1)


def test_multi_range_exp_keeps_small_probabilities():
    """exp at T = 8: a plain table (range 1) rounds to multiples of 2^-8; with 6 ranges from
    2^-5 up, values above e^-4 keep 8 ternary digits (relative error <= 2^-7) and those below
    the smallest range are within 2^-14."""
    bucket = torch.zeros(1, dtype=torch.int64)
    errors = {}
    for G in (0, 6):
        thresholds, codes = stack_tables([exp_table(8, G)])
        for part, x in (("large", torch.linspace(-4, 0, 401)), ("small", torch.linspace(-12, -4.2, 781))):
            value = (snn.fn_quantize(x, thresholds, codes, bucket, 8, G) * exp_range(G)).double()
            error = (value - torch.exp(x.double())).abs()
            errors[G, part] = float((error / torch.exp(x.double())).max() if part == "large" else error.max())
    assert errors[6, "large"] <= 2.0**-7 < errors[0, "large"]
    assert errors[6, "small"] <= 2.0**-14 < 2.0**-10 <= errors[0, "small"]


def test_per_channel_tables_use_each_channels_range():
    tables = [build_table(F.silu, 2.0**e, 12, (-64.0, 64.0)) for e in (0, 4)]
    thresholds, codes = stack_tables(tables)
    x = torch.stack([torch.linspace(-4, 0.7, 500), torch.linspace(-4, 15, 500)], dim=-1)
    bucket = torch.tensor([0, 1])
    y = snn.decode(snn.fn_encode(x, thresholds, codes, bucket, 12), torch.tensor([1.0, 16.0]))
    err = (y.double() - F.silu(x.double())).abs().amax(0)
    assert float(err[0]) <= 2.0**-13 + 1e-6 and float(err[1]) <= 16 * 2.0**-13 + 1e-5


@pytest.mark.parametrize("power", [-1.0, -0.5])
@settings(max_examples=25, deadline=None)
@given(T=st.integers(6, 20), log_a=st.floats(-12, 12), x=st.floats(-100, 100, width=32))
def test_floating_point_normaliser_keeps_relative_precision_at_any_scale(power, T, log_a, x):
    """x * a^power within 2^-T (relative) of exact, a from 1e-12 to 1e12: no fixed range
    (plus the float32 rounding of the output, 2^-24 relative)."""
    thresholds, codes = stack_tables([mantissa_table(power, T)])
    a = torch.tensor([10.0**log_a])
    out = snn.spike_normalize(torch.tensor([x]), a, power, thresholds, codes, T).double()
    exact = x * float(a.double()) ** power
    assert abs(float(out) - exact) <= abs(exact) * (2.0 ** -table_bits(T) + 2.0**-24) + 1e-30


def test_normaliser_unrolled_steps_match_fused():
    thresholds, codes = stack_tables([mantissa_table(-0.5, 14)])
    x, a = torch.randn(4, 7, 32), torch.rand(4, 7, 1) * 100 + 1e-3
    fused = snn.spike_normalize(x, a, -0.5, thresholds, codes, 14)
    with execution_mode("unrolled"):
        unrolled = snn.spike_normalize(x, a, -0.5, thresholds, codes, 14)
    assert torch.allclose(fused, unrolled, rtol=1e-6, atol=1e-7)


@settings(max_examples=50, deadline=None)
@given(k=st.integers(0, 2**20), T=st.integers(2, 21))
def test_ternary_digits_are_the_non_adjacent_form(k, T):
    k = min(k, ternary_max_code(T))
    digits = code_digits(torch.tensor([k]), torch.tensor([1]), T, ternary=True)[:, 0].tolist()
    assert sum(d * 2 ** (T - 1 - t) for t, d in enumerate(digits)) == k
    assert all(not (a and b) for a, b in zip(digits, digits[1:], strict=False))
    assert sum(map(abs, digits)) <= bin(k).count("1")


@settings(max_examples=30, deadline=None)
@given(T=st.integers(4, 20), G=st.integers(0, 6), data=st.data())
def test_multi_range_neuron_keeps_T_bits_relative_to_its_range(T, G, data):
    """Values up to r 2^G (2/3 of the top range) keep error <= half a step of the range
    that holds them; the train is ternary graded spikes +-2^j, and quantize agrees."""
    r = torch.tensor(0.5)
    bound = 2.0**G * 0.3125  # inside 2/3 of the top range, exact in float32
    x = torch.tensor(data.draw(st.lists(st.floats(-bound, bound, width=32), min_size=1, max_size=64)))
    spikes = snn.mr_encode(x, r, T, G)
    y = snn.decode(spikes, r)
    limit = ternary_limit(T)  # about 2/3: the top ternary code
    level = sum((x.abs() / r >= 2.0**i * limit).float() for i in range(G)) if G else torch.zeros_like(x)
    step = r * 2.0**level * 2.0**-T
    assert bool(((y - x).abs() <= step / 2 + 1e-7).all())
    assert set(spikes.abs().unique().tolist()) <= {0} | {2**j for j in range(G + 1)}
    if T <= 22:
        assert torch.equal(snn.mr_quantize(x, r, T, G) * r, y)


def test_multi_range_neuron_does_not_clip_what_a_single_range_clips():
    r, x = torch.tensor(1.0), torch.tensor([0.3, 5.0, 40.0])
    single = snn.decode(snn.mt_encode(x, r, 12), r)
    multi = snn.decode(snn.mr_encode(x, r, 12, 6), r)
    assert float(single[2]) < 1.0  # clipped
    assert torch.allclose(multi, x, rtol=2.0**-10)


def test_spike_mul_is_the_exact_product_of_the_codes():
    a, b = torch.randn(3, 5, 16), torch.randn(3, 5, 16) * 4
    ra, rb = torch.full((16,), 4.0), torch.full((16,), 16.0)
    sa, sb = snn.mr_encode(a, ra, 12, 3), snn.mr_encode(b, rb, 12, 3)
    product = snn.spike_mul(sa, ra, sb, rb)
    assert torch.equal(product, snn.decode(sa, ra) * snn.decode(sb, rb))
    with execution_mode("unrolled"):
        unrolled = snn.spike_mul(sa, ra, sb, rb)
    assert torch.allclose(unrolled, product, rtol=1e-5, atol=1e-6)
    assert float((product - a * b).abs().max()) < 16 * 4 * 2.0**-10


def test_mantissa_table_covers_one_octave_pair():
    table = mantissa_table(-0.5, 12)
    assert math.isclose(float(table.thresholds.min()), 1.0, rel_tol=1e-2)
    assert float(table.thresholds.max()) <= 4.0


def _hard_inputs(T: int, G: int) -> torch.Tensor:
    """Values across 20 decades, zeros, subnormals, range edges and rounding ties."""
    g = torch.Generator().manual_seed(T * 10 + G)
    spread = torch.randn(4000, generator=g) * torch.pow(10.0, torch.randint(-12, 8, (4000,), generator=g).float())
    ties = (torch.arange(-300, 300).float() + 0.5) * 2.0**-T
    edges = torch.tensor([ternary_limit(T) * 2.0**i for i in range(-1, G + 2)])
    special = torch.tensor([0.0, -0.0, 1e-40, -1e-42, 1.0, -1.0, 2.0**G, 3e38])
    values = torch.cat([spread, ties, ties * 2.0**G, edges, -edges, edges.nextafter(torch.tensor(0.0)), special])
    return torch.cat([values, values.new_zeros(-values.numel() % 8)]).reshape(-1, 8)


@pytest.mark.parametrize("T", [1, 4, 8, 14, 16, 22])
@pytest.mark.parametrize("G", [0, 3, 6])
@pytest.mark.parametrize("r", [1.0, 0.37])
def test_fast_quantizers_equal_the_decoded_trains(T, G, r):
    """The float32 quantizers (fused executor) against decoding the encoders' trains."""
    x, scale = _hard_inputs(T, G), torch.full((8,), r)
    assert torch.equal(snn.mr_quantize(x, scale, T, G) * scale, snn.decode(snn.mr_encode(x, scale, T, G), scale))
    assert torch.equal(snn.mt_quantize(x, scale, T) * scale, snn.decode(snn.mt_encode(x, scale, T), scale))


@pytest.mark.parametrize("T", [4, 14, 22])
def test_range_index_from_the_bits_is_frexps(T):
    a = _hard_inputs(T, 6).abs().reshape(-1)
    mantissa, exponent = torch.frexp(a)
    expected = torch.where(torch.isinf(a), 6, exponent + (mantissa >= ternary_limit(T))).clamp(0, 6)
    assert torch.equal(range_index(a, ternary_limit(T), 6), expected.long())
    assert torch.equal(range_index(a.double(), ternary_limit(T), 6), expected.long())
