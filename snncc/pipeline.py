"""Passes, the pass registry, pipelines as data, and the PassManager loop.

A pipeline spec is a pipeline name (`none`, `encode`, ...) or a comma list of pass names,
each with optional options: `encode{T=8,headroom=1.1}`. The global `-T` applies to every
pass that has a `T` option unless the spec sets it; without `-T`, the spec's default
(`default_T`, from DEFAULT_T and STANDARD_T: the one place default step counts live).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx

from snncc.calibration import CalibrationContext
from snncc.errors import ModelError, PipelineError
from snncc.ir.ops import MAX_T
from snncc.ir.rewrite import get_tensor

log = logging.getLogger(__name__)


@dataclass
class PassResult:
    """A pass's output graph and whether it changed anything (checked in debug mode).

    Passes keep nothing between runs: what a run measured comes back here, so one pass
    instance compiles any number of graphs alike."""

    graph_module: fx.GraphModule
    modified: bool
    # A pass that changes what the model computes hands later passes a new context.
    context: CalibrationContext | None = None
    # What the pass measured, for the user (e.g. calibration losses per stage); printed by
    # the CLI and kept in the artifact, so a summary, not one row per site.
    report: dict | None = None
    # Per-site statistics (one dataclass per neuron site) for `snncc debug`'s site tables.
    sites: list = dataclasses.field(default_factory=list)


@dataclass(frozen=True)
class Domain:
    """The values a pass option accepts, declared beside the option (`option`) so that one
    validator checks every pass: numbers in [low, high] (low excluded where `open_low`),
    float options always finite; strings one of `choices`."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    choices: tuple[str, ...] = ()

    def admits(self, value: Any) -> bool:
        if self.choices:
            return value in self.choices
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return False
        return self.high is None or value <= self.high

    def describe(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.low is not None and self.high is not None:
            return f"in {self.low:g}..{self.high:g}"
        if self.low is not None:
            return f"{'>' if self.open_low else '>='} {self.low:g}"
        return f"<= {self.high:g}" if self.high is not None else "any number"


POSITIVE = Domain(0, open_low=True)  # learning rates, range multipliers
NON_NEGATIVE = Domain(0)  # step counts that may be 0 (off), factors
AT_LEAST_ONE = Domain(1)


def option(default: Any, domain: Domain) -> Any:
    """A pass option (dataclass field) with the domain the validator checks it against."""
    return dataclasses.field(default=default, metadata={"domain": domain})


@dataclass
class Pass:
    """Base of all passes: options are dataclass fields, `run` does the one job."""

    name: ClassVar[str]
    # Passes must run in non-decreasing stage order: rewrites < encoding < calibration.
    stage: ClassVar[int]
    summary: ClassVar[str]
    # The ops this pass turns into spiking ops (for `snncc inspect`). In debug mode the
    # PassManager refuses a pass that removes every node of an op it does not list here.
    lowers: ClassVar[frozenset] = frozenset()

    def run(self, gm: fx.GraphModule, ctx: CalibrationContext) -> PassResult:
        """Rewrite gm (in place or not) and return it. Must not assign to self or to module
        state: the manager stamps new nodes' `created_by`, and the result carries the rest."""
        raise NotImplementedError

    def options(self) -> dict:
        return dataclasses.asdict(self)

    def __post_init__(self) -> None:
        validate_options(self)


def validate_options(p: Pass) -> None:
    """Refuse an option outside its declared domain (and any non-finite float option), on one
    line naming the pass, the option and what it accepts: the one check every pass's options
    go through, however the pass was made (spec or Python)."""
    for f in dataclasses.fields(p):
        value = getattr(p, f.name)
        if f.name == "T":
            validate_T(value)
            continue
        domain = f.metadata.get("domain", Domain())
        if isinstance(value, (int, float)) and not isinstance(value, bool) or domain.choices:
            if not domain.admits(value):
                finite = "finite and " if isinstance(value, float) else ""
                raise PipelineError(f"{p.name}: option {f.name}={value} is out of range: it must be "
                                    f"{finite}{domain.describe()}")


PASSES: dict[str, type[Pass]] = {}
DEFAULT_PIPELINE = "las"
# The smallest T at which a pipeline meets its fidelity targets on SmolLM2 (measured: the
# README's T table and benchmarks/greedy_agreement.py); -T overrides it.
DEFAULT_T = {"las": 14, "fas": 8}
# T of any other spec, and of a pass made in Python without one (its option's default).
STANDARD_T = 16
PIPELINES: dict[str, tuple[str, ...]] = {
    "none": (),  # the ANN itself, traced: the identity pipeline
    # LAS (the LAS paper, loss-less conversion): fold norm weights, spiking nonlinearities and
    # norms, spiking softmax, spike x spike products, then every matmul input a spike train.
    # Runtime-dependent analog ops (sums, cos/sin) then run in float64: every backend agrees.
    "las": ("fold", "nonlinear", "attention", "outlier", "ffn", "encode", "portable"),
    # FAS (the FAS paper, Chen et al.): QCFS sites at every synapse input (optionally fine-tuned), IF neurons
    # in their place, coarse-to-fine calibration; softmax, norms (their squares on
    # multi-range neurons) and products as in `las`.
    "fas": ("fold", "qcfs", "ifencode", "calibrate", "nonlinear", "attention", "outlier", "ffn", "encode",
            "portable"),
}
# Options a pipeline gives its passes; a spec's own options for the pass override them key by key.
PIPELINE_OPTIONS: dict[str, dict[str, dict[str, str]]] = {
    "las": {
        # Table neurons send the ternary (non-adjacent form) digits of a multi-range code: within
        # their range the same values as the plain MT code, at a third of the digits non-zero
        # where binary digits are half (measured: MiniLM's GELU feeding its FFN, RESULTS.md).
        # Values past the range go out at twice it rather than clipping.
        "nonlinear": {"ranges": "1"},
    },
    "fas": {
        # QCFS at L = 16 (burst neurons of 2 spikes at T = 8), the sites above half the median
        # site's sensitivity on multi-range neurons: a far smaller perplexity loss than FAS's
        # L = 8 with every site an IF neuron (`fas,qcfs{L=8,multirange=0}`), for somewhat more
        # energy (measured: benchmarks/RESULTS.md, benchmarks/fas_variants.py).
        "qcfs": {"L": "16", "multirange": "0.5"},
        # At fas's few steps, table neurons send multi-range codes: SiLU at its calibrated range
        # (no 16x headroom, which costs 4 of 8 digits) with 6 ranges above it for what unseen
        # text exceeds; exp from 2^-5 up, so small probabilities keep their digits.
        "nonlinear": {"ranges": "6", "headroom": "1"},
        "attention": {"ranges": "6"},
    },
}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by its name."""
    PASSES[cls.name] = cls
    return cls


def validate_T(T: int) -> int:
    """T must be a whole number of steps in 1..MAX_T."""
    if isinstance(T, bool) or not isinstance(T, int) or not 1 <= T <= MAX_T:
        raise PipelineError(f"bad T={T!r}: the number of time steps must be an integer from 1 to {MAX_T}")
    return T


def _coerce(value: str, kind: type):
    if kind is bool:
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(value)
        return value.lower() in ("true", "1")
    return kind(value)


def _make_pass(name: str, raw_options: dict[str, str], T: int) -> Pass:
    cls = PASSES[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {"T": T} if "T" in fields else {}
    for key, raw in raw_options.items():
        if key not in fields:
            known = ", ".join(fields) or "none"
            raise PipelineError(f"pass '{name}' has no option '{key}' (its options: {known})")
        kind = type(fields[key].default) if fields[key].default is not dataclasses.MISSING else str
        try:
            values[key] = _coerce(raw, kind)
        except ValueError:
            raise PipelineError(f"option {key}={raw!r} of pass '{name}' must be of type {kind.__name__}") from None
    return cls(**values)


_ITEM = re.compile(r"^\s*([A-Za-z_][\w-]*)\s*(?:\{([^{}]*)\})?\s*$")


def _split_items(spec: str) -> list[str]:
    items, depth, current = [], 0, ""
    for ch in spec:
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    items.append(current)
    return items


def default_T(spec: str) -> int:
    """T for a spec given without -T: the measured default of the pipeline it starts with
    (`fas` or `fas,qcfs{steps=600}`), else STANDARD_T."""
    first = _split_items(spec)[0].strip() if spec else ""
    return DEFAULT_T.get(first, STANDARD_T)


def parse_pipeline(spec: str, T: int | None) -> list[Pass]:
    """Turn `las`, `none` or `encode{T=8},...` into pass instances, checking names and order.
    T None means the pipeline's default (default_T); a pass's own T= wins over it."""
    T = default_T(spec) if T is None else T
    validate_T(T)
    if not spec or not spec.strip():
        raise PipelineError("empty pipeline: give a pipeline name (" + ", ".join(PIPELINES) + ") or pass names")
    passes: list[Pass] = []
    pipeline_members: dict[int, dict[str, str]] = {}  # position of a pass a pipeline brought -> its options
    for item in _split_items(spec):
        match = _ITEM.match(item)
        if not match:
            raise PipelineError(f"cannot parse pass spec {item.strip()!r}: write name or name{{key=value,...}}")
        name, opts = match.group(1), match.group(2)
        options = dict(kv.split("=", 1) for kv in opts.split(",") if "=" in kv) if opts else {}
        if opts and any("=" not in kv for kv in opts.split(",") if kv.strip()):
            raise PipelineError(f"options of '{name}' must be key=value pairs, got {{{opts}}}")
        if name in PASSES:
            options = {k.strip(): v.strip() for k, v in options.items()}
            from_pipeline = [i for i, p in enumerate(passes) if p.name == name and i in pipeline_members]
            if from_pipeline:  # `fas,qcfs{steps=600}`: set options of a pass the pipeline brought
                i = from_pipeline[0]
                passes[i] = _make_pass(name, {**pipeline_members.pop(i), **options}, T)
            else:
                passes.append(_make_pass(name, options, T))
        elif name in PIPELINES:
            if options:
                raise PipelineError(f"'{name}' is a pipeline; give options to its passes instead")
            for p in PIPELINES[name]:
                given = PIPELINE_OPTIONS.get(name, {}).get(p, {})
                pipeline_members[len(passes)] = given
                passes.append(_make_pass(p, given, T))
        else:
            raise PipelineError(
                f"unknown pass or pipeline '{name}'; pipelines: {', '.join(PIPELINES)}; "
                f"passes: {', '.join(sorted(PASSES))}")
    _check_order(passes)
    return passes


def check_T_given_once(pipeline: Pipeline, T: int | None) -> None:
    """A user's T and a pass's own T= in their spec that differ: which did they mean? Refused
    rather than the pass's silently winning (`pipeline` parsed at T: a pass with another T set
    its own)."""
    for p in pipeline.passes:
        if T is not None and getattr(p, "T", T) != T:
            raise PipelineError(f"T={T} was given and pass '{p.name}' sets its own T={p.T}: give one of them")


@dataclass(frozen=True)
class Pipeline:
    """A spec parsed once: the passes in run order, the spec text a program records, and the T
    the spec was parsed at (-T, or default_T)."""

    spec: str
    passes: tuple[Pass, ...]
    T: int

    @classmethod
    def parse(cls, spec: str, T: int | None = None) -> Pipeline:
        T = default_T(spec) if T is None else T
        return cls(spec, tuple(parse_pipeline(spec, T)), T)

    @property
    def steps(self) -> int:
        """The T a program of this pipeline records: its first pass's with a T option, 0 for `none`."""
        if not self.passes:
            return 0
        return next((p.T for p in self.passes if hasattr(p, "T")), self.T)

    def after(self, name: str | None, option: str) -> int:
        """How many passes run up to and including pass `name` (0 for None): where to stop, or
        where a compile continued from a saved program starts. `option` ("start after", "stop
        after") names the request in the error for a pass the pipeline lacks."""
        if name is None:
            return 0
        names = [p.name for p in self.passes]
        if name not in names:
            raise PipelineError(f"cannot {option} '{name}': no such pass in '{self.spec}' (its passes: "
                                f"{', '.join(names) or 'none'})")
        return names.index(name) + 1


