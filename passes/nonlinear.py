"""nonlinear: activation functions and norms become spiking neurons.

* Elementwise functions of one activation (SiLU, GELU in erf or tanh form, ReLU, tanh,
  sigmoid, exp, sqrt, or any chain of such ops with constants: the whole chain is one
  function f) become table neurons (snncc.ir.neurons): the neuron compares its membrane
  with thresholds placed where f crosses a code level and fires the MT code of f(x).

      y = f(x)   ->   y = snn.decode(snn.fn_encode(x, thresholds, codes, bucket, T), r)

  Output ranges are per channel, from calibration (max |f(x)| times `headroom`), rounded
  up to powers of two so channels share tables: one table per (function, range, T),
  shared by every layer. Error: at most half a code step, r 2^-(T+1), over the calibrated
  range (tested per function, and tabled by benchmarks/neuron_error.py).

  With `ranges=G` (T <= 16) the codes are multi-range codes, as `outlier`'s neurons send:
  a value keeps T digits relative to the smallest of the ranges r 2^j (j <= G) holding it,
  and goes out as graded ternary spikes +-2^j. Few steps need it: at T = 8 a headroom of 16
  leaves SiLU 4 digits of its calibrated range, and no headroom clips unseen values.

* Norm denominators become floating-point neurons (snn.spike_normalize): x * rsqrt(a),
  x / a, x / sqrt(a) and x * reciprocal(a). LayerNorm is decomposed first:
  mean (an accumulation), centring, the square (a spike x spike product, lowered by `ffn`),
  mean, + eps, and x * rsqrt(var + eps).

Polynomial-only chains (x^2 of RMSNorm) are products, left to `ffn`. Softmax is lowered
by `attention`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from snncc.calibration import CENTRED, CalibrationContext
from snncc.ir.analysis import data_dependent_nodes
from snncc.ir.encoders import calib_name, calibrated_absmax
from snncc.ir.match import IDENTITY_OPS, NONLINEAR_OPS, function_regions, normalizer
from snncc.ir.neurons import NeuronTable, build_table, mantissa_table, stack_tables, table_ranges
from snncc.ir.ops import MAX_OUTLIER_RANGES
from snncc.ir.rewrite import add_constant, drop_unused_constants, get_tensor, replace_node
from snncc.pipeline import POSITIVE, STANDARD_T, Domain, Pass, PassResult, option, register_pass

aten = torch.ops.aten
snn = torch.ops.snn

_DOMAIN = 64.0  # thresholds on [-D, D], D = max(64, 4 r 2^G) (the largest range); beyond, codes saturate
_RANGE_SPREAD = 16  # a site's channel ranges span at most 2^16 below its largest (bounds the table count)


class _Slot:
    """In a region's program: the value of the root (0) or of the region's i-th node (i + 1)."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


def region_function(gm: fx.GraphModule, root: fx.Node, region: list[fx.Node]) -> Callable:
    """f(x) as a float64 Python function of the root's value (evaluated at compile time
    only). It keeps the region's ops and scalar constants, not the graph: tables outlive it."""
    slots = {root: 0, **{n: i + 1 for i, n in enumerate(region)}}

    def operand(a):
        if not isinstance(a, fx.Node):
            return a
        return _Slot(slots[a]) if a in slots else get_tensor(gm, a).detach().double().clone()

    program = [(n.target, fx.node.map_aggregate(n.args, operand), fx.node.map_aggregate(n.kwargs, operand))
               for n in region]

    def f(x: torch.Tensor) -> torch.Tensor:
        env = [x]

        def value(a):
            return env[a.index] if isinstance(a, _Slot) else a

        for target, args, kwargs in program:
            if target in IDENTITY_OPS:
                env.append(value(args[0]))
            else:
                env.append(target(*fx.node.map_aggregate(args, value), **fx.node.map_aggregate(kwargs, value)))
        return env[-1]

    return f


