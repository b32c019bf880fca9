"""An ONNX export as a folder a user can take away: the model and what its users need beside it.

    DIR/model.onnx            the model (snncc.backends.onnx)
    DIR/model.onnx.data       its weights, when they go to an external data file
    DIR/snncc_tokenizer.json  the program's tokenizer (a Hugging Face tokenizer adds its own
                              files: tokenizer.json, tokenizer_config.json, ...), where snncc's ONNX
                              frontend (snncc.onnx_import) and transformers read it
    DIR/model.snncc.json      metadata: snncc version, model, pipeline, T, coverage, format,
                              opsets, inputs and outputs, the verification and its tolerance, date
    DIR/README.md             what the files are and how to run them

Everything is written to a scratch folder inside DIR first, the model checked (onnx.checker)
and run there (onnxruntime against the reference executor), and only then moved in, the model
last (snncc.atomic.commit_together): an export that fails leaves DIR as it was, and nothing is
written outside DIR. A verification outside its tolerance still moves the bundle in, its
metadata saying so (as optimum-cli keeps the model it could not validate). Other files in DIR
stay as they are, and so does a README.md that snncc did not write.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from snncc.atomic import commit_together, scratch_dir
from snncc.backends.onnx import ATOL, INPUT_NAME, RTOL, ExportReport, check_onnx, export_onnx, verify_onnx
from snncc.errors import ExportError
from snncc.models import CAUSAL_LM
from snncc.numerics import Comparison
from snncc.version import __version__

README = "README.md"
README_MARK = "<!-- written by snncc export; the next export into this folder rewrites it -->"


def metadata_name(path: Path) -> str:
    """The metadata file of model `path`: model.onnx -> model.snncc.json."""
    return f"{path.stem}.snncc.json"


@dataclass
class Bundle:
    """What export_bundle wrote (`files`, the model last) and how its check went."""

    report: ExportReport
    files: list[Path]
    metadata: dict
    verification: Comparison | None  # None: not run
    readme_kept: Path | None  # a README.md snncc did not write, left as it was


def export_bundle(program, path: str | Path, fmt: str = "onnx", external_data: bool | None = None,
                  input_ids: torch.Tensor | None = None, atol: float = ATOL, rtol: float = RTOL,
                  progress: bool | None = None) -> Bundle:
    """Export `program` to ONNX at `path` with its tokenizer, metadata and README beside it (the
    module docstring); with input_ids, verify the file on them within atol + rtol |reference|.
    `progress` (snncc.progress; None: on a terminal) shows each step on stderr."""
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    with scratch_dir(path) as scratch:
        (scratch / "model").mkdir()  # each part in its own folder: no name of the user's can clash there
        report = export_onnx(program, scratch / "model" / path.name, fmt, external_data, progress)
        check_onnx(report.path, progress)
        verification = None if input_ids is None else verify_onnx(program, report.path, input_ids, atol, rtol,
                                                                  progress)
        tokenizer = scratch / "tokenizer"
        tokenizer.mkdir()
        program.tokenizer.save(tokenizer)
        sidecars = {file.name: file for file in sorted(tokenizer.iterdir()) if file.is_file()}
        meta = metadata(program, path, report, fmt, verification, input_ids)
        sidecars[metadata_name(path)] = scratch / metadata_name(path)
        sidecars[metadata_name(path)].write_text(json.dumps(meta, indent=1) + "\n")
        readme_kept = None if _ours(folder / README) else folder / README
        if readme_kept is None:
            sidecars[README] = scratch / README
            sidecars[README].write_text(readme(meta))
        model_files = [report.external_data, report.path] if report.external_data else [report.path]
        _check_names(folder, list(sidecars), [file.name for file in model_files])
        moves = [(file, folder / name) for name, file in sidecars.items()]
        moves += [(file, folder / file.name) for file in model_files]
        commit_together(moves)
    final = ExportReport(path, folder / report.external_data.name if report.external_data else None,
                         report.bytes, report.seconds, report.nodes, report.inputs, report.outputs, report.opsets)
    return Bundle(final, [target for _, target in moves], meta, verification, readme_kept)


def _ours(readme: Path) -> bool:
    """Whether export may write `readme`: it is not there, or snncc wrote it (a link, or a file
    without snncc's mark, is the user's)."""
    if not (readme.exists() or readme.is_symlink()):
        return True
    if readme.is_symlink() or not readme.is_file():
        return False
    with readme.open("rb") as handle:
        return handle.read(len(README_MARK)) == README_MARK.encode()


def _check_names(folder: Path, sidecars: list[str], model_files: list[str]) -> None:
    """Refuse a model named as one of its side files, and a side file whose place is taken by a
    folder (nothing has moved yet)."""
    clash = sorted(set(sidecars) & set(model_files))
    if clash:
        raise ExportError(f"the model file '{clash[0]}' would be overwritten by the bundle's file of that name: "
                          "give the model another name, such as model.onnx")
    for name in sidecars + model_files:
        target = folder / name
        if target.is_dir() and not target.is_symlink():
            raise ExportError(f"'{target}' is a folder where the export writes a file: move it or export elsewhere")


def metadata(program, path: Path, report: ExportReport, fmt: str, verification: Comparison | None,
             input_ids: torch.Tensor | None) -> dict:
    """The bundle's metadata (JSON-able): what the model is, how to call it, how it was checked."""
    info = program.info
    causal = info.task == CAUSAL_LM
    meaning = {INPUT_NAME: f"token ids (the tokenizer beside the model), batch x seq, seq <= {info.max_positions}",
               "logits": "next-token logits at every position (softmax over the last axis for probabilities)",
               "last_hidden_state": "the encoder's hidden state at every position"}
    return {
        "snncc_version": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": info.model, "task": info.task, "pipeline": info.pipeline, "T": info.T,
        "coverage": None if info.coverage.get("coverage") is None else float(info.coverage["coverage"]),
        "format": fmt, "opsets": report.opsets,
        "files": {"model": path.name, "external_data": report.external_data.name if report.external_data else None,
                  "metadata": metadata_name(path)},
        "inputs": [{**value, "meaning": meaning.get(value["name"], "")} for value in report.inputs],
        "outputs": [{**value, "meaning": meaning.get(value["name"], "")} for value in report.outputs],
        "max_positions": info.max_positions,
        "generation": info.generation if causal else {},
        "verification": None if verification is None else {
            "runtime": _onnxruntime(), "reference": "snncc's reference executor, exact mode (float64 membranes)",
            "tokens": int(input_ids.shape[-1]), "text": "snncc's packaged held-out text",
            "check": "fails where |onnxruntime - reference| > atol + rtol |reference|",
            **verification.to_dict()},
    }


