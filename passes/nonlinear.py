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

from dataclasses import dataclass

import torch
import torch.fx as fx

from snncc.calibration import CalibrationContext
from snncc.ir.analysis import data_dependent_nodes
from snncc.ir.neurons import NeuronTable, build_table, mantissa_table, stack_tables, table_ranges
from snncc.ir.ops import MAX_OUTLIER_RANGES
from snncc.ir.rewrite import add_constant, drop_unused_constants, get_tensor, replace_node
from snncc.passes.encode import calib_name, calibrated_absmax
from snncc.pipeline import POSITIVE, STANDARD_T, Domain, Pass, PassResult, option, register_pass

aten = torch.ops.aten
snn = torch.ops.snn

# Ops that act on each element alone; a chain of them with one activation input is one f.
NONLINEAR_OPS = {
    aten.silu.default, aten.gelu.default, aten.relu.default, aten.tanh.default, aten.sigmoid.default,
    aten.exp.default, aten.erf.default, aten.sqrt.default, aten.abs.default, aten.leaky_relu.default,
    aten.hardtanh.default, aten.softplus.default, aten.elu.default, aten.clamp.default,
}
_AFFINE_OPS = {
    aten.mul.Tensor, aten.mul.Scalar, aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.rsub.Scalar,
    aten.div.Tensor, aten.div.Scalar, aten.neg.default, aten.pow.Tensor_Scalar,
}
_IDENTITY_OPS = {aten.to.dtype, aten.alias.default, aten.clone.default, aten.contiguous.default}
ELEMENTWISE_OPS = NONLINEAR_OPS | _AFFINE_OPS | _IDENTITY_OPS
_TABLES: dict[tuple[str, int, int], NeuronTable] = {}
_DOMAIN = 64.0  # thresholds on [-D, D], D = max(64, 4 r 2^G) (the largest range); beyond, codes saturate
_RANGE_SPREAD = 16  # a site's channel ranges span at most 2^16 below its largest (bounds the table count)


def _is_scalar_constant(arg, gm: fx.GraphModule) -> bool:
    if not isinstance(arg, fx.Node):
        return True
    return arg.op == "get_attr" and get_tensor(gm, arg).numel() == 1


def unary_roots(gm: fx.GraphModule) -> dict[fx.Node, fx.Node]:
    """For each elementwise node that is a function of one activation only, that activation."""
    dependent = data_dependent_nodes(gm.graph)
    root: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in ELEMENTWISE_OPS or node not in dependent:
            continue
        inputs = node.all_input_nodes
        if not all(a in dependent or _is_scalar_constant(a, gm) for a in inputs):
            continue
        roots = {root.get(a, a) for a in inputs if a in dependent}
        if len(roots) == 1:
            root[node] = roots.pop()
    return root


def _region(output: fx.Node, root: fx.Node, roots: dict[fx.Node, fx.Node]) -> list[fx.Node]:
    """The nodes between `root` and `output`, in graph order."""
    members, stack = set(), [output]
    while stack:
        node = stack.pop()
        if node in members or node is root:
            continue
        members.add(node)
        stack += [a for a in node.all_input_nodes if roots.get(a) is root]
    return [n for n in output.graph.nodes if n in members]


