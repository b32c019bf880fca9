"""Event backend cost vs firing rate on a SmolLM2-sized synaptic layer, against the dense
reference executor.

    python benchmarks/event_scaling.py --rates 0.01 0.05 0.2 0.5 --tokens 128 -T 16

One spike_linear layer 1536 -> 576 (SmolLM2's down projection) over a random ternary spike
train with the given firing rate. Prints time and synaptic operations per second for both,
and the crossover rate below which the event backend is faster.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
import torch.fx as fx
from common import best_of

import snncc.ir  # noqa: F401  (registers snn ops)
from snncc.backends.event import EventExecutor, SpikeEvents
from snncc.ir.ops import execution_mode, step_gains
from snncc.render import print_table


def _spike_train(rate: float, T: int, tokens: int, fan_in: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    fired = torch.rand((T, 1, tokens, fan_in), generator=generator) < rate
    signs = torch.where(torch.rand(fired.shape, generator=generator) < 0.5, -1, 1)
    return (fired * signs).to(torch.int8)


def _events(train: torch.Tensor) -> SpikeEvents:
    steps = []
    for step in train:
        flat = step.reshape(-1)
        idx = torch.nonzero(flat).squeeze(1)
        steps.append((idx, flat[idx].long()))
    return SpikeEvents(train.shape[1:], steps, step_gains(train.shape[0]))  # an MT train's gains


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[0.01, 0.05, 0.2, 0.5])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("-T", type=int, default=16)
    parser.add_argument("--fan-in", type=int, default=1536)
    parser.add_argument("--fan-out", type=int, default=576)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    torch.manual_seed(0)
    weight = torch.randn(args.fan_out, args.fan_in) / args.fan_in**0.5
    executor = EventExecutor(fx.GraphModule(torch.nn.Module(), fx.Graph()))
    executor.node = fx.Graph().placeholder("layer")
    rows = []
    for rate in args.rates:
        train = _spike_train(rate, args.T, args.tokens, args.fan_in)
        events = _events(train)
        event_s = best_of(args.repeats, lambda e=events: executor.spike_linear(e, weight, None))
        with execution_mode("fused"):
            dense_s = best_of(args.repeats, lambda s=train: torch.ops.snn.spike_linear(s, weight, None))
        with execution_mode("unrolled"):
            unrolled_s = best_of(args.repeats, lambda s=train: torch.ops.snn.spike_linear(s, weight, None))
        sops = events.count() * args.fan_out
        rows.append({"rate": rate, "events": events.count(), "sops": sops, "event_s": event_s,
                     "dense_fused_s": dense_s, "dense_unrolled_s": unrolled_s,
                     "event_sops_per_s": sops / event_s})
        print(json.dumps(rows[-1]), flush=True)
    print_table(["rate", "events", "SOPs", "event s", "dense fused s", "dense unrolled s", "event SOP/s"],
                [[f"{r['rate']:.2%}", r["events"], r["sops"], f"{r['event_s']:.4f}", f"{r['dense_fused_s']:.4f}",
                  f"{r['dense_unrolled_s']:.4f}", f"{r['event_sops_per_s']:.3g}"] for r in rows])
    crossover = _crossover(rows, "dense_unrolled_s"), _crossover(rows, "dense_fused_s")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "event_scaling.json").write_text(json.dumps(
        {"machine": platform.machine(), "threads": torch.get_num_threads(), "T": args.T, "tokens": args.tokens,
         "layer": [args.fan_in, args.fan_out], "rows": rows, "crossover_vs_unrolled": crossover[0],
         "crossover_vs_fused": crossover[1]}, indent=1))
    print(f"summary: event backend beats the dense unrolled executor below a firing rate of {_fmt(crossover[0])} "
          f"and the fused one below {_fmt(crossover[1])} ({args.fan_in}->{args.fan_out}, T={args.T}, "
          f"{args.tokens} tokens, {torch.get_num_threads()} threads)")


def _crossover(rows: list[dict], dense_key: str) -> float | None:
    """The firing rate where event time equals dense time (log-linear interpolation)."""
    import math

    for low, high in zip(rows, rows[1:], strict=False):
        d_low = low["event_s"] - low[dense_key]
        d_high = high["event_s"] - high[dense_key]
        if d_low <= 0 < d_high:
            f = d_low / (d_low - d_high)
            return math.exp(math.log(low["rate"]) + f * (math.log(high["rate"]) - math.log(low["rate"])))
    return None


def _fmt(rate: float | None) -> str:
    return "(no crossover inside the measured rates)" if rate is None else f"{rate:.1%}"


if __name__ == "__main__":
    main()
