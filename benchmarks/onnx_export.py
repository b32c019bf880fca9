"""ONNX export of a compiled program: time, file size, peak memory, and how onnxruntime's
run of the file compares with the reference executor (error and speed), in one run.

    python benchmarks/onnx_export.py --model smollm2-135m --passes las --format onnx-snn
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import tempfile
import time
from pathlib import Path

import torch

import snncc
from snncc.backends.onnx import OnnxRuntimeExecutor, check_onnx, export_onnx
from snncc.calibration import HELDOUT_TEXT, read_text, token_chunks
from snncc.ir.ops import execution_mode
from snncc.numerics import max_relative_error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--passes", default="las")
    parser.add_argument("--format", default="onnx-snn", choices=["onnx", "onnx-snn"])
    parser.add_argument("--tokens", type=int, default=128, help="held-out tokens to compare on")
    parser.add_argument("--out", default=None, help="write the JSON here too")
    args = parser.parse_args()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)

    program = snncc.compile(args.model, passes=args.passes)
    ids = token_chunks(program.tokenizer, read_text(HELDOUT_TEXT), args.tokens, args.tokens)[0]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        report = export_onnx(program, path, args.format)
        peak_export_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        start = time.perf_counter()
        check_onnx(path)
        check_s = time.perf_counter() - start
        start = time.perf_counter()
        runtime = OnnxRuntimeExecutor(path)
        session_s = time.perf_counter() - start
        start = time.perf_counter()
        exported = runtime(ids)
        ort_s = time.perf_counter() - start
    start = time.perf_counter()
    fused = program(ids)
    fused_s = time.perf_counter() - start
    with torch.no_grad(), execution_mode("exact"):
        start = time.perf_counter()
        exact = program.graph_module(ids)
        exact_s = time.perf_counter() - start

    result = {
        "model": args.model, "pipeline": args.passes, "T": program.T, "format": args.format, "tokens": ids.shape[1],
        "export_s": round(report.seconds, 1), "file_mib": round(report.bytes / 2**20, 1), "nodes": report.nodes,
        "external_data": report.external_data is not None, "peak_rss_gib_after_export": round(peak_export_gib, 2),
        "checker_s": round(check_s, 2), "ort_session_s": round(session_s, 1), "ort_forward_s": round(ort_s, 2),
        "reference_fused_forward_s": round(fused_s, 2), "reference_exact_forward_s": round(exact_s, 2),
        "max_rel_error_vs_exact": max_relative_error(exported, exact),
        "max_rel_error_vs_fused": max_relative_error(exported, fused),
        "fused_vs_exact": max_relative_error(fused, exact),
        "top1_agreement_vs_exact": float((exported.argmax(-1) == exact.argmax(-1)).float().mean()),
        "top1_agreement_vs_fused": float((exported.argmax(-1) == fused.argmax(-1)).float().mean()),
        "machine": "2 CPU cores (torch and onnxruntime threads at their defaults)",
        "snncc": snncc.__version__,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{args.model} {args.passes} T={program.T} {args.format}: exported in {result['export_s']} s, "
          f"{result['file_mib']} MiB; onnxruntime vs reference (exact) max rel error "
          f"{result['max_rel_error_vs_exact']:.2e}, top-1 agreement {100 * result['top1_agreement_vs_exact']:.1f}%")


if __name__ == "__main__":
    main()
