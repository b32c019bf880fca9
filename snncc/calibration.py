"""Calibration: token batches from text, and the ANN's activations recorded once.

Passes read ranges from `CalibrationContext.stats` (keyed by ANN node name) instead of
running the model themselves, so the ANN is recorded exactly once per compile.
"""

from __future__ import annotations

import codecs
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx as fx

from snncc.errors import InputError, InputNotFoundError, PipelineError
from snncc.ir.analysis import data_dependent_nodes
from snncc.ir.rewrite import copy_graph_module
from snncc.progress import bar
from snncc.tokenizer import Tokenizer

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).parent / "data"
DEFAULT_CALIB_TEXT = DATA_DIR / "dev_text.txt"
HELDOUT_TEXT = DATA_DIR / "heldout.txt"
# Held-out text of three kinds, none used for calibration or for choosing defaults: `snncc eval`
# reports each and the worst, since a program tuned on prose can fail on code or manuals.
HELDOUT_TEXTS = {"prose": HELDOUT_TEXT, "code": DATA_DIR / "heldout_code.txt", "docs": DATA_DIR / "heldout_docs.txt"}


BYTES_PER_TOKEN = 64  # generous: real tokenizers average a few bytes per token
MAX_TEXT_BYTES = 256 * 2**20


def text_bytes_for(max_tokens: int | None) -> int:
    """How much of a text file to read for `max_tokens` tokens: enough for any tokenizer,
    never a whole multi-GB file."""
    if max_tokens is None:
        return MAX_TEXT_BYTES
    return min(BYTES_PER_TOKEN * max(max_tokens, 1) + 4096, MAX_TEXT_BYTES)


def read_text(path: str | Path, max_tokens: int | None = None) -> str:
    """The start of a UTF-8 text file, as much as `max_tokens` tokens can need (text_bytes_for).

    Missing, non-regular, empty and non-UTF-8 files are refused with a clear error: a byte
    that is not UTF-8 means a file in another encoding or not text at all (an artifact given
    as text), and calibrating on replacement characters would hide that. A character cut by
    the end of the prefix is dropped; a leading byte-order mark is skipped."""
    path = Path(path)
    if not path.exists():
        raise InputNotFoundError(f"text file '{path}' does not exist")
    if not path.is_file():
        raise InputError(f"text file '{path}' is not a regular file")
    limit = text_bytes_for(max_tokens)
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise InputError(f"cannot read text file '{path}': {exc.strerror or exc}") from None
    text = _decode_utf8(data[:limit], complete=len(data) <= limit, path=path)
    if not text.strip():
        raise InputError(f"text file '{path}' is empty: give a file with some text in it")
    return text


