"""outlier: every synapse input gets a multi-range (outlier-aware) neuron.

LLM activations have a few channels orders of magnitude larger than the rest, and unseen
text exceeds the ranges calibration saw, by far in rare channels (measured:
benchmarks/RESULTS.md). One fixed
range per channel must either clip those values or spend bits of resolution on headroom
for all of them. A multi-range neuron does neither: its normal range is the channel's
calibrated max |x| (times `headroom`), and G outlier ranges above it, each twice the last,
take what exceeds it. Per value, the neuron picks the smallest range that holds it
(threshold units) and sends T ternary digits as graded spikes +-2^j (snn.mr_encode):

    aten.linear(x, W, b)  ->  aten.linear(snn.decode(snn.mr_encode(x, r, T, G), r), W, b)

and `ffn` / `encode` then read that train instead of encoding x again. Values up to
r 2^G keep T bits relative to their range; beyond it, they clip. Outlier spikes are rare,
so they add few synaptic operations.

Debug statistics per site (`sites`): outlier channels (calibrated max above 8x the site's
median channel), the spread of the normal ranges, and the share of calibration values
that needed an outlier range.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from snncc.calibration import CalibrationContext
from snncc.ir.analysis import data_dependent_nodes
from snncc.ir.encoders import Encoders, calib_name
from snncc.ir.match import synapse_operands
from snncc.ir.ops import MAX_OUTLIER_RANGES
from snncc.ir.rewrite import drop_unused_constants, first_reader, get_tensor
from snncc.pipeline import POSITIVE, STANDARD_T, Domain, Pass, PassResult, option, register_pass

snn = torch.ops.snn


@dataclass
class OutlierSite:
    """Debug statistics of one multi-range encoder."""

    node: str
    channels: int
    outlier_channels: int
    range_min: float
    range_max: float
    ranges: int


@register_pass
@dataclass
class OutlierPass(Pass):
    name = "outlier"
    stage = 40
    summary = "synapse inputs -> multi-range neurons: calibrated normal range + G outlier ranges"

    T: int = STANDARD_T
    headroom: float = option(1.0, POSITIVE)
    G: int = option(6, Domain(0, MAX_OUTLIER_RANGES))

    def run(self, gm: fx.GraphModule, ctx: CalibrationContext) -> PassResult:
        dependent = data_dependent_nodes(gm.graph)
        encode = Encoders(gm, ctx, self.T, self.headroom, outlier_ranges=self.G)
        consumers = [(n, synapse_operands(n, dependent)) for n in gm.graph.nodes if n.op == "call_function"]
        consumers = [(n, [(x, per) for x, per in ops if not encode.is_train(x)]) for n, ops in consumers]
        encode.require(x for _, ops in consumers for x, _ in ops)
        decoded: dict[tuple[str, bool], fx.Node] = {}
        sites: list[OutlierSite] = []
        for node, ops in consumers:
            for x, per_last_dim in ops:
                key = (x.name, per_last_dim)
                if key not in decoded:
                    spikes, r_node = encode(x, first_reader(x), per_last_dim)
                    with gm.graph.inserting_after(spikes):
                        decoded[key] = gm.graph.call_function(snn.decode.default, (spikes, r_node))
                    decoded[key]._rename(f"{x.name}_decoded")
                    decoded[key].meta.update(source=x.meta.get("source", ""), calib_name=calib_name(x),
                                             val=x.meta.get("val"))
                    sites.append(self._site(gm, decoded[key], r_node))
                node.replace_input_with(x, decoded[key])
        drop_unused_constants(gm)
        return PassResult(gm, bool(decoded), sites=sites)

    def _site(self, gm: fx.GraphModule, decoded: fx.Node, r_node: fx.Node) -> OutlierSite:
        r = get_tensor(gm, r_node).reshape(-1)
        outliers = int((r > 8 * r.median()).sum())
        return OutlierSite(decoded.name, r.numel(), outliers, float(r.min()), float(r.max()), self.G + 1)
