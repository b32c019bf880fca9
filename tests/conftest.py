"""Shared fixtures: tiny random-weight models, traced and calibrated once per test session."""

from __future__ import annotations

import functools

import pytest
import torch

from snncc.api import prepare
from snncc.calibration import HELDOUT_TEXT, read_text, token_chunks
from snncc.models import TINY_MODELS


@functools.cache
def prepared(name: str, calib_tokens: int = 1024):
    """(LoadedModel, ANN graph, CalibrationContext) for a builtin model, built once.

    Tiny models calibrate on 1024 tokens to keep the fast tier fast; real-model tests pass
    snncc's default (CALIB_TOKENS) to measure what users get."""
    return prepare(name, calib_tokens=calib_tokens)


@functools.cache
def heldout_ids(name: str, tokens: int = 512, calib_tokens: int = 1024) -> torch.Tensor:
    """Held-out text (never used for calibration) as a (n, 128) batch of token ids."""
    tokenizer = prepared(name, calib_tokens)[0].tokenizer
    chunks = token_chunks(tokenizer, read_text(HELDOUT_TEXT), 128, tokens)
    return torch.cat([c for c in chunks if c.shape[1] == 128])


@pytest.fixture(params=TINY_MODELS)
def tiny_name(request) -> str:
    return request.param
