"""Shared fixtures: tiny random-weight models, traced and calibrated once per test session."""

from __future__ import annotations

import functools

import pytest
import torch

from snncc.api import prepare
from snncc.calibration import HELDOUT_TEXT, read_text, token_chunks
from snncc.models import TINY_MODELS


@functools.cache
def prepared(name: str):
    """(LoadedModel, ANN graph, CalibrationContext) for a builtin model, built once."""
    return prepare(name, calib_tokens=1024)


@functools.cache
def heldout_ids(name: str, tokens: int = 512) -> torch.Tensor:
    """Held-out text (never used for calibration) as a (n, 128) batch of token ids."""
    loaded = prepared(name)[0]
    chunks = token_chunks(loaded.tokenizer, read_text(HELDOUT_TEXT), 128, tokens)
    return torch.cat([c for c in chunks if c.shape[1] == 128])


@pytest.fixture(params=TINY_MODELS)
def tiny_name(request) -> str:
    return request.param
