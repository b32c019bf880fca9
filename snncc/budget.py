"""Compiling to a budget: the cheapest program that keeps the user's fidelity targets, or the
most faithful one within an energy ratio, checked on calibration text the allocation did not see.

    --budget top1=0.995,ppl=1.005   top-1 agreement at least, perplexity ratio at most
    --budget kl=1e-4                KL(ANN || program) per token at most
    --budget cosine=0.9999          encoders: mean-pooled embedding cosine at least
    --budget energy=0.5             energy ratio (45 nm convention) at most, fidelity maximised

A plain `las` compile (no -T, no --budget) gets DEFAULT_TARGETS where the model allows a
budget (default_budget), and uniform T steps where it does not, saying why.

The calibration batches are split: the first FIT_SHARE measure the sensitivity
(snncc.sensitivity) the allocation (snncc.allocation) works from; the rest are the check
text. The search runs the ANN with each site's real code (snn.mr_quantize at the planned
ranges) on the check text, a forward pass per candidate, and takes the cheapest plan that
meets every fidelity target with MARGINS to spare; then the real program is compiled and
checked on the same text, and the plan is tightened until it meets them too. The
sensitivity is measured once per model and context and reused across budgets (ctx.memo).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx

from snncc import allocation, sensitivity
from snncc.calibration import CalibrationContext
from snncc.errors import PipelineError
from snncc.evaluate import FidelityTally
from snncc.ir.encoders import channel_range
from snncc.ir.ops import mr_quantize
from snncc.ir.rewrite import contents_digest, copy_graph_module
from snncc.models import CAUSAL_LM, ENCODER
from snncc.pipeline import DEFAULT_PIPELINE, PASSES, Pass, Pipeline
from snncc.profile import ENERGY_TABLES, profile_graph
from snncc.program import SpikingProgram
from snncc.progress import phase

log = logging.getLogger(__name__)

FIT_SHARE = 0.75  # of the calibration batches: sensitivity; the rest: the check
SENSITIVITY_TOKENS = 1024  # of the fit batches the sensitivity runs on (a forward and backward each)
BUDGET_T = 16  # steps of a budgeted program: the most digits any channel keeps
# What a plan must beat a target by on the check text, so that it holds on unseen text
# (confirmed on the packaged held-out texts: benchmarks/energy_frontier.py).
MARGINS = {"top1": 0.001, "ppl": 0.001, "kl": 0.5, "cosine": 0.5}
DEFAULT = "default"  # the budget of a plain `las` compile: DEFAULT_TARGETS where default_budget allows
# What `las` promises without -T or --budget: the fidelity targets it was built to meet.
DEFAULT_TARGETS = {CAUSAL_LM: "top1=0.995,ppl=1.005", ENCODER: "cosine=0.9999"}
# Peak memory of a budgeted compile per model parameter: the float32 ANN, its folded copy
# with gradients at every site, and the compiled programs (SmolLM2-135M's peaks at 5.1 GB:
# 38 bytes per parameter, by /usr/bin/time -v).
BYTES_PER_PARAMETER = 40
_SEARCH_STEPS = 6
_TIGHTENINGS = 3
# Where each budget key's figure is in a FidelityTally result.
_FIGURES = {"top1": "top1_agreement", "ppl": "ppl_ratio", "kl": "kl_per_token", "cosine": "cosine"}
_DOMAINS = {"top1": (0.0, 1.0), "ppl": (1.0, math.inf), "kl": (0.0, math.inf), "cosine": (0.0, 1.0),
            "energy": (0.0, math.inf)}


@dataclass(frozen=True)
class Budget:
    """Fidelity targets (top1, ppl, kl, cosine) or an energy ratio (energy), parsed from
    'key=value,...'."""

    limits: dict[str, float]

    @classmethod
    def parse(cls, text: str) -> Budget:
        limits = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, _, value = item.partition("=")
            key = key.strip()
            if key not in _DOMAINS:
                raise PipelineError(f"budget: unknown key {key!r} (keys: {', '.join(_DOMAINS)})")
            try:
                number = float(value)
            except ValueError:
                raise PipelineError(f"budget: {key}={value!r} is not a number") from None
            low, high = _DOMAINS[key]
            if not (math.isfinite(number) and low < number and (number <= high)):
                raise PipelineError(f"budget: {key}={value} is out of range ({low:g} < {key} <= {high:g})")
            limits[key] = number
        if not limits:
            raise PipelineError("budget: give at least one target, e.g. top1=0.995,ppl=1.005 or energy=0.5")
        if "energy" in limits and len(limits) > 1:
            raise PipelineError("budget: an energy budget maximises fidelity; give it alone")
        return cls(limits)

    @property
    def spec(self) -> str:
        return ",".join(f"{key}={value:g}" for key, value in self.limits.items())

    def check(self, task: str) -> None:
        """Refuse targets the task has no figure for."""
        wrong = {"top1", "ppl", "kl"} if task != CAUSAL_LM else {"cosine"}
        if wrong & set(self.limits):
            raise PipelineError(f"budget: {', '.join(sorted(wrong & set(self.limits)))} does not apply to a "
                                f"{task} model")

    def met(self, result: dict, margin: bool = True) -> bool:
        """Whether fidelity figures meet every fidelity target (with MARGINS when `margin`)."""
        return all(_meets(key, result[_FIGURES[key]], limit, MARGINS[key] if margin else 0.0)
                   for key, limit in self.limits.items() if key != "energy")


def takes_default(passes: str | Pipeline, T: int | None) -> bool:
    """Whether a compile of `passes` gets the default budget: the plain default pipeline, T not given."""
    return T is None and isinstance(passes, str) and passes.strip() == DEFAULT_PIPELINE


def budget_or_default(passes: str | Pipeline, T: int | None, budget: str | None, whole: bool = True) -> str | None:
    """`budget` as given; without one, DEFAULT for the plain default pipeline without T, where
    the compile runs the whole pipeline (`whole`: not stopped part-way, dumped or debugged)."""
    return DEFAULT if budget is None and whole and takes_default(passes, T) else budget


def default_budget(task: str, parameters: int, batches: int, available_bytes: int) -> tuple[Budget | None, str]:
    """The budget a plain `las` compile gets, or None and why it compiles uniform T instead:
    a budget needs fidelity targets for the task, the whole ANN in memory with gradients, and
    two calibration batches (one to fit, one to check)."""
    if task not in DEFAULT_TARGETS:
        return None, f"no default fidelity targets for a {task} model"
    needed = parameters * BYTES_PER_PARAMETER
    if needed > available_bytes:
        return None, (f"a budget runs the whole model with gradients (about {needed / 2**30:.1f} GiB for "
                      f"{parameters / 1e9:.2f}B parameters; {available_bytes / 2**30:.1f} GiB available)")
    if batches < 2:
        return None, (f"a budget needs 2 calibration batches (one held out to check it), got {batches}: give "
                      "more calibration tokens")
    return Budget.parse(DEFAULT_TARGETS[task]), f"the default fidelity targets of a {task} model"


def _meets(key: str, value: float, limit: float, margin: float) -> bool:
    """Whether one figure meets its target by `margin`: absolute for top-1 and perplexity
    ratio, relative (a share of the limit) for KL and 1 - cosine, which span decades."""
    if key == "kl":
        return value <= limit * (1 - margin)
    if key == "cosine":
        return 1 - value <= (1 - limit) * (1 - margin)
    return value >= limit + margin if key == "top1" else value <= limit - margin


class _Simulated(fx.Interpreter):
    """The ANN with every site's value replaced by what its planned code decodes to."""

    def __init__(self, gm: fx.GraphModule, codes: dict[str, tuple[torch.Tensor, int, int]]):
        super().__init__(gm)
        self.codes = codes

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n.name in self.codes:
            scale, T, G = self.codes[n.name]
            out = mr_quantize(out, scale, T, G) * scale
        return out


