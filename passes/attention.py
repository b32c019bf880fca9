"""attention: softmax becomes spiking, and QK^T / PV take spike trains on both sides.

    p = softmax(x)            m = amax(x)                        (winner-take-all: comparisons only)
    o = p @ V         ->      E = fn_encode(x - m; exp)          (table neuron, range 1)
                              s = sum(decode(E))                 (accumulation of E's spikes)
                              o = spike_normalize(E @ V, s, -1)  (floating-point 1/s neuron)

The normalisation moves after the PV product (it is linear in V), so the probabilities are
never re-encoded: the implicit p_i = e_i / s sum to s * (1/s)^ = 1 within the 1/s neuron's
relative error, 2^-T, for any row length and any logits (equal logits, one dominant logit,
masked entries: exp's table sends 0 below its lowest threshold). With `ranges=G` exp sends
multi-range codes from the range 2^(1-G) up: probabilities above it keep T digits relative
to their size, which matters at few steps, where plain codes leave small probabilities
few digits (measured: benchmarks/RESULTS.md). Readers of p other than a
PV product get spike_normalize(e, s, -1). QK^T and E @ V become spike x spike products in
`encode`, which reads E as it is. GQA needs nothing: repeated K/V heads are views.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from snncc.calibration import CalibrationContext
from snncc.ir.match import PASS_THROUGH, SOFTMAX_TARGETS
from snncc.ir.neurons import exp_range, exp_table, mantissa_table, stack_tables, table_ranges
from snncc.ir.ops import MAX_OUTLIER_RANGES
from snncc.ir.rewrite import add_constant, drop_unused_constants, replace_node
from snncc.pipeline import STANDARD_T, Domain, Pass, PassResult, option, register_pass

aten = torch.ops.aten
snn = torch.ops.snn


def _pv_products(p: fx.Node) -> list[fx.Node]:
    """Each matmul(p, V) that reads p directly or through no-op views."""
    found = []
    for user in p.users:
        if user.target in PASS_THROUGH and len(user.users):
            found += _pv_products(user)
        elif user.target == aten.matmul.default and user.args[0] is p:
            found.append(user)
    return found


@register_pass
@dataclass
class AttentionPass(Pass):
    name = "attention"
    stage = 35
    summary = "softmax -> WTA max, exp table neuron, accumulated row sum, 1/s neuron after PV"
    lowers = SOFTMAX_TARGETS

    T: int = STANDARD_T
    # G > 0 (at T <= 16): exp sends multi-range codes from the range 2^(1 - G) up, so small
    # probabilities keep T digits relative to their range (range 1: 2^-T absolute).
    ranges: int = option(0, Domain(0, MAX_OUTLIER_RANGES))

    def run(self, gm: fx.GraphModule, ctx: CalibrationContext) -> PassResult:
        softmaxes = [n for n in gm.graph.nodes if n.target in self.lowers]
        if not softmaxes:
            return PassResult(gm, False)
        G = table_ranges(self.T, self.ranges, self.name)
        first = softmaxes[0]
        exp_thr, exp_codes = stack_tables([exp_table(self.T, G)])
        inv_thr, inv_codes = stack_tables([mantissa_table(-1.0, self.T)])
        tables = {name: add_constant(gm, name, t, first).target for name, t in (
            ("exp_thresholds", exp_thr), ("exp_codes", exp_codes), ("inv_thresholds", inv_thr),
            ("inv_codes", inv_codes), ("exp_bucket", torch.zeros(1, dtype=torch.int64)),
            ("exp_range", torch.tensor(exp_range(G)))
        )}
        for node in softmaxes:
            self._lower(gm, node, tables, G)
        drop_unused_constants(gm)
        return PassResult(gm, True)

    def _lower(self, gm: fx.GraphModule, node: fx.Node, tables: dict[str, str], G: int) -> None:
        graph = gm.graph
        x, dim = node.args[0], node.args[1]
        with graph.inserting_before(node):
            get = {name: graph.get_attr(target) for name, target in tables.items()}
            peak = graph.call_function(aten.amax.default, (x, [dim], True))
            shifted = graph.call_function(aten.sub.Tensor, (x, peak))
            spikes = graph.call_function(snn.fn_encode.default, (shifted, get["exp_thresholds"], get["exp_codes"],
                                                                 get["exp_bucket"], self.T)
                                         + ((G,) if G else ()))
            e = graph.call_function(snn.decode.default, (spikes, get["exp_range"]))
            total = graph.call_function(aten.sum.dim_IntList, (e, [dim], True))
        spikes.meta.update(source=node.meta.get("source", ""),
                           snn={"code": "table", "T": self.T, "function": "exp", "ranges": G + 1})
        spikes._rename(f"{node.name}_exp_spikes")
        e.meta["val"] = node.meta.get("val")
        for matmul in _pv_products(node):
            with graph.inserting_before(matmul):
                unnormalised = graph.call_function(aten.matmul.default, (e, matmul.args[1]))
                out = graph.call_function(snn.spike_normalize.default, (unnormalised, total, -1.0,
                                                                       get["inv_thresholds"], get["inv_codes"],
                                                                       self.T))
            unnormalised.meta["source"] = matmul.meta.get("source", "")
            replace_node(matmul, out)
        if node.users:
            with graph.inserting_before(node):
                p = graph.call_function(snn.spike_normalize.default, (e, total, -1.0, get["inv_thresholds"],
                                                                      get["inv_codes"], self.T))
            replace_node(node, p)
        else:
            graph.erase_node(node)
