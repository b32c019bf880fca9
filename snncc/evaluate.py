"""Fidelity of a spiking program against its ANN on text: perplexity, agreement, errors."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from snncc.models import CAUSAL_LM
from snncc.program import SpikingProgram


def max_relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """max |output - reference| / max |reference|: one number for how far another runtime's
    result is from the reference, relative to the reference's range."""
    return float((output - reference).abs().max() / reference.abs().max().clamp(min=1e-30))


def _nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return float(F.cross_entropy(logits[0, :-1].double(), ids[0, 1:], reduction="sum"))


def _mean_pool(hidden: torch.Tensor) -> torch.Tensor:
    return F.normalize(hidden.mean(dim=1), dim=-1)


def evaluate(program: SpikingProgram, ann: torch.nn.Module, chunks: list[torch.Tensor],
             progress: bool = False) -> dict:
    """Compare program and ANN on every chunk; causal LMs get perplexity and top-1 agreement,
    encoders the cosine of mean-pooled sentence embeddings."""
    causal = program.info.task == CAUSAL_LM
    nll_ann = nll_snn = 0.0
    predicted = agree = 0
    abs_err_sum, max_err, values = 0.0, 0.0, 0
    cosines, token_cosines = [], []
    for ids in tqdm(chunks, desc="evaluating", disable=not progress, leave=False):
        with torch.no_grad():
            ref = ann(ids).float()
        out = program(ids).float().cpu()
        err = (out - ref).abs()
        abs_err_sum += float(err.double().sum())
        max_err = max(max_err, float(err.max()))
        values += err.numel()
        if causal:
            nll_ann += _nll_sum(ref, ids)
            nll_snn += _nll_sum(out, ids)
            agree += int((out.argmax(-1) == ref.argmax(-1)).sum())
            predicted += ids.numel()
        else:
            cosines.append(float((_mean_pool(out) * _mean_pool(ref)).sum(-1).mean()))
            token_cosines.append(float(F.cosine_similarity(out, ref, dim=-1).mean()))
    tokens = sum(c.numel() for c in chunks)
    result = {"model": program.info.model, "pipeline": program.info.pipeline, "T": program.info.T,
              "tokens": tokens, "coverage": program.info.coverage.get("coverage", 1.0),
              "mean_abs_err": abs_err_sum / values, "max_abs_err": max_err}
    if causal:
        scored = sum(c.shape[1] - 1 for c in chunks)
        ppl_ann, ppl_snn = math.exp(nll_ann / scored), math.exp(nll_snn / scored)
        result.update(ppl_ann=ppl_ann, ppl_snn=ppl_snn, ppl_ratio=ppl_snn / ppl_ann,
                      top1_agreement=agree / predicted,
                      mean_abs_logit_err=result.pop("mean_abs_err"),
                      max_abs_logit_err=result.pop("max_abs_err"))
    else:
        result.update(cosine=sum(cosines) / len(cosines), min_cosine=min(cosines),
                      token_cosine=sum(token_cosines) / len(token_cosines))
    return result