def _decode_utf8(data: bytes, complete: bool, path: Path) -> str:
    """Strict UTF-8; when `data` is a prefix, an incomplete last character is held back."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    try:
        return decoder.decode(data, final=complete).removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise InputError(f"text file '{path}' is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                         f"{exc.start}): convert it to UTF-8, e.g. with iconv") from None


def token_chunks(tokenizer: Tokenizer, text: str, seq_len: int, max_tokens: int) -> list[torch.Tensor]:
    """Split the text's tokens into (1, seq_len) chunks, at most `max_tokens` tokens in all
    (read the text with read_text(path, max_tokens) so that only what they need is tokenized)."""
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
        # The max is taken in the value's own dtype, then widened (exact either way: one pass
        # over a bf16 activation fewer); a reduction over dims of size 1 would only copy it.
        current = value.detach().abs()
        if any(current.shape[d] > 1 for d in dims):
            current = current.amax(dim=dims, keepdim=True)
        current = current.float()
        self.absmax = torch.maximum(self.absmax, current) if self.samples else current
        self.samples += 1


# Statistics of a value derived from an ANN tensor, named `<tensor><suffix>`: a LayerNorm's
# centred input x - mean(x), which nonlinear's decomposition creates, is calibrated from the
# ANN's x like every other range (not from a pass's half-rewritten graph).
CENTRED = "__centred"
_DERIVED: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {CENTRED: lambda x: x - x.mean(-1, keepdim=True)}


def split_statistic(name: str) -> tuple[str, Callable[[torch.Tensor], torch.Tensor] | None]:
    """The node a statistic is recorded at, and the transform applied first (None: the value)."""
    for suffix, transform in _DERIVED.items():
        if name.endswith(suffix):
            return name.removesuffix(suffix), transform
    return name, None


def _observed_copy(ann: fx.GraphModule, watched: dict[str, tuple[int, ...]], statistics: dict[str, list[str]],
                   stats: dict[str, ActivationStats]) -> fx.GraphModule:
    """A copy of the ANN with an observer after each watched node (insert observers, run, read):
    the copy runs as compiled Python, so only the observers cost anything. `statistics` names,
    per watched node, the statistics recorded from it."""

    def observe(value: torch.Tensor, name: str) -> None:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            for statistic in statistics[name]:
                transform = split_statistic(statistic)[1]
                sample = transform(value) if transform else value
                stats.setdefault(statistic, ActivationStats(torch.zeros(()))).update(sample, watched[name])

    gm = copy_graph_module(ann)
    for node in list(gm.graph.nodes):
        if node.name in watched:
            with gm.graph.inserting_after(node):
                gm.graph.call_function(observe, (node, node.name))
    gm.recompile()
    return gm


def _recordable(gm: fx.GraphModule) -> list[fx.Node]:
    """Data-dependent floating-point tensors: what any pass may need a range of."""
    dependent = data_dependent_nodes(gm.graph)
    return [n for n in gm.graph.nodes if n in dependent and n.op == "call_function" and _floating(n)]


def _floating(node: fx.Node) -> bool:
    return isinstance(value := node.meta.get("val"), torch.Tensor) and value.is_floating_point()


def recordable_statistics(gm: fx.GraphModule) -> set[str]:
    """Every statistic a pass may ask of this ANN: its recordable tensors, and the centred
    inputs of its LayerNorms."""
    names = {n.name for n in _recordable(gm)}
    norms = [n for n in gm.graph.nodes if n.target == torch.ops.aten.layer_norm.default
             and isinstance(n.args[0], fx.Node) and n.args[0].name in names]
    return names | {norm.args[0].name + CENTRED for norm in norms}


@dataclass
class CalibrationContext:
    """What passes share: calibration batches and the ANN's activation ranges.

    Passes ask for the tensors they need with `require`; the ANN runs once over the
    calibration batches for everything not yet recorded, so a pipeline records each tensor
    once however many passes read it."""

    batches: list[torch.Tensor] | list[tuple]  # token ids, or a block's inputs (snncc.blockwise)
    source: str
    stats: dict[str, ActivationStats] = field(default_factory=dict)
    ann: fx.GraphModule | None = None
    progress: bool | None = False  # snncc.progress: None shows it on a terminal
    teacher: fx.GraphModule | None = None  # the original ANN, whatever `ann` now is
    # Tensors recorded from a pass's graph (not the ANN's): they depend on that pipeline run
    # (its T, its earlier passes), so a new run must record them afresh.
    recorded_from_passes: set[str] = field(default_factory=set)
    # Costly results a pass can reuse in later compiles from this context (qcfs's site
    # sensitivity scan), keyed by contents_digest of what they were computed from.
    memo: dict[str, object] = field(default_factory=dict)
    # A context that continues a program saved part-way has no ANN: the save recorded all
    # of it (record_ann), so what `require` misses is the pass's graph's own.
    ann_recorded: bool = False
    # A block of a block-by-block compile: its graph runs on the ANN's values at its inputs,
    # so ranges recorded from a pass's graph would differ from the whole model's (refused).
    ann_only: bool = False
    # Per-site precision (snncc.allocation): a site's calibrated range times 2^k per channel
    # codes it with k digits fewer. Keyed by the ANN tensor; every pass reads ranges through
    # snncc.ir.encoders.calibrated_absmax, which applies it.
    range_factors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return sum(b.numel() for b in self.batches)

    def attach(self, ann: fx.GraphModule, progress: bool | None = False) -> None:
        """Remember the ANN graph that `require` records from."""
        self.ann = ann
        self.teacher = ann
        self.progress = progress

    def derive(self, changed: fx.GraphModule) -> CalibrationContext:
        """A context for passes after one that changed what the model computes (QCFS sites,
        fine-tuned weights): ranges are recorded afresh from a snapshot of `changed`; the
        original ANN stays the teacher. This context is left as it was."""
        return CalibrationContext(self.batches, self.source, ann=copy_graph_module(changed),
                                  progress=self.progress, teacher=self.teacher, memo=self.memo,
                                  range_factors=self.range_factors)

    def require(self, names: Iterable[str], current: fx.GraphModule | None = None) -> None:
        """Make sure `stats` holds every named tensor, recording what is missing: from the ANN
        where it has the node, else from `current` (a pass's graph, run as it stands, for
        tensors a pass created, such as a decomposed norm's centred input)."""
        missing = {name for name in names if name not in self.stats}
        if not missing:
            return
        if self.ann is None and not self.ann_recorded:
            raise RuntimeError("CalibrationContext.require needs attach(ann) first")
        ann_nodes = {n.name for n in self.ann.graph.nodes} if self.ann is not None else set()
        in_ann = {name for name in missing if split_statistic(name)[0] in ann_nodes}
        if in_ann:  # one run of the ANN records every tensor a later pass may ask for
            self._record(self.ann, in_ann | recordable_statistics(self.ann) - set(self.stats))
        if missing - in_ann:
            if self.ann_only:
                raise PipelineError(f"{sorted(missing - in_ann)[0]} is not an ANN tensor: a block-by-block compile "
                                    "records ranges only from the ANN")
            if current is None:
                raise RuntimeError(f"tensors {sorted(missing - in_ann)} are not in the ANN graph")
            self._record(current, missing - in_ann)
            self.recorded_from_passes |= missing - in_ann

    def record_all(self, keep_outputs: bool = True) -> list:
        """Record every statistic a pass may ask of the ANN in one run over the batches and,
        with `keep_outputs`, return the ANN's output for each batch (a block-by-block compile
        feeds them to the next block)."""
        return self._record(self.ann, recordable_statistics(self.ann) - set(self.stats), keep_outputs)

    def record_ann(self) -> None:
        """Record every ANN tensor a pass may ask for now (what `require` records on its first
        call): a program saved part-way carries them to the passes after it."""
        if self.ann is not None:
            self.require(recordable_statistics(self.ann))

    def forget_pass_records(self) -> None:
        """Drop what earlier pipeline runs recorded from their own graphs (see recorded_from_passes):
        compiling twice with one context must give what two fresh contexts give."""
        for name in self.recorded_from_passes:
            self.stats.pop(name, None)
        self.recorded_from_passes.clear()

    def unrecorded(self, gm: fx.GraphModule) -> bool:
        """Whether a compile of `gm` may need a statistic this context lacks: one record_all
        records, or one a pass records on demand (a block's input, centred for a LayerNorm).
        Without any, the compile need not run the calibration batches at all."""
        dependent = data_dependent_nodes(gm.graph)
        inputs = {n.name for n in gm.graph.nodes if n.op == "placeholder" and n in dependent and _floating(n)}
        centred = {n.args[0].name + CENTRED for n in gm.graph.nodes
                   if n.target == torch.ops.aten.layer_norm.default and n.args[0] in dependent}
        return bool((recordable_statistics(gm) | inputs | centred) - set(self.stats))

    def _record(self, gm: fx.GraphModule, names: set[str], keep_outputs: bool = False) -> list:
        nodes = {n.name: n for n in gm.graph.nodes}
        statistics = _recordable_by_node(gm, names)
        if not statistics and not keep_outputs:
            return []  # nothing to record, nothing wanted
        watched = {name: reduced_dims(nodes[name]) for name in statistics}
        observed = _observed_copy(gm, watched, statistics, self.stats)
        outputs = []
        with torch.no_grad():
            for batch in bar(self.batches, desc="recording calibration activations", progress=self.progress,
                             unit="batch"):
                output = observed(*batch) if isinstance(batch, tuple) else observed(batch)
                if keep_outputs:
                    outputs.append(output)
        log.info("recorded %d statistics on %d batches", sum(map(len, statistics.values())), len(self.batches))
        return outputs

    def summary(self) -> dict:
        """A JSON-able description, stored in artifacts."""
        return {"source": self.source, "tokens": self.tokens, "batches": len(self.batches),
                "recorded_tensors": len(self.stats)}


def _recordable_by_node(gm: fx.GraphModule, names: set[str]) -> dict[str, list[str]]:
    """Node name -> the statistics of `names` it gives (only data-dependent nodes have any)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    dependent = data_dependent_nodes(gm.graph)
    statistics: dict[str, list[str]] = {}
    for name in sorted(names):
        node = nodes.get(split_statistic(name)[0])
        if node in dependent:
            statistics.setdefault(node.name, []).append(name)
    return statistics


def make_context(tokenizer: Tokenizer, calib: str | Path | None, seq_len: int,
                 max_tokens: int) -> CalibrationContext:
    """Tokenize the calibration text (default: the packaged dev text) into batches."""
    path = Path(calib) if calib else DEFAULT_CALIB_TEXT
    batches = token_chunks(tokenizer, read_text(path, max_tokens), seq_len, max_tokens)
    return CalibrationContext(batches=batches, source=path.name)