def _site_codes(gm: fx.GraphModule, ctx: CalibrationContext, T: int, G: int, headroom: float) -> dict:
    """Each site's (range, T, G) as the compiled program will code it under ctx.range_factors."""
    nodes = {n.name: n for n in gm.graph.nodes}
    return {name: (channel_range(ctx, nodes[name], per_last_dim, headroom), T, G)
            for name, per_last_dim in sensitivity.synapse_sites(gm)}


def simulate(folded: fx.GraphModule, ctx: CalibrationContext, plan: allocation.Plan, G: int,
             batches: list[torch.Tensor], references: list[torch.Tensor], causal: bool,
             headroom: float = 1.0) -> dict:
    """Fidelity on `batches` of the ANN with the plan's codes at every site."""
    saved = ctx.range_factors
    ctx.range_factors = plan.range_factors()
    try:
        codes = _site_codes(folded, ctx, plan.T, G, headroom)
    finally:
        ctx.range_factors = saved
    tally = FidelityTally(causal)
    with torch.no_grad():
        for ids, ref in zip(batches, references, strict=True):
            out = _Simulated(folded, codes).run(ids)
            tally.add(out[0] if isinstance(out, (tuple, list)) else out, ref, ids)
    return tally.result()


def energy_ratio(program: SpikingProgram, batches: list[torch.Tensor]) -> float | None:
    """The program's energy ratio (45 nm convention) on the first check batch."""
    return profile_graph(program.graph_module, batches[0]).energy_ratio


