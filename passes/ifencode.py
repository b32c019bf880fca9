"""ifencode: every QCFS site becomes signed integrate-and-fire neurons (FAS).

    snn.qcfs(x, lambda, L)  ->  snn.decode(snn.if_encode(x, theta, v0, T, B), theta, rate=True)

with threshold theta = lambda / B and initial membrane v0 = theta / 2. Each neuron
integrates its input T times, fires up to B spikes of either sign per step (+1 per theta
above 0, -1 below 0) and resets by subtraction; the train decodes to theta * (spike count)
/ T. With B T = L this is QCFS exactly (a test). B = 1 is FAS's plain IF neuron; `burst=0`
(the default) picks B = round(L / T) (at least 1), so a model fine-tuned with L levels keeps
them at fewer steps: L = 16 at T = 8, or L = 8 at T = 4, run as the QCFS model they were
trained as, for the same number of spikes (a burst of n counts n spikes) in fewer steps.
Where B T != L the code has 2 B T + 1 levels instead of 2L + 1, which `calibrate`
compensates. At T > L that is a finer code than the model was fine-tuned with, and more
spikes; `spread=true` instead keeps QCFS's L levels over the T steps (B = L / T < 1:
threshold lambda T / L, at most one spike per step), so a value sends at most L spikes:
QCFS exactly for |x| <= lambda, and counting on, up to T spikes, above it (no clip). That
is how a program at T = 8 gets below one spike per activation (L = 2 or 4). Linear layers
later fold theta into their weight columns (`encode`), so the spikes arrive as integer
events.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from snncc.calibration import CalibrationContext
from snncc.errors import PipelineError
from snncc.ir.ops import MAX_BURST
from snncc.ir.rewrite import add_constant, drop_unused_constants, get_tensor, replace_node
from snncc.pipeline import DEFAULT_T, Domain, Pass, PassResult, option, register_pass

snn = torch.ops.snn


@register_pass
@dataclass
class IfEncodePass(Pass):
    name = "ifencode"
    stage = 24
    summary = "QCFS sites -> signed IF neurons (theta = lambda, v(0) = theta/2, reset by subtraction, rate code)"
    lowers = frozenset({snn.qcfs.default})

    T: int = DEFAULT_T["fas"]
    burst: int = option(0, Domain(0, MAX_BURST))  # 0: round(L / T)
    spread: bool = False  # at T > L: QCFS's L levels over the T steps, not T finer ones

    def run(self, gm: fx.GraphModule, ctx: CalibrationContext) -> PassResult:
        if self.spread and self.burst:
            raise PipelineError(f"ifencode: spread=true sets B = L / T itself; drop burst={self.burst}")
        sites = [n for n in gm.graph.nodes if n.target == snn.qcfs.default]
        for site in sites:
            x, lam_node, L = site.args
            lam = get_tensor(gm, lam_node)
            burst = self.burst or max(1, round(L / self.T))
            levels_per_step = L / self.T if self.spread and L < self.T else burst  # B: theta = lambda / B
            theta = add_constant(gm, f"{x.name}_threshold", lam / levels_per_step, site)
            v0 = add_constant(gm, f"{x.name}_v0", lam / levels_per_step / 2, site)
            with gm.graph.inserting_before(site):
                spikes = gm.graph.call_function(snn.if_encode.default, (x, theta, v0, self.T, burst))
                decoded = gm.graph.call_function(snn.decode.default, (spikes, theta), {"rate": True})
            spikes._rename(f"{x.name}_spikes")
            spikes.meta.update(source=site.meta.get("source", ""),
                               snn={"code": "if", "T": self.T, "burst": burst, "range": tuple(lam.shape)})
            decoded.meta["qcfs"] = {"lambda": lam, "L": L}  # what `calibrate` aligns the neurons to
            replace_node(site, decoded)
        drop_unused_constants(gm)
        return PassResult(gm, bool(sites))
