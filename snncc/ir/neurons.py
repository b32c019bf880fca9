"""Threshold tables of the spiking nonlinear neurons, built at compile time.

A table neuron reads its membrane potential x and sends the MT code of f(x):

    k(x) = sign(f(x)) * min(floor(|f(x)| / r * 2^b + 1/2), 2^b - 1)     (b code bits, range r)

k is a step function of x, constant between the points where f crosses a level
(c + 1/2) r 2^-b. So the neuron is a comparator bank: it finds, by comparing its membrane
with sorted thresholds (a binary search: b comparisons, one per time step), the interval
its membrane lies in, and fires the binary digits of that interval's code. No function is
evaluated at run time; f is evaluated here, in float64, to place the thresholds.

Any piecewise-monotone f works (SiLU and GELU have one minimum): thresholds are found per
monotone piece by bisection. The table has one threshold per level crossed, so its size
is about 2^b per piece; b is capped at TABLE_MAX_BITS. For larger T the neuron splits
each coarse interval where f is monotone into 2^(T - b) evenly spaced finer levels (one
accumulated threshold step apart; snncc.ir.ops._refined), so the error keeps falling until
the float32 membrane no longer resolves the steps.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from snncc.errors import PipelineError
from snncc.ir.ops import MAX_OUTLIER_RANGES, TABLE_MAX_BITS, range_index, ternary_limit, ternary_max_code

_GRID = 1 << 16  # samples used to find the monotone pieces of f
_BISECT = 48  # bisection steps: a domain of width 2^9 shrinks to 2^-39, below float32 resolution

Function = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class NeuronTable:
    """Sorted thresholds (M,) float32 and the code of each of the M + 1 intervals (int64, at T bits)."""

    thresholds: torch.Tensor
    codes: torch.Tensor
    bits: int  # code bits the thresholds resolve (<= T)


MULTI_RANGE_MAX_T = 16  # tables of multi-range codes hold about (G + 1) 2^T thresholds per piece of f


def table_ranges(T: int, G: int, owner: str) -> int:
    """The outlier ranges the table neurons of pass `owner` asked for G get at T steps: none
    above MULTI_RANGE_MAX_T, where the tables would grow large and plain codes are fine
    already. G must fit a graded spike (0..MAX_OUTLIER_RANGES)."""
    if not 0 <= G <= MAX_OUTLIER_RANGES:
        raise PipelineError(f"{owner}: ranges={G} is out of 0..{MAX_OUTLIER_RANGES}")
    return G if T <= MULTI_RANGE_MAX_T else 0


def table_bits(T: int, G: int = 0) -> int:
    return T if G else min(T, TABLE_MAX_BITS)


def code_of(y: torch.Tensor, out_range: float, bits: int, G: int = 0) -> torch.Tensor:
    """The code (signed integer, units of out_range * 2^-bits) a neuron sends for values y:
    G = 0, the MT code; G > 0, the multi-range code of snn.mr_encode (the T = bits digits of
    the smallest range out_range * 2^j, j <= G, that holds |y|, times 2^j)."""
    a = y.abs() / out_range
    if G:
        j = range_index(a, ternary_limit(bits), G)
        magnitude = torch.floor(torch.ldexp(a, bits - j) + 0.5).clamp(max=ternary_max_code(bits)).long() << j
    else:
        magnitude = torch.floor(a * 2**bits + 0.5).clamp(max=2**bits - 1).long()
    return torch.sign(y).long() * magnitude


def level_boundaries(bits: int, G: int = 0) -> torch.Tensor:
    """The sorted values (float64, units of the range) where a code of `bits` bits (G: with G
    outlier ranges) changes: the points a table neuron places thresholds at, where f crosses
    them. The code at a boundary is the one of larger magnitude (rounding half away from 0)."""
    if not G:
        levels = 2**bits
        return (torch.arange(-(levels - 1), levels - 1, dtype=torch.float64) + 0.5) / levels
    halves = torch.arange(ternary_max_code(bits) + 1, dtype=torch.float64) + 0.5
    candidates = torch.cat([torch.ldexp(halves, torch.tensor(j - bits)) for j in range(G + 1)]
                           + [ternary_limit(bits) * 2.0 ** torch.arange(G, dtype=torch.float64)])
    candidates = torch.unique(candidates)
    codes = code_of(candidates, 1.0, bits, G)
    positive = candidates[codes != torch.cat([codes.new_zeros(1), codes[:-1]])]
    return torch.cat([-positive.flip(0), positive])


def _extrema(f: Function, lo: float, hi: float) -> list[float]:
    """Interior local extrema of f on [lo, hi], located to float64 precision."""
    grid = torch.linspace(lo, hi, _GRID + 1, dtype=torch.float64)
    y = f(grid)
    step = torch.diff(y)
    # Changes below float64 noise (tanh saturating at -1) are flat, not extrema.
    slope = torch.sign(step) * (step.abs() > 1e-12 * (1 + float(y.abs().max())))
    nonzero = slope != 0
    points, s = [], slope[nonzero]
    index = torch.nonzero(nonzero).squeeze(1)
    for j in torch.nonzero(s[1:] != s[:-1]).squeeze(1).tolist():
        a, b = float(grid[index[j]]), float(grid[index[j + 1] + 1])
        sign = 1.0 if s[j] > 0 else -1.0  # rising then falling: a maximum
        for _ in range(200):  # golden-section search for the extremum of sign * f
            m1, m2 = a + (b - a) * 0.382, a + (b - a) * 0.618
            v1, v2 = sign * f(torch.tensor([m1, m2], dtype=torch.float64))
            if v1 < v2:
                a = m1
            else:
                b = m2
        points.append((a + b) / 2)
    return points


def _piece_thresholds(f: Function, a: float, b: float, boundaries: torch.Tensor) -> torch.Tensor:
    """Points in [a, b] where the monotone f crosses one of the code boundaries (in f's units)."""
    fa, fb = (float(v) for v in f(torch.tensor([a, b], dtype=torch.float64)))
    low, high = min(fa, fb), max(fa, fb)
    target = boundaries[(boundaries >= low) & (boundaries <= high)]
    if not len(target):
        return torch.empty(0, dtype=torch.float64)
    rising = fb >= fa
    left = torch.full_like(target, a)
    right = torch.full_like(target, b)
    negative = target < 0  # codes round half away from zero: |f| on a level takes the larger code
    for _ in range(_BISECT):
        mid = (left + right) / 2
        value = f(mid)
        if rising:
            below = torch.where(negative, value <= target, value < target)
        else:
            below = torch.where(negative, value > target, value >= target)
        left = torch.where(below, mid, left)
        right = torch.where(below, right, mid)
    return right


def build_table(f: Function, out_range: float, T: int, domain: tuple[float, float], G: int = 0) -> NeuronTable:
    """The threshold table of a neuron sending f(x) with range `out_range` at T steps (G > 0:
    multi-range codes, whose values keep T digits relative to the range that holds them).

    Inputs below or above `domain` get the code at its ends."""
    bits = table_bits(T, G)
    lo, hi = domain
    edges = [lo, *_extrema(f, lo, hi), hi]
    boundaries = level_boundaries(bits, G) * out_range
    pieces = [_piece_thresholds(f, a, b, boundaries) for a, b in zip(edges, edges[1:], strict=False)]
    thresholds = torch.sort(torch.cat(pieces)).values
    inner = (thresholds[1:] + thresholds[:-1]) / 2
    first = torch.tensor([min(lo, float(thresholds[0]) - 1.0) if len(thresholds) else lo], dtype=torch.float64)
    last = torch.tensor([hi], dtype=torch.float64)
    samples = torch.cat([first, inner, last]) if len(thresholds) else first
    codes = code_of(f(samples), out_range, bits, G)
    keep = torch.ones(len(thresholds), dtype=torch.bool)
    keep[codes[1:] == codes[:-1]] = False  # thresholds that change nothing (an extremum's own level)
    codes = torch.cat([codes[:1], codes[1:][keep]])
    return NeuronTable(thresholds[keep].float(), codes << (T - bits), bits)


def stack_tables(tables: list[NeuronTable]) -> tuple[torch.Tensor, torch.Tensor]:
    """One (n, M) threshold tensor (+inf padded) and (n, M + 1) code tensor for n tables."""
    width = max(len(t.thresholds) for t in tables)
    thresholds = torch.full((len(tables), width), math.inf, dtype=torch.float32)
    codes = torch.empty((len(tables), width + 1), dtype=torch.int64)
    for i, t in enumerate(tables):
        n = len(t.thresholds)
        thresholds[i, :n] = t.thresholds
        codes[i, : n + 1] = t.codes
        codes[i, n + 1 :] = t.codes[-1]
    return thresholds, codes


@functools.lru_cache(maxsize=16)
def exp_table(T: int, G: int = 0) -> NeuronTable:
    """exp(x) for x <= 0 (softmax after the row max), range exp_range(G)."""
    return build_table(torch.exp, exp_range(G), T, (-64.0, 64.0), G)


def exp_range(G: int) -> float:
    """The range of the exp neuron: 1, or with G outlier ranges 2^(1 - G), whose top range
    holds 1 (a ternary code reaches about 2/3 of its range)."""
    return 2.0 ** (1 - G) if G else 1.0


@functools.lru_cache(maxsize=16)
def mantissa_table(power: float, T: int) -> NeuronTable:
    """The mantissa neuron of a^power for power -1 (1/a) or -1/2 (1/sqrt(a)).

    a = base^F * m with m in [1, base) (base 2 for 1/a, 4 for 1/sqrt(a), so that base^power
    = 1/2): a^power = 2^(-F) * m^power, m^power in (1/2, 1]. F is read off by comparing a
    with powers of the base (threshold units), the mantissa by this table: the result keeps
    its relative precision 2^-T over any range of a."""
    return build_table(lambda m: m**power, 1.0, T, (1.0, normalize_base(power)))


def normalize_base(power: float) -> float:
    if power not in (-1.0, -0.5):
        raise ValueError(f"spike_normalize supports powers -1 and -1/2, not {power}")
    return 2.0 if power == -1.0 else 4.0


# -- measuring the neurons ----------------------------------------------------------------
# The functions snncc's table neurons replace in the models it supports, and the input
# ranges they are checked over (exp: max-subtracted logits; sqrt: non-negative).
FUNCTIONS: dict[str, Function] = {
    "silu": torch.nn.functional.silu,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "relu": torch.relu,
    "exp": torch.exp,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "sqrt": lambda x: torch.sqrt(x.clamp(min=0)),
}
DOMAINS = {"exp": (-30.0, 0.0), "sqrt": (0.0, 50.0)}


def table_neuron(name: str, out_range: float, T: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> decode(fn_encode(x)) for one of FUNCTIONS: the neuron as a user sees it."""
    thresholds, codes = stack_tables([build_table(FUNCTIONS[name], out_range, T, (-64.0, 64.0))])
    bucket = torch.zeros(1, dtype=torch.int64)

    def neuron(x: torch.Tensor) -> torch.Tensor:
        spikes = torch.ops.snn.fn_encode(x, thresholds, codes, bucket, T)
        return torch.ops.snn.decode(spikes, torch.tensor(out_range))

    return neuron


def table_neuron_error(name: str, T: int, out_range: float = 8.0,
                       samples: int = 200001) -> tuple[float, float, float]:
    """Max absolute error of a table neuron over its input range, that error relative to
    max |f| on the range, and the mean absolute error."""
    lo, hi = DOMAINS.get(name, (-8.0, 8.0))
    x = torch.linspace(lo, hi, samples)
    y = table_neuron(name, out_range, T)(x).double()
    ref = FUNCTIONS[name](x.double())
    err = (y - ref).abs()
    return float(err.max()), float(err.max() / ref.abs().max()), float(err.mean())