def region_signature(gm: fx.GraphModule, root: fx.Node, region: list[fx.Node]) -> str:
    """Identical chains (every layer's SiLU) get one signature, so they share tables."""
    index = {root: "x", **{n: f"v{i}" for i, n in enumerate(region)}}

    def show(a):
        if isinstance(a, fx.Node):
            return index.get(a) or repr(get_tensor(gm, a).item())
        return repr(a)

    return ";".join(f"{n.target}({','.join(show(a) for a in fx.node.map_aggregate(n.args, lambda a: a))})"
                    for n in region)


@dataclass(frozen=True)
class TableFunction:
    """A neuron's function f and its signature, which alone identifies it (the signature
    spells out every op and constant of the chain): tables are cached by signature."""

    signature: str
    f: Callable = field(compare=False, hash=False)


@functools.lru_cache(maxsize=256)
def function_table(fn: TableFunction, exponent: int, T: int, G: int) -> NeuronTable:
    """The table neuron of f at range 2^exponent: it depends only on (f, range, T, G), and
    building one takes seconds, so every layer and compile in the process shares it."""
    top = 2.0 ** (exponent + G)  # the largest range
    return build_table(fn.f, 2.0**exponent, T, (-max(_DOMAIN, 4 * top), max(_DOMAIN, 4 * top)), G)


