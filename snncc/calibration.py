"""Calibration: token batches from text, and the ANN's activations recorded once.

Passes read ranges from `CalibrationContext.stats` (keyed by ANN node name) instead of
running the model themselves, so the ANN is recorded exactly once per compile.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx as fx
from tqdm import tqdm

from snncc.errors import InputError
from snncc.ir.analysis import data_dependent_nodes
from snncc.tokenizer import Tokenizer

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).parent / "data"
DEFAULT_CALIB_TEXT = DATA_DIR / "dev_text.txt"
HELDOUT_TEXT = DATA_DIR / "heldout.txt"


def read_text(path: str | Path) -> str:
    """Read a UTF-8 text file, refusing missing or empty files with a clear error."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"text file '{path}' does not exist")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise InputError(f"text file '{path}' is empty: give a file with some text in it")
    return text


def token_chunks(tokenizer: Tokenizer, text: str, seq_len: int, max_tokens: int) -> list[torch.Tensor]:
    """Split the text's tokens into (1, seq_len) chunks, at most `max_tokens` tokens in all."""
    ids = tokenizer.encode(text)[:max_tokens]
    if len(ids) < 2:
        raise InputError("the text has fewer than 2 tokens: give a longer text")
    return [torch.tensor([ids[i : i + seq_len]]) for i in range(0, len(ids) - 1, seq_len)
            if len(ids[i : i + seq_len]) >= 2]


def reduced_dims(node: fx.Node) -> tuple[int, ...]:
    """Dims that vary between inputs (batch, and any symbolic length): ranges reduce over them."""
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor):
        return (0,)
    return tuple(i for i, d in enumerate(value.shape) if i == 0 or not isinstance(d, int))


@dataclass
class ActivationStats:
    """Per-channel statistics of one ANN tensor, reduced over batch and sequence dims."""

    absmax: torch.Tensor  # keepdim shape, broadcastable to the tensor
    samples: int = 0

    def update(self, value: torch.Tensor, dims: tuple[int, ...]) -> None:
        current = value.detach().abs().float().amax(dim=dims, keepdim=True)
        self.absmax = torch.maximum(self.absmax, current) if self.samples else current
        self.samples += 1


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, watched: dict[str, tuple[int, ...]], stats: dict):
        super().__init__(gm)
        self.watched = watched
        self.stats = stats

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        dims = self.watched.get(n.name)
        if dims is not None and isinstance(result, torch.Tensor) and result.is_floating_point():
            self.stats.setdefault(n.name, ActivationStats(torch.zeros(())) ).update(result, dims)
        return result


@dataclass
class CalibrationContext:
    """What passes share: calibration batches and the ANN's recorded activation ranges."""

    batches: list[torch.Tensor]
    source: str
    stats: dict[str, ActivationStats] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return sum(b.numel() for b in self.batches)

    def record(self, ann: fx.GraphModule, progress: bool = False) -> None:
        """Run the ANN graph on every batch and keep per-channel ranges of every tensor."""
        dependent = data_dependent_nodes(ann.graph)
        watched = {n.name: reduced_dims(n) for n in ann.graph.nodes
                   if n in dependent and n.op == "call_function"}
        with torch.no_grad():
            for batch in tqdm(self.batches, desc="calibrating", disable=not progress, leave=False):
                _Recorder(ann, watched, self.stats).run(batch)
        log.info("recorded %d tensors on %d tokens", len(self.stats), self.tokens)

    def summary(self) -> dict:
        """A JSON-able description, stored in artifacts."""
        return {"source": self.source, "tokens": self.tokens, "batches": len(self.batches),
                "recorded_tensors": len(self.stats)}


def make_context(tokenizer: Tokenizer, calib: str | Path | None, seq_len: int,
                 max_tokens: int) -> CalibrationContext:
    """Tokenize the calibration text (default: the packaged dev text) into batches."""
    path = Path(calib) if calib else DEFAULT_CALIB_TEXT
    batches = token_chunks(tokenizer, read_text(path), seq_len, max_tokens)
    return CalibrationContext(batches=batches, source=path.name)
