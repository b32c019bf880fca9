"""Greedy continuations of the spiking program against its ANN's, token for token.

    python benchmarks/greedy_agreement.py --passes las --T 14 16 --new-tokens 32
    python benchmarks/greedy_agreement.py --passes las --budget top1=0.995,ppl=1.005

For each T: how many of the prompts' greedy continuations are identical to the ANN's,
and the first diverging position of the others. Prints JSON per T and a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from snncc.api import compile_graph, prepare

PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "In 1492, Christopher Columbus",
    "The quick brown fox",
    "def fibonacci(n):",
    "Photosynthesis is the process by which",
    "My favourite season of the year is",
    "The three primary colours are",
    "Once upon a time, in a small village,",
    "To make a cup of tea, first",
]


def greedy(model, ids: list[int], new_tokens: int) -> list[int]:
    tokens = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(new_tokens):
            next_id = model(tokens)[:, -1].argmax(-1, keepdim=True).cpu()
            tokens = torch.cat([tokens, next_id], dim=1)
    return tokens[0, len(ids):].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--passes", default="las")
    parser.add_argument("--T", type=int, nargs="+", default=[16])
    parser.add_argument("--budget", nargs="+", default=[], help="compile to these budgets instead of --T")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    loaded, ann, ctx = prepare(args.model)
    prompts = [loaded.tokenizer.encode(p) for p in PROMPTS]
    reference = [greedy(loaded.module, ids, args.new_tokens) for ids in prompts]
    rows = []
    runs = [(None, budget) for budget in args.budget] or [(T, None) for T in args.T]
    for T, budget in runs:
        start = time.perf_counter()
        program = compile_graph(loaded, ann, ctx, args.passes, T, budget=budget)
        T = program.info.T
        outputs = [greedy(program, ids, args.new_tokens) for ids in prompts]
        diverge = [next((i for i, (a, b) in enumerate(zip(r, o, strict=True)) if a != b), None)
                   for r, o in zip(reference, outputs, strict=True)]
        row = {"model": args.model, "pipeline": args.passes, "T": T, "budget": budget, "prompts": len(prompts),
               "identical": sum(d is None for d in diverge), "first_divergence": diverge,
               "seconds": time.perf_counter() - start}
        rows.append(row)
        print(json.dumps(row), flush=True)
        for text, d, o in zip(PROMPTS, diverge, outputs, strict=True):
            if d is not None:
                print(f"  differs at token {d}: {text!r} -> {loaded.tokenizer.decode(o)!r}")
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "_budget" if args.budget else ""
    (args.out / f"greedy_{args.model}_{args.passes}{suffix}.json").write_text(json.dumps(
        {"machine": platform.processor() or platform.machine(), "torch": torch.__version__, "rows": rows}, indent=1))
    print("summary: " + "; ".join(f"{r['budget'] or 'T=' + str(r['T'])}: "
                                  f"{r['identical']}/{r['prompts']} greedy {args.new_tokens}-token "
                                  f"continuations identical to the ANN's" for r in rows))


if __name__ == "__main__":
    main()
