"""Spike, synaptic-operation and energy profiling of a spiking program on real input.

SOPs follow the convention of the LAS and FAS papers: each spike adds one weight column into its
targets, so a spike costs as many accumulates (ACs) as its neuron has targets (fan-out); a
burst of n spikes in one step costs n.
Energy = SOPs * E_AC + analog MACs * E_MAC, against the ANN's MACs * E_MAC.

That arithmetic convention leaves out memory, where much of the energy of real hardware goes.
The memory-aware figures beside it (`memory_energy_*`) add on-chip SRAM traffic, counted per
event as analytical SNN energy models do (Lemaire et al., "An analytical estimation of spiking
neural networks energy efficiency", ICONIP 2022; Dampfhoffer et al., "Are SNNs really more
energy-efficient than ANNs? An in-depth hardware-aware study", IEEE TETCI 2022):
- a synaptic event (one SOP) reads its weight and reads and writes its target's membrane:
  E_AC + 3 words;
- a neuron integrates its input once per time step: E_AC + 2 words (membrane read, write);
- a MAC, the ANN's or an analog one left in the program, reads its weight: E_MAC + 1 word.
Inputs (buffered, read once per layer) and outputs (one write per output, 1/fan-in of the
operations) are left out on both sides, and nothing is reused across tokens: a word's energy
is SRAM_PJ_PER_BIT times the table's word width.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from snncc.ir.analysis import data_dependent_nodes, matmul_like, site_macs
from snncc.ir.ops import burst_sizes, execution_mode, normalizer_codes, signed_code_digits
from snncc.ir.spec import (
    COST_ELEMENTWISE,
    COST_LINEAR,
    COST_MATMUL,
    COST_NONE,
    COST_NORMALIZE,
    COST_TRAIN,
    cost_gaps,
    require_covered,
    spec_of,
)


@dataclass(frozen=True)
class EnergyTable:
    """Energy per operation in picojoules, with the source of the numbers."""

    name: str
    e_mac_pj: float
    e_ac_pj: float
    source: str
    word_bits: int = 32  # the width of a weight or a membrane potential in memory

    @property
    def word_pj(self) -> float:
        """Reading or writing one word of on-chip SRAM."""
        return SRAM_PJ_PER_BIT * self.word_bits


# Horowitz, "Computing's energy problem", ISSCC 2014, 45 nm at 0.9 V: a MAC is one multiply
# plus one add, an accumulate (AC) one add.
ENERGY_TABLES = {
    "45nm": EnergyTable("45nm", 4.6, 0.9, "Horowitz ISSCC 2014, 45 nm FP32: mult 3.7 + add 0.9 pJ; add 0.9 pJ "
                        "(the convention of the LAS/FAS papers)", 32),
    "45nm-fp16": EnergyTable("45nm-fp16", 1.5, 0.4, "Horowitz ISSCC 2014, 45 nm FP16: mult 1.1 + add 0.4 pJ; "
                             "add 0.4 pJ", 16),
    "45nm-int8": EnergyTable("45nm-int8", 0.23, 0.03, "Horowitz ISSCC 2014, 45 nm INT8: mult 0.2 + add 0.03 pJ; "
                             "add 0.03 pJ", 8),
}
# Horowitz ISSCC 2014, 45 nm: a 64-bit access to an 8 KB SRAM costs 10 pJ (the smallest array
# he lists: the cheapest memory a chip could keep its weights and membranes in).
SRAM_PJ_PER_BIT = 10.0 / 64
MEMORY_SOURCE = ("memory-aware: + SRAM 8 KB, 10 pJ per 64-bit access (Horowitz ISSCC 2014); per SOP a weight read "
                 "and a membrane read and write, per neuron step a membrane read and write, per MAC a weight read "
                 "(Lemaire et al. ICONIP 2022; Dampfhoffer et al. IEEE TETCI 2022)")


@dataclass
class LayerProfile:
    """One synapse (or analog matmul) site."""

    node: str
    source: str
    kind: str  # the synapse op's name ("spike_linear", "spike_matmul"...) or "analog"
    neurons_in: int = 0  # input neurons x batch x tokens
    spikes_in: int = 0
    T: int = 0
    sops: int = 0
    analog_macs: int = 0
    ann_macs: int = 0

    @property
    def firing_rate(self) -> float:
        """Spikes per input neuron per time step."""
        return self.spikes_in / (self.neurons_in * self.T) if self.neurons_in and self.T else 0.0


@dataclass
class Profile:
    """Per-site and total spike and operation counts for one input."""

    layers: list[LayerProfile] = field(default_factory=list)
    spikes_per_step: dict[str, list[int]] = field(default_factory=dict)  # per encoder node
    spikes: int = 0
    neurons: int = 0
    T: int = 0
    energy: EnergyTable = ENERGY_TABLES["45nm"]
    unknown_sites: list[str] = field(default_factory=list)  # analog matmuls whose MACs are unknown

    @property
    def sops(self) -> int:
        return sum(layer.sops for layer in self.layers)

    @property
    def analog_macs(self) -> int:
        return sum(layer.analog_macs for layer in self.layers)

    @property
    def ann_macs(self) -> int:
        return sum(layer.ann_macs for layer in self.layers)

    @property
    def energy_snn_pj(self) -> float:
        return self.sops * self.energy.e_ac_pj + self.analog_macs * self.energy.e_mac_pj

    @property
    def energy_ann_pj(self) -> float:
        return self.ann_macs * self.energy.e_mac_pj

    @property
    def energy_ratio(self) -> float | None:
        """SNN over ANN energy; None when an analog matmul's MACs are unknown (no number can be backed)."""
        if self.unknown_sites:
            return None
        return self.energy_snn_pj / self.energy_ann_pj if self.ann_macs else 0.0

    @property
    def memory_energy_snn_pj(self) -> float:
        """The program's energy with its SRAM traffic (module docstring)."""
        e, word = self.energy, self.energy.word_pj
        return (self.sops * (e.e_ac_pj + 3 * word) + self.neurons * self.T * (e.e_ac_pj + 2 * word)
                + self.analog_macs * (e.e_mac_pj + word))

    @property
    def memory_energy_ann_pj(self) -> float:
        return self.ann_macs * (self.energy.e_mac_pj + self.energy.word_pj)

    @property
    def memory_energy_ratio(self) -> float | None:
        """As energy_ratio, memory traffic counted; None where that one is."""
        if self.unknown_sites:
            return None
        return self.memory_energy_snn_pj / self.memory_energy_ann_pj if self.ann_macs else 0.0

    def totals(self) -> dict:
        """The headline numbers as a JSON-able dict."""
        return {
            "T": self.T, "neurons": self.neurons, "spikes": self.spikes,
            "spikes_per_neuron": self.spikes / self.neurons if self.neurons else 0.0,
            "firing_rate": self.spikes / (self.neurons * self.T) if self.neurons and self.T else 0.0,
            "sops": self.sops, "analog_macs": self.analog_macs, "ann_macs": self.ann_macs,
            "energy_snn_uj": self.energy_snn_pj * 1e-6, "energy_ann_uj": self.energy_ann_pj * 1e-6,
            "energy_ratio": self.energy_ratio, "energy_table": self.energy.name,
            "memory_energy_snn_uj": self.memory_energy_snn_pj * 1e-6,
            "memory_energy_ann_uj": self.memory_energy_ann_pj * 1e-6,
            "memory_energy_ratio": self.memory_energy_ratio,
            "unknown_mac_sites": len(self.unknown_sites),
        }

    def firing_rate_per_step(self) -> list[float]:
        """Share of encoder neurons that fire at each step, over the whole program."""
        if not self.spikes_per_step or not self.neurons:
            return []
        return [sum(counts[t] for counts in self.spikes_per_step.values()) / self.neurons for t in range(self.T)]

    def to_dict(self) -> dict:
        rows = [dict(vars(layer), firing_rate=layer.firing_rate) for layer in self.layers]
        return {"totals": self.totals(), "firing_rate_per_step": self.firing_rate_per_step(), "layers": rows,
                "energy_source": self.energy.source, "memory_energy_source": MEMORY_SOURCE}


