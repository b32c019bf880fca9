"""Per-site, per-channel sensitivity: what each digit of each synapse input costs in fidelity
and buys in energy, measured on calibration text (snncc.allocation reads it).

A site is a tensor `las` codes into a train that feeds synapses (a linear layer's input, an
operand of QK^T or PV; the exp train of softmax is not one: its range is fixed). Its channels
are those of its calibrated range. Dropping k digits at a channel multiplies its range by
2^k: the code keeps T - k digits of the value, and the k leading steps stay silent.

For each site, channel and k in 0..T-1, on the calibration batches:
- distortion: the second-order estimate of the output divergence the channel's coding error
  adds, 1/2 sum over values of F e^2, with e the error of the real multi-range code
  (snn.mr_quantize) and F the diagonal Fisher information of the output at the value
  (the expected squared gradient of log q(y), y drawn from the model's own next-token
  distribution: the Hessian of KL(p || q) at q = p). For a causal LM it is the KL divergence
  of the next-token distributions summed over tokens; for an encoder, 1 - cos of the
  mean-pooled embedding (the same quadratic form, with y a random direction).
- sops: the synaptic operations its spikes cost, counted from the real code (snn.mr_encode)
  times the fan-out of each spike (the readers' output widths).
Both add up over sites to first order; benchmarks/energy_frontier.py checks the sum against
the compiled programs' measured divergence.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.fx as fx

from snncc.calibration import CalibrationContext
from snncc.ir.analysis import MATMUL_TARGETS, data_dependent_nodes, matmul_operands, weight_linear
from snncc.ir.encoders import calib_name, channel_range
from snncc.ir.match import function_regions, is_probability, synapse_operands, through_identity
from snncc.ir.ops import mr_quantize, mr_spike_counts
from snncc.ir.rewrite import copy_graph_module
from snncc.progress import bar

log = logging.getLogger(__name__)

FISHER_SAMPLES = 2  # draws of y per batch: the Fisher estimate's noise averages over tokens too
MAX_DROPPED = 11  # digits a channel may drop: at T = 16 it keeps at least 5


@dataclass
class SiteSensitivity:
    """One site's measured cost and benefit per channel and digits dropped (k)."""

    name: str  # the ANN tensor (calibration name) the train codes
    per_last_dim: bool  # its range layout (snncc.ir.encoders.channel_range)
    distortion: torch.Tensor  # (T, *range shape) float64: divergence added at k digits dropped
    sops: torch.Tensor  # (T, *range shape) float64: synaptic operations at k digits dropped

    @property
    def channels(self) -> int:
        return self.distortion[0].numel()


@dataclass
class Sensitivity:
    """Every site's sensitivity, measured at T steps with G outlier ranges on `tokens` tokens."""

    sites: list[SiteSensitivity]
    T: int
    G: int
    tokens: int
    objective: str  # "kl" (causal LM) or "cosine" (encoder)
    ann_macs: int  # the ANN's multiply-accumulates at the sites' readers on the same tokens


