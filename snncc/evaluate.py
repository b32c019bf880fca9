"""Fidelity of a spiking program against its ANN on text: perplexity, agreement, errors."""

from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn.functional as F

from snncc.errors import NumericsError
from snncc.ir.ops import EXECUTION_MODES, POISON, execution_mode
from snncc.models import CAUSAL_LM
from snncc.program import SpikingProgram
from snncc.progress import bar


class _NonFiniteTracer(fx.Interpreter):
    """Runs a graph and notes, per node, whether its output holds a bad value (NaN, or
    POISON spikes, which decode to NaN; or +-inf), keeping flags, not values."""

    def __init__(self, gm: fx.GraphModule, bad):
        super().__init__(gm)
        self.bad = bad
        self.flags: dict[fx.Node, bool] = {}

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        values = result if isinstance(result, (tuple, list)) else (result,)
        self.flags[n] = any(isinstance(v, torch.Tensor) and bool(self.bad(v)) for v in values)
        return result


def _has_nan(v: torch.Tensor) -> torch.Tensor:
    return (v == POISON).any() if v.dtype == torch.int8 else v.is_floating_point() and torch.isnan(v).any()


def _has_inf(v: torch.Tensor) -> torch.Tensor:
    return v.is_floating_point() and torch.isinf(v).any()


