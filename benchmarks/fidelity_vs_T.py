"""Fidelity (and spike cost) of a pipeline against its ANN as T grows, on held-out text.

    python benchmarks/fidelity_vs_T.py --model smollm2-135m --passes encode --T 8 12 16 24 32

Prints one JSON object per T, a table, and a one-line summary; writes JSON and a plot.
The model is traced and calibrated once; each T is a fresh compile of the same ANN graph.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch
from common import prepare_scored, scoring_parser

from snncc.api import compile_graph
from snncc.evaluate import evaluate
from snncc.render import print_table


def main() -> None:
    parser = scoring_parser(__doc__, tokens=2048)
    parser.add_argument("--passes", default="encode")
    parser.add_argument("--T", type=int, nargs="+", default=[4, 8, 12, 16, 24, 32])
    parser.add_argument("--calib-tokens", type=int, default=8192)
    args = parser.parse_args()

    loaded, ann, ctx, chunks = prepare_scored(args, calib_tokens=args.calib_tokens)
    rows = []
    for T in args.T:
        start = time.perf_counter()
        program = compile_graph(loaded, ann, ctx, args.passes, T)
        result = evaluate(program, loaded.module, chunks)
        result.update(program.profile(chunks[0]).totals())
        result["seconds"] = time.perf_counter() - start
        rows.append(result)
        print(json.dumps(result), flush=True)

    causal = "ppl_ratio" in rows[0]
    metric = (("ppl_ratio", "top1_agreement", "mean_abs_logit_err", "max_abs_logit_err") if causal
              else ("cosine", "min_cosine", "mean_abs_err", "max_abs_err"))
    print_table(["T", *metric, "spikes/act", "energy ratio"],
                [[r["T"], *(f"{r[m]:.6f}" for m in metric), f"{r['spikes_per_neuron']:.2f}",
                  f"{r['energy_ratio']:.3f}"] for r in rows])
    stem = f"fidelity_vs_T_{args.model}_{args.passes}".replace("{", "(").replace("}", ")").replace(",", "+")
    (args.out / f"{stem}.json").write_text(json.dumps(
        {"machine": platform.processor() or platform.machine(), "torch": torch.__version__, "rows": rows}, indent=1))
    _plot(rows, metric, args.out / f"{stem}.png", f"{args.model} '{args.passes}' vs T")
    first, last = rows[0], rows[-1]
    print(f"summary: {args.model} '{args.passes}': {metric[0]} {first[metric[0]]:.5f} at T={first['T']} -> "
          f"{last[metric[0]]:.5f} at T={last['T']}; {metric[1]} {first[metric[1]]:.4f} -> {last[metric[1]]:.4f}")


def _plot(rows: list[dict], metric: tuple[str, ...], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Ts = [r["T"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.semilogy(Ts, [max(abs(r[metric[0]] - 1), 1e-7) for r in rows], "o-", label=f"|{metric[0]} - 1|")
    left.semilogy(Ts, [max(1 - r[metric[1]], 1e-7) for r in rows], "s-", label=f"1 - {metric[1]} (1e-7 = exact)")
    left.semilogy(Ts, [r[metric[2]] for r in rows], "^-", label=metric[2])
    left.set_xlabel("T (time steps)")
    left.set_title("error vs ANN")
    left.legend()
    right.plot(Ts, [r["energy_ratio"] for r in rows], "o-")
    right.axhline(1.0, color="grey", lw=0.8)
    right.set_xlabel("T (time steps)")
    right.set_title("energy SNN / ANN (45 nm)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