def _check_order(passes: list[Pass]) -> None:
    seen: set[str] = set()
    for before, after in zip(passes, passes[1:], strict=False):
        if after.stage < before.stage:
            raise PipelineError(f"bad pass order: '{after.name}' must run before '{before.name}'")
    for p in passes:
        if p.name in seen:
            raise PipelineError(f"pass '{p.name}' appears twice in the pipeline")
        seen.add(p.name)


def graph_fingerprint(gm: fx.GraphModule) -> str:
    """A hash of the graph's code and its tensors' identities, to check `modified` flags."""
    digest = hashlib.sha256(gm.code.encode())
    for name, tensor in sorted(gm.state_dict(keep_vars=True).items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.data_ptr()}".encode())
    return digest.hexdigest()


@dataclass
class PassRecord:
    """What the PassManager measured for one pass."""

    name: str
    options: dict
    seconds: float
    modified: bool
    nodes: int
    report: dict | None = None


aten = torch.ops.aten
# Ops whose tensor operands are weights: an infinite one is broken, where an infinite constant
# elsewhere may be a mask.
_WEIGHT_READERS = {aten.linear.default, aten.embedding.default, aten.matmul.default, aten.mm.default,
                   aten.addmm.default, aten.bmm.default, aten.layer_norm.default}


