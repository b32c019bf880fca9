"""ifencode: every QCFS site becomes signed integrate-and-fire neurons (FAS).

    snn.qcfs(x, lambda, L)  ->  snn.decode(snn.if_encode(x, theta, v0, T), theta, rate=True)

with threshold theta = lambda and initial membrane v0 = theta / 2. Each neuron integrates
its input T times, fires +1 at theta and -1 below 0, and resets by subtraction; the train
decodes to theta * (spike count) / T. With T = L this is QCFS exactly (a test); at other T
the code has 2T + 1 levels instead of 2L + 1, which `calibrate` compensates. Linear layers
later fold theta into their weight columns (`encode`), so the spikes arrive as +-1 events.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from snncc.calibration import CalibrationContext
from snncc.ir.rewrite import add_constant, drop_unused_constants, get_tensor, replace_node
from snncc.pipeline import Pass, PassResult, register_pass

snn = torch.ops.snn


@register_pass
@dataclass
class IfEncodePass(Pass):
    name = "ifencode"
    stage = 24
    summary = "QCFS sites -> signed IF neurons (theta = lambda, v(0) = theta/2, reset by subtraction, rate code)"

    T: int = 8

    def run(self, gm: fx.GraphModule, ctx: CalibrationContext) -> PassResult:
        sites = [n for n in gm.graph.nodes if n.target == snn.qcfs.default]
        for site in sites:
            x, lam_node, L = site.args
            lam = get_tensor(gm, lam_node)
            theta = add_constant(gm, f"{x.name}_threshold", lam.clone(), site)
            v0 = add_constant(gm, f"{x.name}_v0", lam / 2, site)
            with gm.graph.inserting_before(site):
                spikes = gm.graph.call_function(snn.if_encode.default, (x, theta, v0, self.T))
                decoded = gm.graph.call_function(snn.decode.default, (spikes, theta), {"rate": True})
            spikes._rename(f"{x.name}_spikes")
            spikes.meta.update(source=site.meta.get("source", ""), created_by=self.name,
                               snn={"code": "if", "T": self.T, "range": tuple(lam.shape)})
            decoded.meta["qcfs"] = {"lambda": lam, "L": L}  # what `calibrate` aligns the neurons to
            replace_node(site, decoded, self.name)
        drop_unused_constants(gm)
        return PassResult(gm, bool(sites))
