"""The snn op set: MT neuron dynamics, error bounds, fused == unrolled, fake kernels."""

from __future__ import annotations

from fractions import Fraction

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torch._subclasses.fake_tensor import FakeTensorMode

from snncc.ir.ops import execution_mode

snn = torch.ops.snn


def successive_approximation(u: float, T: int) -> list[int]:
    """The MT neuron written as its dynamics, in exact arithmetic: the residual starts half a
    step up (round to nearest), thresholds halve, the neuron subtracts what it fires. The
    largest code is 1 - 2^-T: inputs that round above it saturate (all ones)."""
    sign = 1 if u > 0 else -1 if u < 0 else 0
    residual = Fraction(abs(u)) + Fraction(1, 2 ** (T + 1))
    if residual >= 1:
        return [sign] * T
    spikes = []
    for t in range(T):
        threshold = Fraction(1, 2 ** (t + 1))
        fire = residual >= threshold
        spikes.append(sign if fire else 0)
        residual -= threshold if fire else 0
    return spikes


@settings(max_examples=300, deadline=None)
@given(u=st.floats(-1, 1, width=32), T=st.integers(1, 24))
def test_kernel_matches_neuron_dynamics(u, T):
    got = snn.mt_encode(torch.tensor([u], dtype=torch.float32), torch.tensor([1.0]), T)[:, 0]
    assert got.tolist() == successive_approximation(u, T)


@settings(max_examples=100, deadline=None)
@given(T=st.integers(1, 24), scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16))
def test_decode_error_bound_and_clipping(T, scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(64, generator=g) * 2 - 1) * scale * 1.5  # a third lies outside the range
    r = torch.tensor(scale, dtype=torch.float32)
    s = snn.mt_encode(x, r, T)
    assert s.dtype == torch.int8 and s.shape == (T, 64)
    assert set(s.unique().tolist()) <= {-1, 0, 1}
    x_hat = snn.decode(s, r)
    inside = x.abs() <= r
    bound = float(r) * 2.0**-T * (1 + 1e-5) + 1e-6 * float(r)
    worst_inside = float((x_hat - x)[inside].abs().amax()) if inside.any() else 0.0
    assert worst_inside <= bound
    top = float(r) * (1 - 2.0**-T)
    assert torch.allclose(x_hat[~inside].abs(), torch.full_like(x_hat[~inside], top), rtol=1e-6)


