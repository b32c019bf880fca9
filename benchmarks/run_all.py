"""Run the benchmark suite and refresh the README's results section (tables and plots).

    python benchmarks/run_all.py                       # every script below (about an hour on 2 cores)
    python benchmarks/run_all.py --only executor_speed generation
    python benchmarks/run_all.py --render-only         # rebuild the section from the JSON on disk

Each script runs in its own process with the arguments listed in SUITE, prints JSON and a
`summary:` line, and writes its JSON to benchmarks/results. The README section between the
`benchmarks:begin` / `benchmarks:end` markers is then rebuilt from those files alone: figures
are ratios measured within one run, absolute times name the machine they came from.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE.parent / "README.md"
BEGIN, END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"

SUITE = {
    "compile_time": ["--model", "smollm2-135m", "--passes", "las"],
    "executor_speed": ["--model", "smollm2-135m", "--passes", "encode", "las", "-T", "16", "8",
                       "--tokens", "128", "512"],
    "executor_memory": ["--passes", "encode", "las", "--lengths", "128", "512", "1024", "--T", "8", "16", "32"],
    "generation": ["--model", "smollm2-135m", "--passes", "las"],
    "event_scaling": ["--rates", "0.001", "0.003", "0.01", "0.05", "0.2", "0.5"],
    "hot_paths": ["--model", "smollm2-135m", "--passes", "las", "-T", "16", "--tokens", "128"],
    "fidelity_vs_T": ["--passes", "las", "--T", "8", "12", "14", "16", "24", "32"],
}


def run(name: str) -> str:
    """Run one benchmark script, echoing its output; returns its summary line."""
    command = [sys.executable, str(HERE / f"{name}.py"), *SUITE[name]]
    print(f"== {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=HERE.parent)
    summary = ""
    for line in process.stdout:
        print(line, end="", flush=True)
        summary = line.strip() if line.startswith("summary:") else summary
    if process.wait() != 0:
        raise RuntimeError(f"benchmarks/{name}.py failed with exit code {process.returncode}")
    return f"{summary} [{time.perf_counter() - start:.0f} s]"


def _load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
           ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


def _bar_plot(path: Path, labels: list[str], values: list[float], xlabel: str, title: str) -> None:
    fig, ax = _pyplot().subplots(figsize=(7, 0.45 * len(labels) + 1.2))
    ax.barh(labels[::-1], values[::-1], color="tab:blue")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    _save(fig, path)


def speed_section(data: dict) -> list[str]:
    rows = data["rows"]
    labels = [f"{r['runner']}" + (f" T={r['T']}" if r["T"] else "") + f", {r['tokens']} tok" for r in rows]
    _bar_plot(RESULTS / "executor_speed_cpu.png", labels, [r["x_ann"] for r in rows],
              "wall time / the ANN's at the same length (log)", f"{data['model']} forward, reference executor")
    return [f"One {data['model']} forward on {data['machine']} ({data['threads']} threads), best of 3, the ANN and "
            "every program side by side at each length (`benchmarks/executor_speed.py`; targets: fused <= 2x "
            "the ANN, unrolled <= 1.2 x T x the ANN):", "",
            *_table(["runner", "tokens", "T", "seconds", "x ANN", "x ANN / T"],
                    [[r["runner"], r["tokens"], r["T"] or "", f"{r['seconds']:.3f}", f"{r['x_ann']:.2f}",
                      f"{r['x_ann'] / r['T']:.2f}" if r["T"] else ""] for r in rows]),
            "", "![executor speed](benchmarks/results/executor_speed_cpu.png)"]


def gpu_section(speed: dict) -> list[str]:
    """The device run (benchmarks/gpu_check.sh): executor speed, generation and hot paths on CUDA."""
    lines = [f"On the GPU (`bash benchmarks/gpu_check.sh` on the device machine, {speed['machine']}; a "
             f"{speed['model']} Llama with random weights, since the weights cannot travel there):", "",
             *_table(["runner", "tokens", "T", "seconds", "x ANN", "x ANN / T"],
                     [[r["runner"], r["tokens"], r["T"] or "", f"{r['seconds']:.4f}", f"{r['x_ann']:.2f}",
                       f"{r['x_ann'] / r['T']:.2f}" if r["T"] else ""] for r in speed["rows"]])]
    generation = _load(f"generation_{speed['model']}_las_cuda.json")
    if generation is not None:
        rates = ", ".join(f"{r['runner']} {r['tokens_per_s']:.1f} tokens/s" for r in generation["rows"])
        snn = _runner(generation, "SNN fused cached")["x_ann_cached_speed"]
        lines += ["", f"Generation there ({generation['new_tokens']} new tokens, `las` T = {generation['T']}): "
                  f"{rates}; SNN/ANN tokens/s with the cache: {snn:.2f}."]
    hot = _load(f"hot_paths_{speed['model']}_las_cuda.json")
    if hot is not None:
        lines += ["", "Kernel time (torch.profiler, device self time) of one forward there: " + ", ".join(
            f"{name} {runner['self_ms']:.0f} ms" for name, runner in hot["runners"].items())
            + ": the rest of the wall time above is the host launching small kernels."]
    return lines


def _runner(data: dict, name: str) -> dict:
    return next(r for r in data["rows"] if r["runner"] == name)


def memory_section(data: dict) -> list[str]:
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
    return [f"Peak memory of one forward (`benchmarks/executor_memory.py`: SmolLM2-shaped Llama, {data['layers']} "
            "blocks, random weights, fresh process per cell, fused mode; target <= 3x the ANN):", "",
            *_table(["program"] + [f"{n} tokens" for n in lengths], body),
            "", "![executor memory](benchmarks/results/executor_memory_fused.png)"]


def generation_section(data: dict) -> list[str]:
    rows = data["rows"]
    _bar_plot(RESULTS / "generation_smollm2-135m_las.png", [r["runner"] for r in rows],
              [r["tokens_per_s"] for r in rows], "tokens/s (log)",
              f"greedy generation, {data['model']} {data['passes']} T = {data['T']}")
    return [f"Greedy generation (`benchmarks/generation.py`): {data['new_tokens']} new tokens after a "
            f"{data['prompt_tokens']}-token held-out prompt, {data['model']} `{data['passes']}` T = {data['T']}, "
            f"on {data['machine']}; cached and uncached runs give the same tokens: "
            f"{all(data['cached_equals_uncached'].values())}:", "",
            *_table(["runner", "seconds", "tokens/s", "x ANN cached", "same tokens as the ANN"],
                    [[r["runner"], f"{r['seconds']:.2f}", f"{r['tokens_per_s']:.2f}",
                      f"{r['x_ann_cached_speed']:.3f}", r["tokens_equal_ann"]] for r in rows]),
            "", "![generation](benchmarks/results/generation_smollm2-135m_las.png)"]


def compile_section(data: dict) -> list[str]:
    passes = ", ".join(f"{name} {s:.1f} s" for name, s in data["per_pass_s"].items())
    return [f"Compile time (`benchmarks/compile_time.py`), {data['model']} `{data['pipeline']}` T = {data['T']} on "
            f"{data['machine']}: {data['compile_s']:.1f} s after a {data['load_s']:.1f} s load (trace "
            f"{data['trace_s']:.1f} s; calibration on {data['calib_tokens']} tokens and passes "
            f"{data['calibration_and_passes_s']:.1f} s: {passes})."]


def event_section(data: dict) -> list[str]:
    crossover = data.get("crossover_vs_unrolled")
    return [f"Event backend (`benchmarks/event_scaling.py`, one {data['layer'][0]} -> {data['layer'][1]} layer, "
            f"T = {data['T']}, {data['tokens']} tokens, {data['machine']}): beats the dense unrolled executor below "
            f"a firing rate of {crossover if crossover is None else f'{crossover:.2%}'}.", "",
            *_table(["firing rate", "events", "event s", "dense fused s", "dense unrolled s", "SOPs/s"],
                    [[r["rate"], r["events"], f"{r['event_s']:.4f}", f"{r['dense_fused_s']:.4f}",
                      f"{r['dense_unrolled_s']:.4f}", f"{r['event_sops_per_s']:.2e}"] for r in data["rows"]])]


def hot_paths_section(data: dict) -> list[str]:
    rows = [[name, f"{runner['self_ms']:.0f}",
             ", ".join(f"{op['op']} {op['share']:.0%}" for op in runner["top"][:5])]
            for name, runner in data["runners"].items()]
    return [f"Where the time goes (`benchmarks/hot_paths.py`, torch.profiler, {data['model']} `{data['passes']}` "
            f"T = {data['T']}, {data['tokens']} tokens; self CPU time, profiler overhead included):", "",
            *_table(["runner", "self ms", "top ops (share of self time)"], rows)]


def fidelity_section(data: dict) -> list[str]:
    return [f"Fidelity vs T (`benchmarks/fidelity_vs_T.py`, SmolLM2 `las`, held-out tokens, {data['machine']}):", "",
            *_table(["T", "tokens", "ppl ratio", "top-1", "mean abs logit err", "energy SNN/ANN"],
                    [[r["T"], r["tokens"], f"{r['ppl_ratio']:.6f}", f"{r['top1_agreement']:.4f}",
                      f"{r['mean_abs_logit_err']:.4f}", f"{r['energy_ratio']:.3f}"] for r in data["rows"]]),
            "", "![fidelity](benchmarks/results/fidelity_vs_T_smollm2-135m_las.png)"]


# README order: (result file, the script that writes it, its section)
SECTIONS = [
    ("compile_time_smollm2-135m_las.json", "compile_time", compile_section),
    ("executor_speed_cpu.json", "executor_speed", speed_section),
    ("hot_paths_smollm2-135m_las_cpu.json", "hot_paths", hot_paths_section),
    ("executor_speed_cuda.json", "gpu_check.sh (device machine)", gpu_section),
    ("executor_memory_fused.json", "executor_memory", memory_section),
    ("generation_smollm2-135m_las.json", "generation", generation_section),
    ("event_scaling.json", "event_scaling", event_section),
    ("fidelity_vs_T_smollm2-135m_las.json", "fidelity_vs_T", fidelity_section),
]


def render(summaries: dict[str, str]) -> str:
    parts = [BEGIN, "_Rebuilt by `python benchmarks/run_all.py` from benchmarks/results/*.json._", ""]
    if summaries:
        parts += ["Each script's last summary line (and its wall time):", "",
                  *[f"- `{name}`: {line.removeprefix('summary: ')}" for name, line in summaries.items()], ""]
    for file, script, section in SECTIONS:
        data = _load(file)
        parts += [*(section(data) if data is not None else
                    [f"`{script}`: not measured yet (run `python benchmarks/run_all.py --only {script}`)."]), ""]
    return "\n".join(parts).rstrip() + "\n" + END


def refresh_readme(summaries: dict[str, str]) -> None:
    text = README.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"README.md has no {BEGIN} ... {END} section to refresh")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    scratch = README.with_suffix(".md.tmp")
    scratch.write_text(head + render(summaries) + tail)
    scratch.replace(README)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(SUITE), help="run only these scripts")
    parser.add_argument("--render-only", action="store_true", help="rebuild the README section, run nothing")
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
    summaries_file.write_text(json.dumps({name: summaries[name] for name in SUITE if name in summaries}, indent=1))
    refresh_readme({name: summaries[name] for name in SUITE if name in summaries})
    print(f"README.md refreshed ({ran} scripts run" + (f"; failed: {', '.join(failed)})" if failed else ")"))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
