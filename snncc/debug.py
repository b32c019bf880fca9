"""Pass-by-pass debugging: the PassManager instruments behind `snncc debug` and `compile --dump`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn.functional as F

from snncc.backends.reference import ReferenceExecutor
from snncc.ir.printer import format_graph
from snncc.ir.verify import coverage_report, format_coverage
from snncc.models import CAUSAL_LM, LoadedModel
from snncc.pipeline import Pass, PassRecord


class GraphDump:
    """Instrument: the graph before the first pass (`00-input.txt`) and after each pass
    (`NN-PASS.txt`, NN the pass's place in the pipeline, from `first`) as readable IR."""

    def __init__(self, folder: Path, first: int = 1):
        self.folder = folder
        self.index = first

    def __call__(self, p: Pass | None, gm: fx.GraphModule, record: PassRecord | None, sites: list) -> None:
        if p is None:
            name = "00-input.txt"
        else:
            name = f"{self.index:02d}-{p.name}.txt"
            self.index += 1
        (self.folder / name).write_text(format_graph(gm))


@dataclass
class PassRow:
    """One line of the debug table."""

    name: str
    seconds: float
    modified: bool
    nodes: int
    coverage: float | None  # None: some matmul's MACs are unknown
    max_abs_err: float
    agreement: float  # top-1 agreement (causal LMs) or mean token cosine (encoders)


class PassTable:
    """Instrument: after each pass, measure coverage and error vs the ANN on one sample."""

    def __init__(self, model: LoadedModel, sample: torch.Tensor, dump: Path | None, device: str = "cpu"):
        self.model = model
        self.sample = sample
        self.dump = dump
        self.device = device
        self.reference = None  # a model read a block at a time has no module to run: its traced ANN (the first graph)
        if model.weights is None:
            with torch.no_grad():
                self.reference = model.module(sample).float()
        self.rows: list[PassRow] = []
        self.sites: list[tuple[str, dict]] = []  # (pass, per-site statistics) of passes that keep them
        if dump:
            dump.mkdir(parents=True, exist_ok=True)
            (dump / "passes.jsonl").write_text("")

    def __call__(self, p: Pass | None, gm: fx.GraphModule, record: PassRecord | None, sites: list) -> None:
        out = ReferenceExecutor(gm, self.device)(self.sample).float().cpu()
        if self.reference is None:
            self.reference = out
        if self.model.task == CAUSAL_LM:
            agreement = float((out.argmax(-1) == self.reference.argmax(-1)).float().mean())
        else:
            agreement = float(F.cosine_similarity(out, self.reference, dim=-1).mean())
        row = PassRow(record.name if record else "(traced ANN)", record.seconds if record else 0.0,
                      record.modified if record else False, len(gm.graph.nodes),
                      coverage_report(gm).coverage, float((out - self.reference).abs().max()), agreement)
        self.rows.append(row)
        clipped = clipped_fractions(gm, self.sample.to(self.device)) if sites else {}
        for site in sites:
            self.sites.append((row.name, dict(vars(site), clipped=clipped.get(site.node))))
        if self.dump and (record is None or record.modified):
            index = len(self.rows) - 1
            (self.dump / f"{index:02d}_{row.name.strip('()').replace(' ', '_')}.txt").write_text(format_graph(gm))
        if self.dump:
            with (self.dump / "passes.jsonl").open("a") as f:
                f.write(json.dumps(dict(vars(row), options=record.options if record else {})) + "\n")

    @property
    def metric(self) -> str:
        return "top-1 agreement" if self.model.task == CAUSAL_LM else "token cosine"

    def plot(self, path: Path, title: str) -> None:
        """The table as a picture: error, agreement and coverage per pass."""
        from snncc.plots import plot_passes

        output = "logits" if self.model.task == CAUSAL_LM else "last hidden state"
        plot_passes(self.rows, path, title, self.metric, output)

    def print(self) -> None:
        from snncc.render import print_table

        self.print_sites()
        metric = "top1" if self.model.task == CAUSAL_LM else "cosine"
        print_table(["pass", "seconds", "changed", "nodes", "coverage", "max|err|", metric],
                    [[r.name, f"{r.seconds:.2f}", "yes" if r.modified else "no", r.nodes,
                      format_coverage({"coverage": r.coverage}), f"{r.max_abs_err:.3g}", f"{r.agreement:.4f}"]
                     for r in self.rows])

    def print_sites(self) -> None:
        """Per-site statistics of the passes that keep them (outlier, nonlinear)."""
        from snncc.render import print_table

        for pass_name in dict.fromkeys(name for name, _ in self.sites):
            rows = [site for name, site in self.sites if name == pass_name]
            columns = [c for c in rows[0] if c != "node"]
            print(f"{pass_name}: {len(rows)} sites")
            print_table(["node", *columns], [[site["node"], *(_show(site[c]) for c in columns)] for site in rows])


def _show(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, tuple):
        return "..".join(_show(v) for v in value)
    return "-" if value is None else str(value)


def clipped_fractions(gm: fx.GraphModule, sample: torch.Tensor) -> dict[str, float]:
    """For each decoded multi-range train: the share of its input values on `sample` beyond
    the top range (clipped), keyed by the decode node."""
    from snncc.ir.ops import ternary_limit

    snn = torch.ops.snn
    values: dict[str, float] = {}

    class Watcher(fx.Interpreter):
        def run_node(self, n: fx.Node):
            if n.target == snn.mr_encode.default:
                x, scale, T, G = (self.env[a] if isinstance(a, fx.Node) else a for a in n.args)
                top = ternary_limit(T) * 2.0**G
                for user in n.users:
                    values[user.name] = float(((x / scale).abs() >= top).float().mean())
            return super().run_node(n)

    with torch.no_grad():
        Watcher(gm).run(sample)
    return values
