"""Peak memory of one reference-executor forward vs the ANN, across sequence length and T.

    python benchmarks/executor_memory.py --passes encode las --lengths 128 512 1024 --T 8 16 32 --layers 4

Uses a SmolLM2-shaped Llama (hidden 576, MLP 1536, 9/3 heads, vocab 49152) with random
weights and `--layers` blocks: peak activation memory is set by one block's live tensors,
so a few blocks measure what all 30 would. Each (program, length) runs in a fresh process;
the peak is the kernel's resident high-water mark (VmHWM, reset through
/proc/self/clear_refs) minus the resident size before the forward.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import SMOLLM2_SHAPED, benchmark_model

_MEASURE = r"""
import gc, json, sys, torch, snncc, snncc.backends
prog = snncc.load(sys.argv[1])
prog.executor = snncc.backends.create_executor(prog.graph_module, "reference", "cpu", sys.argv[3])
length = int(sys.argv[2])
ids = torch.randint(0, 256, (1, length))
prog(ids[:, :8])  # warm-up: lazy initialisation is not activation memory
gc.collect()
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
prog(ids)
print(json.dumps({"peak_bytes": status("VmHWM") - before}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024])
    parser.add_argument("--T", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--passes", nargs="+", default=["encode", "las"])
    parser.add_argument("--mode", default="fused", help="reference executor mode of the SNN programs")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    from snncc.api import compile_graph, prepare
    from snncc.render import print_table

    loaded, ann, ctx = prepare(benchmark_model(SMOLLM2_SHAPED, args.layers), calib_tokens=1024)
    loaded.max_positions = max(args.lengths)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        programs = {"ANN": ("none", 16)} | {f"{p} T={T}": (p, T) for p in args.passes for T in args.T}
        for label, (passes, T) in programs.items():
            path = Path(tmp) / f"{passes}_{T}.snn"
            compile_graph(loaded, ann, ctx, passes, T).save(path)
            for length in args.lengths:
                run = subprocess.run([sys.executable, "-c", _MEASURE, str(path), str(length), args.mode],
                                     capture_output=True, text=True, check=True)
                peak = json.loads(run.stdout.strip().splitlines()[-1])["peak_bytes"]
                rows.append({"program": label, "length": length, "peak_mib": peak / 2**20})
                print(json.dumps(rows[-1]), flush=True)
    ann_peak = {r["length"]: r["peak_mib"] for r in rows if r["program"] == "ANN"}
    for r in rows:
        r["ratio_to_ann"] = r["peak_mib"] / ann_peak[r["length"]]
    print_table(["program", "length", "peak MiB", "x ANN"],
                [[r["program"], r["length"], f"{r['peak_mib']:.1f}", f"{r['ratio_to_ann']:.2f}"] for r in rows])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"executor_memory_{args.mode}.json").write_text(json.dumps(
        {"layers": args.layers, "mode": args.mode, "rows": rows}, indent=1))
    worst = max((r for r in rows if r["program"] != "ANN"), key=lambda r: r["ratio_to_ann"])
    print(f"summary: {args.mode} mode, worst peak {worst['ratio_to_ann']:.2f}x the ANN's "
          f"({worst['program']}, {worst['length']} tokens)")


if __name__ == "__main__":
    main()
