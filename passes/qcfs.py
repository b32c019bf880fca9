"""qcfs: every synapse input becomes a QCFS activation (FAS stage 1), optionally fine-tuned.

    aten.linear(x, W, b)  ->  aten.linear(snn.qcfs(x, lambda, L), W, b)

QCFS (quantization-clip-floor-shift) rounds x to one of 2L + 1 levels, signed because
transformer activations are (lambda / L * clip(floor(x L / lambda + 1/2), -L, L)); `ifencode`
then replaces each site by IF neurons that reproduce it exactly at T = L. Sites are the
inputs of linear layers, of activation-activation matmuls and of elementwise activation
products (as `outlier` in `las`), except what later passes turn into trains anyway (table
neuron outputs such as SiLU before the gated product, softmax probabilities) and the
squares of norms: a norm's mean square must keep its relative precision on every token
(the residual stream spans orders of magnitude across tokens), which 2L + 1 levels at a
per-channel clip cannot (QCFS on the squares alone costs more perplexity than every other
site together; measured: benchmarks/RESULTS.md), so `fas` gives them `outlier`'s
multi-range neurons, as `las` does.

lambda is per channel (per last dim for linear layers and products, per static dim for
matmuls): channels differ by orders of magnitude in LLMs, and a linear layer folds a per-channel threshold
into its weight columns for free. It starts at the calibrated max |x| times the factor (of
a fixed grid) that minimises the site's QCFS error on the first calibration batch.

`multirange=K` (K > 0) measures each site's sensitivity: the KL of the logits to the ANN's
on the first calibration batch with only that site quantized. Sites above K times the
median site are left to `outlier`'s multi-range neurons (a static clip with 2L + 1 levels
cannot hold their token-to-token spread, as down-projection inputs show). That is a LAS
neuron inside `fas`; at T = 8 it sends fewer spikes per value than an L = 16 QCFS site does
by bursts, so a lower K buys perplexity and energy at once (measured:
benchmarks/RESULTS.md). The pass's own defaults are FAS's (L = 8, no multi-range sites);
the `fas` pipeline gives it L = 16 and K = 0.5 (snncc.pipeline.PIPELINE_OPTIONS).

With `steps` > 0 the graph is fine-tuned by distillation from the ANN (snncc.finetune):
`mode=lambda` trains the lambdas, `mode=full` also every weight (on copies: the ANN is left
alone), straight-through gradients through the floor. The last `check` calibration batches
are held out, and the state with the lowest loss on them (the start included) is kept.
`checkpoint` makes it resumable; the report carries the loss of every step and the checks
(snncc.plots.plot_finetune draws them). Later passes record their ranges on the resulting
graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx

from snncc.calibration import CalibrationContext
from snncc.finetune import FinetuneConfig, distillation_loss, finetune, logits_of, probe_kl
from snncc.ir.analysis import activation_product, capture, data_dependent_nodes, weight_linear
from snncc.ir.encoders import calib_name, channel_range
from snncc.ir.match import function_regions, is_probability, normalizer, synapse_operands
from snncc.ir.rewrite import (
    add_constant,
    contents_digest,
    drop_unused_constants,
    first_reader,
    get_tensor,
    rewired_copy,
    set_tensor,
)
from snncc.pipeline import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, Domain, Pass, PassResult, option, register_pass
from snncc.progress import bar

snn = torch.ops.snn
_CLIP_FACTORS = (1.0, 0.8, 0.65, 0.5, 0.4, 0.3, 0.22, 0.16, 0.12)


def qcfs_operands(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node, bool]]:
    """(reader, operand, per_last_dim) of every synapse input that becomes a QCFS site."""
    dependent = data_dependent_nodes(gm.graph)
    future_trains = {out for out, _, _ in function_regions(gm)}
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or normalizer(node, dependent) is not None or _is_square(node, dependent):
            continue
        for x, per_last_dim in synapse_operands(node, dependent):
            if x not in future_trains and not is_probability(x):
                sites.append((node, x, per_last_dim))
    return sites


def _is_square(node: fx.Node, dependent: set[fx.Node]) -> bool:
    """x * x or x^2: a norm's mean square, left to `outlier`'s multi-range neurons."""
    product = activation_product(node, dependent)
    return product is not None and product[0] is product[1]


def best_lambda(x: torch.Tensor, absmax: torch.Tensor, L: int) -> tuple[torch.Tensor, float]:
    """(lambda, factor): absmax times the grid factor with the least QCFS error on x."""
    errors = [float((snn.qcfs(x, absmax * f, L) - x).pow(2).mean()) for f in _CLIP_FACTORS]
    factor = _CLIP_FACTORS[min(range(len(errors)), key=errors.__getitem__)]
    return absmax * factor, factor


@register_pass
@dataclass
class QcfsPass(Pass):
    name = "qcfs"
    stage = 22
    summary = "synapse inputs -> QCFS activations (L levels, per-channel lambda); optional distillation fine-tuning"

    L: int = option(8, AT_LEAST_ONE)
    steps: int = option(0, NON_NEGATIVE)  # 0: no fine-tuning
    mode: str = option("lambda", Domain(choices=("lambda", "full")))
    lr: float = option(1e-5, POSITIVE)
    lambda_lr: float = option(3e-3, POSITIVE)
    checkpoint: str = ""
    multirange: float = option(0.0, NON_NEGATIVE)  # 0: off
    check: int = option(4, NON_NEGATIVE)  # calibration batches fine-tuning holds out to choose the state it keeps

    def run(self, gm: fx.GraphModule, ctx: CalibrationContext) -> PassResult:
        sites = qcfs_operands(gm)
        if not sites:
            return PassResult(gm, False)
        ctx.require({calib_name(x) for _, x, _ in sites}, gm)
        samples = capture(gm, {x.name for _, x, _ in sites}, ctx.batches[0])
        made: dict[tuple[str, bool], fx.Node] = {}
        factors = []
        for reader, x, per_last_dim in sites:
            key = (x.name, per_last_dim)
            if key not in made:
                lam, factor = best_lambda(samples[x.name], channel_range(ctx, x, per_last_dim), self.L)
                factors.append(factor)
                made[key] = self._insert_site(gm, x, lam)
            reader.replace_input_with(x, made[key])
        report = {"sites": len(made), "median_clip_factor": sorted(factors)[len(factors) // 2]}
        kept = list(made.values())
        if self.multirange > 0:
            undone, report["multirange"] = self._leave_to_multirange(gm, ctx, kept)
            kept = [site for site in kept if site not in undone]
        if self.steps > 0:
            gm.recompile()  # train the graph as it now stands
            report["finetune"] = self._finetune(gm, ctx, [n.args[1].target for n in kept])
        return PassResult(gm, True, context=ctx.derive(gm), report=report)

    def _insert_site(self, gm: fx.GraphModule, x: fx.Node, lam: torch.Tensor) -> fx.Node:
        lam_node = add_constant(gm, f"{x.name}_lambda", lam, first_reader(x))
        with gm.graph.inserting_after(lam_node):
            site = gm.graph.call_function(snn.qcfs.default, (x, lam_node, self.L))
        site._rename(f"{x.name}_qcfs")
        site.meta.update(source=x.meta.get("source", ""), calib_name=calib_name(x), val=x.meta.get("val"))
        return site

    def _leave_to_multirange(self, gm: fx.GraphModule, ctx: CalibrationContext,
                             sites: list[fx.Node]) -> tuple[list[fx.Node], dict]:
        """Undo the sites whose sensitivity exceeds `multirange` x the median's: (them, a report)."""
        teacher = ctx.teacher or ctx.ann
        # Recompiles of the same model reuse the scan (one forward pass per site: minutes on a real model).
        key = f"qcfs site sensitivity {id(teacher)} {contents_digest(gm, ctx.batches[0])}"
        if key not in ctx.memo:
            ctx.memo[key] = site_sensitivities(gm, sites, ctx.batches[0], teacher, ctx.progress)
        sensitivity = ctx.memo[key]
        median = sorted(sensitivity)[len(sensitivity) // 2]
        undone = [site for site, kl in zip(sites, sensitivity, strict=True) if kl > self.multirange * median]
        names = [site.args[0].name for site in undone]
        for site in undone:
            site.replace_all_uses_with(site.args[0])
            gm.graph.erase_node(site)
        drop_unused_constants(gm)
        return undone, {"median_site_kl": median, "max_site_kl": max(sensitivity), "sites": len(undone),
                        "names": names}

    def _finetune(self, gm: fx.GraphModule, ctx: CalibrationContext, lambdas: list[str]) -> dict:
        tensors = {name: get_tensor(gm, node) for name, node in ((n.target, n) for n in gm.graph.nodes
                                                                  if n.op == "get_attr" and n.target in lambdas)}
        if self.mode == "full":
            tensors.update(_private_weights(gm))
        config = FinetuneConfig(self.steps, self.lr, self.lambda_lr, self.mode, check=self.check)
        checkpoint = Path(self.checkpoint) if self.checkpoint else None
        teacher = ctx.teacher or ctx.ann
        before = probe_kl(gm, teacher, ctx.batches[0])
        losses, check = finetune(gm, teacher, ctx.batches, tensors, set(lambdas), config, checkpoint, ctx.progress)
        window = max(1, min(10, len(losses) // 5))
        # Per-step losses are on different batches; the first batch before and after is a
        # like-for-like comparison.
        return {"steps": len(losses), "mode": self.mode, "tensors": len(tensors),
                "kl_first": sum(losses[:window]) / window, "kl_last": sum(losses[-window:]) / window,
                "kl_batch0_before": before, "kl_batch0_after": probe_kl(gm, teacher, ctx.batches[0]), **check,
                "losses": losses}


def site_sensitivities(gm: fx.GraphModule, sites: list[fx.Node], batch: torch.Tensor, teacher: fx.GraphModule,
                       progress: bool | None = False) -> list[float]:
    """Per QCFS site, the KL of the logits to the teacher's on `batch` with only that site
    quantized (the others pass their input through)."""
    lambdas = [get_tensor(gm, site.args[1]) for site in sites]
    active = [-1]

    def site_or_identity(x: torch.Tensor, index: int) -> torch.Tensor:
        return snn.qcfs(x, lambdas[index], sites[index].args[2]) if index == active[0] else x

    probe = rewired_copy(gm, [(site, site.args[0]) for site in sites], site_or_identity)
    with torch.no_grad():
        teacher_logits = logits_of(teacher(batch))
        kls = []
        for index in bar(range(len(sites)), desc="site sensitivity", progress=progress, unit="site"):
            active[0] = index
            kls.append(float(distillation_loss(logits_of(probe(batch)), teacher_logits)))
    return kls


def _private_weights(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """The weights fine-tuning trains (weight matrices, embeddings and linear-layer biases:
    norm weights are folded into the linear layers by then), each replaced by a copy the
    graph owns: the graph shares its tensors with the ANN, which must stay as it is."""
    owned: dict[str, torch.Tensor] = {}
    copies: dict[int, torch.Tensor] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target in owned:
            continue
        tensor = get_tensor(gm, node)
        is_bias = any(weight_linear(u) and len(u.args) > 2 and u.args[2] is node for u in node.users)
        if not tensor.is_floating_point() or not (tensor.dim() >= 2 or is_bias):
            continue
        if id(tensor) not in copies:  # tied weights (embedding = LM head) stay tied
            copies[id(tensor)] = owned[node.target] = tensor.detach().clone()
        set_tensor(gm, node.target, copies[id(tensor)])
    return owned
