"""Run the benchmark suite and render benchmarks/RESULTS.md (tables and plots) from benchmarks/results/.

    python benchmarks/run_all.py                       # every script in SUITE (about an hour on 2 cores)
    python benchmarks/run_all.py --only executor_speed generation
    python benchmarks/run_all.py --render-only         # rebuild RESULTS.md from the JSON on disk, run nothing

Each script runs in its own process with the arguments listed in SUITE, prints JSON and a
`summary:` line, and writes its JSON to benchmarks/results. RESULTS.md is then rebuilt from
the JSON files alone, so every figure in it comes from a file, and each section names the
command that wrote the file and the date it was measured. The longer runs (fas fine-tuning,
the GPU check, ONNX export) are not in SUITE; their commands are in COMMANDS, and
`--render-only` renders whatever they left in benchmarks/results.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
RESULTS_MD = HERE / "RESULTS.md"

SUITE = {
    "compile_time": ["--model", "smollm2-135m", "--passes", "las", "--paths", "block", "whole", "--repeats", "2"],
    "executor_speed": ["--model", "smollm2-135m", "--passes", "las", "-T", "14", "--tokens", "128", "512",
                       "--modes", "fused", "compiled", "--compiled-ann", "--repeats", "5"],
    "executor_memory": ["--passes", "encode", "las", "--lengths", "128", "512", "1024", "--T", "8", "16", "32"],
    "generation": ["--model", "smollm2-135m", "--passes", "las", "-T", "14", "--modes", "fused", "compiled",
                   "--compiled-ann", "--batch", "1", "8"],
    "event_scaling": ["--rates", "0.001", "0.003", "0.01", "0.05", "0.2", "0.5"],
    "hot_paths": ["--model", "smollm2-135m", "--passes", "las", "-T", "16", "--tokens", "128"],
    "fidelity_vs_T": ["--passes", "las", "--T", "8", "12", "14", "16", "24", "32"],
}


def suite_command(name: str) -> str:
    return " ".join(["python", f"benchmarks/{name}.py", *SUITE[name]])


_FAS = "python benchmarks/fas_smollm2.py "
_FIDELITY = "python benchmarks/fidelity_vs_T.py "
_SPREAD_SPECS = " ".join(f'"fas,qcfs{{L={L},multirange={K}}},ifencode{{spread=true}}"'
                         for L, K in ((2, 0), (4, 0), (4, 4), (2, 4)))
# The command that wrote each result file (the JSON does not record it; load_time.py's does).
COMMANDS = {
    "compile_time_smollm2-135m_las.json": suite_command("compile_time"),
    "compile_time_smollm2-135m_budget.json": "python benchmarks/compile_time.py --model smollm2-135m --budget default",
    "executor_speed_cpu.json": suite_command("executor_speed"),
    "executor_memory_fused.json": suite_command("executor_memory"),
    "generation_smollm2-135m_las.json": suite_command("generation"),
    "event_scaling.json": suite_command("event_scaling"),
    "hot_paths_smollm2-135m_las_cpu.json": suite_command("hot_paths"),
    "hot_paths_smollm2-135m_las_cpu_step.json": "python benchmarks/hot_paths.py --passes las -T 14 --tokens 32 --step "
                                                "--modes fused compiled",
    "fidelity_vs_T_smollm2-135m_las.json": suite_command("fidelity_vs_T"),
    "fidelity_vs_T_smollm2-135m_las+nonlinear(ranges=6+headroom=1)+attention(ranges=6).json":
        _FIDELITY + '--passes "las,nonlinear{ranges=6,headroom=1},attention{ranges=6}" --T 6 8 10 12',
    "fidelity_vs_T_smollm2-135m_encode.json": _FIDELITY + "--T 8 12 16 24 32",
    "fidelity_vs_T_minilm-l6_encode.json": _FIDELITY + "--model minilm-l6 --T 8 12 16 24 32",
    **{f"fidelity_vs_T_tiny-{m}_encode.json": _FIDELITY + f"--model tiny-{m} --tokens 1024 --T 4 8 12 16 24"
       for m in ("llama", "qwen2", "gpt2", "opt", "bert")},
    "greedy_smollm2-135m_las.json": "python benchmarks/greedy_agreement.py --passes las --T 12 14 16",
    "neuron_error.json": "python benchmarks/neuron_error.py --T 8 12 16 20 24 32",
    "fas_variants_smollm2-135m.json": "python benchmarks/fas_variants.py",
    "fas_variants_smollm2-135m_spread.json": f"python benchmarks/fas_variants.py --tag spread --specs {_SPREAD_SPECS}",
    "fas_smollm2-135m.json": _FAS + "--steps 300 --mode full --L 8 --T 8",
    "fas_smollm2-135m_L16.json": _FAS + "--steps 500 --lr 3e-5 --L 16 --T 8 4 16",
    "fas_smollm2-135m_L16_mr4.json": _FAS + "--steps 500 --lr 3e-5 --L 16 --multirange 4 --T 8 --out /tmp/fascheck",
    "fas_smollm2-135m_L16_mr0.5.json": _FAS + "--steps 300 --mode lambda --L 16 --multirange 0.5 --T 8 4 16",
    "fas_smollm2-135m_L2_spread.json": _FAS + "--steps 300 --mode full --L 2 --spread --T 8",
    "onnx_export_smollm2-135m_las.json": "python benchmarks/onnx_export.py --model smollm2-135m --passes las "
                                         "--format onnx-snn --out benchmarks/results/onnx_export_smollm2-135m_las.json",
    "onnx_export_smollm2-135m_none.json": "python benchmarks/onnx_export.py --model smollm2-135m --passes none "
                                          "--format onnx --out benchmarks/results/onnx_export_smollm2-135m_none.json",
    "onnx_export_smollm2-135m_las_onnx.json": "python benchmarks/onnx_export.py --model smollm2-135m --passes las "
                                              "--format onnx --out "
                                              "benchmarks/results/onnx_export_smollm2-135m_las_onnx.json",
    "energy_frontier_smollm2-135m.json": "python benchmarks/energy_frontier.py --model smollm2-135m",
    "energy_frontier_minilm-l6.json": "python benchmarks/energy_frontier.py --model minilm-l6",
    "table_lookup_smollm2-135m.json": "python benchmarks/table_lookup.py --model smollm2-135m -T 14 --tokens 512",
    "greedy_smollm2-135m_las_budget.json": "python benchmarks/greedy_agreement.py --passes las "
                                           "--budget top1=0.995,ppl=1.005 kl=1e-4",
    "scale.json": "python benchmarks/scale.py --folder /work/shaped --models smollm2-135m smollm2-360m smollm2-1.7b "
                  "llama2-7b --calib-tokens 8192 2048 2048 1024",
    "executor_speed_cuda.json": "python3 benchmarks/executor_speed.py --model smollm2-shaped --device cuda "
                                "-T 16 --tokens 128 512 --repeats 5 --out \"$OUT\"",
    "generation_smollm2-shaped_las_cuda.json": "python3 benchmarks/generation.py --model smollm2-shaped "
                                               "--device cuda --new-tokens 32 --calib-tokens 1024 --out \"$OUT\"",
    "hot_paths_smollm2-shaped_las_cuda.json": "python3 benchmarks/hot_paths.py --model smollm2-shaped "
                                              "--device cuda -T 16 --tokens 128 --out \"$OUT\"",
}
# How a command ran, where it was not `python ...` from the repository root on this machine.
_GPU = "run by `bash benchmarks/gpu_check.sh` on the device machine; JSON copied from its $OUT"
RUN_BY = {"executor_speed_cuda.json": _GPU, "generation_smollm2-shaped_las_cuda.json": _GPU,
          "hot_paths_smollm2-shaped_las_cuda.json": _GPU,
          "fas_smollm2-135m_L16_mr4.json": "JSON and plots copied from /tmp/fascheck",
          "profile_smollm2-135m_L16_mr4_fas_T8.json": "JSON and plots copied from /tmp/fascheck"}
# fas_smollm2.py writes the profile of its first T's calibrated program beside its results.
for _tag in ("", "_L16", "_L16_mr4", "_L16_mr0.5"):
    COMMANDS[f"profile_smollm2-135m{_tag}_fas_T8.json"] = COMMANDS[f"fas_smollm2-135m{_tag}.json"]


def run(name: str) -> str:
    """Run one benchmark script, echoing its output; returns its summary line."""
    command = [sys.executable, str(HERE / f"{name}.py"), *SUITE[name]]
    print(f"== {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    summary = ""
    for line in process.stdout:
        print(line, end="", flush=True)
        summary = line.strip() if line.startswith("summary:") else summary
    if process.wait() != 0:
        raise RuntimeError(f"benchmarks/{name}.py failed with exit code {process.returncode}")
    return f"{summary} [{time.perf_counter() - start:.0f} s]"


# ---------------------------------------------------------------- reading results


@functools.cache
def _load(name: str):
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


@functools.cache
def measured_on(name: str) -> str:
    """The date of a result file: the one its JSON records, else its last git commit's."""
    data = _load(name)
    if isinstance(data, dict) and data.get("date"):
        return f"{data['date']} (recorded in the JSON)"
    git = subprocess.run(["git", "log", "-1", "--format=%cs", "--", str(RESULTS / name)], cwd=REPO,
                         capture_output=True, text=True)
    date = git.stdout.strip()
    return f"{date} (last git commit of the JSON)" if git.returncode == 0 and date else "not committed yet"


