"""The `snn` op set: spiking operations registered with torch.library.

Every op has a reference kernel (CPU or CUDA, batched over time) and a fake kernel, so
graphs that use them trace, shape-propagate and export like any ATen graph.

Spike trains are int8 tensors of shape (T, *x.shape) with entries in {-1, 0, 1}. The
multi-threshold (MT) code is binary successive approximation: step t (0-based) has the
threshold 2^-(t+1) of the channel's range, so a train decodes as

    x_hat = scale * sum_t 2^-(t+1) * s_t

which is exact in float32 for T <= 24. `scale` is the per-channel range from calibration;
for linear layers it is folded into the weight columns, so spikes reach the synapses as
plain +-1 events and only the per-step gain 2^-(t+1) remains on the membrane.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
import torch.nn.functional as F

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


def _steps(s: torch.Tensor) -> Iterator[tuple[float, torch.Tensor]]:
    for t in range(s.shape[0]):
        yield step_gain(t), s[t]


def _decode_unit(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """sum_t 2^-(t+1) s_t, accumulated step by step to keep memory at one activation."""
    out = torch.zeros(s.shape[1:], dtype=dtype, device=s.device)
    for gain, st in _steps(s):
        out.add_(st.to(dtype), alpha=gain)
    return out


_ENCODE_SCRATCH = 1 << 21  # (elements x steps) encoded at a time: bounds the scratch space


@torch.library.custom_op("snn::mt_encode", mutates_args=())
def mt_encode(x: torch.Tensor, scale: torch.Tensor, T: int) -> torch.Tensor:
    """Multi-threshold neuron: T-step signed binary successive approximation of x / scale.

    The residual starts at |x|/scale plus half a step (round to nearest); at step t the
    neuron fires sign(x) when the residual reaches 2^-(t+1), and subtracts it. Inputs
    beyond the range clip to the largest code, 1 - 2^-T. Works in chunks, so memory is the
    int8 output plus a bounded scratch space, whatever T and the input size.
    """
    u = (x / scale).reshape(-1)
    out = torch.empty((T, u.numel()), dtype=torch.int8, device=x.device)
    code = torch.int32 if T <= 30 else torch.int64  # int32 halves the scratch traffic
    shifts = torch.arange(T - 1, -1, -1, device=x.device, dtype=code).unsqueeze(1)
    chunk = max(4096, _ENCODE_SCRATCH // T)
    for start in range(0, u.numel(), chunk):
        membrane, sign = mt_initial_membrane(u[start : start + chunk], T)
        bits = torch.bitwise_and(torch.bitwise_right_shift(membrane.to(code).unsqueeze(0), shifts), 1)
        out[:, start : start + chunk] = bits.mul_(sign.to(code))
    return out.view(T, *x.shape)


def mt_initial_membrane(u: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The MT neuron's starting residual in units of its last threshold 2^-T (an integer:
    floor(|u| 2^T + 1/2), clipped to 2^T - 1) and its sign, for normalised inputs u = x/scale.

    Step t then fires when the residual reaches 2^(T-1-t) and subtracts it; both backends
    start from this, so their spikes agree bit for bit."""
    u = u.double().clamp(-1.0, 1.0)
    levels = 2**T
    membrane = torch.floor(u.abs() * levels + 0.5).clamp_(max=levels - 1).to(torch.int64)
    return membrane, torch.sign(u).to(torch.int64)


@mt_encode.register_fake
def _(x: torch.Tensor, scale: torch.Tensor, T: int) -> torch.Tensor:
    return x.new_empty((T, *x.shape), dtype=torch.int8)


@torch.library.custom_op("snn::mt_quantize", mutates_args=())
def mt_quantize(x: torch.Tensor, scale: torch.Tensor, T: int) -> torch.Tensor:
    """What an MT train decodes to, sum_t 2^-(t+1) s_t, computed without the train:
    sign(u) * min(floor(|u| 2^T + 1/2), 2^T - 1) * 2^-T with u = x / scale. Bit-identical to
    decoding `mt_encode` for T <= 24 (float32 holds every such code exactly); the fused
    executor uses it where only synapses read a train."""
    u = (x / scale).reshape(-1)
    out = torch.empty_like(u)
    chunk = 1 << 20  # bounds the int64 / float64 scratch to a few MiB
    for start in range(0, u.numel(), chunk):
        membrane, sign = mt_initial_membrane(u[start : start + chunk], T)
        out[start : start + chunk] = membrane.mul_(sign).to(torch.float64).mul_(2.0**-T)
    return out.view(torch.broadcast_shapes(x.shape, scale.shape))