def multirange_neurons(pipeline: Pipeline) -> Pass:
    """The pipeline's `outlier` pass: its multi-range neurons (G ranges, headroom) are what a
    budget allocates."""
    outliers = [p for p in pipeline.passes if p.name == "outlier"]
    if not outliers or any(p.name == "qcfs" for p in pipeline.passes):
        raise PipelineError(f"budget: '{pipeline.spec}' has no multi-range synapse neurons to give per-channel "
                            "precision (a budget needs las's outlier pass, and no qcfs)")
    return outliers[0]


def compile_within_budget(ann: fx.GraphModule, ctx: CalibrationContext, pipeline: Pipeline, budget: Budget,
                          task: str, compile_with: Callable[[CalibrationContext], SpikingProgram],
                          progress: bool | None = False) -> SpikingProgram:
    """The program `compile_with(ctx)` makes under the plan that meets `budget` (module docstring).
    The pipeline's T is the most digits a channel keeps."""
    budget.check(task)
    neurons = multirange_neurons(pipeline)
    G, headroom = neurons.G, neurons.headroom
    causal = task == CAUSAL_LM
    split = max(1, int(len(ctx.batches) * FIT_SHARE))
    fit, check = ctx.batches[:split], ctx.batches[split:]
    fit = _first_tokens(fit, SENSITIVITY_TOKENS)
    if not check:
        raise PipelineError(f"budget: the calibration text gives {len(ctx.batches)} batch(es); a budget needs at "
                            "least 2 (one held out to check the plan): give more calibration tokens")
    folded = folded_ann(ann, ctx)
    key = f"site sensitivity {contents_digest(folded, fit[0])} {len(fit)} {pipeline.steps} {G} {headroom}"
    seconds = {"sensitivity": 0.0, "search": 0.0, "compile_and_check": 0.0}  # where the compile's time went
    start = time.perf_counter()
    if key not in ctx.memo:  # measured once per context: a later budget reuses it (0 s)
        ctx.memo[key] = sensitivity.measure(folded, ctx, fit, pipeline.steps, G, causal, progress, headroom)
    measured: sensitivity.Sensitivity = ctx.memo[key]
    seconds["sensitivity"] = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        references = [_output(folded, ids) for ids in check]
    if "energy" in budget.limits:
        site_share = budget.limits["energy"]  # of the ANN's energy, for the sites' operations
        tried: list[tuple[float, float]] = []
        plan = _plan_for_energy(measured, site_share)
    else:
        plan, simulated = _plan_for_fidelity(measured, folded, ctx, (G, headroom), budget, check, references,
                                             causal)
    seconds["search"] = time.perf_counter() - start
    start = time.perf_counter()
    saved = ctx.range_factors  # the context is the caller's: it compiles plain programs after
    try:
        for attempt in range(_TIGHTENINGS + 1):
            ctx.range_factors = plan.range_factors()
            with phase(f"budget: compiling plan {attempt + 1} and checking it", progress,
                       f"budget: compiled and checked plan {attempt + 1}"):
                program = compile_with(ctx)
                result = _check_program(program, check, references, causal)
                ratio = energy_ratio(program, check)
            log.info("budget %s: plan %s, check %s, energy %s", budget.spec, plan.summary(), result, ratio)
            if "energy" in budget.limits:
                if ratio is None or ratio <= budget.limits["energy"] or attempt == _TIGHTENINGS:
                    break
                # What is not a site (tables, norms, exp) costs what it costs: take the excess off the
                # sites, scaled by how the measured ratio has followed the planned share (secant).
                tried.append((site_share, ratio))
                site_share -= (ratio - 0.995 * budget.limits["energy"]) / _slope(tried)
                plan = _plan_for_energy(measured, max(site_share, 0.0))
            elif budget.met(result) or attempt == _TIGHTENINGS:
                break
            else:
                # The program also has what the simulation leaves out (table neurons, norms): its
                # divergence exceeds the simulated one, by a factor the next plan divides out.
                gap = _divergence(result) / max(_divergence(simulated), 1e-30) if attempt == 0 else 1.0
                plan = allocation.within_distortion(measured, plan.distortion / plan.tokens / max(gap * 1.25, 2.0))
    finally:
        ctx.range_factors = saved
    seconds["compile_and_check"] = time.perf_counter() - start
    energy_met = "energy" not in budget.limits or (ratio is not None and ratio <= budget.limits["energy"])
    program.info = dataclasses.replace(program.info, precision={
        "budget": budget.spec, "margins": {k: MARGINS[k] for k in budget.limits if k in MARGINS},
        "met_on_check": budget.met(result) and energy_met,
        "fit_tokens": sum(b.numel() for b in fit), "check_tokens": sum(b.numel() for b in check),
        "check": result, "check_energy_ratio": ratio, "plan": plan.summary(),
        "programs_compiled": attempt + 1, "seconds": {k: round(v, 1) for k, v in seconds.items()}})
    return program


