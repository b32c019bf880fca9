"""The `snn` op set: spiking operations registered with torch.library.

Every op has a reference kernel (CPU or CUDA, batched over time) and a fake kernel, so
graphs that use them trace, shape-propagate and export like any ATen graph. This module is
the ops' math; what each op is to the passes and backends (its role, spike operands, T,
quantizer, event handler, ONNX function, cost model) is its entry in snncc.ir.spec.

Spike trains are int8 tensors of shape (T, *x.shape) with entries in {-1, 0, 1}. The
multi-threshold (MT) code is binary successive approximation: step t (0-based) has the
threshold 2^-(t+1) of the channel's range, so a train decodes as

    x_hat = scale * sum_t 2^-(t+1) * s_t

which is exact in float32 for T <= 24. `scale` is the per-channel range from calibration;
for linear layers it is folded into the weight columns, so spikes reach the synapses as
plain +-1 events and only the per-step gain 2^-(t+1) remains on the membrane.

NaN and inf (one rule for every backend): a value has no code, so a neuron whose input
cannot be coded sends one POISON spike (int8 -128, which no code, graded spike or burst
reaches) at step 0 and nothing after, and every reader of a train (decoders, synapses,
quantizers) reads POISON as NaN. Linear-code neurons (MT, multi-range, IF) poison on NaN
and +-inf (an infinite input is an overflow upstream, not a large value to clip); table
neurons poison on NaN only, since +-inf has a limit they code (exp(-inf) = 0: masked
attention scores); floating-point neurons poison where their denominator is NaN or inf.
So NaN propagates to the same outputs a float ANN would give NaN, never into finite codes.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import math
import struct
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F

from snncc.ir.kernels import kernels_for

MAX_T = 32

# "fused": decode each train once, then one matmul (exact by linearity of the synapses).
# "unrolled": one matmul per time step, accumulated on the membrane, as hardware would.
# "exact": fused with float64 membranes, rounded to float32 once per op: the result no
#   longer depends on summation order, so the event backend can match it bit for bit.
_execution_mode: contextvars.ContextVar[str] = contextvars.ContextVar("snn_mode", default="fused")
EXECUTION_MODES = ("fused", "unrolled", "exact")


@contextlib.contextmanager
def execution_mode(mode: str) -> Iterator[None]:
    """Run `snn` kernels in `mode` (one of EXECUTION_MODES) inside the block."""
    if mode not in EXECUTION_MODES:
        raise ValueError(f"unknown execution mode {mode!r}; known: {', '.join(EXECUTION_MODES)}")
    token = _execution_mode.set(mode)
    try:
        yield
    finally:
        _execution_mode.reset(token)


def step_gain(t: int) -> float:
    """The membrane gain of step t (0-based) of an MT train: its threshold, 2^-(t+1)."""
    return 2.0 ** -(t + 1)


def step_gains(T: int, rate: bool = False) -> list[float]:
    """The per-step gains of a T-step train: 2^-(t+1) for MT codes, 1/T for a rate code (an
    IF neuron's spikes all weigh the same; the train decodes to its mean)."""
    return [1.0 / T] * T if rate else [step_gain(t) for t in range(T)]


def _steps(s: torch.Tensor, rate: bool = False) -> Iterator[tuple[float, torch.Tensor]]:
    yield from zip(step_gains(s.shape[0], rate), s, strict=True)


POISON = -128  # the spike of a neuron whose input has no code (NaN, inf): reads as NaN


def spike_values(spikes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spikes (or event payloads) as numbers of `dtype` for a membrane, POISON as NaN: the
    one place a reader turns a poisoned neuron back into NaN."""
    return spikes.to(dtype).masked_fill_(spikes == POISON, float("nan"))


def burst_sizes(spikes: torch.Tensor) -> torch.Tensor:
    """Spikes each entry of a train or event payload stands for: |n| of a burst, a POISON spike
    once (int8 -128 has no int8 absolute value)."""
    return spikes.int().abs().masked_fill_(spikes == POISON, 1)


def poisoned(train: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """`train` (T, ...) with the neurons where `bad` (the neuron array's shape, or flat)
    replaced by a POISON spike at step 0 and silence after (in place; returned)."""
    if bool(bad.any()):
        flat = train.view(train.shape[0], -1)
        where = bad.reshape(-1).expand(flat.shape[1])
        flat[:, where] = 0
        flat[0, where] = POISON
    return train


def all_finite(x: torch.Tensor) -> bool:
    """Whether x holds no NaN and no inf, in one reduction that allocates nothing of x's size
    (min and max propagate NaN): the quantizers' fast path skips their masks on it."""
    if x.numel() == 0:
        return True
    low, high = torch.aminmax(x)
    return math.isfinite(low) and math.isfinite(high)


def _fill_where(values: torch.Tensor, x: torch.Tensor, mask_of) -> torch.Tensor:
    """values with NaN where mask_of(x) (x broadcasts to values), skipped when x is finite
    (eagerly: under torch.compile the mask fuses into the op and a branch on data would not)."""
    if torch.compiler.is_compiling():
        return values.masked_fill(mask_of(x), float("nan"))
    return values if all_finite(x) else values.masked_fill_(mask_of(x), float("nan"))


def uncodable(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Where a linear-code neuron with input x and normalised input u (x / scale, or x / theta,
    shaped as the neuron array) has no code: u is NaN, or x is +-inf. A finite x whose u
    overflows to inf is a value beyond the range like any other, and clips. Where u is all
    finite (one reduction) nothing is uncodable: an infinite x would make u inf or NaN, so a
    single False broadcasts instead of two masks of u's size."""
    if not torch.compiler.is_compiling() and all_finite(u):
        return torch.zeros(1, dtype=torch.bool, device=u.device)
    return torch.isnan(u) | torch.isinf(x).expand(u.shape)


def _decode_unit(s: torch.Tensor, dtype: torch.dtype, rate: bool = False) -> torch.Tensor:
    """sum_t gain_t s_t, accumulated step by step to keep memory at one activation."""
    out = torch.zeros(s.shape[1:], dtype=dtype, device=s.device)
    for gain, st in _steps(s, rate):
        out.add_(spike_values(st, dtype), alpha=gain)
    return out


_ENCODE_SCRATCH = 1 << 21  # (elements x steps) encoded at a time: bounds the scratch space


@torch.library.custom_op("snn::mt_encode", mutates_args=())
def mt_encode(x: torch.Tensor, scale: torch.Tensor, T: int) -> torch.Tensor:
    """Multi-threshold neuron: T-step signed binary successive approximation of x / scale.

    The residual starts at |x|/scale plus half a step (round to nearest); at step t the
    neuron fires sign(x) when the residual reaches 2^-(t+1), and subtracts it. Inputs
    beyond the range clip to the largest code, 1 - 2^-T; NaN and +-inf poison (module
    docstring). Works in chunks, so memory is the int8 output plus a bounded scratch space,
    whatever T and the input size.
    """
    u = x / scale
    bad, u = uncodable(x, u), u.reshape(-1)
    out = torch.empty((T, u.numel()), dtype=torch.int8, device=x.device)
    chunk = max(4096, _ENCODE_SCRATCH // T)
    for start in range(0, u.numel(), chunk):
        membrane, sign = mt_initial_membrane(u[start : start + chunk], T)
        out[:, start : start + chunk] = code_digits(membrane, sign, T)
    return poisoned(out, bad).view(T, *x.shape)


MAX_OUTLIER_RANGES = 6  # graded spikes +-2^j, j <= 6, fit int8


@torch.library.custom_op("snn::mr_encode", mutates_args=())
def mr_encode(x: torch.Tensor, scale: torch.Tensor, T: int, G: int) -> torch.Tensor:
    """Multi-range (outlier-aware) ternary neuron: the signed-digit MT code of x at the
    smallest of the ranges scale * 2^j, j = 0..G, that holds |x|. The neuron picks j by
    comparing |x| with its G range thresholds, then sends T ternary digits in non-adjacent
    form as graded spikes +-2^j (the range index rides on the spike, as an OAT neuron's
    outlier spikes reach their own synapses). Every value keeps T bits relative to its
    range, and a third of the digits or fewer are non-zero (binary: half). Decodes like
    mt_encode; NaN and +-inf poison (module docstring)."""
    u = x / scale
    bad, u = uncodable(x, u), u.reshape(-1)
    compiled = kernels_for(u)
    if compiled is not None and T <= 22:  # sends nothing for NaN: poisoned below
        out = compiled.mr_encode(u.contiguous(), T, G, _limit_mantissa(ternary_limit(T)), ternary_max_code(T))
    else:
        out = torch.empty((T, u.numel()), dtype=torch.int8, device=x.device)
        chunk = max(4096, _ENCODE_SCRATCH // T)
        for start in range(0, u.numel(), chunk):
            membrane, sign, j = multi_range_code(u[start : start + chunk], T, G)
            spikes = code_digits(membrane, sign, T, ternary=True)
            out[:, start : start + chunk] = spikes * torch.bitwise_left_shift(1, j).to(torch.int8)
    return poisoned(out, bad).view(T, *x.shape)


def mr_spike_counts(x: torch.Tensor, scale: torch.Tensor, T: int, G: int) -> torch.Tensor:
    """How many steps of mr_encode(x, scale, T, G) are non-zero, per neuron (int8, shaped as
    x / scale), without building the (T, ...) train: what a sensitivity scan counts at every
    precision."""
    u = x / scale
    compiled = kernels_for(u)
    if compiled is None or T > 22:
        return mr_encode(x, scale, T, G).ne(0).sum(0, dtype=torch.int8)
    bad = uncodable(x, u)
    counts = compiled.mr_spike_counts(u.contiguous(), T, G, _limit_mantissa(ternary_limit(T)), ternary_max_code(T))
    return counts.masked_fill_(bad, 1) if bool(bad.any()) else counts


def multi_range_code(u: torch.Tensor, T: int, G: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(code magnitude, sign, range index j) of normalised inputs u for mr_encode.

    Exact in float32 for T <= 22 (every product with a power of two and every code up to
    2^23 is representable), so encoder and quantizer agree bit for bit and stay fast.
    NaN gets code 0 in range 0 (no digits): callers poison it."""
    u = u.float() if T <= 22 else u.double()
    u = u.masked_fill(torch.isnan(u), 0.0)  # inf stays: the top code of range G, as overflow clips
    top = ternary_max_code(T)
    a = u.abs()
    j = range_index(a, ternary_limit(T), G)
    scaled = a * torch.tensor([2.0 ** (T - i) for i in range(G + 1)], dtype=u.dtype, device=u.device)[j]
    membrane = torch.floor(scaled.add_(0.5)).clamp_(max=top).to(torch.int64)
    return membrane, torch.sign(u).to(torch.int64), j


@torch.library.custom_op("snn::mr_quantize", mutates_args=())
def mr_quantize(x: torch.Tensor, scale: torch.Tensor, T: int, G: int) -> torch.Tensor:
    """What an mr_encode train decodes to (in units of scale), computed without the train;
    bit-identical to decoding it for T <= 22 (NaN where it poisons). For the fused executor."""
    if T <= 22:
        return multi_range_value(x, scale, T, G)
    u = x / scale
    bad, u = uncodable(x, u).reshape(-1), u.reshape(-1)
    out = torch.empty_like(u)
    gains = torch.tensor([2.0 ** (i - T) for i in range(G + 1)], dtype=u.dtype, device=u.device)
    chunk = 1 << 20
    for start in range(0, u.numel(), chunk):
        membrane, sign, j = multi_range_code(u[start : start + chunk], T, G)
        out[start : start + chunk] = membrane.mul_(sign).to(u.dtype).mul_(gains[j])
    return out.masked_fill_(bad, float("nan")).view(torch.broadcast_shapes(x.shape, scale.shape))


def multi_range_value(x: torch.Tensor, scale: torch.Tensor, T: int, G: int) -> torch.Tensor:
    """mr_quantize for T <= 22 as plain tensor code: what torch.compile traces and fuses."""
    return _fill_where(_mr_quantize_float32(x / scale, T, G), x, torch.isinf)


def _power_of_two(exponent: torch.Tensor) -> torch.Tensor:
    """2^e as float32 for int32 e in [-126, 127], written as its bits (exact, one pass)."""
    return torch.bitwise_left_shift(exponent + 127, 23).view(torch.float32)


def _mr_quantize_float32(u: torch.Tensor, T: int, G: int) -> torch.Tensor:
    """mr_quantize in a few float32 and int32 passes for T <= 22, bit-identical to
    multi_range_code: the code is floor(|u| 2^(T-j) + 1/2) capped at the top code, and every
    product is by a power of two built from its bits. One compiled pass on the CPU."""
    compiled = kernels_for(u)
    if compiled is not None:
        return compiled.mr_quantize(u.contiguous(), T, G, _limit_mantissa(ternary_limit(T)), ternary_max_code(T))
    return _mr_quantize_torch(u, T, G)


def _mr_quantize_torch(u: torch.Tensor, T: int, G: int) -> torch.Tensor:
    a = u.float().abs()
    j = _range_index32(a, ternary_limit(T), G)
    code = torch.floor(a.mul_(_power_of_two(T - j)).add_(0.5)).clamp_(max=ternary_max_code(T))
    return torch.copysign(code.mul_(_power_of_two(j - T)), u).to(u.dtype)


@mr_quantize.register_fake
def _(x, scale, T, G):
    return torch.empty(torch.broadcast_shapes(x.shape, scale.shape), dtype=x.dtype, device=x.device)


def ternary_max_code(T: int) -> int:
    """The largest code whose non-adjacent form has T digits: 1010...1 = (2^(T+1) - 1) / 3."""
    return (2 ** (T + 1) - 1) // 3


def ternary_limit(T: int) -> float:
    """The largest |u| a ternary T-digit code holds in its range (the top code plus half a
    step, about 2/3): the threshold at which a multi-range neuron moves up one range."""
    return (ternary_max_code(T) + 0.5) * 2.0**-T


def range_index(a: torch.Tensor, limit: float, G: int) -> torch.Tensor:
    """How many of the range thresholds 2^i * limit (i < G, 1/2 <= limit < 1) |u| = a
    reaches (int64): the smallest range 2^j whose codes hold it. With a = m 2^e (m in
    [1/2, 1)), that count is e + [m >= limit], clipped to 0..G: one exact comparison, not G.
    float32 reads e and m from the bits (subnormals and 0 land in range 0, inf in range G)."""
    if a.dtype == torch.float32:
        return _range_index32(a, limit, G).long()
    mantissa, exponent = torch.frexp(a)
    return torch.where(torch.isinf(a), G, exponent + (mantissa >= limit)).clamp_(0, G).long()


def _range_index32(a: torch.Tensor, limit: float, G: int) -> torch.Tensor:
    """range_index of float32 a >= 0 as int32, from the bits: the biased exponent is e + 126,
    and m >= limit compares the two 23-bit mantissas."""
    bits = a.view(torch.int32)
    return (bits >> 23).sub_(126).add_(torch.bitwise_and(bits, 0x7FFFFF) >= _limit_mantissa(limit)).clamp_(0, G)


def _limit_mantissa(limit: float) -> int:
    """The 23 mantissa bits of float32 `limit` (read with struct: no tensor, so torch.compile
    keeps it a constant)."""
    return struct.unpack("<I", struct.pack("<f", limit))[0] & 0x7FFFFF


@mr_encode.register_fake
def _(x, scale, T, G):
    return x.new_empty((T, *x.shape), dtype=torch.int8)


def code_digits(magnitude: torch.Tensor, sign: torch.Tensor, T: int, ternary: bool = False) -> torch.Tensor:
    """The T spikes (MSB first, int8 in {-1, 0, 1}) of integer codes |k| with signs.

    Binary (|k| < 2^T): step t fires where bit T-1-t of |k| is set, as an MT neuron with
    residual |k| would. Ternary (|k| <= ternary_max_code(T)): the non-adjacent form, digit
    bit(3k/2) - bit(k/2): a pair of MT neurons fed 3x/2 and x/2 whose spikes cancel when
    both fire; no two adjacent digits are non-zero."""
    code = torch.int32 if T <= 29 else torch.int64  # int32 halves the scratch traffic
    shifts = torch.arange(T - 1, -1, -1, device=magnitude.device, dtype=code).unsqueeze(1)
    k = magnitude.to(code).unsqueeze(0)
    if ternary:
        digits = (torch.bitwise_and(torch.bitwise_right_shift(3 * k, shifts + 1), 1)
                  - torch.bitwise_and(torch.bitwise_right_shift(k, shifts + 1), 1))
    else:
        digits = torch.bitwise_and(torch.bitwise_right_shift(k, shifts), 1)
    return digits.mul_(sign.to(code)).to(torch.int8)


def signed_code_digits(k: torch.Tensor, T: int) -> torch.Tensor:
    """The binary T-step train (T, k.numel()) of signed integer codes k, built in chunks so
    the scratch space stays bounded whatever T and the size of k."""
    flat = k.reshape(-1)
    compiled = kernels_for(flat, torch.int64)
    if compiled is not None and T <= 29:
        return compiled.signed_digits(flat.contiguous(), T)
    out = torch.empty((T, flat.numel()), dtype=torch.int8, device=k.device)
    chunk = max(4096, _ENCODE_SCRATCH // T)
    for start in range(0, flat.numel(), chunk):
        part = flat[start : start + chunk]
        out[:, start : start + chunk] = code_digits(part.abs(), torch.sign(part), T)
    return out


def mt_initial_membrane(u: torch.Tensor, T: int, max_code: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The MT neuron's starting residual in units of its last threshold 2^-T (an integer:
    floor(|u| 2^T + 1/2), clipped to 2^T - 1) and its sign, for normalised inputs u = x/scale.

    Step t then fires when the residual reaches 2^(T-1-t) and subtracts it; both backends
    start from this, so their spikes agree bit for bit. NaN starts at 0 (no digits): callers
    poison it."""
    u = u.double()
    u = u.masked_fill(torch.isnan(u), 0.0).clamp(-1.0, 1.0)
    levels = 2**T
    top = levels - 1 if max_code is None else max_code
    membrane = torch.floor(u.abs() * levels + 0.5).clamp_(max=top).to(torch.int64)
    return membrane, torch.sign(u).to(torch.int64)


@mt_encode.register_fake
def _(x: torch.Tensor, scale: torch.Tensor, T: int) -> torch.Tensor:
    return x.new_empty((T, *x.shape), dtype=torch.int8)


@torch.library.custom_op("snn::mt_quantize", mutates_args=())
def mt_quantize(x: torch.Tensor, scale: torch.Tensor, T: int) -> torch.Tensor:
    """What an MT train decodes to, sum_t 2^-(t+1) s_t, computed without the train:
    sign(u) * min(floor(|u| 2^T + 1/2), 2^T - 1) * 2^-T with u = x / scale. Bit-identical to
    decoding `mt_encode` for T <= 24 (float32 holds every such code exactly; NaN where it
    poisons); the fused executor uses it where only synapses read a train."""
    if T <= 22:
        return multi_threshold_value(x, scale, T)
    u = x / scale
    bad, u = uncodable(x, u).reshape(-1), u.reshape(-1)
    out = torch.empty_like(u)
    chunk = 1 << 20  # bounds the int64 / float64 scratch to a few MiB
    for start in range(0, u.numel(), chunk):
        membrane, sign = mt_initial_membrane(u[start : start + chunk], T)
        out[start : start + chunk] = membrane.mul_(sign).to(torch.float64).mul_(2.0**-T)
    return out.masked_fill_(bad, float("nan")).view(torch.broadcast_shapes(x.shape, scale.shape))


def multi_threshold_value(x: torch.Tensor, scale: torch.Tensor, T: int) -> torch.Tensor:
    """mt_quantize for T <= 22 as plain tensor code (torch.compile traces it): float32 holds
    |u| 2^T + 1/2 exactly, so the same codes come out of a few float32 passes."""
    u = x / scale  # NaN stays NaN through the clamps; an infinite x has no code either
    code = torch.floor(u.float().abs().clamp_(max=1.0).mul_(2.0**T).add_(0.5)).clamp_(max=2**T - 1)
    return _fill_where(torch.copysign(code.mul_(2.0**-T), u).to(u.dtype), x, torch.isinf)


@mt_quantize.register_fake
def _(x: torch.Tensor, scale: torch.Tensor, T: int) -> torch.Tensor:
    return torch.empty(torch.broadcast_shapes(x.shape, scale.shape), dtype=x.dtype, device=x.device)


FUSABLE_MAX_T = 24  # codes up to 2^24 are exact in float32


@torch.library.custom_op("snn::decode", mutates_args=())
def decode(s: torch.Tensor, scale: torch.Tensor, rate: bool = False) -> torch.Tensor:
    """Read a spike train back into the ANN's units: scale * sum_t gain_t s_t (step_gains)."""
    return _decode_unit(s, scale.dtype, rate) * scale


@decode.register_fake
def _(s: torch.Tensor, scale: torch.Tensor, rate: bool = False) -> torch.Tensor:
    return torch.empty(torch.broadcast_shapes(s.shape[1:], scale.shape), dtype=scale.dtype,
                       device=s.device)


@torch.library.custom_op("snn::spike_linear", mutates_args=())
def spike_linear(s: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 rate: bool = False) -> torch.Tensor:
    """Synaptic layer over a unit-amplitude spike train: sum_t gain_t W s_t + b.

    The input channel ranges are already folded into `weight` (one column per input neuron).
    """
    if _execution_mode.get() == "unrolled":  # one matmul per step, accumulated by BLAS (addmm)
        out = torch.zeros((s[0].numel() // s.shape[-1], weight.shape[0]), dtype=weight.dtype, device=s.device)
        for gain, st in _steps(s, rate):
            out.addmm_(spike_values(st.reshape(-1, s.shape[-1]), weight.dtype), weight.t(), alpha=gain)
        out = out.view(*s.shape[1:-1], weight.shape[0])
        return out + bias if bias is not None else out
    if _execution_mode.get() == "exact":
        bias64 = bias.double() if bias is not None else None
        return F.linear(_decode_unit(s, torch.float64, rate), weight.double(), bias64).to(weight.dtype)
    return F.linear(_decode_unit(s, weight.dtype, rate), weight, bias)


@spike_linear.register_fake
def _(s: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rate: bool = False) -> torch.Tensor:
    return s.new_empty((*s.shape[1:-1], weight.shape[0]), dtype=weight.dtype)


def _partial_sum_product(sa: torch.Tensor, scale_a: torch.Tensor, sb: torch.Tensor, scale_b: torch.Tensor,
                         product, rate_a: bool = False, rate_b: bool = False) -> torch.Tensor:
    """Step by step: out += product(A_t, P^B_t) + product(P^A_{t-1}, B_t), with P the stored
    partial sums, which sums over t to product(A_hat, B_hat) (matmul or elementwise)."""
    partial_a = torch.zeros(sa.shape[1:], dtype=scale_a.dtype, device=sa.device)
    partial_b = torch.zeros(sb.shape[1:], dtype=scale_b.dtype, device=sb.device)
    out = None
    gains_a, gains_b = step_gains(sa.shape[0], rate_a), step_gains(sb.shape[0], rate_b)
    for t in range(sa.shape[0]):
        a_t = spike_values(sa[t], scale_a.dtype) * (scale_a * gains_a[t])
        b_t = spike_values(sb[t], scale_b.dtype) * (scale_b * gains_b[t])
        partial_b.add_(b_t)
        if product is torch.mul and out is not None:  # elementwise: accumulate in place
            out.addcmul_(a_t, partial_b).addcmul_(partial_a, b_t)
        else:
            step = product(a_t, partial_b) + product(partial_a, b_t)
            out = step if out is None else out.add_(step)
        partial_a.add_(a_t)
    return out


@torch.library.custom_op("snn::spike_matmul", mutates_args=())
def spike_matmul(sa: torch.Tensor, scale_a: torch.Tensor, sb: torch.Tensor, scale_b: torch.Tensor,
                 rate_a: bool = False, rate_b: bool = False) -> torch.Tensor:
    """Exact spike x spike product of two MT trains (activation-activation matmul).

    With partial sums P^A_t = sum_{k<=t} A_k, the step output A_t P^B_t + P^A_{t-1} B_t
    sums over t to A_hat @ B_hat; every term multiplies a spike by a stored partial sum.
    """
    if _execution_mode.get() == "unrolled":
        return _partial_sum_product(sa, scale_a, sb, scale_b, torch.matmul, rate_a, rate_b)
    if _execution_mode.get() == "exact":
        a_hat = _decode_unit(sa, torch.float64, rate_a) * scale_a.double()
        b_hat = _decode_unit(sb, torch.float64, rate_b) * scale_b.double()
        return torch.matmul(a_hat, b_hat).to(scale_a.dtype)
    a_hat = _decode_unit(sa, scale_a.dtype, rate_a) * scale_a
    b_hat = _decode_unit(sb, scale_b.dtype, rate_b) * scale_b
    return torch.matmul(a_hat, b_hat)


@spike_matmul.register_fake
def _(sa: torch.Tensor, scale_a: torch.Tensor, sb: torch.Tensor, scale_b: torch.Tensor,
      rate_a: bool = False, rate_b: bool = False) -> torch.Tensor:
    a = torch.empty(sa.shape[1:], dtype=scale_a.dtype, device=sa.device)
    b = torch.empty(sb.shape[1:], dtype=scale_b.dtype, device=sb.device)
    return torch.matmul(a, b)


TABLE_MAX_BITS = 20  # threshold tables resolve at most 2^20 levels (snncc.ir.neurons)


def table_codes(x: torch.Tensor, thresholds: torch.Tensor, codes: torch.Tensor, bucket: torch.Tensor,
                T: int, scale: float = 0.0) -> torch.Tensor:
    """The integer codes (int64, shape of x) a table neuron sends: channel c of the last dim
    compares its membrane with the thresholds of table bucket[c] (one table if bucket has
    one entry) and takes the code of the interval it lands in. scale > 0: the codes times
    scale as float32 (exact for codes below 2^24), in the same pass where the kernels run."""
    lookup = table_lookup(thresholds, codes, bucket) if T <= TABLE_MAX_BITS else None
    if lookup is not None:  # all channels at once, each through its own table's guide
        return looked_up_codes(x, lookup, scale)
    if bucket.numel() == 1:
        b = int(bucket)
        return _lookup(x.float().contiguous(), thresholds, b, codes[b], T, scale)
    flat = x.reshape(-1, x.shape[-1]).float()
    out = torch.empty(flat.shape, dtype=torch.int64, device=x.device)
    for b in torch.unique(bucket).tolist():
        columns = torch.nonzero(bucket == b).squeeze(1)
        out[:, columns] = _lookup(flat[:, columns].contiguous(), thresholds, b, codes[b], T)
    return _scaled(out.view(x.shape), scale)


class TableLookup(NamedTuple):
    """A table neuron's tables as its guided search reads them (table_lookup builds it once,
    looked_up_codes is plain tensor code that torch.compile traces)."""

    guide: _Guide
    codes: torch.Tensor  # every table's codes, flat (int64)
    code_base: torch.Tensor  # where each channel's table starts in `codes` (one entry: all channels)
    channels: int  # 1: one table for every channel, else the channels of the last dim


def table_lookup(thresholds: torch.Tensor, codes: torch.Tensor, bucket: torch.Tensor,
                 widths: tuple[int, ...] | None = None) -> TableLookup | None:
    """The lookup of the table(s) `bucket` selects (shared or one per channel), or None where
    no guide fits (then only binary search resolves it). widths: the thresholds per guide
    bucket to try, narrowest first (None: what suits the kernels the tables' device has;
    code torch.compile generates takes NARROW_GUIDE_WIDTHS)."""
    if bucket.numel() == 1:
        row = int(bucket)
        guide = _guide_for(thresholds, row, widths)
        base, codes, channels = torch.zeros(1, dtype=torch.int64, device=codes.device), codes[row], 1
    else:
        guide = _guide_for(thresholds, bucket, widths)
        base, codes, channels = bucket * codes.shape[1], codes.reshape(-1), bucket.numel()
    return None if guide is None else TableLookup(guide, codes, base.reshape(-1).long(), channels)


def looked_up_codes(x: torch.Tensor, lookup: TableLookup, scale: float = 0.0) -> torch.Tensor:
    """table_codes through a prebuilt lookup (scale as there)."""
    flat = x.reshape(-1, lookup.channels).float().contiguous()
    return _guided_codes(flat, lookup.guide, lookup.codes, lookup.code_base, scale).view(x.shape)


def _scaled(codes: torch.Tensor, scale: float) -> torch.Tensor:
    return codes.float().mul_(scale) if scale > 0 else codes


def _lookup(x: torch.Tensor, tables: torch.Tensor, row: int, codes: torch.Tensor, T: int,
            scale: float = 0.0) -> torch.Tensor:
    """Table `row`'s codes for membranes x: the interval among its sorted thresholds, refined
    (scale: as in table_codes)."""
    guide = _guide_for(tables, row)
    if guide is not None and T <= TABLE_MAX_BITS and x.dtype == torch.float32:  # nothing to refine
        zero = torch.zeros(1, dtype=torch.int64, device=x.device)
        return _guided_codes(x.reshape(-1, 1), guide, codes, zero, scale).view(x.shape)
    return _scaled(_refined(x, _interval(x, tables, row), tables[row], codes, T), scale)


def _guided_codes(x: torch.Tensor, guide: _Guide, codes: torch.Tensor, code_base: torch.Tensor,
                  scale: float = 0.0) -> torch.Tensor:
    """codes[code_base[c] + interval] for contiguous float32 x (N, C), the interval found
    through the guide (code_base: one start per channel of the flat codes, or one for all);
    scale > 0: those codes times scale, as float32."""
    compiled = kernels_for(x)
    if compiled is not None and codes.dtype == torch.int64:
        fields = [torch.as_tensor(getattr(guide, name), dtype=torch.int32).reshape(-1) for name in _PER_TABLE]
        return compiled.table_codes(x, *fields, guide.starts, guide.padded, guide.width, guide.padded_table,
                                    codes.contiguous(), code_base.reshape(-1).long().contiguous(), scale)
    return _scaled(codes.take(_guided_interval(x, guide) + code_base), scale)


class _Guide(NamedTuple):
    """Where to start looking in a sorted table: the thresholds are bucketed by the top bits
    of an order-preserving integer key of their float32 value; `starts[b]` counts the
    thresholds in the buckets before b, and no bucket holds more than `width`. A guide can
    stack several tables (per-channel tables): then the fields that differ between tables
    are tensors (per table in the stack, per channel once read through a bucket) and each
    channel reads its own table's stretch of `starts` and `padded`."""

    shift: int | torch.Tensor
    first: int | torch.Tensor  # the first bucket's key >> shift
    floor: int | torch.Tensor  # keys of magnitudes below the smallest nonzero |threshold| are squeezed to 0
    last: int | torch.Tensor  # the last bucket, counted from `first`
    base: int | torch.Tensor  # where the table's buckets begin in `starts`
    offset: int | torch.Tensor  # where the table's thresholds begin in `padded`
    length: int | torch.Tensor  # the table's length with its +inf padding (what +inf input counts)
    starts: torch.Tensor
    padded: torch.Tensor  # the finite thresholds, each table followed by `width` NaN (never <= x)
    width: int
    padded_table: bool  # some table ends with +inf entries (per-channel tables share a length)


_PER_TABLE = _Guide._fields[:7]  # the fields a stacked guide holds per channel


NARROW_GUIDE_WIDTHS = (1, 2, 4, 8)  # each width costs a gather pass in PyTorch: narrow first
_KERNEL_GUIDE_WIDTHS = (8, 16)  # in the C++ kernel a bucket's thresholds share a cache line, so
# fewer, wider buckets (a smaller `starts` that stays in cache) win: SmolLM2's SiLU tables 1.7 -> 0.9 ms
_GUIDE_MAX_BUCKETS = 1 << 19
_GUIDES_KEPT = 64  # distinct tables whose guides stay cached (a program shares a few dozen)
_remembered_by: dict[int, tuple[weakref.ref, dict]] = {}  # id(tensor) -> (tensor, its cache)
_guides_by_content: OrderedDict[bytes, _Guide | None] = OrderedDict()


def tensor_bytes(t: torch.Tensor):
    """t's values as a flat byte array (any dtype, bfloat16 included), for hashing."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def _digest(t: torch.Tensor) -> bytes:
    return hashlib.blake2b(tensor_bytes(t), digest_size=16).digest()


def _remembered(t: torch.Tensor) -> dict:
    """A cache that lives as long as the tensor t (kept by identity, not by value)."""
    entry = _remembered_by.get(id(t))
    if entry is None or entry[0]() is not t:
        entry = (weakref.ref(t, lambda _, key=id(t): _remembered_by.pop(key, None)), {})
        _remembered_by[id(t)] = entry
    return entry[1]


def _widths_for(tables: torch.Tensor) -> tuple[int, ...]:
    """The guide widths that suit the kernels the tables' device has (narrow without them)."""
    return NARROW_GUIDE_WIDTHS if kernels_for(tables) is None else _KERNEL_GUIDE_WIDTHS


def _guide_for(tables: torch.Tensor, row: int | torch.Tensor, widths: tuple[int, ...] | None = None) -> _Guide | None:
    """The guide of tables[row], or of the per-channel tables tables[bucket] for a bucket
    tensor, its bucket widths tried in the order given (None: those that suit the kernels
    tables' device has): remembered with the table (or bucket) tensor while it lives, so a
    call costs a dict lookup."""
    single = isinstance(row, int)
    widths = widths or _widths_for(tables)
    cache = _remembered(tables if single else row)
    key = (row, tables._version, widths) if single else (id(tables), tables._version, row._version, widths)
    hit = cache.get(key)
    if hit is None or hit[0]() is not tables:
        digest = _digest(tables[row] if single else tables) + repr(widths).encode()
        if single:
            guide = _shared(digest, tables, lambda: _table_guide(tables[row], widths))
        else:  # the stack of all tables is shared; only its per-table fields are read per channel
            stack = _shared(digest, tables, lambda: _stacked_guide(tables, widths))
            guide = None if stack is None else stack._replace(**{name: getattr(stack, name)[row]
                                                                 for name in _PER_TABLE})
        hit = cache[key] = (weakref.ref(tables), guide)
    return hit[1]


def _shared(digest: bytes, tables: torch.Tensor, build) -> _Guide | None:
    """One guide per table contents (layers reuse the same neuron tables), the last
    _GUIDES_KEPT of them kept."""
    digest += str(tables.device).encode()
    if digest not in _guides_by_content:
        _guides_by_content[digest] = build()
        if len(_guides_by_content) > _GUIDES_KEPT:
            _guides_by_content.popitem(last=False)
    return _guides_by_content[digest]


def _squeezed_keys(x: torch.Tensor, floor: int | torch.Tensor) -> torch.Tensor:
    """An int32 key that orders float32 values as they compare (with -0 = +0), with the empty
    stretch of magnitudes below the table's smallest threshold squeezed out."""
    bits = x.view(torch.int32)
    sign = bits >> 31  # -1 for negative values, else 0
    magnitude = torch.bitwise_and(bits, 0x7FFFFFFF).sub_(floor).clamp_(min=0)
    return magnitude.bitwise_xor_(sign).sub_(sign)


def _table_guide(table: torch.Tensor, widths: tuple[int, ...] | None = None) -> _Guide | None:
    """A guide for one sorted table (finite, or finite then +inf padding), its buckets as
    narrow as `widths` allows in _GUIDE_MAX_BUCKETS buckets (None: the widths that suit the
    kernels the table's device has), or None where none fits (then binary search stays)."""
    finite = int(torch.isfinite(table).sum())
    length = table.numel()
    table = table[:finite]
    if finite < 64 or not bool(torch.isfinite(table).all()):
        return None
    magnitudes = table.abs()
    nonzero = magnitudes[magnitudes > 0]
    floor = int(nonzero.min().view(torch.int32)) if nonzero.numel() else 0
    keys = _squeezed_keys(table.contiguous(), floor).long()
    for width in widths or _widths_for(table):
        for shift in range(31, -1, -1):
            buckets = keys >> shift
            if int(torch.unique_consecutive(buckets, return_counts=True)[1].max()) <= width:
                break
        count = int(buckets[-1] - buckets[0]) + 1
        if count <= _GUIDE_MAX_BUCKETS:
            first = int(buckets[0])
            starts = torch.searchsorted(keys, (torch.arange(count, device=table.device) + first) << shift).int()
            padded = torch.cat([table, table.new_full((width,), float("nan"))])
            return _Guide(shift, first, floor, count - 1, 0, 0, length, starts, padded, width, length > finite)
    return None


def _stacked_guide(tables: torch.Tensor, widths: tuple[int, ...]) -> _Guide | None:
    """One guide over all rows of `tables`, its per-table fields (tables,) tensors, or None if
    a row has no guide."""
    guides = [_guide_for(tables, row, widths) for row in range(tables.shape[0])]
    if any(guide is None for guide in guides):
        return None
    width = max(guide.width for guide in guides)
    per_row: dict[str, list[int]] = {name: [] for name in _PER_TABLE}
    starts, padded, base, offset = [], [], 0, 0
    for guide in guides:
        fields = (guide.shift, guide.first, guide.floor, guide.last, base, offset, guide.length)
        for name, value in zip(_PER_TABLE, fields, strict=True):
            per_row[name].append(value)
        finite = guide.padded[: guide.padded.numel() - guide.width]
        starts.append(guide.starts)
        padded.append(torch.cat([finite, finite.new_full((width,), float("nan"))]))
        base, offset = base + guide.starts.numel(), offset + padded[-1].numel()
    rows = {name: torch.tensor(values, dtype=torch.int32, device=tables.device) for name, values in per_row.items()}
    return _Guide(**rows, starts=torch.cat(starts), padded=torch.cat(padded), width=width,
                  padded_table=any(guide.padded_table for guide in guides))


def _interval(x: torch.Tensor, tables: torch.Tensor, row: int) -> torch.Tensor:
    """searchsorted(tables[row], x, right=True) for float32 x: how many thresholds are <= x.
    Through the table's guide (one bucket lookup and `width` comparisons instead of a binary
    search: 3-5x faster on 16k thresholds) where one fits, else binary search."""
    guide = _guide_for(tables, row)
    if guide is None or x.dtype != torch.float32:
        return torch.searchsorted(tables[row], x, right=True)
    return _guided_interval(x, guide)


def _guided_interval(x: torch.Tensor, guide: _Guide) -> torch.Tensor:
    """How many thresholds of its table are <= each x (a stacked guide: of its channel's)."""
    x = x + 0.0  # -0 -> +0: the key orders them apart, the comparisons below do not
    bucket = (_squeezed_keys(x, guide.floor) >> guide.shift).sub_(guide.first).clamp_(min=0)
    bucket = torch.minimum(bucket, torch.as_tensor(guide.last, device=x.device)).add_(guide.base)
    start = torch.take(guide.starts, bucket.long()).long().add_(guide.offset)
    index = start.clone()
    for i in range(guide.width):
        index += guide.padded.take(start + i) <= x
    index -= guide.offset
    if guide.padded_table:
        index = torch.where(torch.isposinf(x), guide.length, index)
    return index


def _refined(x: torch.Tensor, index: torch.Tensor, thresholds: torch.Tensor, codes: torch.Tensor,
             T: int) -> torch.Tensor:
    """Codes for T above the table's resolution: inside a coarse interval where f is monotone
    (its neighbours' codes step evenly), the 2^(T - bits) finer levels sit at evenly spaced
    thresholds (one accumulated step apart), which linear interpolation between the
    interval's two thresholds places; elsewhere the coarse code stands."""
    coarse = codes[index]
    d = T - min(T, TABLE_MAX_BITS)
    if d == 0:
        return coarse
    n = int(torch.isfinite(thresholds).sum())
    i = index.clamp(1, max(n - 1, 1))
    below, above = codes[i - 1], codes[(i + 1).clamp(max=n)]
    step = coarse - below
    linear = (index > 0) & (index < n) & (step.abs() == 2**d) & (above - coarse == step)
    lo, hi = thresholds[i - 1].double(), thresholds[i.clamp(max=n - 1)].double()
    phi = ((x.double() - lo) / (hi - lo).clamp(min=1e-300)).clamp(0, 1)
    offset = torch.floor((phi - 0.5) * 2**d + 0.5).long() * torch.sign(step)
    fine = (coarse + torch.where(linear, offset, 0)).clamp(-(2**T - 1), 2**T - 1)
    return fine


@torch.library.custom_op("snn::fn_encode", mutates_args=())
def fn_encode(x: torch.Tensor, thresholds: torch.Tensor, codes: torch.Tensor, bucket: torch.Tensor,
              T: int, G: int = 0) -> torch.Tensor:
    """Nonlinear table neuron: the T-step train of f(x) for the f its thresholds encode
    (snncc.ir.neurons): it compares its membrane x with sorted thresholds and fires the
    digits of the code of the interval x lies in: binary MT digits, or for tables of
    multi-range codes (G > 0) the ternary digits of the range that holds the value, as
    graded spikes +-2^j (the train mr_encode sends for that value). Decodes with the range
    of each channel's table (snn.decode). NaN poisons; +-inf takes the outermost interval's
    code, f's limit (module docstring)."""
    if G:  # the value k 2^-T (exact in float32: |k| < 2^(T+G) <= 2^22) as a multi-range train
        value = table_value(x, thresholds, codes, bucket, T)
        return mr_encode(value, torch.ones((), device=x.device), T, G)
    train = signed_code_digits(table_codes(x, thresholds, codes, bucket, T), T)
    return poisoned(train, torch.isnan(x)).view(T, *x.shape)


def table_value(x: torch.Tensor, thresholds: torch.Tensor, codes: torch.Tensor, bucket: torch.Tensor,
                T: int) -> torch.Tensor:
    """A table neuron's value k 2^-T as float32 (exact while codes stay below 2^24), NaN
    where x is NaN (it lies in no interval)."""
    return _fill_where(table_codes(x, thresholds, codes, bucket, T, scale=2.0**-T), x, torch.isnan)


@torch.library.custom_op("snn::fn_quantize", mutates_args=())
def fn_quantize(x: torch.Tensor, thresholds: torch.Tensor, codes: torch.Tensor, bucket: torch.Tensor,
                T: int, G: int = 0) -> torch.Tensor:
    """What an fn_encode train decodes to (before its range), without the train: k 2^-T
    (the code holds the value whatever digits send it, so G does not enter); NaN for NaN x."""
    lookup = table_lookup(thresholds, codes, bucket) if T + G <= TABLE_MAX_BITS else None
    if lookup is not None:
        return table_neuron_value(x, lookup, T)
    return _fill_where(table_codes(x, thresholds, codes, bucket, T).to(x.dtype).mul_(2.0**-T), x, torch.isnan)


def table_neuron_value(x: torch.Tensor, lookup: TableLookup, T: int) -> torch.Tensor:
    """fn_quantize through a prebuilt lookup, for T + G <= TABLE_MAX_BITS (codes below 2^20:
    exact in float32) as plain tensor code: what torch.compile traces and fuses."""
    if x.dtype == torch.float32:
        return _fill_where(looked_up_codes(x, lookup, 2.0**-T), x, torch.isnan)
    return _fill_where(looked_up_codes(x, lookup).to(x.dtype).mul_(2.0**-T), x, torch.isnan)


class DirectTable(NamedTuple):
    """A shared table's width-1 guide laid out for generated code: each bucket's row holds
    its threshold and the values below and at or above it, so a value costs one row read
    where the guided lookup chases three tables (starts, thresholds, codes), one after the
    other (benchmarks/table_lookup.py)."""

    shift: int
    first: int
    floor: int
    last: int
    rows: torch.Tensor  # (buckets, 3) float32: threshold (NaN: none), value below it, value at or above it
    posinf: float | None  # the value +inf takes where the table ends in +inf entries


_DIRECT_MAX_BUCKETS = 1 << 18  # bounds a table's rows to 3 MiB (softmax's exp at T = 14: 1.6 MiB)


def direct_table(lookup: TableLookup, T: int) -> DirectTable | None:
    """The DirectTable of a shared table's lookup (narrow widths), or None where
    its guide is not width 1 or has too many buckets."""
    guide = lookup.guide
    if lookup.channels != 1 or guide.width != 1 or guide.starts.numel() > _DIRECT_MAX_BUCKETS:
        return None
    cache = _remembered(guide.starts)  # blocks share a table's guide, and so its rows
    key = (_digest(lookup.codes), T)
    if key not in cache:
        cache[key] = _direct_table(lookup, T)
    return cache[key]


def _direct_table(lookup: TableLookup, T: int) -> DirectTable:
    guide = lookup.guide
    values = lookup.codes.float().mul_(2.0**-T)  # exact: codes stay below 2^20
    start = guide.starts.long()
    above = (start + 1).clamp_(max=values.numel() - 1)  # past the last threshold: never taken (NaN)
    rows = torch.stack([guide.padded[start], values[start], values[above]], dim=1).contiguous()
    posinf = float(values[guide.length]) if guide.padded_table else None
    return DirectTable(guide.shift, guide.first, guide.floor, guide.last, rows, posinf)


def direct_table_value(x: torch.Tensor, table: DirectTable) -> torch.Tensor:
    """table_neuron_value for float32 x through its DirectTable, bit for bit (the interval
    found as _guided_interval finds it with one comparison)."""
    bucket = (_squeezed_keys(x, table.floor) >> table.shift).sub_(table.first).clamp_(0, table.last).long()
    threshold, below, above = (table.rows[:, column][bucket] for column in range(3))
    value = torch.where(threshold <= x, above, below)
    if table.posinf is not None:
        value = value.masked_fill(torch.isposinf(x), table.posinf)
    return value.masked_fill(torch.isnan(x), float("nan"))


@fn_quantize.register_fake
def _(x, thresholds, codes, bucket, T, G=0):
    return torch.empty_like(x)


@fn_encode.register_fake
def _(x, thresholds, codes, bucket, T, G=0):
    return x.new_empty((T, *x.shape), dtype=torch.int8)


@torch.library.custom_op("snn::spike_mul", mutates_args=())
def spike_mul(sa: torch.Tensor, scale_a: torch.Tensor, sb: torch.Tensor, scale_b: torch.Tensor,
              rate_a: bool = False, rate_b: bool = False) -> torch.Tensor:
    """Exact elementwise spike x spike product of two trains (gated FFNs, squares):
    the partial-sum scheme of spike_matmul, one synapse per element."""
    if _execution_mode.get() == "unrolled":
        return _partial_sum_product(sa, scale_a, sb, scale_b, torch.mul, rate_a, rate_b)
    dtype = torch.float64 if _execution_mode.get() == "exact" else scale_a.dtype
    a_hat = _decode_unit(sa, dtype, rate_a) * scale_a.to(dtype)
    b_hat = _decode_unit(sb, dtype, rate_b) * scale_b.to(dtype)
    return (a_hat * b_hat).to(scale_a.dtype)


@spike_mul.register_fake
def _(sa, scale_a, sb, scale_b, rate_a=False, rate_b=False):
    shape = torch.broadcast_shapes(sa.shape[1:], scale_a.shape, sb.shape[1:], scale_b.shape)
    return torch.empty(shape, dtype=scale_a.dtype, device=sa.device)


def normalizer_codes(a: torch.Tensor, power: float, thresholds: torch.Tensor, codes: torch.Tensor,
                     T: int, lookup: TableLookup | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mantissa code k, exponent F) of the floating-point neuron for a^power: a^power is
    about k 2^-T 2^-F (snncc.ir.neurons.mantissa_table). frexp reads the exponent exactly;
    it is what comparing a with the powers of two would give. `lookup`: the mantissa table's,
    prebuilt (T <= TABLE_MAX_BITS), as compiled code passes it."""
    mantissa, exponent = torch.frexp(a.float().clamp(min=torch.finfo(torch.float32).tiny))
    m, e = mantissa * 2, exponent - 1  # a = m 2^e, m in [1, 2)
    if power == -0.5:
        odd = torch.remainder(e, 2)
        m, e = m * (1 + odd), e - odd  # a = m 4^(e/2), m in [1, 4)
        e = torch.div(e, 2, rounding_mode="floor")
    if lookup is not None:
        return looked_up_codes(m, lookup), e
    return _lookup(m.contiguous(), thresholds, 0, codes[0], T), e


def normalizer_train(a: torch.Tensor, power: float, thresholds: torch.Tensor, codes: torch.Tensor,
                     T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mantissa train (T, a.numel()), exponent F) of the floating-point neuron for a^power,
    poisoned where a is NaN or +-inf (no exponent or mantissa codes it)."""
    k, e = normalizer_codes(a, power, thresholds, codes, T)
    return poisoned(signed_code_digits(k, T), uncodable(a, a)), e


@torch.library.custom_op("snn::spike_normalize", mutates_args=())
def spike_normalize(x: torch.Tensor, a: torch.Tensor, power: float, thresholds: torch.Tensor,
                    codes: torch.Tensor, T: int) -> torch.Tensor:
    """x * a^power (power -1 or -1/2: softmax and norm denominators) where a^power is sent by
    a floating-point neuron: an exponent (threshold units) and a T-step mantissa train whose
    spikes each add the exponent-shifted x into the output. Relative error 2^-T at any scale
    of a, which a fixed-range code cannot give (a spans orders of magnitude across tokens)."""
    if _execution_mode.get() == "unrolled":
        train, e = normalizer_train(a, power, thresholds, codes, T)
        out = torch.zeros(torch.broadcast_shapes(x.shape, a.shape), dtype=x.dtype, device=x.device)
        for t, spikes in enumerate(train):
            gain = torch.ldexp(spike_values(spikes.view(e.shape), x.dtype), -(e + t + 1))
            out.add_(x * gain)
        return out
    return normalized(x, a, power, thresholds, codes, T, exact=_execution_mode.get() == "exact")


def normalized(x: torch.Tensor, a: torch.Tensor, power: float, thresholds: torch.Tensor, codes: torch.Tensor,
               T: int, lookup: TableLookup | None = None, exact: bool = False) -> torch.Tensor:
    """spike_normalize outside unrolled mode (exact: float64 membranes) as plain tensor code,
    which torch.compile traces where the mantissa `lookup` is prebuilt."""
    k, e = normalizer_codes(a, power, thresholds, codes, T, lookup)
    dtype = torch.float64 if exact else x.dtype
    factor = torch.ldexp(k.to(dtype), -(e + T).to(dtype)).masked_fill(uncodable(a, a), float("nan"))
    return (x.to(dtype) * factor).to(x.dtype)


@spike_normalize.register_fake
def _(x, a, power, thresholds, codes, T):
    return torch.empty(torch.broadcast_shapes(x.shape, a.shape), dtype=x.dtype, device=x.device)


# --- rate-coded integrate-and-fire neurons (the `fas` pipeline) ---------------------------


MAX_BURST = 127  # spikes one IF neuron may send in a step: a burst rides on an int8 payload


def if_spikes(x: torch.Tensor, threshold: torch.Tensor, membrane: torch.Tensor, T: int,
              burst: int = 1) -> Iterator[torch.Tensor]:
    """The T steps (int8 in [-burst, burst]) of signed IF neurons fed the constant current x.

    Per step, in threshold units (u = x / theta, m(0) = v(0) / theta, clipped to [0, 1]):
    m += u; the neuron fires n = floor(m) spikes, at most `burst` of either sign, and
    subtracts n (reset by subtraction). For |u| <= burst, m stays in [0, 1), so after T steps
    the count is floor(T u + m(0)): with m(0) = 1/2 and burst * T = L that is QCFS's
    floor(z L / lambda + 1/2) for theta = lambda / burst. burst = 1 is the plain IF neuron
    (+1 at m >= 1, -1 at m < 0); a burst neuron (Li & Zeng, IJCAI 2022) sends up to `burst`
    spikes in one step, so it codes burst * T levels per sign in T steps. float64 membranes;
    every backend steps through this one function. The three tensors broadcast; the steps
    are flat over their joint shape (if_shape). A neuron whose current u is NaN or +-inf
    poisons (module docstring): POISON at step 0, silent after."""
    shape = if_shape(x, threshold, membrane)
    u = (x.double() / threshold.double()).expand(shape)
    bad = uncodable(x, u).reshape(-1)
    u = u.reshape(-1).masked_fill(bad, 0.0)
    m = (membrane.double() / threshold.double()).clamp(0.0, 1.0).expand(shape).reshape(-1).clone()
    for t in range(T):
        m += u
        fired = m.floor().clamp_(-burst, burst)
        m -= fired
        spikes = fired.to(torch.int8)
        yield poisoned(spikes.unsqueeze(0), bad)[0] if t == 0 else spikes


def if_shape(x: torch.Tensor, threshold: torch.Tensor, membrane: torch.Tensor) -> torch.Size:
    """The neuron array of IF neurons: x, threshold and initial membrane broadcast."""
    return torch.broadcast_shapes(x.shape, threshold.shape, membrane.shape)


@torch.library.custom_op("snn::if_encode", mutates_args=())
def if_encode(x: torch.Tensor, threshold: torch.Tensor, membrane: torch.Tensor, T: int,
              burst: int = 1) -> torch.Tensor:
    """Signed integrate-and-fire neurons (rate code, FAS): T steps of if_spikes, up to
    `burst` spikes per step. The train decodes to threshold * sum_t s_t / T (decode with
    rate=True)."""
    return torch.stack(list(if_spikes(x, threshold, membrane, T, burst))).view(T, *if_shape(x, threshold, membrane))


@if_encode.register_fake
def _(x, threshold, membrane, T, burst=1):
    return x.new_empty((T, *if_shape(x, threshold, membrane)), dtype=torch.int8)


@torch.library.custom_op("snn::if_quantize", mutates_args=())
def if_quantize(x: torch.Tensor, threshold: torch.Tensor, membrane: torch.Tensor, T: int,
                burst: int = 1) -> torch.Tensor:
    """What an if_encode train decodes to in threshold units (spike count / T), without
    the train: for the fused executor."""
    shape = if_shape(x, threshold, membrane)
    count = torch.zeros(shape.numel(), dtype=torch.float64, device=x.device)
    for spikes in if_spikes(x, threshold, membrane, T, burst):
        count += spike_values(spikes, torch.float64)
    return (count / T).to(x.dtype).view(shape)


@if_quantize.register_fake
def _(x, threshold, membrane, T, burst=1):
    return torch.empty(if_shape(x, threshold, membrane), dtype=x.dtype, device=x.device)


def qcfs_levels(x: torch.Tensor, lam: torch.Tensor, L: int) -> torch.Tensor:
    """clip(floor(x L / lambda + 1/2), -L, L): the signed QCFS level of x (float64 inside,
    as the IF neurons that reproduce it)."""
    return torch.floor(x.double() * L / lam.double() + 0.5).clamp(-L, L).to(x.dtype)


@torch.library.custom_op("snn::qcfs", mutates_args=())
def qcfs(x: torch.Tensor, lam: torch.Tensor, L: int) -> torch.Tensor:
    """Signed quantization-clip-floor-shift activation (FAS stage 1):
    lambda / L * clip(floor(x L / lambda + 1/2), -L, L). An ANN op, trained with
    straight-through gradients; `ifencode` turns it into IF neurons that reproduce it."""
    return qcfs_levels(x, lam, L) * (lam / L)


@qcfs.register_fake
def _(x, lam, L):
    return torch.empty(torch.broadcast_shapes(x.shape, lam.shape), dtype=x.dtype, device=x.device)


def _qcfs_setup(ctx, inputs, output) -> None:
    x, lam, L = inputs
    ctx.save_for_backward(x, lam)
    ctx.L = L


def _qcfs_backward(ctx, grad: torch.Tensor):
    """Straight-through floor: d/dx = 1 inside the clip range, 0 outside; d/dlambda =
    level/L - x/lambda inside, the sign outside (LSQ-style)."""
    x, lam = ctx.saved_tensors
    z = x * ctx.L / lam
    inside = z.abs() <= ctx.L
    grad_x = grad * inside if ctx.needs_input_grad[0] else None
    grad_lam = None
    if ctx.needs_input_grad[1]:
        local = torch.where(inside, qcfs_levels(x, lam, ctx.L) / ctx.L - x / lam, torch.sign(z))
        grad_lam = (grad * local).sum_to_size(lam.shape)
    return grad_x, grad_lam, None


qcfs.register_autograd(_qcfs_backward, setup_context=_qcfs_setup)
