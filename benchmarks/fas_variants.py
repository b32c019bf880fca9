"""fas variants before fine-tuning: perplexity against energy, one row per pipeline spec.

    python benchmarks/fas_variants.py                      # the default specs below, T = 8
    python benchmarks/fas_variants.py --specs "fas,qcfs{L=16,multirange=0}" "fas,qcfs{L=16,multirange=4}"

Each spec is compiled without fine-tuning or calibration (what the levels L, burst neurons
and multi-range sites do by themselves) and scored on held-out text: perplexity ratio and
top-1 agreement against the ANN, spikes per activation and energy (45 nm) from the profile
of the first sequence. Prints one JSON object per row, a table and a summary line; writes
JSON and a plot of perplexity ratio against energy (the accuracy/energy trade-off).
"""

from __future__ import annotations

import json
from pathlib import Path

from common import prepare_scored, scoring_parser

from snncc.api import compile_graph
from snncc.evaluate import evaluate
from snncc.render import print_table

_NO_CALIBRATION = "calibrate{layer_steps=0,neuron_steps=0}"
# fas's table neurons as they were before multi-range codes (las's plain tables, 16x headroom)
PLAIN_TABLES = "nonlinear{ranges=0,headroom=16},attention{ranges=0}"
DEFAULT_SPECS = ("fas,qcfs{L=8,multirange=0}", "fas,qcfs{L=8,multirange=4}", "fas,qcfs{L=16,multirange=0}",
                 "fas,qcfs{L=16,multirange=8}",
                 f"fas,qcfs{{L=16,multirange=4}},{PLAIN_TABLES}", "fas,qcfs{L=16,multirange=4}",
                 "fas,qcfs{L=16,multirange=2}", "fas,qcfs{L=16,multirange=1}", "fas,qcfs{L=16,multirange=0.5}")


def main() -> None:
    parser = scoring_parser(__doc__, tokens=512)
    parser.add_argument("--specs", nargs="+", default=list(DEFAULT_SPECS))
    parser.add_argument("--T", type=int, default=8)
    parser.add_argument("--tag", default="", help="added to the output names (keeps the default run's files)")
    args = parser.parse_args()

    loaded, ann, ctx, chunks = prepare_scored(args, progress=True)
    rows = []
    name = f"fas_variants_{args.model}" + (f"_{args.tag}" if args.tag else "")
    path = args.out / f"{name}.json"
    for spec in args.specs:
        program = compile_graph(loaded, ann, ctx, f"{spec},{_NO_CALIBRATION}", args.T)
        qcfs = next(p["report"] for p in program.info.passes if p["name"] == "qcfs")
        row = evaluate(program, loaded.module, chunks, progress=True)
        row.update(program.profile(chunks[0]).totals())
        row.update(spec=spec, qcfs_sites=qcfs["sites"], multirange_sites=qcfs.get("multirange", {}).get("sites", 0))
        rows.append(row)
        print(json.dumps(row), flush=True)
        path.write_text(json.dumps(rows, indent=1))  # after every row: a long run keeps what it measured
    _plot(rows, args.out / f"{name}.png", f"{args.model} fas at T = {args.T}, before fine-tuning")
    print_table(["spec", "multi-range sites", "ppl ratio", "top-1", "spikes/act", "energy ratio"],
                [[r["spec"], f"{r['multirange_sites']}/{r['qcfs_sites']}", f"{r['ppl_ratio']:.4f}",
                  f"{r['top1_agreement']:.4f}", f"{r['spikes_per_neuron']:.2f}", f"{r['energy_ratio']:.3f}"]
                 for r in rows])
    best = min(rows, key=lambda r: r["ppl_ratio"])
    print(f"summary: best before fine-tuning {best['spec']}: ppl ratio {best['ppl_ratio']:.3f} "
          f"at {best['energy_ratio']:.3f} of the ANN's energy (T = {args.T}; {path})")


def _plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 7))
    for i, row in enumerate(rows, 1):
        ax.scatter(row["energy_ratio"], row["ppl_ratio"], label=f"{i}: {row['spec'].removeprefix('fas,')}")
        ax.annotate(str(i), (row["energy_ratio"], row["ppl_ratio"]), fontsize=8, xytext=(4, 2),
                    textcoords="offset points")
    # the fas issue's targets: perplexity ratio <= 1.10 at <= 0.10 of the ANN's energy
    ax.axhline(1.10, color="grey", linestyle="--", linewidth=0.8)
    ax.axvline(0.10, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlim(0, max(1.0, max(r["energy_ratio"] for r in rows) * 1.05))
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("energy SNN / ANN (45 nm)")
    ax.set_ylabel("perplexity ratio SNN / ANN")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
