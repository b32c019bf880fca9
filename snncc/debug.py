"""Pass-by-pass debugging: the PassManager instrument behind `snncc debug`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn.functional as F

from snncc.backends.reference import ReferenceExecutor
from snncc.ir.printer import format_graph
from snncc.ir.verify import coverage_report
from snncc.models import CAUSAL_LM, LoadedModel
from snncc.pipeline import Pass, PassRecord


@dataclass
class PassRow:
    """One line of the debug table."""

    name: str
    seconds: float
    modified: bool
    nodes: int
    coverage: float
    max_abs_err: float
    agreement: float  # top-1 agreement (causal LMs) or mean token cosine (encoders)


class PassTable:
    """Instrument: after each pass, measure coverage and error vs the ANN on one sample."""

    def __init__(self, model: LoadedModel, sample: torch.Tensor, dump: Path | None, device: str = "cpu"):
        self.model = model
        self.sample = sample
        self.dump = dump
        self.device = device
        with torch.no_grad():
            self.reference = model.module(sample).float()
        self.rows: list[PassRow] = []
        if dump:
            dump.mkdir(parents=True, exist_ok=True)
            (dump / "passes.jsonl").write_text("")

    def __call__(self, p: Pass | None, gm: fx.GraphModule, record: PassRecord | None) -> None:
        out = ReferenceExecutor(gm, self.device)(self.sample).float().cpu()
        if self.model.task == CAUSAL_LM:
            agreement = float((out.argmax(-1) == self.reference.argmax(-1)).float().mean())
        else:
            agreement = float(F.cosine_similarity(out, self.reference, dim=-1).mean())
        row = PassRow(record.name if record else "(traced ANN)", record.seconds if record else 0.0,
                      record.modified if record else False, len(gm.graph.nodes),
                      coverage_report(gm).coverage, float((out - self.reference).abs().max()), agreement)
        self.rows.append(row)
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

        plot_passes(self.rows, path, title, self.metric)

    def print(self) -> None:
        from snncc.render import print_table

        metric = "top1" if self.model.task == CAUSAL_LM else "cosine"
        print_table(["pass", "seconds", "changed", "nodes", "coverage", "max|err|", metric],
                    [[r.name, f"{r.seconds:.2f}", "yes" if r.modified else "no", r.nodes,
                      f"{100 * r.coverage:.2f}%", f"{r.max_abs_err:.3g}", f"{r.agreement:.4f}"] for r in self.rows])