def _onnxruntime() -> str:
    import onnxruntime

    return f"onnxruntime {onnxruntime.__version__} (CPUExecutionProvider)"


def _number(value: float | None) -> str:
    return "NaN" if value is None else f"{value:.2e}"


def readme(meta: dict) -> str:
    """A short README for the bundle's folder."""
    model, output = meta["files"]["model"], meta["outputs"][0]["name"] if meta["outputs"] else "output"
    data = f"\n- `{meta['files']['external_data']}`: its weights (keep it beside the model)" \
        if meta["files"]["external_data"] else ""
    check = meta["verification"]
    checked = "not run at export" if check is None else (
        f"{'passed' if check['passed'] else 'FAILED'}: onnxruntime against snncc's reference executor on "
        f"{check['tokens']} held-out tokens, max abs error {_number(check['max_abs_error'])}, tolerance atol "
        f"{check['atol']:g} + rtol {check['rtol']:g} x |reference|")
    return f"""{README_MARK}
# {meta['model']}: spiking program ({meta['pipeline']}, T = {meta['T']}) as ONNX

Exported by snncc {meta['snncc_version']} on {meta['date']}, format `{meta['format']}`.

- `{model}`: the model: `{INPUT_NAME}` (int64, batch x seq) -> `{output}`{data}
- `snncc_tokenizer.json` and any tokenizer files: the tokenizer
- `{meta['files']['metadata']}`: machine-readable metadata (pipeline, T, coverage, opsets, inputs and
  outputs, verification)

Verification: {checked}.

Run it with onnxruntime:

```python
import numpy as np, onnxruntime as ort
session = ort.InferenceSession("{model}")
(out,) = session.run(None, {{"{INPUT_NAME}": np.array([[1, 2, 3]], dtype=np.int64)}})
```

or read it back with snncc (the tokenizer beside it is found): `snncc inspect {model}`,
`snncc compile {model} -o program.snn`.
"""
