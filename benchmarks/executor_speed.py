"""Wall time of one forward: ANN vs the reference executor's fused and unrolled modes.

    python benchmarks/executor_speed.py --model smollm2-135m --passes encode las -T 16 --tokens 128
    python benchmarks/executor_speed.py --passes las -T 8 16 --tokens 128 512   # vs T and length
    python benchmarks/executor_speed.py --passes las -T 14 --tokens 128 512 --modes fused compiled

Modes: `fused` and `unrolled` (eager), `compiled` (fused, through torch.compile; its compile
is the untimed warm-up; its outputs are checked against fused mode's, bit for bit).
`--compiled-ann` also times the ANN compiled, as snncc's `none`
program through the same path, to compare like with like; ratios stay against the eager ANN.

For each length, the ANN and every (pipeline, T, mode) run side by side in one process on the
same input (best of `--repeats`), so the ratios hold on any machine; absolute times are for
the machine printed. The summary reports the first T and length given.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
from pathlib import Path

import torch
from common import EXECUTOR_MODES, SMOLLM2_SHAPED, benchmark_model, best_of, executor_for

from snncc.api import compile_graph, prepare
from snncc.render import print_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m",
                        help=f"a model snncc loads, or {SMOLLM2_SHAPED} (random weights, no package needed)")
    parser.add_argument("--layers", type=int, default=30, help=f"blocks of {SMOLLM2_SHAPED}")
    parser.add_argument("--tokens", type=int, nargs="+", default=[128])
    parser.add_argument("-T", type=int, nargs="+", default=[16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--passes", nargs="+", default=["encode", "las"])
    parser.add_argument("--modes", nargs="+", default=["fused", "unrolled"], choices=EXECUTOR_MODES)
    parser.add_argument("--compiled-ann", action="store_true", help="also time the ANN through torch.compile")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    loaded, ann, ctx = prepare(benchmark_model(args.model, args.layers), calib_tokens=1024)
    model = copy.deepcopy(loaded.module).to(args.device)  # the programs keep theirs
    executors = {(passes, T, mode): executor_for(program.graph_module, args.device, mode)
                 for passes in args.passes for T in args.T
                 for program in [compile_graph(loaded, ann, ctx, passes, T)] for mode in args.modes}
    ann_compiled = (executor_for(compile_graph(loaded, ann, ctx, "none").graph_module, args.device, "compiled")
                    if args.compiled_ann else None)
    rows = []
    with torch.no_grad():
        for tokens in args.tokens:
            ids = torch.randint(0, 256, (1, tokens)).to(args.device)
            ann_s = best_of(args.repeats, lambda x=ids: model(x))
            rows.append({"runner": "ANN", "tokens": tokens, "T": None, "seconds": ann_s, "x_ann": 1.0})
            print(json.dumps(rows[-1]), flush=True)
            if ann_compiled is not None:
                seconds = best_of(args.repeats, lambda x=ids: ann_compiled(x))
                rows.append({"runner": "ANN compiled", "tokens": tokens, "T": None, "seconds": seconds,
                             "x_ann": seconds / ann_s})
                print(json.dumps(rows[-1]), flush=True)
            for (passes, T, mode), executor in executors.items():
                seconds = best_of(args.repeats, lambda e=executor, x=ids: e(x))
                rows.append({"runner": f"{passes} {mode}", "tokens": tokens, "T": T, "seconds": seconds,
                             "x_ann": seconds / ann_s})
                fused = executors.get((passes, T, "fused"))
                if mode == "compiled" and fused is not None:  # torch.compile must not change a bit
                    rows[-1]["equals_fused"] = torch.equal(executor(ids), fused(ids))
                print(json.dumps(rows[-1]), flush=True)
    print_table(["runner", "tokens", "T", "seconds", "x ANN", "x ANN / T"],
                [[r["runner"], r["tokens"], r["T"] or "", f"{r['seconds']:.3f}", f"{r['x_ann']:.2f}",
                  f"{r['x_ann'] / r['T']:.2f}" if r["T"] else ""] for r in rows])
    cuda = args.device.startswith("cuda")
    machine = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"executor_speed_{args.device}.json").write_text(json.dumps(
        {"model": args.model, "tokens": args.tokens, "T": args.T, "machine": machine,
         "threads": torch.get_num_threads(), "repeats": args.repeats, "rows": rows}, indent=1))
    head = {r["runner"]: r["x_ann"] for r in rows if r["tokens"] == args.tokens[0] and r["T"] in (None, args.T[0])}
    parts = [f"{p} " + ", ".join(f"{m} {head[f'{p} {m}']:.2f}x" for m in args.modes) for p in args.passes]
    print(f"summary: {args.model}, {args.tokens[0]} tokens, T={args.T[0]} on {machine}, wall time vs the ANN: "
          + "; ".join(parts))


if __name__ == "__main__":
    main()
