"""Wall time of `snncc.load` on an artifact, optionally beside an older loader in the same process.

    python benchmarks/load_time.py --artifact smollm2.snn --repeats 8
    python benchmarks/load_time.py --artifact smollm2.snn --repeats 8 --baseline ee8e39a
    python benchmarks/load_time.py --artifact smollm2.snn --repeats 8 --baseline 3c56035 --baseline-format-1

--baseline REF loads snncc/artifact.py as it was at git commit REF (against today's other
modules) and alternates the two loaders, so both see the same machine load: this VM's speed
drifts between runs, so only ratios measured together compare. Prints JSON (also written to
benchmarks/results/load_time_NAME.json, with the command and date) and a one-line summary.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from snncc.artifact import load_program


def loader_at(ref: str) -> Callable[[Path], object]:
    """`load_program` of snncc/artifact.py at git commit `ref`."""
    source = subprocess.run(["git", "show", f"{ref}:snncc/artifact.py"], capture_output=True, text=True, check=True)
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as file:
        file.write(source.stdout)
    spec = importlib.util.spec_from_file_location(f"artifact_at_{ref}", file.name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load_program


def format_1_copy(artifact: Path, folder: Path) -> Path:
    """The artifact as format 1 wrote it: every shard's tensors in one weights.safetensors
    member, the aliases at the manifest's top level, no weight dtype in the program info."""
    import hashlib
    import zipfile

    import safetensors.torch

    with zipfile.ZipFile(artifact) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    manifest = json.loads(members.pop("manifest.json"))
    weights = manifest.pop("weights")
    tensors = {}
    for name in [n for n in members if n.startswith("weights/")]:
        tensors.update(safetensors.torch.load(members.pop(name)))
    members["weights.safetensors"] = safetensors.torch.save(tensors)
    manifest.update(format_version=1, aliases=weights["aliases"])
    manifest["info"].pop("dtype", None)
    manifest["sha256"] = {name: hashlib.sha256(data).hexdigest() for name, data in members.items()}
    path = folder / artifact.name
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        archive.writestr("manifest.json", json.dumps(manifest))
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def timed(load: Callable[[Path], object], path: Path) -> float:
    start = time.perf_counter()
    load(path)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, required=True, help="an .snn file (e.g. from snncc compile -o)")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--baseline", default=None, help="git commit whose artifact loader to time alongside")
    parser.add_argument("--baseline-format-1", action="store_true",
                        help="give the baseline loader a format-1 copy of the artifact (one weights.safetensors "
                             "member), for a loader from before format 2")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    loaders = {"current": load_program}
    paths = {"current": args.artifact}
    scratch = tempfile.TemporaryDirectory()
    if args.baseline:
        loaders[args.baseline] = loader_at(args.baseline)
        paths[args.baseline] = format_1_copy(args.artifact, Path(scratch.name)) if args.baseline_format_1 \
            else args.artifact
    for name, load in loaders.items():  # warm-up: imports, first-use caches
        load(paths[name])
    times: dict[str, list[float]] = {name: [] for name in loaders}
    for repeat in range(args.repeats):
        order = list(loaders) if repeat % 2 == 0 else list(reversed(loaders))
        for name in order:
            times[name].append(timed(loaders[name], paths[name]))
    scratch.cleanup()
    result = {"artifact": str(args.artifact), "bytes": args.artifact.stat().st_size,
              "median_s": {name: statistics.median(t) for name, t in times.items()},
              "min_s": {name: min(t) for name, t in times.items()}, "times_s": times,
              "command": "python " + " ".join(sys.argv), "date": datetime.date.today().isoformat()}
    print(json.dumps(result))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"load_time_{args.artifact.stem}.json").write_text(json.dumps(result, indent=1))
    summary = ", ".join(f"{name} median {result['median_s'][name]:.2f} s (min {result['min_s'][name]:.2f})"
                        for name in loaders)
    print(f"summary: snncc.load {args.artifact.name} ({result['bytes'] / 2**20:.0f} MiB), {args.repeats} loads "
          f"each: {summary}")


if __name__ == "__main__":
    main()
