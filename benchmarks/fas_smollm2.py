"""The fas pipeline on a real model: fine-tune, then calibrate, and measure each step.

    python benchmarks/fas_smollm2.py --steps 250 --T 8 4 16
    python benchmarks/fas_smollm2.py --steps 500 --L 16 --T 8 4 16   # burst neurons at T < L

Fine-tunes the QCFS model once (resumable checkpoint, loss plot), then for each T compiles
`fas` without and with calibration and scores both on held-out text: perplexity ratio,
top-1 agreement, spikes, energy; also the fine-tuned QCFS ANN itself (no spikes). Prints
one JSON object per row and a table; writes JSON, and the profile (per-layer firing rates
and SOPs) of the first T's calibrated program as JSON and a plot. `--L` sets the QCFS levels
(outputs of L != 8 carry _L<L> in their names, of `--multirange K` _mr<K>, of `--spread`
_spread); `ifencode` runs them as burst neurons of round(L / T) spikes per step unless
`--burst` says otherwise, or with `--spread` at T > L as neurons of at most L spikes.
"""

from __future__ import annotations

import json
import time

import torch
from common import prepare_scored, scoring_parser

from snncc.api import compile_graph
from snncc.evaluate import evaluate
from snncc.plots import plot_finetune
from snncc.render import print_table


def main() -> None:
    parser = scoring_parser(__doc__, tokens=512)
    parser.add_argument("--steps", type=int, default=250, help="fine-tuning steps (128 tokens each)")
    parser.add_argument("--mode", default="full", choices=("full", "lambda"))
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--T", type=int, nargs="+", default=[8, 4, 16])
    parser.add_argument("--L", type=int, default=8, help="QCFS levels")
    parser.add_argument("--burst", type=int, default=0, help="spikes per step (0: round(L / T))")
    parser.add_argument("--spread", action="store_true",
                        help="at T > L, IF neurons keep the L QCFS levels over the T steps (ifencode{spread=true})")
    parser.add_argument("--multirange", type=float, default=0.0,
                        help="qcfs multirange: sites above this x the median sensitivity get multi-range neurons")
    parser.add_argument("--calibrate", default="layer_steps=20,neuron_steps=20,batches=2")
    args = parser.parse_args()

    loaded, ann, ctx, chunks = prepare_scored(args, progress=True)
    tag = (args.model + (f"_L{args.L}" if args.L != 8 else "") + (f"_mr{args.multirange:g}" if args.multirange else "")
           + ("_spread" if args.spread else ""))
    qcfs = (f"qcfs{{L={args.L},multirange={args.multirange},steps={args.steps},mode={args.mode},lr={args.lr},"
            f"checkpoint={args.out / f'fas_{tag}_finetune.pt'}}}")
    # The fine-tuned QCFS ANN itself (no IF neurons, no spiking nonlinearities): what the
    # spiking program is converted from, and the share of the error that is quantisation.
    qcfs_ann = compile_graph(loaded, ann, ctx, f"fold,{qcfs}")
    finetuned = next(p["report"] for p in qcfs_ann.info.passes if p["name"] == "qcfs").get("finetune")
    if finetuned:
        plot_finetune(finetuned, args.out / f"fas_{tag}_finetune_loss.png")
    row = evaluate(qcfs_ann, loaded.module, chunks, progress=True)
    row.update(T=0, calibrated=False, stage="QCFS ANN (fine-tuned), no spikes", reports={})
    rows = [row]
    print(json.dumps(row), flush=True)
    ifencode = "ifencode{spread=true}" if args.spread else f"ifencode{{burst={args.burst}}}"
    for T in args.T:
        for calibrate in ("layer_steps=0,neuron_steps=0", args.calibrate):
            start = time.perf_counter()
            spec = f"fas,{qcfs},{ifencode},calibrate{{{calibrate}}}"
            program = compile_graph(loaded, ann, ctx, spec, T)
            reports = {p["name"]: p["report"] for p in program.info.passes if p.get("report")}
            row = evaluate(program, loaded.module, chunks, progress=True)
            profile = program.profile(chunks[0])
            row.update(profile.totals())
            row.update(calibrated=calibrate != "layer_steps=0,neuron_steps=0", reports=reports, L=args.L,
                       burst=_burst(program), spread=args.spread,
                       seconds=time.perf_counter() - start)
            if T == args.T[0] and row["calibrated"]:
                from snncc.plots import plot_profile

                plot_profile(profile, args.out / f"profile_{tag}_fas_T{T}.png",
                             f"{args.model} fas T={T} (fine-tuned, calibrated)")
                (args.out / f"profile_{tag}_fas_T{T}.json").write_text(json.dumps(profile.to_dict(), indent=1))
            rows.append(row)
            print(json.dumps(row), flush=True)
            (args.out / f"fas_{tag}.json").write_text(json.dumps(rows, indent=1))
    print_table(["T", "burst", "calibrated", "ppl_ratio", "top1", "spikes/act", "energy ratio"],
                [[r["T"] or "ANN", r.get("burst", "-"), r["calibrated"], f"{r['ppl_ratio']:.4f}",
                  f"{r['top1_agreement']:.4f}",
                  f"{r.get('spikes_per_neuron', 0):.2f}", f"{r.get('energy_ratio', 1):.3f}"] for r in rows])


def _burst(program) -> int:
    """The spikes per step the program's IF neurons may send, as `ifencode` chose it."""
    return max((n.meta["snn"]["burst"] for n in program.graph_module.graph.nodes
                if n.target == torch.ops.snn.if_encode.default), default=0)


if __name__ == "__main__":
    main()