def check_weights(gm: fx.GraphModule) -> None:
    """Refuse a traced model with a NaN in any tensor, or an inf in a weight, naming the first:
    every pass would carry it into codes and ranges, and no number measured after means
    anything."""
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        tensor = get_tensor(gm, node)
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            continue
        weight = any(user.target in _WEIGHT_READERS for user in node.users)
        kind = _non_finite(tensor)
        if kind == "NaN" or (weight and kind == "inf"):
            raise ModelError(f"tensor '{node.target}' of the traced model holds {kind}: its weights are broken; "
                             "fix or re-download them (or the fine-tuning checkpoint that wrote them)")


def _non_finite(tensor: torch.Tensor) -> str | None:
    """"NaN" if the tensor holds one, else "inf" if it holds an infinity, else None. One
    min/max pass (NaN propagates through both): a billion-parameter model's weights are
    checked in a fraction of the time elementwise tests with their temporaries take."""
    if not tensor.numel():
        return None
    low, high = torch.aminmax(tensor)
    if bool(torch.isnan(high)):
        return "NaN"
    return "inf" if bool(high.isinf() | low.isinf()) else None


def computing_ops(gm: fx.GraphModule) -> set:
    """The ops of the graph's call nodes that compute: what `lowers` declarations are about.
    Not data movement, not Python's tuple and size accessors, and not snn.decode, the readout
    of a spike train: a pass that reads a train itself (ffn, encode) leaves its readout unread,
    which lowers nothing."""
    from snncc.ir.analysis import DATA_MOVEMENT, is_python_builtin

    return {n.target for n in gm.graph.nodes if n.op == "call_function" and n.target not in DATA_MOVEMENT
            and n.target != torch.ops.snn.decode.default and not is_python_builtin(n.target)}


