"""Where a forward spends its time: torch.profiler over the ANN and the SNN executor modes.

    python benchmarks/hot_paths.py --model smollm2-135m --passes las --tokens 128
    python benchmarks/hot_paths.py --passes las -T 14 --tokens 32 --step --modes fused compiled

With --step, what is profiled is one cached decoding step (one new token after --tokens
cached ones: where generation spends its time) instead of a forward; the ANN is then snncc's
`none` program stepping the same way.

Prints, per runner, the ops with the most self CPU time (JSON lines, then a table) and
writes them to benchmarks/results/hot_paths_MODEL_PASSES_DEVICE.json.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from common import EXECUTOR_MODES, SMOLLM2_SHAPED, benchmark_model, executor_for
from torch.profiler import ProfilerActivity, profile

from snncc.api import compile_graph, prepare
from snncc.render import print_table


def top_ops(fn, count: int, cuda: bool) -> tuple[float, list[dict]]:
    """Total and per-op self milliseconds of one call of fn (after a warm-up call): CPU time,
    or on CUDA the kernels' device time, where a GPU forward spends it."""
    fn()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) / 1e3
    return total, [{"op": e.key, "self_ms": getattr(e, key) / 1e3, "calls": e.count,
                    "share": getattr(e, key) / 1e3 / total} for e in events[:count]]


def decoding_step(executor, ids: torch.Tensor):
    """A call that runs one cached decoding step: the token after `ids`, theirs cached."""
    with torch.no_grad():
        _, past = executor.step(ids, None, 0)
    token = ids[:, -1:]
    return lambda: executor.step(token, past, ids.shape[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m",
                        help=f"a model snncc loads, or {SMOLLM2_SHAPED} (random weights, no package needed)")
    parser.add_argument("--layers", type=int, default=30, help=f"blocks of {SMOLLM2_SHAPED}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--passes", default="las")
    parser.add_argument("-T", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--modes", nargs="+", default=["fused", "unrolled"], choices=EXECUTOR_MODES,
                        help="compiled: fused through torch.compile (its compile is the untimed warm-up call)")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--step", action="store_true", help="profile one cached decoding step, not a forward")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    loaded, ann, ctx = prepare(benchmark_model(args.model, args.layers), calib_tokens=1024)
    program = compile_graph(loaded, ann, ctx, args.passes, args.T)
    ids = torch.randint(0, 256, (1, args.tokens))
    if args.step:
        none = compile_graph(loaded, ann, ctx, "none").graph_module
        runners = {"ANN": decoding_step(executor_for(none, args.device, "fused"), ids)}
    else:
        ann_module, ann_ids = copy.deepcopy(loaded.module).to(args.device), ids.to(args.device)
        runners = {"ANN": lambda: ann_module(ann_ids)}
    for mode in args.modes:
        executor = executor_for(program.graph_module, args.device, mode)
        runners[f"SNN {mode}"] = decoding_step(executor, ids) if args.step else lambda e=executor: e(ids)
    result = {"model": args.model, "device": args.device, "passes": args.passes, "T": program.T,
              "tokens": args.tokens, "step": args.step, "runners": {}}
    with torch.no_grad():
        for name, fn in runners.items():
            total, ops = top_ops(fn, args.top, args.device.startswith("cuda"))
            result["runners"][name] = {"self_ms": total, "top": ops}
            print(json.dumps({"runner": name, "self_ms": total, "top": ops[:3]}))
            print_table([f"{name}: op", "self ms", "calls", "share"],
                        [[o["op"], f"{o['self_ms']:.1f}", o["calls"], f"{o['share']:.1%}"] for o in ops])
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"hot_paths_{args.model}_{args.passes}_{args.device}{'_step' if args.step else ''}.json"
    (args.out / name).write_text(json.dumps(result, indent=1))
    shares = ", ".join(f"{name} {r['self_ms']:.0f} ms (top: {r['top'][0]['op']})"
                       for name, r in result["runners"].items())
    print(f"summary: {args.model} {args.passes} T={program.T}, {args.tokens} tokens: {shares}")


if __name__ == "__main__":
    main()