def link(name: str) -> str:
    """A Markdown link, relative to RESULTS.md, to a file in benchmarks/results."""
    return f"[{name}](results/{quote(name)})"


def image(name: str, alt: str) -> str:
    return f"![{alt}](results/{quote(name)})"


def provenance(name: str) -> list[str]:
    """Where a section's figures come from: the file, the command that wrote it, the date."""
    note = f" ({RUN_BY[name]})" if name in RUN_BY else ""
    return [f"- data: {link(name)}", f"- command: `{COMMANDS[name]}`{note}", f"- measured: {measured_on(name)}"]


# ---------------------------------------------------------------- formatting


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
           ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _pct(x: float) -> str:
    return f"{x:.2%}"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


def _bar_plot(path: Path, labels: list[str], values: list[float], xlabel: str, title: str,
              fmt: str = "%.3g", lines: dict[str, float] | None = None) -> None:
    """Horizontal bars, each labelled with its value; a log axis where values span over 10x,
    else a linear one from 0. `lines`: vertical reference lines, by legend label."""
    fig, ax = _pyplot().subplots(figsize=(7, 0.45 * len(labels) + 1.2))
    bars = ax.barh(labels[::-1], values[::-1], color="tab:blue")
    ax.bar_label(bars, fmt=fmt, padding=3)
    if max(values) > 10 * min(values):
        ax.set_xscale("log")
        ax.set_xlim(right=max(values) * 3)
        xlabel += " (log)"
    else:
        ax.set_xlim(0, max(values) * 1.35)
    for (label, x), style in zip((lines or {}).items(), ("-", "--"), strict=False):
        ax.axvline(x, color="black" if style == "-" else "tab:red", linestyle=style, linewidth=1, label=label)
    if lines:
        ax.legend(loc="upper right")
    ax.set_xlabel(xlabel)
    fig.suptitle(title)  # centred on the figure: long bar labels would push an axes title off it
    _save(fig, path)