@mt_quantize.register_fake
def _(x: torch.Tensor, scale: torch.Tensor, T: int) -> torch.Tensor:
    return torch.empty(torch.broadcast_shapes(x.shape, scale.shape), dtype=x.dtype, device=x.device)


FUSABLE_MAX_T = 24  # codes up to 2^24 are exact in float32


@torch.library.custom_op("snn::decode", mutates_args=())
def decode(s: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Read a spike train back into the ANN's units: scale * sum_t 2^-(t+1) s_t."""
    return _decode_unit(s, scale.dtype) * scale


@decode.register_fake
def _(s: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.empty(torch.broadcast_shapes(s.shape[1:], scale.shape), dtype=scale.dtype,
                       device=s.device)


@torch.library.custom_op("snn::spike_linear", mutates_args=())
def spike_linear(s: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Synaptic layer over a unit-amplitude spike train: sum_t 2^-(t+1) W s_t + b.

    The input channel ranges are already folded into `weight` (one column per input neuron).
    """
    if _execution_mode.get() == "unrolled":
        out = None
        for gain, st in _steps(s):
            contribution = F.linear(st.to(weight.dtype), weight) * gain
            out = contribution if out is None else out.add_(contribution)
        return out + bias if bias is not None else out
    if _execution_mode.get() == "exact":
        bias64 = bias.double() if bias is not None else None
        return F.linear(_decode_unit(s, torch.float64), weight.double(), bias64).to(weight.dtype)
    return F.linear(_decode_unit(s, weight.dtype), weight, bias)


@spike_linear.register_fake
def _(s: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return s.new_empty((*s.shape[1:-1], weight.shape[0]), dtype=weight.dtype)


@torch.library.custom_op("snn::spike_matmul", mutates_args=())
def spike_matmul(
    sa: torch.Tensor, scale_a: torch.Tensor, sb: torch.Tensor, scale_b: torch.Tensor
) -> torch.Tensor:
    """Exact spike x spike product of two MT trains (activation-activation matmul).

    With partial sums P^A_t = sum_{k<=t} A_k, the step output A_t P^B_t + P^A_{t-1} B_t
    sums over t to A_hat @ B_hat; every term multiplies a spike by a stored partial sum.
    """
    if _execution_mode.get() == "unrolled":
        partial_a = torch.zeros(sa.shape[1:], dtype=scale_a.dtype, device=sa.device)
        partial_b = torch.zeros(sb.shape[1:], dtype=scale_b.dtype, device=sb.device)
        out = None
        for t in range(sa.shape[0]):
            gain = step_gain(t)
            a_t = sa[t].to(scale_a.dtype) * (scale_a * gain)
            b_t = sb[t].to(scale_b.dtype) * (scale_b * gain)
            partial_b.add_(b_t)
            step = torch.matmul(a_t, partial_b) + torch.matmul(partial_a, b_t)
            partial_a.add_(a_t)
            out = step if out is None else out.add_(step)
        return out
    if _execution_mode.get() == "exact":
        a_hat = _decode_unit(sa, torch.float64) * scale_a.double()
        b_hat = _decode_unit(sb, torch.float64) * scale_b.double()
        return torch.matmul(a_hat, b_hat).to(scale_a.dtype)
    a_hat = _decode_unit(sa, scale_a.dtype) * scale_a
    b_hat = _decode_unit(sb, scale_b.dtype) * scale_b
    return torch.matmul(a_hat, b_hat)


@spike_matmul.register_fake
def _(sa: torch.Tensor, scale_a: torch.Tensor, sb: torch.Tensor, scale_b: torch.Tensor) -> torch.Tensor:
    a = torch.empty(sa.shape[1:], dtype=scale_a.dtype, device=sa.device)
    b = torch.empty(sb.shape[1:], dtype=scale_b.dtype, device=sb.device)
    return torch.matmul(a, b)


SPIKE_SOURCES = {torch.ops.snn.mt_encode.default}
SPIKE_SYNAPSES = {torch.ops.snn.spike_linear.default, torch.ops.snn.spike_matmul.default}
