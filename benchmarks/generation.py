"""Greedy generation speed, ANN vs SNN, with and without the KV cache.

    python benchmarks/generation.py --model smollm2-135m --passes las --prompt-tokens 32 --new-tokens 32
    python benchmarks/generation.py --modes fused compiled --batch 1 8

Every runner continues the same held-out prompts in one process: the ANN as snncc's `none`
program, the SNN in the reference executor's fused and unrolled modes, each with the KV
cache (snncc.ir.incremental) and without (the whole sequence re-run per token), and the
model's own transformers `generate` (its KV cache) as a yardstick. Mode `compiled` runs the
fused decoding step through torch.compile (snncc.backends.compiled; its compile happens in the
untimed warm-up); `--compiled-ann` also runs the ANN's compiled, to compare like with like
(ratios stay against the eager ANN). With a batch of B, B
different prompts are continued at once. Tokens/s counts the new tokens of the whole batch
over the whole wall time, prompt pass included. Cached and uncached runs of one program must
produce the same tokens (checked and printed).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch
from common import EXECUTOR_MODES, SMOLLM2_SHAPED, benchmark_model, executor_for

from snncc.api import compile_graph, prepare
from snncc.calibration import HELDOUT_TEXT, read_text, token_chunks
from snncc.render import print_table


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def _timed(fn) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m",
                        help=f"a model snncc loads, or {SMOLLM2_SHAPED} (random weights, no package needed)")
    parser.add_argument("--layers", type=int, default=30, help=f"blocks of {SMOLLM2_SHAPED}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--passes", default="las")
    parser.add_argument("-T", type=int, default=None, help="default: the pipeline's")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--modes", nargs="+", default=["fused", "unrolled"], choices=EXECUTOR_MODES)
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="prompts continued at once")
    parser.add_argument("--compiled-ann", action="store_true", help="also run the ANN through torch.compile")
    parser.add_argument("--uncached-modes", nargs="*", default=["fused"],
                        help="modes also timed without the cache (slow: the sequence is re-run per token)")
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    loaded, ann, ctx = prepare(benchmark_model(args.model, args.layers), calib_tokens=args.calib_tokens, progress=True)
    chunks = token_chunks(loaded.tokenizer, read_text(HELDOUT_TEXT), args.prompt_tokens,
                          args.prompt_tokens * max(args.batch))
    programs = {"ANN": compile_graph(loaded, ann, ctx, "none"),
                "SNN": compile_graph(loaded, ann, ctx, args.passes, args.T)}
    hf = copy.deepcopy(loaded.module.model).to(args.device)
    rows, tokens = [], {}
    for batch in args.batch:
        rows += _runners(args, programs, hf, torch.cat(chunks[:batch]), tokens)
    same = {name: torch.equal(tokens[name], tokens[name.replace("uncached", "cached")])
            for name in tokens if "uncached" in name}
    print_table(["runner", "batch", "seconds", "tokens/s", "x ANN cached", "same tokens as ANN"],
                [[r["runner"], r["batch"], f"{r['seconds']:.2f}", f"{r['tokens_per_s']:.2f}",
                  f"{r['x_ann_cached_speed']:.3f}", r["tokens_equal_ann"]] for r in rows])
    result = {"model": args.model, "passes": args.passes, "T": programs["SNN"].T, "machine": machine(args.device),
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "batches": args.batch,
              "rows": rows, "cached_equals_uncached": same}
    args.out.mkdir(parents=True, exist_ok=True)
    device_suffix = "" if args.device == "cpu" else "_" + args.device.split(":")[0]
    (args.out / f"generation_{args.model}_{args.passes}{device_suffix}.json").write_text(json.dumps(result, indent=1))
    first = [r for r in rows if r["batch"] == args.batch[0]]
    ann = next(r for r in first if r["runner"] == "ANN cached")
    snns = ", ".join(f"{r['runner']} {r['tokens_per_s']:.1f} ({r['x_ann_cached_speed']:.2f}x)" for r in first
                     if r["runner"].startswith("SNN") and r["runner"].endswith(" cached"))
    print(f"summary: {args.model} {args.passes} T={result['T']} on {result['machine']}, batch {args.batch[0]}: "
          f"ANN {ann['tokens_per_s']:.1f} tokens/s, {snns}; cached tokens equal uncached: {all(same.values())}")


def new_tokens(program, prompt: torch.Tensor, count: int, cache: bool) -> torch.Tensor:
    """`count` greedy tokens after `prompt`, never stopping early (as min_new_tokens does for transformers)."""
    return program.generate(prompt, count, eos_token_id=[], cache=cache)[:, prompt.shape[1]:]


def _runners(args, programs: dict, hf, prompt: torch.Tensor, tokens: dict) -> list[dict]:
    """Every runner on one batch of prompts; their new tokens go into `tokens` by name."""
    batch, rows = prompt.shape[0], []

    def record(name: str, fn) -> None:
        new, seconds = _timed(fn)
        tokens[f"{name}, batch {batch}"] = new
        rows.append({"runner": name, "batch": batch, "seconds": seconds,
                     "tokens_per_s": batch * args.new_tokens / seconds})
        print(json.dumps(rows[-1]), flush=True)

    hf_prompt = prompt.to(args.device)
    with torch.no_grad():
        hf.generate(hf_prompt, max_new_tokens=2, do_sample=False)  # warm-up
        record("ANN transformers generate (KV cache)", lambda: hf.generate(
            hf_prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
            do_sample=False)[:, prompt.shape[1]:].cpu())
    ann_modes = ["fused"] + (["compiled"] if args.compiled_ann else [])
    for kind, program in programs.items():
        for mode in args.modes if kind == "SNN" else ann_modes:
            program.executor = executor_for(program.graph_module, args.device, mode)
            program.generate(prompt, 2, eos_token_id=[])  # warm-up; builds (and compiles) the step graph
            label = f"{kind} {mode}" if kind == "SNN" or mode != "fused" else kind
            record(f"{label} cached", lambda p=program: new_tokens(p, prompt, args.new_tokens, cache=True))
            if mode != "compiled" and (kind == "ANN" or mode in args.uncached_modes):
                record(f"{label} uncached", lambda p=program: new_tokens(p, prompt, args.new_tokens, cache=False))
    ann_rate = next(r["tokens_per_s"] for r in rows if r["runner"] == "ANN cached")
    for row in rows:
        row["x_ann_cached_speed"] = row["tokens_per_s"] / ann_rate
        row["tokens_equal_ann"] = torch.equal(tokens[f"{row['runner']}, batch {batch}"],
                                              tokens[f"ANN cached, batch {batch}"])
    return rows


if __name__ == "__main__":
    main()
