"""Compile time of a pipeline after the model is loaded: trace, then calibration and passes.

    python benchmarks/compile_time.py --model smollm2-135m --passes las
    python benchmarks/compile_time.py --model smollm2-135m --passes las --paths block whole --repeats 2
    python benchmarks/compile_time.py --model smollm2-135m --budget default

Prints JSON (seconds per phase and per pass, also written to
benchmarks/results/compile_time_MODEL_PASSES.json) and a one-line summary. With --paths,
the block-by-block and the whole-model compile alternate in this process, each from a fresh
calibration context and with the table caches cleared, so both see the same machine
(this VM's speed drifts between runs); the fastest of --repeats is reported for each.
With --budget, one budgeted compile from a fresh context, its artifact written as
`snncc compile` writes it (benchmarks/results/compile_time_MODEL_budget.json): the load, the
trace, and the compile's own phases (sensitivity, plan search, programs compiled and checked),
against the 5-minute target for the whole.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from snncc.api import CALIB_TOKENS, compile_graph
from snncc.calibration import CalibrationContext, make_context
from snncc.frontend import trace
from snncc.models import load_model


def clear_caches() -> None:
    """Forget the neuron tables built by an earlier compile in this process."""
    from snncc.ir import neurons
    from snncc.passes import nonlinear

    nonlinear.function_table.cache_clear()
    for cached in (getattr(neurons, name) for name in dir(neurons)):
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()


def load_and_trace(model: str) -> tuple:
    """(loaded model, traced ANN, load seconds, trace seconds)."""
    start = time.perf_counter()
    loaded = load_model(model)
    loaded_s = time.perf_counter() - start
    start = time.perf_counter()
    ann = trace(loaded)
    return loaded, ann, loaded_s, time.perf_counter() - start


def fresh_context(loaded, ann) -> CalibrationContext:
    """The calibration context `snncc compile` makes: the packaged text, nothing recorded."""
    ctx = make_context(loaded.tokenizer, None, min(128, loaded.max_positions), CALIB_TOKENS)
    ctx.attach(ann)
    return ctx


def write_result(result: dict, path: Path) -> None:
    """Print the result with the machine it ran on, and write it as JSON to `path`."""
    result.update(machine=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    print(json.dumps(result))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--passes", default="las")
    parser.add_argument("-T", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--paths", nargs="+", choices=["block", "whole"], default=["block"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--budget", help="time one compile to this budget instead ('default': plain las's)")
    args = parser.parse_args()
    if args.budget:
        return budget_compile(args)

    loaded, ann, loaded_s, trace_s = load_and_trace(args.model)
    seconds = {path: [] for path in args.paths}
    for _ in range(args.repeats):
        for path in args.paths:
            clear_caches()
            start = time.perf_counter()
            ctx = fresh_context(loaded, ann)
            program = compile_graph(loaded, ann, ctx, args.passes, args.T, by_block=path == "block")
            seconds[path].append(time.perf_counter() - start)
    passes_s = min(seconds[args.paths[0]])
    result = {"model": args.model, "pipeline": args.passes, "T": program.T, "load_s": loaded_s, "trace_s": trace_s,
              "calibration_and_passes_s": passes_s, "compile_s": trace_s + passes_s,
              "calibration_and_passes_s_by_path": {path: min(times) for path, times in seconds.items()},
              "repeats": args.repeats,
              "per_pass_s": {r["name"]: r["seconds"] for r in program.info.passes},
              "calib_tokens": ctx.tokens}
    write_result(result, args.out / f"compile_time_{args.model}_{args.passes}.json")
    print(f"summary: {args.model} '{args.passes}' T={program.T}: compile {result['compile_s']:.1f} s after a "
          f"{loaded_s:.1f} s load (trace {trace_s:.1f} s, calibration + passes {passes_s:.1f} s)")


TARGET_S = 300  # a budgeted compile, load to written artifact, on 2 cores


def budget_compile(args: argparse.Namespace) -> None:
    """Time a budgeted compile as `snncc compile MODEL -o FILE` runs it, phase by phase."""
    loaded, ann, loaded_s, trace_s = load_and_trace(args.model)
    start = time.perf_counter()
    ctx = fresh_context(loaded, ann)
    with tempfile.TemporaryDirectory() as folder:
        program = compile_graph(loaded, ann, ctx, args.passes, args.T, budget=args.budget,
                                save_to=Path(folder) / "program.snn")
    compile_s = time.perf_counter() - start
    precision = program.info.precision
    total_s = loaded_s + trace_s + compile_s
    result = {"model": args.model, "pipeline": args.passes, "budget": args.budget, "T": program.T,
              "load_s": loaded_s, "trace_s": trace_s, "budget_compile_s": compile_s, "total_s": total_s,
              "target_s": TARGET_S, "met": total_s <= TARGET_S, "phases_s": precision.get("seconds"),
              "programs_compiled": precision.get("programs_compiled"), "precision": precision,
              "calib_tokens": ctx.tokens}
    write_result(result, args.out / f"compile_time_{args.model}_budget.json")
    print(f"summary: {args.model} budget {args.budget}: {total_s:.0f} s from load to written artifact "
          f"(target {TARGET_S} s: {'met' if result['met'] else 'MISSED'}); load {loaded_s:.0f} s, trace "
          f"{trace_s:.0f} s, compile {compile_s:.0f} s ({precision.get('seconds')}, "
          f"{precision.get('programs_compiled')} program(s) compiled)")


if __name__ == "__main__":
    main()