# ---------------------------------------------------------------- fidelity


def fidelity_section(name: str) -> list[str]:
    """Fidelity and spike cost per T: perplexity and agreement (causal models) or cosine (encoders)."""
    data = _load(name)
    rows = data["rows"]
    causal = "ppl_ratio" in rows[0]
    header = ["T", "tokens"] + (["ppl ratio", "top-1 agreement", "mean abs logit err", "max abs logit err"] if causal
                                else ["cosine", "min cosine", "mean abs err", "max abs err"])
    body = [[r["T"], r["tokens"]] + ([f"{r['ppl_ratio']:.5f}", _pct(r["top1_agreement"]),
                                      f"{r['mean_abs_logit_err']:.4g}", f"{r['max_abs_logit_err']:.4g}"] if causal
                                     else [f"{r['cosine']:.6f}", f"{r['min_cosine']:.6f}", f"{r['mean_abs_err']:.3g}",
                                           f"{r['max_abs_err']:.3g}"])
            + [f"{r['spikes_per_neuron']:.2f}", f"{r['energy_ratio']:.3f}", f"{r['coverage']:.0%}"] for r in rows]
    header += ["spikes / activation", "energy SNN/ANN (45 nm)", "coverage"]
    return [f"`{rows[0]['pipeline']}` on {rows[0]['model']}, {data['machine']}, torch {data['torch']}:", "",
            *_table(header, body), "", image(name.replace(".json", ".png"), name.replace(".json", ""))]


def greedy_section(name: str) -> list[str]:
    data = _load(name)
    return _table(["T", "budget", "prompts", "identical continuations", "first diverging token of the others"],
                  [[r["T"], r.get("budget") or "-", r["prompts"], r["identical"],
                    ", ".join(str(d) for d in r["first_divergence"] if d is not None) or "-"] for r in data["rows"]])


def neuron_error_section(name: str) -> list[str]:
    """Max / mean error per neuron and T; normalisers (no absolute error) relative to the exact value."""
    rows = _load(name)["rows"]
    names = [k for k in rows[0] if k not in ("T", "table_bits")]

    def cell(errors: list[float]) -> str:
        worst = errors[1] if errors[0] != errors[0] else errors[0]  # NaN absolute error: relative only
        return f"{worst:.1e} / {errors[2]:.1e}"

    return ["Max / mean absolute error (reciprocal and rsqrt: relative to the exact value):", "",
            *_table(["neuron"] + [f"T={r['T']}" for r in rows], [[n] + [cell(r[n]) for r in rows] for n in names]),
            "", "Table bits per T: " + ", ".join(f"T={r['T']}: {r['table_bits']}" for r in rows) + "."]


# ---------------------------------------------------------------- fas


def _qcfs_options(pipeline: str) -> dict[str, str]:
    match = re.search(r"qcfs\{([^}]*)\}", pipeline)
    return dict(kv.split("=", 1) for kv in match.group(1).split(",")) if match else {}


def _fas_spec(row: dict) -> str:
    """The `--passes` spec of a fas_smollm2.py row without its run-specific options (paths, steps)."""
    q = _qcfs_options(row["pipeline"])
    spec = f"fas,qcfs{{L={q['L']},multirange={float(q.get('multirange', 0)):g}}}"
    return spec + (",ifencode{spread=true}" if row.get("spread") else "")


def _fine_tuned(row: dict) -> str:
    q = _qcfs_options(row["pipeline"])
    return f"{q['mode']}, {q['steps']} steps" if int(q.get("steps", 0)) else "no"


def fas_run_section(name: str) -> list[str]:
    """One fas_smollm2.py run: the fine-tuned QCFS ANN, then each T without and with calibration."""
    rows = _load(name)
    body = [["QCFS ANN, fine-tuned (no spikes)", "-", "-", "-", f"{rows[0]['ppl_ratio']:.4g}",
             _pct(rows[0]["top1_agreement"]), "-", "-"]]
    body += [[f"`{_fas_spec(r)}`", r["T"], r.get("burst", "-"), "yes" if r["calibrated"] else "no",
              f"{r['ppl_ratio']:.4g}", _pct(r["top1_agreement"]), f"{r['spikes_per_neuron']:.2f}",
              f"{r['energy_ratio']:.3f}"] for r in rows[1:]]
    lines = [f"{rows[0]['tokens']} held-out tokens:", "",
             *_table(["program", "T", "burst", "calibrated", "ppl ratio", "top-1 agreement", "spikes / activation",
                      "energy SNN/ANN"], body)]
    lines += ["", *_finetune_report(rows[-1]), "", *_calibration_report(rows)]
    loss_plot = f"{name.removesuffix('.json')}_finetune_loss.png"
    return lines + (["", image(loss_plot, "fine-tuning loss")] if (RESULTS / loss_plot).exists() else [])