def first_nonfinite_node(gm: fx.GraphModule, input_ids: torch.Tensor, mode: str = "fused") -> fx.Node | None:
    """The node where the NaN in gm's output starts (or, if the output holds inf but no NaN,
    the inf): from the output, follow the earliest input that carries it, until a node
    whose inputs are all free of it. Tracing back, not forward, passes over -inf that only
    a mask holds. Runs the graph once more: for error reports only."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    for bad in (_has_nan, _has_inf):
        tracer = _NonFiniteTracer(gm, bad)
        with torch.no_grad(), execution_mode(mode if mode in EXECUTION_MODES else "exact"):
            tracer.run(input_ids)
        node = next((a for a in output.all_input_nodes if tracer.flags.get(a)), None)
        while node is not None:
            carrier = next((a for a in node.all_input_nodes if tracer.flags.get(a)), None)
            if carrier is None:
                return node
            node = carrier
    return None


def _check_finite(values: torch.Tensor, what: str, gm: fx.GraphModule | None, input_ids: torch.Tensor,
                  mode: str = "fused") -> None:
    """Refuse non-finite outputs (Python's max skips NaN: the errors would read 0), naming the
    graph node that produced the first of them (gm None: a module without a graph)."""
    if bool(torch.isfinite(values).all()):
        return
    kind = "NaN" if bool(torch.isnan(values).any()) else "inf"
    node = None if gm is None else first_nonfinite_node(gm, input_ids, mode)
    unnamed = "the model's own forward" if gm is None else "no single node"
    origin = unnamed if node is None else f"node '{node.name}' ({node.target}" + (
        f", from {node.meta['source']})" if node.meta.get("source") else ")")
    raise NumericsError(f"{what} hold {kind} (first produced by {origin}): nothing can be measured; check the "
                        "model's weights and calibration ranges (debugging the pipeline shows the error pass by pass)")


def _nll_sum(log_probs: torch.Tensor, ids: torch.Tensor) -> float:
    """Negative log-likelihood of each next token, summed (log_probs: the model's, float64)."""
    return -float(log_probs[0, :-1].gather(-1, ids[0, 1:, None]).sum())


def _mean_pool(hidden: torch.Tensor) -> torch.Tensor:
    return F.normalize(hidden.mean(dim=1), dim=-1)


class FidelityTally:
    """Fidelity figures of outputs against the ANN's, added a chunk at a time: causal LMs get
    perplexities, top-1 agreement and the KL divergence of the next-token distributions
    (ANN to program, per token), encoders the cosine of mean-pooled sentence embeddings."""

    def __init__(self, causal: bool):
        self.causal = causal
        self.nll_ann = self.nll_snn = self.kl = 0.0
        self.predicted = self.agree = self.scored = 0
        self.abs_err_sum, self.max_err, self.values = 0.0, 0.0, 0
        self.cosines: list[float] = []
        self.token_cosines: list[float] = []

    def add(self, out: torch.Tensor, ref: torch.Tensor, ids: torch.Tensor) -> None:
        out, ref = out.float().cpu(), ref.float().cpu()
        err = (out - ref).abs()
        self.abs_err_sum += float(err.double().sum())
        self.max_err = max(self.max_err, float(err.max()))
        self.values += err.numel()
        if self.causal:
            logp_ann, logp_snn = ref.double().log_softmax(-1), out.double().log_softmax(-1)
            self.nll_ann += _nll_sum(logp_ann, ids)
            self.nll_snn += _nll_sum(logp_snn, ids)
            self.scored += ids.shape[1] - 1
            self.agree += int((out.argmax(-1) == ref.argmax(-1)).sum())
            self.predicted += ids.numel()
            self.kl += float((logp_ann.exp() * (logp_ann - logp_snn)).sum())
        else:
            self.cosines.append(float((_mean_pool(out) * _mean_pool(ref)).sum(-1).mean()))
            self.token_cosines.append(float(F.cosine_similarity(out, ref, dim=-1).mean()))

    def result(self) -> dict:
        if not self.causal:
            return {"mean_abs_err": self.abs_err_sum / self.values, "max_abs_err": self.max_err,
                    "cosine": sum(self.cosines) / len(self.cosines), "min_cosine": min(self.cosines),
                    "token_cosine": sum(self.token_cosines) / len(self.token_cosines)}
        ppl_ann, ppl_snn = math.exp(self.nll_ann / self.scored), math.exp(self.nll_snn / self.scored)
        return {"ppl_ann": ppl_ann, "ppl_snn": ppl_snn, "ppl_ratio": ppl_snn / ppl_ann,
                "top1_agreement": self.agree / self.predicted, "kl_per_token": self.kl / self.predicted,
                "mean_abs_logit_err": self.abs_err_sum / self.values, "max_abs_logit_err": self.max_err}


def evaluate(program: SpikingProgram, ann: torch.nn.Module | list[torch.Tensor], chunks: list[torch.Tensor],
             progress: bool | None = None) -> dict:
    """Compare program and ANN on every chunk (FidelityTally's figures). `ann` is the ANN, or
    its outputs for the chunks computed already (snncc.blockwise.ann_outputs, for a model run
    a block at a time)."""
    tally = FidelityTally(program.info.task == CAUSAL_LM)
    for index, ids in enumerate(bar(chunks, desc="evaluating", progress=progress, unit="chunk")):
        with torch.no_grad():
            ref = (ann[index] if isinstance(ann, list) else ann(ids)).float()
        _check_finite(ref, "the ANN's outputs", ann if isinstance(ann, fx.GraphModule) else None, ids)
        out = program(ids).float().cpu()
        executor = program.executor
        gm = getattr(executor, "gm", program.graph_module)
        _check_finite(out, "the spiking program's outputs", gm, ids.to(getattr(executor, "device", "cpu")),
                      getattr(executor, "mode", "fused"))
        tally.add(out, ref, ids)
    return {"model": program.info.model, "pipeline": program.info.pipeline, "T": program.info.T,
            "tokens": sum(c.numel() for c in chunks), "coverage": program.info.coverage.get("coverage"),
            **tally.result()}


# Whether a higher value of a fidelity figure is worse (errors, perplexity ratio) or better
# (agreement, cosine): what `worst_of` takes over the domains.
_HIGHER_IS_WORSE = {"ppl_ratio": True, "kl_per_token": True, "mean_abs_logit_err": True,
                    "max_abs_logit_err": True, "mean_abs_err": True, "max_abs_err": True, "top1_agreement": False,
                    "cosine": False, "min_cosine": False, "token_cosine": False}


def worst_of(results: dict[str, dict]) -> dict[str, dict]:
    """Per fidelity figure, its worst value over the domains' results and the domain it comes
    from: a program must be judged by the text it does worst on."""
    worst = {}
    for key, higher_is_worse in _HIGHER_IS_WORSE.items():
        values = {domain: result[key] for domain, result in results.items() if key in result}
        if values:
            domain = (max if higher_is_worse else min)(values, key=values.get)
            worst[key] = {"value": values[domain], "domain": domain}
    return worst
