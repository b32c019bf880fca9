"""Helpers shared by the benchmark scripts (run them as `python benchmarks/NAME.py`)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from snncc.calibration import HELDOUT_TEXT, read_text, token_chunks


def best_of(repeats: int, fn: Callable[[], object]) -> float:
    """The fastest of `repeats` wall-clock timings of fn() after one untimed warm-up call:
    the least disturbed run."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def heldout_chunks(tokenizer, tokens: int, seq_len: int = 128) -> list[torch.Tensor]:
    """`tokens` tokens of the held-out text (never used for calibration or fine-tuning) in
    `seq_len`-token sequences: what the fidelity benchmarks score on."""
    return token_chunks(tokenizer, read_text(HELDOUT_TEXT), seq_len, tokens)