def _finetune_report(row: dict) -> list[str]:
    """What fine-tuning reported: the distillation KL while training, and on the held-out check batches."""
    report = row["reports"].get("qcfs", {}).get("finetune")
    if not report:
        return []
    check = (f"{report['check_kl_start']:.4g} -> {report['check_kl_kept']:.4g} (kept step {report['kept_step']})"
             if "check_kl_start" in report else "not measured (no check batches then)")
    return _table(["fine-tuning", "tensors trained", "training KL, first -> last 10 steps",
                   "held-out check KL, start -> kept"],
                  [[f"{report['mode']}, {report['steps']} steps", report["tensors"],
                    f"{report['kl_first']:.4g} -> {report['kl_last']:.4g}", check]])


def _calibration_report(rows: list[dict]) -> list[str]:
    """What calibration reported per T: its loss on the check batches (or, before they existed, on its own)."""
    body = []
    for r in rows[1:]:
        calibrate = r["reports"].get("calibrate", {})
        if not r["calibrated"] or "before" not in calibrate:
            continue
        before, after = calibrate["before"], calibrate["after"]
        loss = "check_loss" if "check_loss" in before else "loss"
        body.append([r["T"], "check batches" if loss == "check_loss" else "training batches",
                     f"{before[loss]:.4g} -> {after[loss]:.4g}"])
    return _table(["T", "calibration loss on", "before -> after"], body) if body else []


def fas_variants_section(name: str) -> list[str]:
    rows = _load(name)
    return [f"T = {rows[0]['T']}, no fine-tuning, no calibration (`calibrate{{layer_steps=0,neuron_steps=0}}` "
            f"appended), {rows[0]['tokens']} held-out tokens:", "",
            *_table(["spec", "multi-range sites", "ppl ratio", "top-1 agreement", "spikes / activation",
                     "energy SNN/ANN"],
                    [[f"`{r['spec']}`", f"{r['multirange_sites']} / {r['qcfs_sites']}", f"{r['ppl_ratio']:.4g}",
                      _pct(r["top1_agreement"]), f"{r['spikes_per_neuron']:.2f}", f"{r['energy_ratio']:.3f}"]
                     for r in rows]),
            "", image(name.replace(".json", ".png"), name.replace(".json", ""))]


FAS_RUNS = ["fas_smollm2-135m_L16_mr0.5.json", "fas_smollm2-135m_L16_mr4.json", "fas_smollm2-135m_L16.json",
            "fas_smollm2-135m.json", "fas_smollm2-135m_L2_spread.json"]
FAS_VARIANTS = ["fas_variants_smollm2-135m.json", "fas_variants_smollm2-135m_spread.json"]


def fas_frontier_section(_: str) -> list[str]:
    """Every fas program measured at T = 8, cheapest first, from the variant and fine-tuning files."""
    entries = []
    for name in FAS_VARIANTS:
        for r in _load(name) or []:
            entries.append((r, f"`{r['spec']}`", "no", "no", name))
    for name in FAS_RUNS:
        for r in (_load(name) or [])[1:]:
            if r["T"] == 8:
                entries.append((r, f"`{_fas_spec(r)}`", _fine_tuned(r), "yes" if r["calibrated"] else "no", name))
    entries.sort(key=lambda e: e[0]["energy_ratio"])
    return ["Every row comes from a file rendered in its own section below, with its command.", "",
            *_table(["program (T = 8)", "fine-tuned", "calibrated", "ppl ratio", "top-1 agreement",
                     "spikes / activation", "energy SNN/ANN", "file", "measured"],
                    [[spec, tuned, calibrated, f"{r['ppl_ratio']:.4g}", _pct(r["top1_agreement"]),
                      f"{r['spikes_per_neuron']:.2f}", f"{r['energy_ratio']:.3f}", link(name),
                      measured_on(name).split()[0]] for r, spec, tuned, calibrated, name in entries])]


def profile_section(name: str) -> list[str]:
    """A profile's totals, and spikes and SOPs per role (the source module without its block index)."""
    data = _load(name)
    totals = data["totals"]
    roles: dict[tuple[str, str], list[int]] = {}
    for layer in data["layers"]:
        role = re.sub(r"^model\.layers\.\d+\.", "", layer["source"]) or "(top level)"
        counts = roles.setdefault((role, layer["kind"]), [0, 0, 0])
        counts[0] += layer["spikes_in"]
        counts[1] += layer["neurons_in"]
        counts[2] += layer["sops"]
    sops = sum(c[2] for c in roles.values()) or 1
    body = [[f"`{role}`", kind, f"{c[0] / c[1]:.2f}" if c[1] else "-", f"{c[2] / sops:.1%}"]
            for (role, kind), c in sorted(roles.items(), key=lambda item: -item[1][2])]
    return [*_table(["T", "spikes / activation", "firing rate", "SOPs", "ANN MACs", "analog MACs", "energy SNN/ANN",
                     "energy table"],
                    [[totals["T"], f"{totals['spikes_per_neuron']:.2f}", f"{totals['firing_rate']:.3f}",
                      f"{totals['sops']:.3g}", f"{totals['ann_macs']:.3g}", totals["analog_macs"],
                      f"{totals['energy_ratio']:.3f}", totals["energy_table"]]]),
            "", "Firing rate per step: " + ", ".join(f"{rate:.3f}" for rate in data["firing_rate_per_step"]) + ".",
            "", *_table(["site (all blocks)", "kind", "spikes / activation", "share of SOPs"], body),
            "", image(name.replace(".json", ".png"), name.replace(".json", ""))]


