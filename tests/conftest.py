"""Shared fixtures: tiny random-weight models, traced and calibrated once per test session."""

from __future__ import annotations

import functools
import os

import pytest
import torch

from snncc.api import compile_graph, prepare
from snncc.calibration import HELDOUT_TEXT, read_text, token_chunks
from snncc.ir.rewrite import copy_graph_module
from snncc.models import TINY_MODELS
from snncc.pipeline import graph_fingerprint

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # pytest -n N runs a worker per core: one thread each, no fight over cores


@functools.cache
def prepared(name: str, calib_tokens: int = 1024):
    """(LoadedModel, ANN graph, CalibrationContext) for a builtin model, built once.

    Tiny models calibrate on 1024 tokens to keep the fast tier fast; real-model tests pass
    snncc's default (CALIB_TOKENS) to measure what users get."""
    return prepare(name, calib_tokens=calib_tokens)


@functools.cache
def compiled(name: str, spec: str, T: int | None = None):
    """`spec` compiled from the shared tiny model `name`, once per session, in debug mode (so
    every shared compile also checks the passes' contracts). Tests only read it: a test that
    runs a pass on it runs it on a copy_graph_module."""
    loaded, ann, ctx = prepared(name)
    return compile_graph(loaded, ann, ctx, spec, T, debug=True)


class _NoSynapse(torch.nn.Module):
    """Token embeddings through SiLU and a constant gain: no matmul, product, softmax or norm."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(256, 8)

    def forward(self, input_ids):
        return torch.nn.functional.silu(self.embed(input_ids)) * 2


@functools.cache
def no_synapse_model():
    """(LoadedModel, ANN graph, context) of _NoSynapse: a graph most passes must leave alone."""
    return prepare(_NoSynapse(), calib_tokens=256)


def assert_left_alone(pass_, gm, ctx) -> None:
    """Running `pass_` on a copy of gm reports modified=False and leaves the graph as it was
    (code and tensors)."""
    gm = copy_graph_module(gm)
    code, fingerprint = gm.code, graph_fingerprint(gm)
    result = pass_.run(gm, ctx)
    assert result.modified is False
    result.graph_module.recompile()  # the code of the graph as the pass left it
    assert result.graph_module.code == code and graph_fingerprint(result.graph_module) == fingerprint


@functools.cache
def heldout_ids(name: str, tokens: int = 512, calib_tokens: int = 1024) -> torch.Tensor:
    """Held-out text (never used for calibration) as a (n, 128) batch of token ids."""
    tokenizer = prepared(name, calib_tokens)[0].tokenizer
    chunks = token_chunks(tokenizer, read_text(HELDOUT_TEXT), 128, tokens)
    return torch.cat([c for c in chunks if c.shape[1] == 128])


@pytest.fixture(params=TINY_MODELS)
def tiny_name(request) -> str:
    return request.param


def byte_level_hf_tokenizer():
    """A transformers tokenizer object for the tiny models' 256 ids, built offline: what a
    user hands over with a model of their own."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(0x100 + i): i for i in range(256)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=chr(0x100)))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend)
