"""fold pass: norm weights move into the linear layers that read them, exactly."""

from __future__ import annotations

import pytest
import torch

from snncc.api import compile_graph, prepare
from snncc.calibration import HELDOUT_TEXT, read_text, token_chunks
from snncc.ir.rewrite import copy_graph_module
from snncc.models import load_model
from snncc.pipeline import parse_pipeline

aten = torch.ops.aten


def _with_random_norms(name: str):
    """A tiny model whose norm weights and biases are not the trivial 1 and 0."""
    loaded = load_model(name)
    generator = torch.Generator().manual_seed(1)
    for module_name, module in loaded.module.named_modules():
        if "norm" in module_name.lower() or "ln" in module_name.split(".")[-1]:
            if getattr(module, "weight", None) is not None:
                module.weight.data = torch.rand(module.weight.shape, generator=generator) + 0.5
            if getattr(module, "bias", None) is not None:
                module.bias.data = torch.randn(module.bias.shape, generator=generator) * 0.2
    return prepare(loaded, calib_tokens=512)


def _norm_scales(gm) -> int:
    muls = sum(n.target == aten.mul.Tensor and any(getattr(a, "op", None) == "get_attr" for a in n.args)
               for n in gm.graph.nodes)
    affine_norms = sum(n.target == aten.layer_norm.default and n.args[2] is not None for n in gm.graph.nodes)
    return muls + affine_norms


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-gpt2", "tiny-opt"])
def test_fold_is_exact_up_to_rounding_and_removes_the_norm_scales(name):
    loaded, ann, ctx = _with_random_norms(name)
    program = compile_graph(loaded, ann, ctx, "fold", 8)
    ids = torch.cat(token_chunks(loaded.tokenizer, read_text(HELDOUT_TEXT), 64, 256)[:2])
    with torch.no_grad():
        reference = loaded.module(ids)
    out = program(ids)
    assert float((out - reference).abs().max()) <= 1e-4 * float(reference.abs().max())
    assert float((out - reference).abs().max()) > 0 or name == "tiny-gpt2"  # the weights really moved
    assert _norm_scales(program.graph_module) < _norm_scales(ann)
    layers = 2
    if name in ("tiny-llama", "tiny-qwen2"):  # every RMSNorm feeds only linears
        assert _norm_scales(ann) - _norm_scales(program.graph_module) == 2 * layers + 1


def test_fold_then_encode_keeps_fidelity():
    loaded, ann, ctx = _with_random_norms("tiny-llama")
    ids = torch.cat(token_chunks(loaded.tokenizer, read_text(HELDOUT_TEXT), 128, 512)[:4])
    with torch.no_grad():
        reference = loaded.module(ids)
    out = compile_graph(loaded, ann, ctx, "fold,encode", 16)(ids)
    assert float((out.argmax(-1) == reference.argmax(-1)).float().mean()) >= 0.99


def test_post_ln_norms_that_feed_the_residual_stay():
    """BERT's LayerNorm outputs feed the residual stream too: nothing to fold."""
    loaded, ann, ctx = _with_random_norms("tiny-bert")
    gm = copy_graph_module(ann)
    code = gm.code
    [fold] = parse_pipeline("fold", 8)
    result = fold.run(gm, ctx)
    assert result.modified is False and result.graph_module.code == code