# ---------------------------------------------------------------- speed, memory, generation, export


def _speed_table(data: dict, digits: int) -> list[str]:
    checked = any("equals_fused" in r for r in data["rows"])
    header = ["runner", "tokens", "T", "seconds", "x ANN", "x ANN / T"] + ["outputs = fused, bit for bit"] * checked
    return _table(header,
                  [[r["runner"], r["tokens"], r["T"] or "", f"{r['seconds']:.{digits}f}", f"{r['x_ann']:.2f}",
                    f"{r['x_ann'] / r['T']:.2f}" if r["T"] else ""] + [r.get("equals_fused", "")] * checked
                   for r in data["rows"]])


def speed_section(name: str) -> list[str]:
    data = _load(name)
    rows = data["rows"]
    labels = [f"{r['runner']}" + (f" T={r['T']}" if r["T"] else "") + f", {r['tokens']} tok" for r in rows]
    _bar_plot(RESULTS / "executor_speed_cpu.png", labels, [r["x_ann"] for r in rows],
              "wall time / the ANN's at the same length", f"{data['model']} forward, reference executor",
              fmt="%.2fx", lines={"the ANN": 1.0, "target: at most 1.3x": 1.3})
    return [f"One {data['model']} forward on {data['machine']} ({data['threads']} threads), best of "
            f"{data.get('repeats', 3)}, the ANN and "
            "every program side by side at each length:", "", *_speed_table(data, 3),
            "", image("executor_speed_cpu.png", "executor speed")]


def gpu_section(name: str) -> list[str]:
    speed = _load(name)
    lines = [f"{speed['machine']}, a {speed['model']} Llama with random weights:", "", *_speed_table(speed, 4)]
    generation = f"generation_{speed['model']}_las_cuda.json"
    if _load(generation) is not None:
        lines += ["", *provenance(generation), "", *generation_table(_load(generation))]
    hot = f"hot_paths_{speed['model']}_las_cuda.json"
    if _load(hot) is not None:
        lines += ["", *provenance(hot), "", "Device self time (torch.profiler):", "", *hot_paths_table(_load(hot))]
    logs = sorted(RESULTS.glob("*cuda*.log")) + sorted(RESULTS.glob("gpu_check*.log"))
    if logs:
        lines += ["", "Later device runs that were cut short (the compiled executor; each log heads with its command "
                  "and why it stopped): " + ", ".join(f"[{log.name}](results/{log.name})" for log in logs) + "."]
    return lines


def memory_section(name: str) -> list[str]:
    data = _load(name)
    rows = data["rows"]
    lengths = sorted({r["length"] for r in rows})
    programs = list(dict.fromkeys(r["program"] for r in rows))
    cell = {(r["program"], r["length"]): r for r in rows}
    fig, ax = _pyplot().subplots(figsize=(7, 4))
    for program in programs:
        ax.plot(lengths, [cell[program, n]["peak_mib"] for n in lengths], marker="o", label=program)
    ax.set_xlabel("tokens")
    ax.set_ylabel("peak MiB (one forward)")
    ax.set_title(f"peak memory, SmolLM2-shaped, {data['layers']} blocks, {data.get('mode', 'fused')} mode")
    ax.legend(fontsize=8)
    _save(fig, RESULTS / "executor_memory_fused.png")
    body = [[program] + [f"{cell[program, n]['peak_mib']:.1f} MiB" if program == "ANN"
                         else f"{cell[program, n]['ratio_to_ann']:.2f}x" for n in lengths] for program in programs]
    return [f"Peak memory of one forward: SmolLM2-shaped Llama, {data['layers']} blocks, random weights, a fresh "
            f"process per cell, {data.get('mode', 'fused')} mode; the ANN in MiB, programs as a multiple of it:", "",
            *_table(["program"] + [f"{n} tokens" for n in lengths], body),
            "", image("executor_memory_fused.png", "executor memory")]


def generation_table(data: dict) -> list[str]:
    return [f"{data['new_tokens']} new tokens after a {data['prompt_tokens']}-token held-out prompt (per sequence "
            f"of the batch), {data['model']} `{data['passes']}` T = {data['T']}, {data['machine']}; tokens/s counts "
            f"the whole batch; cached and uncached runs give the same tokens: "
            f"{all(data['cached_equals_uncached'].values())}.", "",
            *_table(["runner", "batch", "seconds", "tokens/s", "x ANN cached (same batch)", "same tokens as the ANN"],
                    [[r["runner"], r.get("batch", 1), f"{r['seconds']:.2f}", f"{r['tokens_per_s']:.2f}",
                      f"{r['x_ann_cached_speed']:.3f}", r["tokens_equal_ann"]] for r in data["rows"]])]