class _TableConstants:
    """The stacked threshold and code tensors one run registers on its graph: registered
    once per distinct table set, read by every site that uses them."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.targets: dict[str, tuple[str, str]] = {}

    def nodes(self, key: str, tables: list[NeuronTable], before: fx.Node) -> tuple[fx.Node, fx.Node]:
        """get_attr nodes (before `before`) of the stacked thresholds and codes of `tables`."""
        if key not in self.targets:
            thresholds, codes = stack_tables(tables)
            self.targets[key] = (add_constant(self.gm, "neuron_table", thresholds, before).target,
                                 add_constant(self.gm, "neuron_table", codes, before).target)
        with self.gm.graph.inserting_before(before):
            return tuple(self.gm.graph.get_attr(target) for target in self.targets[key])


@dataclass
class NeuronSite:
    """Debug statistics of one neuron site."""

    node: str
    function: str
    ranges: tuple[float, float]  # smallest and largest channel range
    tables: int
    thresholds: int


@register_pass
@dataclass
class NonlinearPass(Pass):
    name = "nonlinear"
    stage = 30
    summary = "SiLU/GELU/ReLU/exp/sqrt chains -> table neurons; norms -> floating-point neurons"
    # Beyond the nonlinear ops themselves: the divisions of norms (x / a), and the powers
    # inside a chain (x^3 in GELU's tanh form), which vanish with it.
    lowers = frozenset(NONLINEAR_OPS | {aten.rsqrt.default, aten.reciprocal.default, aten.layer_norm.default,
                                        aten.div.Tensor, aten.pow.Tensor_Scalar})

    T: int = STANDARD_T
    headroom: float = option(16.0, POSITIVE)
    # G > 0 (at T <= 16): table neurons send multi-range codes, G ranges each twice the last
    # above the calibrated one: values keep T digits relative to the range that holds them.
    ranges: int = option(0, Domain(0, MAX_OUTLIER_RANGES))

    def run(self, gm: fx.GraphModule, ctx: CalibrationContext) -> PassResult:
        G = table_ranges(self.T, self.ranges, self.name)
        constants = _TableConstants(gm)
        modified = self._decompose_layer_norms(gm)
        modified |= self._lower_normalizers(gm, constants)
        sites = self._lower_functions(gm, ctx, constants, G)
        drop_unused_constants(gm)
        return PassResult(gm, modified or bool(sites), sites=sites)

    # -- table neurons ------------------------------------------------------------------
    def _lower_functions(self, gm: fx.GraphModule, ctx: CalibrationContext, constants: _TableConstants,
                         G: int) -> list[NeuronSite]:
        outputs = function_regions(gm)
        ctx.require({calib_name(node) for node, _, _ in outputs}, gm)
        return [self._lower_function(gm, ctx, constants, G, node, root, region) for node, root, region in outputs]

    def _lower_function(self, gm: fx.GraphModule, ctx: CalibrationContext, constants: _TableConstants, G: int,
                        node: fx.Node, root: fx.Node, region: list[fx.Node]) -> NeuronSite:
        absmax = calibrated_absmax(ctx, node)
        absmax = absmax.reshape(-1, absmax.shape[-1]).amax(0).double()
        r = (absmax * self.headroom).clamp(min=1e-30)
        exponents = torch.ceil(torch.log2(r)).to(torch.int64)
        # Channels 2^16 below the site's largest share one range: their absolute error is
        # still 2^-16 of the largest channel's, and the table count stays small.
        exponents = exponents.clamp(min=int(exponents.max()) - _RANGE_SPREAD)
        levels, bucket = torch.unique(exponents, return_inverse=True)
        fn = TableFunction(region_signature(gm, root, region), region_function(gm, root, region))
        tables = [function_table(fn, int(e), self.T, G) for e in levels.tolist()]
        t_node, c_node = constants.nodes(f"{fn.signature}|{levels.tolist()}", tables, node)
        if len(levels) == 1:
            bucket = bucket[:1]
        scale = torch.ldexp(torch.ones(len(exponents)), exponents).float()
        b_node = add_constant(gm, f"{node.name}_bucket", bucket, node)
        s_node = add_constant(gm, f"{node.name}_out_range", scale, node)
        with gm.graph.inserting_before(node):
            spikes = gm.graph.call_function(snn.fn_encode.default,
                                            (root, t_node, c_node, b_node, self.T) + ((G,) if G else ()))
            decoded = gm.graph.call_function(snn.decode.default, (spikes, s_node))
        spikes.meta.update(source=node.meta.get("source", ""),
                           snn={"code": "table", "T": self.T, "function": fn.signature, "ranges": G + 1})
        spikes._rename(f"{node.name}_spikes")
        replace_node(node, decoded)
        return NeuronSite(decoded.name, fn.signature, (float(scale.min()), float(scale.max())), len(tables),
                          int(sum(len(t.thresholds) for t in tables)))

    # -- floating-point neurons for norm denominators ---------------------------------------
    def _lower_normalizers(self, gm: fx.GraphModule, constants: _TableConstants) -> bool:
        dependent = data_dependent_nodes(gm.graph)
        modified = False
        for node in list(gm.graph.nodes):
            match = normalizer(node, dependent)
            if match is None:
                continue
            x, a, power = match
            t_node, c_node = constants.nodes(f"mantissa{power}", [mantissa_table(power, self.T)], node)
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(snn.spike_normalize.default, (x, a, power, t_node, c_node, self.T))
            replace_node(node, new)
            modified = True
        return modified

    def _decompose_layer_norms(self, gm: fx.GraphModule) -> bool:
        graph = gm.graph
        modified = False
        for node in list(graph.nodes):
            if node.target != aten.layer_norm.default or len(node.args[1]) != 1:
                continue
            x, _, weight, bias, eps = (list(node.args) + [None, None, 1e-5])[:5]
            with graph.inserting_before(node):
                mean = graph.call_function(aten.mean.dim, (x, [-1], True))
                centred = graph.call_function(aten.sub.Tensor, (x, mean))
                square = graph.call_function(aten.mul.Tensor, (centred, centred))
                var = graph.call_function(aten.mean.dim, (square, [-1], True))
                shifted = graph.call_function(aten.add.Tensor, (var, eps))
                out = graph.call_function(aten.mul.Tensor, (centred, graph.call_function(aten.rsqrt.default,
                                                                                         (shifted,))))
                if weight is not None:
                    out = graph.call_function(aten.mul.Tensor, (out, weight))
                if bias is not None:
                    out = graph.call_function(aten.add.Tensor, (out, bias))
            for new in (centred, square):
                new.meta["val"] = x.meta.get("val")
                new.meta["source"] = node.meta.get("source", "")
            centred._rename(f"{node.name}_centred")
            centred.meta["calib_name"] = calib_name(x) + CENTRED  # recorded from the ANN's x
            replace_node(node, out)
            modified = True
        return modified