def region_function(gm: fx.GraphModule, root: fx.Node, region: list[fx.Node]):
    """f(x) as a float64 Python function of the root's value (evaluated at compile time only)."""

    def f(x: torch.Tensor) -> torch.Tensor:
        env = {root: x}

        def value(a):
            if not isinstance(a, fx.Node):
                return a
            return env[a] if a in env else get_tensor(gm, a).double()

        for node in region:
            if node.target in _IDENTITY_OPS:
                env[node] = value(node.args[0])
            else:
                env[node] = node.target(*fx.node.map_aggregate(node.args, value),
                                        **fx.node.map_aggregate(node.kwargs, value))
        return env[region[-1]]

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
    lowers = frozenset(NONLINEAR_OPS | {aten.rsqrt.default, aten.reciprocal.default, aten.layer_norm.default})

    T: int = STANDARD_T
    headroom: float = option(16.0, POSITIVE)
    # G > 0 (at T <= 16): table neurons send multi-range codes, G ranges each twice the last
    # above the calibrated one: values keep T digits relative to the range that holds them.
    ranges: int = option(0, Domain(0, MAX_OUTLIER_RANGES))

    def run(self, gm: fx.GraphModule, ctx: CalibrationContext) -> PassResult:
        self.G = table_ranges(self.T, self.ranges, self.name)
        self.sites: list[NeuronSite] = []  # per-site statistics, for `snncc debug`
        self._buffers: dict[str, tuple[str, str]] = {}  # table key -> buffer names
        modified = self._decompose_layer_norms(gm)
        modified |= self._lower_normalizers(gm)
        modified |= self._lower_functions(gm, ctx)
        drop_unused_constants(gm)
        return PassResult(gm, modified)

    # -- table neurons ------------------------------------------------------------------
    def _lower_functions(self, gm: fx.GraphModule, ctx: CalibrationContext) -> bool:
        outputs = function_regions(gm)
        ctx.require({calib_name(node) for node, _, _ in outputs}, gm)
        for node, root, region in outputs:
            self._lower_function(gm, ctx, node, root, region)
        return bool(outputs)

    def _lower_function(self, gm, ctx, node: fx.Node, root: fx.Node, region: list[fx.Node]) -> None:
        absmax = calibrated_absmax(ctx, node)
        absmax = absmax.reshape(-1, absmax.shape[-1]).amax(0).double()
        r = (absmax * self.headroom).clamp(min=1e-30)
        exponents = torch.ceil(torch.log2(r)).to(torch.int64)
        # Channels 2^16 below the site's largest share one range: their absolute error is
        # still 2^-16 of the largest channel's, and the table count stays small.
        exponents = exponents.clamp(min=int(exponents.max()) - _RANGE_SPREAD)
        levels, bucket = torch.unique(exponents, return_inverse=True)
        f = region_function(gm, root, region)
        signature = region_signature(gm, root, region)
        tables = [self._table(signature, f, int(e)) for e in levels.tolist()]
        t_node, c_node = self._table_nodes(gm, f"{signature}|{levels.tolist()}", tables, node)
        if len(levels) == 1:
            bucket = bucket[:1]
        scale = torch.ldexp(torch.ones(len(exponents)), exponents).float()
        b_node = add_constant(gm, f"{node.name}_bucket", bucket, node)
        s_node = add_constant(gm, f"{node.name}_out_range", scale, node)
        with gm.graph.inserting_before(node):
            spikes = gm.graph.call_function(snn.fn_encode.default,
                                            (root, t_node, c_node, b_node, self.T) + ((self.G,) if self.G else ()))
            decoded = gm.graph.call_function(snn.decode.default, (spikes, s_node))
        spikes.meta.update(source=node.meta.get("source", ""), created_by=self.name,
                           snn={"code": "table", "T": self.T, "function": signature, "ranges": self.G + 1})
        spikes._rename(f"{node.name}_spikes")
        replace_node(node, decoded, self.name)
        self.sites.append(NeuronSite(decoded.name, signature, (float(scale.min()), float(scale.max())),
                                     len(tables), int(sum(len(t.thresholds) for t in tables))))

    def _table(self, signature: str, f, exponent: int) -> NeuronTable:
        """Tables depend only on (function, range, T, ranges): built once per process."""
        key = (signature, exponent, self.T, self.G)
        if key not in _TABLES:
            top = 2.0 ** (exponent + self.G)  # the largest range
            _TABLES[key] = build_table(f, 2.0**exponent, self.T, (-max(_DOMAIN, 4 * top), max(_DOMAIN, 4 * top)),
                                       self.G)
        return _TABLES[key]

    def _table_nodes(self, gm: fx.GraphModule, key: str, tables: list[NeuronTable],
                     before: fx.Node) -> tuple[fx.Node, fx.Node]:
        """get_attr nodes of the stacked thresholds and codes of `tables`: stacked and
        registered once per distinct key, read by every site that uses them."""
        if key not in self._buffers:
            thresholds, codes = stack_tables(tables)
            self._buffers[key] = (add_constant(gm, "neuron_table", thresholds, before).target,
                                  add_constant(gm, "neuron_table", codes, before).target)
        with gm.graph.inserting_before(before):
            return tuple(gm.graph.get_attr(target) for target in self._buffers[key])

    # -- floating-point neurons for norm denominators ---------------------------------------
    def _lower_normalizers(self, gm: fx.GraphModule) -> bool:
        dependent = data_dependent_nodes(gm.graph)
        modified = False
        for node in list(gm.graph.nodes):
            match = normalizer(node, dependent)
            if match is None:
                continue
            x, a, power = match
            t_node, c_node = self._table_nodes(gm, f"mantissa{power}", [mantissa_table(power, self.T)], node)
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(snn.spike_normalize.default, (x, a, power, t_node, c_node, self.T))
            replace_node(node, new, self.name)
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
            replace_node(node, out, self.name)
            modified = True
        return modified


def function_regions(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node, list[fx.Node]]]:
    """(output, root, region) of every chain this pass turns into a table neuron: elementwise
    functions of one activation that contain a nonlinear op."""
    roots = unary_roots(gm)
    outputs = []
    for node, root in roots.items():
        if any(roots.get(u) is not root for u in node.users):
            region = _region(node, root, roots)
            if any(n.target in NONLINEAR_OPS for n in region) and _same_shape(node, root):
                outputs.append((node, root, region))
    return outputs


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    va, vb = a.meta.get("val"), b.meta.get("val")
    return isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.shape[-1] == vb.shape[-1]


def normalizer(node: fx.Node, dependent: set[fx.Node]) -> tuple[fx.Node, fx.Node, float] | None:
    """(x, a, power) where node computes x * a^power with power -1 or -1/2."""
    if node.target == aten.div.Tensor and isinstance(node.args[1], fx.Node) and node.args[1] in dependent:
        x, d = node.args
        if d.target == aten.sqrt.default:
            return x, d.args[0], -0.5
        return x, d, -1.0
    if node.target == aten.mul.Tensor and len(node.args) == 2:
        for x, d in (node.args, node.args[::-1]):
            if isinstance(d, fx.Node) and isinstance(x, fx.Node) and x in dependent:
                if d.target == aten.rsqrt.default:
                    return x, d.args[0], -0.5
                if d.target == aten.reciprocal.default:
                    return x, d.args[0], -1.0
    return None


__all__ = ["NonlinearPass", "unary_roots", "region_function", "function_regions", "normalizer"]