def folded_ann(ann: fx.GraphModule, ctx: CalibrationContext) -> fx.GraphModule:
    """The ANN with its norm weights folded into the linear layers (`fold`): the tensors las
    encodes, as a module that runs."""
    folded = PASSES["fold"]().run(copy_graph_module(ann), ctx).graph_module
    folded.recompile()
    return folded


def _first_tokens(batches: list[torch.Tensor], tokens: int) -> list[torch.Tensor]:
    """The first batches that hold `tokens` tokens (at least one batch)."""
    taken, total = [], 0
    for batch in batches:
        if taken and total >= tokens:
            break
        taken.append(batch)
        total += batch.numel()
    return taken


def _output(gm: fx.GraphModule, ids: torch.Tensor) -> torch.Tensor:
    out = gm(ids)
    return (out[0] if isinstance(out, (tuple, list)) else out).float()


def _check_program(program: SpikingProgram, check: list[torch.Tensor], references: list[torch.Tensor],
                   causal: bool) -> dict:
    tally = FidelityTally(causal)
    for ids, ref in zip(check, references, strict=True):
        tally.add(program(ids), ref, ids)
    return tally.result()


def _plan_for_energy(measured: sensitivity.Sensitivity, ratio: float) -> allocation.Plan:
    """The least divergent plan whose sites' predicted operations fit `ratio` of the ANN's energy."""
    table = ENERGY_TABLES["45nm"]
    sops = ratio * measured.ann_macs * table.e_mac_pj / table.e_ac_pj
    return allocation.within_sops(measured, sops)


def _plan_for_fidelity(measured: sensitivity.Sensitivity, folded: fx.GraphModule, ctx: CalibrationContext,
                       code: tuple[int, float],
                       budget: Budget, check: list[torch.Tensor], references: list[torch.Tensor],
                       causal: bool) -> tuple[allocation.Plan, dict]:
    """The cheapest plan whose simulated program meets the budget on the check text, and its
    simulated figures: bisection on the predicted divergence per token, between full
    precision and the cheapest plan."""
    finest = allocation.allocate(measured, allocation.LAMBDA_RANGE[1])
    low = math.log(max(finest.distortion / measured.tokens, 1e-12))
    coarsest = allocation.uniform(measured, max(1, measured.T - sensitivity.MAX_DROPPED))
    high = math.log(coarsest.distortion / measured.tokens)
    best, best_result = finest, None
    for _ in range(_SEARCH_STEPS):
        mid = (low + high) / 2
        plan = allocation.within_distortion(measured, math.exp(mid))
        simulated = simulate(folded, ctx, plan, code[0], check, references, causal, code[1])
        log.info("budget search: predicted divergence %.3g per token -> %s", math.exp(mid), simulated)
        if budget.met(simulated):
            best, best_result, low = plan, simulated, mid
        else:
            high = mid
    if best_result is None:
        best_result = simulate(folded, ctx, best, code[0], check, references, causal, code[1])
    return best, best_result


def _slope(tried: list[tuple[float, float]]) -> float:
    """d(measured energy ratio) / d(planned site share) from the last two tries (1 before)."""
    if len(tried) < 2 or tried[-1][0] == tried[-2][0]:
        return 1.0
    (share0, ratio0), (share1, ratio1) = tried[-2:]
    return min(max((ratio1 - ratio0) / (share1 - share0), 0.2), 5.0)


def _divergence(result: dict) -> float:
    """KL per token (causal LMs) or 1 - cosine (encoders) of a FidelityTally result."""
    return result["kl_per_token"] if "kl_per_token" in result else 1 - result["cosine"]
