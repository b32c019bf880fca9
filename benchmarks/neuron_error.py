"""Max absolute and relative error of every spiking neuron over its calibrated input range, per T.

    python benchmarks/neuron_error.py --T 8 12 16 20 24 32

Table neurons (SiLU, GELU, ReLU, exp, tanh, sigmoid, sqrt) at output range 8 over
x in [-8, 8] (exp: [-30, 0], sqrt: [0, 50]); square is a spike x spike product of an MT
code with itself (range 8); reciprocal and rsqrt are the floating-point normalisers over
a in [1e-6, 1e6]. Per neuron: max absolute error, that error relative to max |f| on the
range, and the mean absolute error (normalisers: max and mean error relative to the exact
value at every a, as their code is floating).
Prints JSON, a table and a one-line summary; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from snncc.ir.neurons import FUNCTIONS, mantissa_table, stack_tables, table_bits, table_neuron_error

snn = torch.ops.snn


def square_error(T: int, out_range: float = 8.0) -> tuple[float, float]:
    x = torch.linspace(-out_range, out_range, 20001)
    s = snn.mr_encode(x, torch.tensor(out_range), T, 6)
    y = snn.spike_mul(s, torch.tensor(out_range), s, torch.tensor(out_range)).double()
    err = (y - x.double() ** 2).abs()
    return float(err.max()), float(err.max() / out_range**2), float(err.mean())


def normaliser_error(power: float, T: int) -> tuple[float, float]:
    thresholds, codes = stack_tables([mantissa_table(power, T)])
    a = torch.logspace(-6, 6, 20001)
    y = snn.spike_normalize(torch.ones_like(a), a, power, thresholds, codes, T).double()
    exact = a.double() ** power
    err = (y - exact).abs() / exact
    return float("nan"), float(err.max()), float(err.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, nargs="+", default=[8, 12, 16, 20, 24, 32])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    rows = []
    for T in args.T:
        row = {"T": T, "table_bits": table_bits(T)}
        for name in FUNCTIONS:
            row[name] = table_neuron_error(name, T)
        row["square"] = square_error(T)
        row["reciprocal"] = normaliser_error(-1.0, T)
        row["rsqrt"] = normaliser_error(-0.5, T)
        rows.append(row)
        print(json.dumps(row), flush=True)
    names = [k for k in rows[0] if k not in ("T", "table_bits")]
    width = max(map(len, names))
    print(f"{'neuron':{width}s} " + " ".join(f"{'T=' + str(r['T']):>29s}" for r in rows))
    for name in names:
        print(f"{name:{width}s} " + " ".join(f"{r[name][0]:9.2e}/{r[name][1]:9.2e}/{r[name][2]:9.2e}" for r in rows))
    print("(max abs / max relative / mean error; normalisers: relative only)")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "neuron_error.json").write_text(json.dumps(
        {"machine": platform.processor() or platform.machine(), "torch": torch.__version__, "rows": rows}, indent=1))
    falls = all(rows[i + 1][n][2] < rows[i][n][2] for n in names for i in range(len(rows) - 1))
    print(f"summary: mean error at T={rows[0]['T']} -> T={rows[-1]['T']}: "
          + ", ".join(f"{n} {rows[0][n][2]:.1e}->{rows[-1][n][2]:.1e}" for n in names)
          + f"; falls at every T for every neuron: {falls}")


if __name__ == "__main__":
    main()
