"""Compiled table neurons: guide widths and the direct (row per bucket) layout, timed.

    python benchmarks/table_lookup.py --model smollm2-135m -T 14 --tokens 512

A table neuron compiled by Inductor reads its tables element by element, so how the lookup is
laid out decides its speed (snncc.ir.ops: guides of 1-16 thresholds per bucket, DirectTable).
This times one attention block's softmax chain (scores, row max, the exp table neuron, row
sum: heads x tokens x tokens scores) and one FFN's SiLU table neuron (tokens x channels),
each compiled at every guide width that fits and, for the shared exp table, through the
direct rows. Every variant must give the same bits as the first (checked). Widths 8 and 16
suit the eager path's C++ kernels; the compiled path took them until it built its own.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from common import benchmark_model, best_of

import snncc.ir.ops as ops
from snncc.api import compile_graph, prepare
from snncc.backends.compiled import TableNeuron, inductor_options
from snncc.ir.spec import arguments
from snncc.render import print_table

HERE = Path(__file__).resolve().parent
snn = torch.ops.snn


class SoftmaxChain(torch.nn.Module):
    """scores -> the exp table neuron of (scores - row max) -> row sum, as the fused graph has it."""

    def __init__(self, neuron: torch.nn.Module):
        super().__init__()
        self.neuron = neuron

    def forward(self, scores: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = scores * 0.125 + mask
        exp = self.neuron(x - x.amax(-1, keepdim=True))
        return exp, exp.double().sum(-1, keepdim=True).float()


def table_neurons(gm: torch.fx.GraphModule) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
    """The first shared (exp) and first per-channel (SiLU) fn_quantize tables of a fused graph."""
    found = {}
    for node in gm.graph.nodes:
        if node.target != snn.fn_quantize.default:
            continue
        bound = arguments(node.target, node.args, node.kwargs)
        tables = tuple(gm.get_buffer(bound[name].target) for name in ("thresholds", "codes", "bucket"))
        found.setdefault("shared" if tables[2].numel() == 1 else "per-channel", (*tables, bound["T"]))
    return found


def variants(thresholds, codes, bucket, T) -> dict[str, TableNeuron]:
    """The table neuron through a guide of each width that fits, and through direct rows."""
    found = {}
    for width in (16, 8, 4, 2, 1):
        lookup = ops.table_lookup(thresholds, codes, bucket, (width,))
        if lookup is not None and lookup.guide.width == width:
            found[f"guide width {width}"] = TableNeuron(lookup, T, direct=False)
            if ops.direct_table(lookup, T) is not None:
                found["direct rows"] = TableNeuron(lookup, T)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("-T", type=int, default=14)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()

    loaded, ann, ctx = prepare(benchmark_model(args.model), calib_tokens=1024)
    program = compile_graph(loaded, ann, ctx, "las", args.T)
    tables = table_neurons(program.executor._runnable)
    generator = torch.Generator().manual_seed(0)
    n = args.tokens
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    inputs = {"shared": (torch.randn(1, args.heads, n, n, generator=generator) * 3,
                         torch.where(causal, 0.0, torch.finfo(torch.float32).min)),
              "per-channel": None}
    rows = []
    with torch.no_grad():
        for kind, (thresholds, codes, bucket, T) in tables.items():
            channels = bucket.numel()
            x = inputs[kind] or (torch.randn(1, n, channels, generator=generator) * 2,)
            expected = None
            for name, neuron in variants(thresholds, codes, bucket, T).items():
                module = SoftmaxChain(neuron) if kind == "shared" else neuron
                compiled = torch.compile(module, dynamic=False, options=inductor_options())
                out = compiled(*x)
                out = out if isinstance(out, tuple) else (out,)
                expected = expected or out
                same = all(torch.equal(a, b) for a, b in zip(out, expected, strict=True))
                seconds = best_of(args.repeats, lambda c=compiled, x=x: c(*x))
                what = (f"softmax chain, {args.heads}x{n}x{n} scores" if kind == "shared"
                        else f"SiLU table neuron, {n}x{channels}")
                rows.append({"table": kind, "what": what, "lookup": name, "ms": seconds * 1e3,
                             "buckets": int(neuron.lookup().guide.starts.numel()), "same_bits": same})
                print(json.dumps(rows[-1]), flush=True)
    print_table(["table", "timed", "lookup", "buckets", "ms", "same bits"],
                [[r["table"], r["what"], r["lookup"], r["buckets"], f"{r['ms']:.2f}", r["same_bits"]] for r in rows])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"table_lookup_{args.model}.json").write_text(json.dumps(
        {"model": args.model, "T": args.T, "tokens": n, "machine": platform.processor() or platform.machine(),
         "threads": torch.get_num_threads(), "repeats": args.repeats, "rows": rows}, indent=1))
    fastest = {kind: min((r for r in rows if r["table"] == kind), key=lambda r: r["ms"]) for kind in tables}
    print("summary: " + "; ".join(f"{kind} table fastest through {r['lookup']} ({r['ms']:.2f} ms)"
                                  for kind, r in fastest.items()))


if __name__ == "__main__":
    main()
