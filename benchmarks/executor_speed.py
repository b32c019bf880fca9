"""Wall time of one forward: ANN vs the reference executor's fused and unrolled modes.

    python benchmarks/executor_speed.py --model smollm2-135m --tokens 128 -T 16 --passes encode las

All three run side by side in one process on the same input (best of `--repeats`), so the
ratios hold on any machine; absolute times are for the machine printed.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from common import best_of

from snncc.api import compile_graph, prepare
from snncc.backends.reference import ReferenceExecutor
from snncc.render import print_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("-T", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--passes", nargs="+", default=["encode", "las"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    loaded, ann, ctx = prepare(args.model, calib_tokens=1024)
    ids = torch.randint(0, 256, (1, args.tokens)).to(args.device)
    model = loaded.module.to(args.device)
    runners = {"ANN": lambda: model(ids)}
    for passes in args.passes:
        program = compile_graph(loaded, ann, ctx, passes, args.T)
        for mode in ("fused", "unrolled"):
            executor = ReferenceExecutor(program.graph_module, args.device, mode)
            runners[f"{passes} {mode}"] = lambda e=executor: e(ids)
    with torch.no_grad():
        for run in runners.values():
            run()  # warm-up
        seconds = {name: best_of(args.repeats, run) for name, run in runners.items()}
    rows = [{"runner": name, "seconds": s, "x_ann": s / seconds["ANN"]} for name, s in seconds.items()]
    for row in rows:
        print(json.dumps(row))
    print_table(["runner", "seconds", "x ANN"],
                [[r["runner"], f"{r['seconds']:.3f}", f"{r['x_ann']:.2f}"] for r in rows])
    cuda = args.device.startswith("cuda")
    machine = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"executor_speed_{args.device}.json").write_text(json.dumps(
        {"model": args.model, "tokens": args.tokens, "T": args.T, "machine": machine,
         "threads": torch.get_num_threads(), "rows": rows}, indent=1))
    ratios = {r["runner"]: r["x_ann"] for r in rows}
    parts = [f"{p} fused {ratios[p + ' fused']:.2f}x, unrolled {ratios[p + ' unrolled']:.2f}x "
             f"({ratios[p + ' unrolled'] / args.T:.2f} x T)" for p in args.passes]
    print(f"summary: {args.model}, {args.tokens} tokens, T={args.T} on {machine}, wall time vs the ANN: "
          + "; ".join(parts))


if __name__ == "__main__":
    main()