_COSTS: dict[str, Callable] = {}  # cost model (snncc.ir.spec) -> the _Counter method that counts it


def _counts(cost: str):
    """Register a _Counter method as the profiler's count for ops with cost model `cost`."""
    def register(method):
        _COSTS[cost] = method
        return method
    return register


class _Counter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, profile: Profile):
        super().__init__(gm)
        self.profile = profile
        self.dependent = data_dependent_nodes(gm.graph)
        self.nnz: dict[str, int] = {}

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        if n.op != "call_function":
            return result
        spec = spec_of(n.target)
        if spec is not None:
            _COSTS[spec.cost](self, n, result)
        elif matmul_like(n.target) and n in self.dependent:
            macs = site_macs(n, self._shape, result.shape if isinstance(result, torch.Tensor) else None)
            if macs is None:
                self.profile.unknown_sites.append(n.name)
            self.profile.layers.append(LayerProfile(n.name, n.meta.get("source", ""), "analog",
                                                    analog_macs=macs or 0, ann_macs=macs or 0))
        return result

    @_counts(COST_NONE)
    def no_cost(self, n: fx.Node, result) -> None:
        """Decoders and analog ops: no spikes sent, no synaptic operation."""

    @_counts(COST_TRAIN)
    def train(self, n: fx.Node, result: torch.Tensor) -> None:
        self._count_train(n.name, result, bursts=spec_of(n.target).bursts)

    @_counts(COST_LINEAR)
    def linear(self, n: fx.Node, result: torch.Tensor) -> None:
        """Each input spike adds a weight column into the layer's outputs (fan-out: its width)."""
        s = self.env[n.args[0]]
        fan_out = result.shape[-1]
        row = LayerProfile(n.name, n.meta.get("source", ""), n.target._opname, s[0].numel(),
                           self.nnz[n.args[0].name], s.shape[0])
        row.sops = row.spikes_in * fan_out
        row.ann_macs = s[0].numel() * fan_out
        self.profile.layers.append(row)

    @_counts(COST_MATMUL)
    def matmul(self, n: fx.Node, result: torch.Tensor) -> None:
        """A spike of A adds a row of B's partial sums (cols targets); one of B a column of A's (m)."""
        sa, sb = self.env[n.args[0]], self.env[n.args[2]]
        m, k, cols = result.shape[-2], sa.shape[-1], result.shape[-1]
        nnz_a, nnz_b = self.nnz[n.args[0].name], self.nnz[n.args[2].name]
        row = LayerProfile(n.name, n.meta.get("source", ""), n.target._opname,
                           sa[0].numel() + sb[0].numel(), nnz_a + nnz_b, sa.shape[0])
        row.sops = nnz_a * cols + nnz_b * m
        row.ann_macs = result.numel() * k
        self.profile.layers.append(row)

    @_counts(COST_ELEMENTWISE)
    def elementwise(self, n: fx.Node, result: torch.Tensor) -> None:
        """Each spike adds the other operand's partial sum into one output: fan-out 1."""
        sa, sb = self.env[n.args[0]], self.env[n.args[2]]
        nnz_a, nnz_b = self.nnz[n.args[0].name], self.nnz[n.args[2].name]
        row = LayerProfile(n.name, n.meta.get("source", ""), n.target._opname,
                           sa[0].numel() + sb[0].numel(), nnz_a + nnz_b, sa.shape[0])
        row.sops = nnz_a + nnz_b
        row.ann_macs = result.numel()
        self.profile.layers.append(row)

    @_counts(COST_NORMALIZE)
    def normalize(self, n: fx.Node, result: torch.Tensor) -> None:
        """The mantissa train of the floating-point neuron; each spike scales a whole row of x."""
        x, a, power, thresholds, codes, T = (self.env.get(v, v) if isinstance(v, fx.Node) else v for v in n.args)
        k, _ = normalizer_codes(a, power, thresholds, codes, T)
        self._count_train(f"{n.name}_mantissa", signed_code_digits(k, T))
        fan_out = result.numel() // max(k.numel(), 1)
        row = LayerProfile(n.name, n.meta.get("source", ""), n.target._opname, k.numel(),
                           self.nnz[f"{n.name}_mantissa"], T)
        row.sops = row.spikes_in * fan_out
        row.ann_macs = result.numel()
        self.profile.layers.append(row)

    def _shape(self, value: object) -> torch.Size | None:
        """The runtime shape of a node's value (fused attention's outputs are tuples: None)."""
        value = self.env.get(value) if isinstance(value, fx.Node) else None
        return value.shape if isinstance(value, torch.Tensor) else None

    def _count_train(self, name: str, spikes: torch.Tensor, bursts: bool = False) -> None:
        """A graded spike (+-2^j of a multi-range neuron) is one event; a burst of n spikes
        of an IF neuron counts n, as n plain spikes in n steps would; a POISON spike (a
        neuron whose input was NaN) is one event."""
        p = self.profile
        per_step = [int(burst_sizes(step).sum() if bursts else torch.count_nonzero(step)) for step in spikes]
        p.spikes_per_step[name] = per_step
        self.nnz[name] = sum(per_step)
        p.spikes += self.nnz[name]
        p.neurons += spikes[0].numel()
        p.T = max(p.T, spikes.shape[0])


require_covered("snncc.profile", cost_gaps(_COSTS))


def profile_graph(gm: fx.GraphModule, input_ids: torch.Tensor, energy: str = "45nm",
                  mode: str = "fused") -> Profile:
    """Run the program once on `input_ids` (in execution `mode`) and count spikes, SOPs and
    MACs at every site."""
    profile = Profile(energy=ENERGY_TABLES[energy])
    with torch.no_grad(), execution_mode(mode):
        _Counter(gm, profile).run(input_ids)
    return profile