def table_lookup_section(name: str) -> list[str]:
    data = _load(name)
    rows = data["rows"]
    return [f"{data['model']} `las` T = {data['T']}, {data['tokens']} tokens, each variant compiled alone on "
            f"{data['machine']} ({data['threads']} threads), best of {data['repeats']}; every variant's outputs "
            "are checked against the first's:", "",
            *_table(["table", "timed", "lookup", "buckets", "ms", "same bits"],
                    [[r["table"], r["what"], r["lookup"], r["buckets"], f"{r['ms']:.2f}", r["same_bits"]]
                     for r in rows])]


def generation_section(name: str) -> list[str]:
    data = _load(name)
    rows = data["rows"]
    _bar_plot(RESULTS / "generation_smollm2-135m_las.png", [f"{r['runner']}, batch {r.get('batch', 1)}" for r in rows],
              [r["tokens_per_s"] for r in rows], "tokens/s",
              f"greedy generation, {data['model']} {data['passes']} T = {data['T']}")
    return [*generation_table(data), "", image("generation_smollm2-135m_las.png", "generation")]


def compile_section(name: str) -> list[str]:
    data = _load(name)
    return [f"{data['model']} `{data['pipeline']}` T = {data['T']}, {data['calib_tokens']} calibration tokens, "
            f"{data['machine']}, {data['threads']} threads:", "",
            *_table(["load", "trace", "calibration and passes", "compile (after the load)"],
                    [[f"{data[k]:.1f} s" for k in ("load_s", "trace_s", "calibration_and_passes_s", "compile_s")]]),
            "", *_table(["pass", "seconds"], [[p, f"{s:.1f}"] for p, s in data["per_pass_s"].items()]),
            *_compile_paths(data)]


def budget_compile_section(name: str) -> list[str]:
    data = _load(name)
    phases = data["phases_s"] or {}
    check = data["precision"].get("check", {})
    return [f"{data['model']} `{data['pipeline']}` to the budget `{data['budget']}` "
            f"({data['precision'].get('budget', 'uniform steps')}), {data['calib_tokens']} calibration tokens, "
            f"{data['machine']}, {data['threads']} threads; from load to written artifact, against the "
            f"{data['target_s']} s target: **{'met' if data['met'] else 'missed'}**.", "",
            *_table(["load", "trace", "sensitivity", "plan search", "programs compiled and checked", "total"],
                    [[f"{data['load_s']:.0f} s", f"{data['trace_s']:.0f} s",
                      *[f"{phases[k]:.0f} s" if k in phases else "" for k in ("sensitivity", "search")],
                      f"{data['programs_compiled']}: {phases['compile_and_check']:.0f} s"
                      if "compile_and_check" in phases else "", f"{data['total_s']:.0f} s"]]),
            "", f"The program: top-1 {check.get('top1_agreement', float('nan')):.4f}, ppl ratio "
                f"{check.get('ppl_ratio', float('nan')):.5f} and energy ratio "
                f"{data['precision'].get('check_energy_ratio') or float('nan'):.3f} on the check text. The "
                "rest of the compile time (tracing the blocks, writing the artifact) is total minus the phases."]


def _compile_paths(data: dict) -> list[str]:
    """Block by block vs the whole model at once, where both were timed (same process, best of N)."""
    paths = data.get("calibration_and_passes_s_by_path")
    if not paths or len(paths) < 2:
        return []
    return ["", f"Calibration and passes by path (best of {data['repeats']}, alternating in one process, table "
                "caches cleared before each):", "",
            *_table(["path", "seconds"], [[path, f"{seconds:.1f}"] for path, seconds in paths.items()])]


def event_section(name: str) -> list[str]:
    data = _load(name)
    crossover = {k: "none inside the measured rates" if data.get(k) is None else f"{data[k]:.2%}"
                 for k in ("crossover_vs_unrolled", "crossover_vs_fused")}
    return [f"One {data['layer'][0]} -> {data['layer'][1]} synaptic layer over random ternary trains, T = {data['T']}, "
            f"{data['tokens']} tokens, {data['machine']}, {data['threads']} threads. Firing rate below which the event "
            f"backend is faster: vs dense unrolled {crossover['crossover_vs_unrolled']}, vs dense fused "
            f"{crossover['crossover_vs_fused']}.", "",
            *_table(["firing rate", "events", "SOPs", "event s", "dense fused s", "dense unrolled s", "event SOPs/s"],
                    [[r["rate"], r["events"], r["sops"], f"{r['event_s']:.4f}", f"{r['dense_fused_s']:.4f}",
                      f"{r['dense_unrolled_s']:.4f}", f"{r['event_sops_per_s']:.2e}"] for r in data["rows"]])]


def _op_name(op: str, width: int = 48) -> str:
    """An op or CUDA kernel name, cut to `width` characters (kernel names run to hundreds)."""
    return op if len(op) <= width else op[: width - 3] + "..."