@pytest.mark.parametrize("T", [1, 4, 16])
def test_spike_linear_fused_equals_unrolled_and_decode(T):
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 5, 32), torch.randn(24, 32), torch.randn(24)
    r = x.abs().amax((0, 1))
    s = snn.mt_encode(x, r, T)
    fused = snn.spike_linear(s, w * r, b)
    with execution_mode("unrolled"):
        unrolled = snn.spike_linear(s, w * r, b)
    exact = torch.nn.functional.linear(snn.decode(s, r), w, b)
    torch.testing.assert_close(fused, unrolled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused, exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T", [1, 6, 16])
def test_spike_matmul_is_exact_product_of_decoded_trains(T):
    torch.manual_seed(1)
    a, b = torch.randn(2, 3, 7, 8), torch.randn(2, 3, 8, 5)
    ra, rb = a.abs().amax((0, 2), keepdim=True)[0], b.abs().amax((0, 3), keepdim=True)[0]
    sa, sb = snn.mt_encode(a, ra, T), snn.mt_encode(b, rb, T)
    fused = snn.spike_matmul(sa, ra, sb, rb)
    with execution_mode("unrolled"):
        unrolled = snn.spike_matmul(sa, ra, sb, rb)
    exact = snn.decode(sa, ra) @ snn.decode(sb, rb)
    torch.testing.assert_close(fused, exact, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unrolled, exact, rtol=1e-5, atol=1e-5)


def test_fake_kernels_give_shapes_without_compute():
    with FakeTensorMode():
        x, r = torch.empty(2, 9, 16), torch.empty(16)
        s = snn.mt_encode(x, r, 8)
        assert s.shape == (8, 2, 9, 16) and s.dtype == torch.int8
        assert snn.spike_linear(s, torch.empty(4, 16), None).shape == (2, 9, 4)
        sb = snn.mt_encode(torch.empty(2, 16, 3), torch.empty(16, 1), 8)
        assert snn.spike_matmul(s, r, sb, torch.empty(16, 1)).shape == (2, 9, 3)


def test_unknown_execution_mode_is_refused():
    with pytest.raises(ValueError, match="unknown execution mode"):
        with execution_mode("warp"):
            pass


def _probe_points(table: torch.Tensor) -> torch.Tensor:
    """Every threshold, its float neighbours, zeros of both signs, subnormals, infinities and
    random values over the table's span."""
    finite = table[torch.isfinite(table)]
    span = float(finite.abs().max()) * 1.5 + 1.0
    up, down = torch.tensor(float("inf")), torch.tensor(-float("inf"))
    return torch.cat([finite, finite.nextafter(up), finite.nextafter(down),
                      torch.tensor([0.0, -0.0, 1e-42, -1e-42, float("inf"), -float("inf")]),
                      (torch.rand(20000, generator=torch.Generator().manual_seed(0)) * 2 - 1) * span])


def _tables() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    dense = torch.sort(torch.randn(20000, generator=g) * 4).values
    decades = torch.pow(10.0, torch.randint(-20, 10, (5000,), generator=g))
    spread = torch.sort(torch.randn(5000, generator=g) * decades).values
    repeated = torch.sort(torch.cat([dense[:3000], dense[:3000], torch.zeros(7), -torch.zeros(3)])).values
    padded = torch.cat([dense[::3], torch.full((900,), float("inf"))])
    uniform = torch.linspace(-8, 8, 2**14 - 1)
    return {"dense": dense, "spread": spread, "repeated": repeated, "padded": padded, "uniform": uniform}


@pytest.mark.parametrize("name", list(_tables()))
def test_guided_table_search_is_searchsorted(name):
    """snn table neurons find their interval through a bucket guide: the same index as a
    binary search for every threshold, its neighbours and the special values."""
    from snncc.ir.ops import _interval, _table_guide

    table = _tables()[name]
    tables = table.unsqueeze(0)
    x = _probe_points(table)
    assert torch.equal(_interval(x, tables, 0), torch.searchsorted(table, x, right=True))
    if name in ("padded", "uniform"):
        assert _table_guide(table) is not None  # the fast path is what was tested


def test_per_channel_tables_find_their_intervals_through_one_stacked_guide():
    """A table neuron with one table per channel group reads all channels at once through a
    stacked guide: the same codes as looking each group up in its own table."""
    from snncc.ir.ops import _guide_for, table_codes

    tables = _tables()
    stack = torch.stack([tables["uniform"][:6000], tables["padded"][-6000:], tables["uniform"][6000:12000]])
    codes = torch.randint(-(2**10), 2**10, (3, 6001))
    bucket = torch.tensor([0, 2, 1, 1, 0, 2, 2, 1])
    x = torch.cat([_probe_points(stack[b])[:4000] for b in range(3)]).reshape(-1, 1).expand(-1, 8).contiguous()
    expected = torch.stack([codes[b][torch.searchsorted(stack[b], x[:, c].contiguous(), right=True)]
                            for c, b in enumerate(bucket.tolist())], dim=1)
    assert _guide_for(stack, bucket) is not None
    assert torch.equal(table_codes(x, stack, codes, bucket, 10), expected)


@pytest.mark.parametrize("name", ["padded", "uniform", "exp"])
def test_a_direct_table_gives_the_table_neurons_values_bit_for_bit(name):
    """The row-per-bucket layout compiled code reads for shared tables (direct_table) gives
    fn_quantize's values exactly: at every threshold and its neighbours, both zeros,
    subnormals, infinities (a table ending in +inf entries included) and NaN."""
    from snncc.ir.ops import NARROW_GUIDE_WIDTHS, direct_table, direct_table_value, table_lookup
    from tests.ir.test_kernels import same_bits

    uniform = _tables()["uniform"]
    table = {"padded": torch.cat([uniform[::4], torch.full((500,), float("inf"))]), "uniform": uniform,
             "exp": torch.log((torch.arange(1, 2**14) - 0.5) / 2**14)}[name]  # softmax's exp neuron
    thresholds = table.unsqueeze(0)
    codes = torch.sort(torch.randint(-(2**13), 2**13, (1, table.numel() + 1))).values
    bucket = torch.zeros(1, dtype=torch.int64)
    direct = direct_table(table_lookup(thresholds, codes, bucket, widths=NARROW_GUIDE_WIDTHS), 14)
    assert direct is not None and (direct.posinf is not None) == (name == "padded")
    x = torch.cat([_probe_points(table), torch.tensor([float("nan")])])
    assert same_bits(direct_table_value(x, direct), torch.ops.snn.fn_quantize(x, thresholds, codes, bucket, 14))


def test_no_direct_table_where_its_rows_would_not_stay_in_cache():
    """Per-channel tables, guides wider than one threshold per bucket (repeated thresholds
    need them) and guides of too many buckets keep the guided lookup."""
    from snncc.ir.ops import _DIRECT_MAX_BUCKETS, NARROW_GUIDE_WIDTHS, direct_table, table_lookup

    tables = _tables()
    stack = torch.stack([tables["uniform"][:6000], tables["uniform"][6000:12000]])
    codes = torch.zeros(2, 6001, dtype=torch.int64)
    per_channel = table_lookup(stack, codes, torch.tensor([0, 1, 1]), widths=NARROW_GUIDE_WIDTHS)
    assert per_channel is not None and direct_table(per_channel, 14) is None
    shared = table_lookup(stack, codes, torch.zeros(1, dtype=torch.int64), widths=NARROW_GUIDE_WIDTHS)
    assert direct_table(shared, 14) is not None
    repeated = torch.sort(torch.cat([tables["uniform"], tables["uniform"][:100]])).values.unsqueeze(0)
    wide = table_lookup(repeated, torch.zeros(1, repeated.numel() + 1, dtype=torch.int64),
                        torch.zeros(1, dtype=torch.int64), widths=NARROW_GUIDE_WIDTHS)
    assert wide.guide.width > 1 and direct_table(wide, 14) is None
    many = shared._replace(guide=shared.guide._replace(starts=torch.zeros(_DIRECT_MAX_BUCKETS + 1, dtype=torch.int32)))
    assert direct_table(many, 14) is None