def synapse_sites(gm: fx.GraphModule) -> dict[tuple[str, bool], list[tuple[fx.Node, fx.Node]]]:
    """(tensor, range layout) -> the (reader, operand) pairs of every spike train `las` makes
    for a synapse input (outlier's multi-range neurons), in graph order."""
    dependent = data_dependent_nodes(gm.graph)
    sites: dict[tuple[str, bool], list[tuple[fx.Node, fx.Node]]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or not (weight_linear(node) or node.target in MATMUL_TARGETS):
            continue
        for x, per_last_dim in synapse_operands(node, dependent):
            if not is_probability(x):
                sites.setdefault((through_identity(x).name, per_last_dim), []).append((node, x))
    # A tensor read in both range layouts gets two encoders; a plan keyed by tensor cannot
    # tell them apart, so such a tensor keeps every digit. So does a table neuron's output
    # (GELU's, read by BERT's FFN): its code is the table's, not a multi-range neuron's.
    names = [name for name, _ in sites]
    tables = {output.name for output, _, _ in function_regions(gm)}
    return {key: pairs for key, pairs in sites.items() if names.count(key[0]) == 1 and key[0] not in tables}


def _fan_out(reader_value: torch.Tensor, reader: fx.Node, operand: fx.Node) -> int:
    """Targets one spike of `operand` reaches at `reader`: a linear layer's output width; for
    an activation matmul A @ B, a spike of A reaches B's columns, one of B A's rows."""
    if weight_linear(reader):
        return int(reader_value.shape[-1])
    a, _ = matmul_operands(reader)
    return int(reader_value.shape[-1] if operand is a else reader_value.shape[-2])


class _Perturbed(fx.Interpreter):
    """Runs the ANN with a zero perturbation leaf added to every site's value, so one backward
    gives each site's total gradient; remembers the site values and the fan-out of their readers."""

    def __init__(self, gm: fx.GraphModule, site_names: set[str], readers: dict[str, list[tuple[str, fx.Node]]]):
        super().__init__(gm)
        self.site_names, self.readers = site_names, readers
        self.values: dict[str, torch.Tensor] = {}
        self.leaves: dict[str, torch.Tensor] = {}
        self.fan_out: dict[str, int] = {}
        self.macs = 0

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n.name in self.site_names:
            self.values[n.name] = out.detach()
            self.leaves[n.name] = torch.zeros_like(out, requires_grad=True)
            out = out + self.leaves[n.name]
        for name, operand in self.readers.get(n.name, ()):
            self.fan_out[name] = self.fan_out.get(name, 0) + _fan_out(out, n, operand)
        if n.name in self.readers:
            self.macs += out.numel() * int(self.env[matmul_operands(n)[0]].shape[-1])
        return out


def _readers(sites: dict[tuple[str, bool], list[tuple[fx.Node, fx.Node]]]) -> dict[str, list[tuple[str, fx.Node]]]:
    """Reader node name -> the (site, operand) pairs it reads: built once, read at every node."""
    readers: dict[str, list[tuple[str, fx.Node]]] = {}
    for (name, _), pairs in sites.items():
        for reader, operand in pairs:
            readers.setdefault(reader.name, []).append((name, operand))
    return readers


def _objective(output: torch.Tensor, causal: bool, generator: torch.Generator) -> torch.Tensor:
    """A scalar whose gradient's square, averaged over draws, is the diagonal Fisher information
    of the output at each value (module docstring)."""
    if causal:
        logp = torch.log_softmax(output.float(), -1)
        y = torch.multinomial(logp.detach().exp().reshape(-1, logp.shape[-1]), 1, generator=generator)
        return logp.reshape(-1, logp.shape[-1]).gather(1, y).sum()
    pooled = output.float().mean(1)
    unit = pooled / pooled.norm(dim=-1, keepdim=True)
    direction = torch.randn(unit.shape, generator=generator)
    return (unit * direction).sum()


def measure(ann: fx.GraphModule, ctx: CalibrationContext, batches: list[torch.Tensor], T: int, G: int,
            causal: bool = True, progress: bool | None = False, headroom: float = 1.0, seed: int = 0) -> Sensitivity:
    """Sensitivity of every synapse site of `ann` (fold applied: the graph las encodes) on
    `batches`, at T steps with G outlier ranges above ranges `headroom` x the calibrated max
    (`outlier`'s options; module docstring)."""
    gm = copy_graph_module(ann)
    sites = synapse_sites(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    ctx.require({calib_name(nodes[name]) for name, _ in sites}, gm)
    ranges = {key: channel_range(ctx, nodes[key[0]], key[1], headroom).double() for key in sites}
    distortion = {key: torch.zeros((T, *r.shape), dtype=torch.float64) for key, r in ranges.items()}
    sops = {key: torch.zeros((T, *r.shape), dtype=torch.float64) for key, r in ranges.items()}
    generator = torch.Generator().manual_seed(seed)
    macs = 0
    site_names, readers = {name for name, _ in sites}, _readers(sites)
    for batch in bar(batches, desc="sensitivity", progress=progress, unit="batch"):
        runner = _Perturbed(gm, site_names, readers)
        with torch.enable_grad():
            output = runner.run(batch)
            output = output[0] if isinstance(output, (tuple, list)) else output
            fisher = {name: torch.zeros_like(leaf, dtype=torch.float64) for name, leaf in runner.leaves.items()}
            for draw in range(FISHER_SAMPLES):
                grads = torch.autograd.grad(_objective(output, causal, generator), list(runner.leaves.values()),
                                            retain_graph=draw < FISHER_SAMPLES - 1, allow_unused=True)
                for name, grad in zip(runner.leaves, grads, strict=True):
                    if grad is not None:
                        fisher[name] += grad.double().square() / FISHER_SAMPLES
        del output
        macs += runner.macs
        for key, r in ranges.items():
            _add_site_costs(runner.values[key[0]], fisher[key[0]], r, runner.fan_out.get(key[0], 0), T, G,
                            distortion[key], sops[key])
    tokens = sum(b.numel() for b in batches)
    log.info("measured %d sites on %d tokens", len(sites), tokens)
    return Sensitivity([SiteSensitivity(name, per_last_dim, distortion[(name, per_last_dim)],
                                        sops[(name, per_last_dim)]) for name, per_last_dim in sites],
                       T, G, tokens, "kl" if causal else "cosine", macs)


def _add_site_costs(x: torch.Tensor, fisher: torch.Tensor, r: torch.Tensor, fan_out: int, T: int, G: int,
                    distortion: torch.Tensor, sops: torch.Tensor) -> None:
    """Add one batch's distortion and operations at each k to a site's totals (per channel)."""
    x, fisher, r = x.float(), fisher.float(), r.float()
    for k in range(min(T, MAX_DROPPED + 1)):
        scale = r * 2.0**k
        error = mr_quantize(x, scale, T, G).mul_(scale).sub_(x)
        distortion[k] += 0.5 * _sum_to(fisher * error.square_(), r.shape).double()
        spikes = mr_spike_counts(x, scale, T, G)
        sops[k] += fan_out * _sum_to(spikes, r.shape).double()
    distortion[MAX_DROPPED + 1 :] = float("inf")  # not offered: too few digits left


def _sum_to(values: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum `values` down to `shape` (a range: its size-1 and missing leading dims are summed)."""
    target = (1,) * (values.dim() - len(shape)) + tuple(shape)
    dims = tuple(i for i, size in enumerate(target) if size == 1 and values.shape[i] != 1)
    summed = values.sum(dims, keepdim=True) if dims else values
    return summed.reshape(shape)