def hot_paths_table(data: dict) -> list[str]:
    return _table(["runner", "self ms", "top ops (share of self time)"],
                  [[name, f"{runner['self_ms']:.0f}", ", ".join(f"`{_op_name(op['op'])}` {op['share']:.0%}"
                                                               for op in runner["top"][:5])]
                   for name, runner in data["runners"].items()])


def hot_paths_section(name: str) -> list[str]:
    data = _load(name)
    what = (f"one cached decoding step after {data['tokens']} tokens" if data.get("step")
            else f"one forward of {data['tokens']} tokens")
    return [f"torch.profiler, {data['model']} `{data['passes']}` T = {data['T']}, {what}, "
            f"{data['device']}; self time, profiler overhead included:", "", *hot_paths_table(data)]


ONNX_EXPORTS = ["onnx_export_smollm2-135m_las.json", "onnx_export_smollm2-135m_las_onnx.json",
                "onnx_export_smollm2-135m_none.json"]


def onnx_section(_: str) -> list[str]:
    """Export cost and onnxruntime's agreement with the reference executor, one column per export."""
    runs = [(name, _load(name)) for name in ONNX_EXPORTS if _load(name) is not None]
    fields = ["model", "pipeline", "T", "format", "tokens", "export_s", "file_mib", "nodes", "external_data",
              "peak_rss_gib_after_export", "checker_s", "ort_session_s", "ort_forward_s", "reference_fused_forward_s",
              "reference_exact_forward_s", "max_rel_error_vs_exact", "max_rel_error_vs_fused", "fused_vs_exact",
              "top1_agreement_vs_exact", "top1_agreement_vs_fused", "machine", "snncc"]
    lines = [line for name, _ in runs for line in provenance(name)]
    return [*lines, "", *_table(["field"] + [f"{data['pipeline']}, {data['format']}" for _, data in runs],
                                [[f"`{f}`"] + [f"{data.get(f):.3g}" if isinstance(data.get(f), float) else data.get(f)
                                               for _, data in runs] for f in fields])]


def scale_section(name: str) -> list[str]:
    """Per model: the compile's and the program's memory and time beside the ANN's."""
    data = _load(name)
    header = ["model", "parameters", "weights (file)", "calib tokens", "ANN load + calib forward", "compile",
              "compile / ANN", "compile peak RSS", "RSS / weights", "artifact", "artifact / weights",
              "ANN 128-token forward", "program forward", "ANN forward peak RSS", "program forward peak RSS"]
    rows = [[r["model"], f"{r['parameters'] / 1e9:.2f}B",
             f"{r['weights_gib']:.2f} GiB {r['dtype'].removeprefix('torch.')} ({r['checkpoint_gib']:.2f} GiB)",
             r["calib_tokens"], f"{r['ann_load_s'] + r['ann_calib_forward_s']:.1f} s", f"{r['compile_s']:.1f} s",
             f"{r['compile_per_ann']:.2f}x", f"{r['compile_peak_rss_gib']:.2f} GiB",
             f"{r['compile_rss_per_weights']:.2f}x", f"{r['artifact_gib']:.2f} GiB",
             f"{r['artifact_per_weights']:.3f}x", f"{r['ann_forward_s']:.2f} s",
             f"{r['program_forward_s']:.2f} s ({r['forward_per_ann']:.1f}x)", f"{r['ann_peak_rss_gib']:.2f} GiB",
             f"{r['program_peak_rss_gib']:.2f} GiB"] for r in data["rows"]]
    return [f"{data['machine']}; each figure from its own process (peak RSS from wait4). The shaped models "
            "are random weights in real models' shapes, bf16; smollm2-135m is the real model, whose quantized "
            "GGUF file loads as float32 (its weights are those float32 tensors). "
            "Compile: `snncc compile DIR --passes las -o out.snn --eval-tokens 0`; program: the artifact "
            "loaded and run once; ANN: transformers in the checkpoint's dtype.", "",
            *_table(header, rows), "", image("scale.png", "memory and time per model")]


def energy_frontier_section(name: str) -> list[str]:
    """The frontier table energy_frontier.py wrote beside its JSON, and its plot."""
    table = (RESULTS / name.replace(".json", ".md")).read_text().splitlines()
    return [*table, "", image(name.replace(".json", ".png"), "fidelity vs energy")]


def load_time_section(_: str) -> list[str]:
    files = sorted(path.name for path in RESULTS.glob("load_time_*.json"))
    if not files:
        return ["Not measured yet: `python benchmarks/load_time.py --artifact smollm2.snn --repeats 8` "
                "(after `snncc compile smollm2-135m -o smollm2.snn`)."]
    lines = []
    for name in files:
        data = _load(name)
        lines += [f"- data: {link(name)}", f"- command: `{data['command']}`", f"- measured: {measured_on(name)}", "",
                  *_table(["loader", "median s", "min s"],
                          [[loader, f"{data['median_s'][loader]:.3f}", f"{data['min_s'][loader]:.3f}"]
                           for loader in data["median_s"]]), ""]
    return lines


# ---------------------------------------------------------------- the document


@dataclass(frozen=True)
class Section:
    title: str
    file: str | None  # the result file it renders (None: several, named in the section)
    render: Callable[[str], list[str]]