def check_lowers(p: Pass, ops_before: set, gm: fx.GraphModule) -> None:
    """Refuse a pass that made every node of an op disappear without declaring the op in
    `lowers`: `snncc inspect` tells users which pass makes which op spiking from these
    declarations, so an undeclared removal makes it wrong. Op kinds that vanish are checked,
    not counts: lowering a function chain (GELU's tanh form) removes some of the multiplies
    and adds inside it while others of the same op stay, which is not lowering those ops."""
    undeclared = sorted(str(op) for op in ops_before - computing_ops(gm) - p.lowers)
    if undeclared:
        raise PipelineError(f"pass '{p.name}' removed every {', '.join(undeclared)} from the graph, but its "
                            f"`lowers` does not declare {'it' if len(undeclared) == 1 else 'them'}")


def stamp_provenance(gm: fx.GraphModule, existing: set[fx.Node], name: str) -> None:
    """Every node that is not in `existing` gets meta created_by = name, unless its pass
    named a more specific creator: dumps and artifacts say which pass made what."""
    for node in gm.graph.nodes:
        if node not in existing:
            node.meta.setdefault("created_by", name)


Instrument = Callable[[Pass | None, fx.GraphModule, PassRecord | None, list], None]


class PassManager:
    """Runs passes in order and stamps each new node with the pass that made it; one
    instrument hook sees the graph before the first pass and, after each, the graph, the
    pass's record and its per-site statistics.

    In debug mode it also checks each pass's contracts: `modified` tells the truth, every op
    the pass made disappear is in its `lowers` (check_lowers), and `run` left the pass's own
    fields as they were (passes are stateless).

    `progress` (snncc.progress): a bar over the passes naming the one running; `on_pass`: told
    each pass as it starts instead (a block-by-block compile names it on its block bar)."""

    def __init__(self, passes: list[Pass], debug: bool = False, instrument: Instrument | None = None,
                 progress: bool | None = False, on_pass: Callable[[Pass], None] | None = None):
        self.passes = passes
        self.debug = debug
        self.instrument = instrument
        self.progress = progress
        self.on_pass = on_pass
        self.records: list[PassRecord] = []
        self.context: CalibrationContext | None = None  # what the last pass handed on (snncc.resume keeps it)

    def run(self, gm: fx.GraphModule, ctx: CalibrationContext) -> fx.GraphModule:
        from snncc.ir.verify import verify
        from snncc.progress import bar

        ctx.forget_pass_records()
        check_weights(gm)
        if self.instrument:
            self.instrument(None, gm, None, [])
        with bar(total=len(self.passes), desc="passes", progress=self.progress if self.on_pass is None else False,
                 unit="pass", leave=True) as shown:
            for p in self.passes:
                shown.set_postfix_str(p.name)
                if self.on_pass:
                    self.on_pass(p)
                existing = set(gm.graph.nodes)
                if self.debug:
                    before, ops_before, fields_before = graph_fingerprint(gm), computing_ops(gm), dict(vars(p))
                start = time.perf_counter()
                try:
                    result = p.run(gm, ctx)
                except PipelineError:
                    raise
                except Exception as exc:
                    done = ", ".join(r.name for r in self.records) or "none"
                    raise PipelineError(f"pass '{p.name}' failed ({type(exc).__name__}: {exc}); "
                                        f"passes already run: {done}") from exc
                gm = result.graph_module
                ctx = result.context or ctx
                stamp_provenance(gm, existing, p.name)
                gm.graph.lint()
                gm.recompile()
                if self.debug:
                    if (graph_fingerprint(gm) != before) != result.modified:
                        raise PipelineError(f"pass '{p.name}' reported modified={result.modified}, "
                                            "but the graph says otherwise")
                    check_lowers(p, ops_before, gm)
                    if dict(vars(p)) != fields_before:
                        raise PipelineError(f"pass '{p.name}' changed its own fields while running: passes must be "
                                            "stateless (return what a run measured in its PassResult)")
                verify(gm)
                record = PassRecord(p.name, p.options(), time.perf_counter() - start, result.modified,
                                    len(gm.graph.nodes), result.report)
                self.records.append(record)
                log.info("pass %s: %.2fs, modified=%s", p.name, record.seconds, record.modified)
                if self.instrument:
                    self.instrument(p, gm, record, result.sites)
                shown.update()
            shown.set_postfix_str("")
        self.context = ctx
        return gm