SECTIONS = [
    Section("las on SmolLM2-135M vs T", "fidelity_vs_T_smollm2-135m_las.json", fidelity_section),
    Section("las with multi-range table neurons vs T",
            "fidelity_vs_T_smollm2-135m_las+nonlinear(ranges=6+headroom=1)+attention(ranges=6).json", fidelity_section),
    Section("las greedy continuations", "greedy_smollm2-135m_las.json", greedy_section),
    Section("las greedy continuations, budgeted", "greedy_smollm2-135m_las_budget.json", greedy_section),
    Section("Fidelity vs energy: uniform T, fas, budgets", "energy_frontier_smollm2-135m.json",
            energy_frontier_section),
    Section("Fidelity vs energy: MiniLM", "energy_frontier_minilm-l6.json", energy_frontier_section),
    Section("Per-neuron error", "neuron_error.json", neuron_error_section),
    Section("fas at T = 8: accuracy and energy", None, fas_frontier_section),
    *[Section(f"fas variants before fine-tuning ({name.removesuffix('.json')})", name, fas_variants_section)
      for name in FAS_VARIANTS],
    *[Section(f"fas fine-tuned ({name.removesuffix('.json')})", name, fas_run_section) for name in FAS_RUNS],
    *[Section(f"fas profile ({name.removesuffix('.json')})", name, profile_section)
      for name in ("profile_smollm2-135m_L16_mr0.5_fas_T8.json", "profile_smollm2-135m_L16_mr4_fas_T8.json",
                   "profile_smollm2-135m_L16_fas_T8.json", "profile_smollm2-135m_fas_T8.json")],
    Section("encode on SmolLM2-135M vs T", "fidelity_vs_T_smollm2-135m_encode.json", fidelity_section),
    Section("encode on MiniLM-L6 vs T", "fidelity_vs_T_minilm-l6_encode.json", fidelity_section),
    *[Section(f"encode on tiny-{m} vs T", f"fidelity_vs_T_tiny-{m}_encode.json", fidelity_section)
      for m in ("llama", "qwen2", "gpt2", "opt", "bert")],
    Section("Compile time", "compile_time_smollm2-135m_las.json", compile_section),
    Section("Compile time to the default budget", "compile_time_smollm2-135m_budget.json", budget_compile_section),
    Section("Executor speed (CPU)", "executor_speed_cpu.json", speed_section),
    Section("Compiled table neurons: lookup layouts (CPU)", "table_lookup_smollm2-135m.json", table_lookup_section),
    Section("Where the time goes (CPU)", "hot_paths_smollm2-135m_las_cpu.json", hot_paths_section),
    Section("Where a generation step's time goes (CPU)", "hot_paths_smollm2-135m_las_cpu_step.json",
            hot_paths_section),
    Section("GPU: speed, generation, kernel time", "executor_speed_cuda.json", gpu_section),
    Section("Peak memory", "executor_memory_fused.json", memory_section),
    Section("Generation", "generation_smollm2-135m_las.json", generation_section),
    Section("Event backend vs firing rate", "event_scaling.json", event_section),
    Section("ONNX export", None, onnx_section),
    Section("Artifact load time", None, load_time_section),
    Section("Scale: from 135M to 7B parameters", "scale.json", scale_section),
]


def anchor(title: str) -> str:
    """The anchor GitHub gives a heading (lower case, punctuation dropped, spaces as hyphens)."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def render(summaries: dict[str, str]) -> str:
    parts = ["# Benchmark results", "",
             "_Generated by `python benchmarks/run_all.py --render-only` from the JSON files in "
             "[results/](results/); do not edit by hand._", "",
             *[f"- [{s.title}](#{anchor(s.title)})" for s in SECTIONS], ""]
    for section in SECTIONS:
        parts += [f"## {section.title}", ""]
        if section.file is not None and _load(section.file) is None:
            parts += [f"Not measured yet: `{COMMANDS[section.file]}`.", ""]
            continue
        parts += [*(provenance(section.file) + [""] if section.file else []), *section.render(section.file or ""), ""]
    if summaries:
        parts += ["## Last run_all summary lines", "", f"- data: {link('summaries.json')}", "",
                  *[f"- `{name}`: {line.removeprefix('summary: ')}" for name, line in summaries.items()], ""]
    return "\n".join(parts).rstrip() + "\n"


def write_results(summaries: dict[str, str]) -> None:
    scratch = RESULTS_MD.with_suffix(".md.tmp")
    scratch.write_text(render(summaries))
    scratch.replace(RESULTS_MD)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(SUITE), help="run only these scripts")
    parser.add_argument("--render-only", action="store_true", help="rebuild RESULTS.md, run nothing")
    args = parser.parse_args()
    summaries_file = RESULTS / "summaries.json"
    summaries = json.loads(summaries_file.read_text()) if summaries_file.exists() else {}
    ran, failed = 0, []
    for name in [] if args.render_only else args.only or list(SUITE):
        try:
            summaries[name] = run(name)
            ran += 1
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            failed.append(name)
    summaries = {name: summaries[name] for name in SUITE if name in summaries}
    if ran:
        summaries_file.write_text(json.dumps(summaries, indent=1))
    write_results(summaries)
    print(f"{RESULTS_MD.relative_to(REPO)} rendered ({ran} scripts run" +
          (f"; failed: {', '.join(failed)})" if failed else ")"))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
