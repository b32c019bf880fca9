"""The `snncc` command line: a thin layer over snncc.api that renders results.

Anything that goes wrong is one line on stderr, `snncc: error: ...` (`-v`: with the traceback
of an unexpected error before it), and an exit code that says whose move it is:

  0    done
  1    the work failed: the model or artifact could not be loaded, a pass or an export failed,
       an optional package is missing (checked before any model is loaded where the options
       tell), or an unexpected error (shown as `snncc: error: <ExceptionType>: <message>`)
  2    the command line is wrong: click's usage errors, and snncc's checks of option values,
       input files, prompts, devices and output paths, all made before any model is loaded
  130  interrupted (Ctrl-C)

A reader that leaves early (`snncc inspect MODEL | head`) ends the command quietly with 1.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
import tempfile
import traceback
from collections.abc import Iterator
from pathlib import Path

import click

from snncc.errors import InputError, SnnccError, first_line, require
from snncc.numerics import EXPORT_TOLERANCES
from snncc.pipeline import DEFAULT_PIPELINE, DEFAULT_T, PIPELINE_OPTIONS, STANDARD_T, Pipeline, check_T_given_once
from snncc.profile import ENERGY_TABLES, MEMORY_SOURCE

HELDOUT_HELP = "held-out text (default: snncc's packaged heldout.txt, never used for calibration)"
EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
_verbose = 0  # the group's -v count, for showing tracebacks of unexpected errors


class ArgumentError(InputError):
    """An argument refused by the checks made before any work starts: exit 2, like click's
    usage errors, because the command line itself must change."""


@contextlib.contextmanager
def _arguments() -> Iterator[None]:
    """Mark the checks of a command's arguments: what they refuse exits with EXIT_USAGE."""
    try:
        yield
    except ArgumentError:
        raise
    except SnnccError as exc:
        raise ArgumentError(str(exc)) from exc


def _error(message: str, code: int) -> None:
    """Print one `snncc: error:` line, whatever line breaks a library put into `message`, and exit."""
    click.echo(f"snncc: error: {' '.join(message.split())}", err=True)
    sys.exit(code)


def _unexpected(exc: BaseException) -> None:
    """An exception snncc did not anticipate: its type and first line; -v adds the traceback."""
    if _verbose:
        traceback.print_exception(exc, file=sys.stderr)
    detail = f": {first_line(exc)}" if str(exc).strip() else ""
    _error(f"{type(exc).__name__}{detail}", EXIT_FAILED)


def _fail_cleanly(fn):
    """Every exception a command raises becomes one line and an exit code (module docstring)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise  # click's own: _Group.main reports them
        except KeyboardInterrupt:
            click.echo("snncc: interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except ArgumentError as exc:
            _error(str(exc), EXIT_USAGE)
        except SnnccError as exc:
            _error(str(exc), EXIT_FAILED)
        except BrokenPipeError:  # `snncc inspect m | head`: the reader left; say nothing
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(EXIT_FAILED)
        except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
            _unexpected(exc)

    return wrapper


def _in_order(*options):
    """Options that --help lists in the order given (decorators apply from the bottom up)."""
    def apply(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return apply


_model_options = _in_order(
    click.option("--passes", "-p", default=DEFAULT_PIPELINE, show_default=True,
                 help="pipeline name (las, fas, none) or comma list of passes, e.g. 'fold,encode{T=8}'; "
                      "'fas,qcfs{steps=250}' sets options of a pipeline's pass"),
    click.option("-T", "T", type=int, default=None,
                 help="time steps per spike train, the same at every site [default: plain las gets the default "
                      "budget (per-channel digits, at most 16; docs/precision.md) where the model allows one, else "
                      "the pipeline's measured default, " + ", ".join(f"{k} {v}" for k, v in DEFAULT_T.items())
                      + f"; else {STANDARD_T}]; a pass's own T= in --passes cannot also be given"),
    click.option("--calib", type=click.Path(dir_okay=False), default=None,
                 help="calibration text file (default: snncc's packaged dev text)"),
    click.option("--calib-tokens", type=int, default=8192, show_default=True,
                 help="tokens of calibration text to record"),
    click.option("--device", default="cpu", show_default=True, help="cpu or cuda (cuda:N)"))

_placement_options = _in_order(
    click.option("--device-map", default=None, metavar="MAP",
                 help="run the program's stages where accelerate places them: auto, balanced, balanced_low_0, "
                      "sequential, or a JSON file mapping stages (stages.0 the prologue, stages.1 block 0, ...; "
                      "'' all) to cpu, disk or a GPU index"),
    click.option("--max-memory", default=None, metavar="BUDGET",
                 help="with --device-map: memory per device, e.g. cpu=2GiB,0=20GiB; what does not fit goes "
                      "to the disk"),
    click.option("--offload-folder", type=click.Path(file_okay=False), default=None,
                 help="with --device-map: where stages placed on the disk keep their tensors"))

_json_option = click.option("--json", "as_json", is_flag=True,
                            help="print the result as one JSON object on stdout (progress and notes go to stderr)")

ARTIFACT, ONNX, MODEL = "artifact", "onnx", "model"


def _source_kind(source: str) -> str:
    """What a MODEL_OR_ARTIFACT argument names, for every command alike: an .snn artifact (or
    any zip file: what artifacts are), an .onnx model, or a model (a builtin name, a model
    directory or a Hugging Face id; snncc.models.load_model tells those apart)."""
    path = Path(source)
    if source.endswith(".snn"):
        return ARTIFACT
    if source.endswith(".onnx"):
        return ONNX
    if path.is_file():
        import zipfile

        if zipfile.is_zipfile(path):
            return ARTIFACT
        raise InputError(f"'{source}' is a file but neither an .snn artifact nor an .onnx model: give one of those, "
                         "a model directory, a builtin model name or a Hugging Face id")
    return MODEL


def _dtype_option(fn):
    return click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
                        show_default=True,
                        help="what the program stores its weights in (it computes in float32); auto: the dtype "
                             "of the model's checkpoint")(fn)


def _dtype(choice: str) -> str | None:
    return None if choice == "auto" else choice


def _progress() -> bool:
    """Progress on stderr where it is a terminal (snncc.progress): the library's own default."""
    from snncc.progress import enabled

    return enabled(None)


# --- checks made before any work --------------------------------------------------------------


def _check_model_options(passes: str, T: int | None, calib: str | None, calib_tokens: int,
                         device: str = "cpu") -> Pipeline:
    """The pipeline spec, calibration text and device of _model_options, checked in seconds;
    the spec parsed (once: the API takes the Pipeline)."""
    pipeline = Pipeline.parse(passes, T)
    check_T_given_once(pipeline, T if _given("T") else None)
    _check_at_least("--calib-tokens", calib_tokens, 2)
    if calib:
        _check_text_file(calib, calib_tokens)
    _check_device(device)
    return pipeline


def _check_at_least(option: str, value: int, least: int, zero_ok: bool = False) -> None:
    if value < least and not (zero_ok and value == 0):
        allowed = f"0 or at least {least}" if zero_ok else f"at least {least}"
        raise InputError(f"{option} must be {allowed}, got {value}")


def _check_text_file(path: str, max_tokens: int) -> None:
    """Refuse a missing, empty or non-UTF-8 text file now rather than after loading a model."""
    from snncc.calibration import read_text

    read_text(path, max_tokens)


def _check_device(device: str) -> None:
    """A device torch knows and this machine has: cuda without CUDA fails here, not after loading."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise InputError(f"--device '{device}' is not a device: give cpu, cuda or cuda:N") from None
    if parsed.type == "cpu":
        return
    if parsed.type != "cuda":
        raise InputError(f"--device '{device}': snncc runs programs on cpu or cuda, not {parsed.type}")
    if not torch.cuda.is_available():
        raise InputError(f"--device '{device}': CUDA is not available on this machine; use --device cpu")
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise InputError(f"--device '{device}': this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")


def _check_placement(device_map: str | None, max_memory: str | None, offload_folder: str | None,
                     device: str = "cpu", backend: str = "reference") -> dict:
    """The _placement_options, parsed and checked before any model loads: the keyword
    arguments that place a program (snncc.load, SpikingProgram.place), empty without a map."""
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise InputError("--max-memory and --offload-folder go with --device-map: give it too")
        return {}
    import torch

    if torch.device(device).type != "cpu":  # (checked by _check_device already)
        raise InputError(f"give --device ('{device}') or --device-map, not both: the map says where each stage runs")
    if backend != "reference":
        raise InputError(f"--device-map places the reference backend, not the {backend} backend: "
                         "use --backend reference")
    from snncc.backends.placed import parse_device_map, parse_max_memory

    placement = parse_device_map(device_map)
    if isinstance(placement, dict) and "disk" in placement.values() and offload_folder is None:
        raise InputError(f"--device-map '{device_map}' puts stages on the disk: give --offload-folder DIR too")
    if offload_folder is not None:
        _check_output_path(offload_folder, "--offload-folder", directory=True)
    return {"device_map": placement, "max_memory": parse_max_memory(max_memory) if max_memory is not None else None,
            "offload_folder": offload_folder}


def _check_prompt(prompt: str) -> None:
    """Refuse a prompt that is not UTF-8: click hands undecodable bytes over as surrogates,
    which no tokenizer can encode."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(prompt[exc.start])
        byte = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"character U+{code:04X}"
        raise InputError(f"--prompt is not valid UTF-8 ({byte} at position {exc.start}): give UTF-8 text") from None


def _check_artifact(artifact: str) -> None:
    path = Path(artifact)
    if not path.exists():
        raise InputError(f"artifact '{artifact}' does not exist: create it with `snncc compile MODEL -o {artifact}`")
    if not path.is_file():
        raise InputError(f"artifact '{artifact}' is not a file")


_PSEUDO_FILESYSTEMS = (Path("/proc"), Path("/sys"), Path("/dev"))


def _check_output_path(output: str, option: str = "-o", directory: bool = False) -> Path:
    """Refuse an output that cannot be written, before the long work that produces it: a
    directory (or a file, for a folder output), a device or pseudo-file, a parent that is not a
    directory or not writable. A real probe file is created (and removed) where the output will
    go: permissions, read-only mounts and full quotas all show there, even for root."""
    path = Path(output)
    kind = "folder" if directory else "file"
    if not output or (output.endswith(("/", os.sep)) and not directory):
        raise InputError(f"{option} '{output}' is not a file name: give one such as out.snn")
    resolved = path.resolve()
    for pseudo in _PSEUDO_FILESYSTEMS:
        if resolved == pseudo or pseudo in resolved.parents:
            raise InputError(f"{option} '{output}' is under {pseudo}: give a {kind} on a real filesystem")
    if path.exists() and directory and not path.is_dir():
        raise InputError(f"{option} '{output}' exists and is not a folder")
    if path.exists() and not directory and not path.is_file():
        what = "a directory: give a file name such as out.snn" if path.is_dir() else "not a regular file"
        raise InputError(f"{option} '{output}' is {what}")
    folder = resolved if directory and path.is_dir() else _existing_ancestor(resolved.parent)
    if not folder.is_dir():
        raise InputError(f"cannot write {option} '{output}': '{folder}' is not a directory")
    _probe(folder, option, output)
    return path


def _existing_ancestor(path: Path) -> Path:
    """`path` or its nearest existing ancestor: the folder that a write would create folders in."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _probe(folder: Path, option: str, output: str) -> None:
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {option} '{output}': no permission to write in '{folder}'")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".snncc-probe-"):
            pass
    except OSError as exc:
        raise InputError(f"cannot write {option} '{output}' in '{folder}': {exc.strerror or exc}") from None


def _prepare(model, calib, calib_tokens):
    """Load, trace and set up calibration (slow): call it after the checks."""
    from snncc.api import prepare

    return prepare(model, calib, calib_tokens, progress=_progress())


def _eval_chunks(tokenizer, text_path, max_tokens, seq_len, max_positions):
    from snncc.calibration import HELDOUT_TEXT, read_text, token_chunks

    text = read_text(text_path or HELDOUT_TEXT, max_tokens)
    return token_chunks(tokenizer, text, min(seq_len, max_positions), max_tokens)


def _usage_error(exc: click.UsageError) -> None:
    """A usage error on one line, then click's hint where to read the command's help."""
    click.echo(f"snncc: error: {' '.join(exc.format_message().split())}", err=True)
    if exc.ctx is not None:
        names, ctx = [], exc.ctx
        while ctx.parent is not None:  # the subcommands, under whatever name the program was started by
            names.append(ctx.info_name)
            ctx = ctx.parent
        click.echo(f"Try '{' '.join(['snncc', *reversed(names)])} -h' for help.", err=True)
    sys.exit(exc.exit_code)


class _Group(click.Group):
    """Click's own usage errors (bad option values, unknown options) in snncc's one-line form."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        global _verbose
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        _verbose = 0
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            _usage_error(exc)
        except click.ClickException as exc:
            _error(exc.format_message(), exc.exit_code)
        except click.Abort as exc:
            if isinstance(exc.__cause__, EOFError):  # click files end of input under Abort too
                _unexpected(exc.__cause__)
            click.echo("snncc: interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except Exception as exc:  # noqa: BLE001 - outside any command (the group's own set-up)
            _unexpected(exc)
        sys.exit(result if isinstance(result, int) else 0)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="log what the compiler does (-vv: debug)")
@click.version_option(package_name="snncc")
def main(verbose: int) -> None:
    """snncc: compile transformer LLMs into spiking neural networks."""
    global _verbose
    _verbose = verbose
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if verbose == 0:  # the hub client's retry warnings would break snncc's one-line errors
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
        # accelerate says offloaded tensors are "on the meta device" each time a program is placed
        logging.getLogger("accelerate.big_modeling").setLevel(logging.ERROR)


_budget_option = click.option(
    "--budget", metavar="TARGETS", default=None,
    help="give each synapse input's channels the fewest digits that keep these targets on held-out calibration "
         "text: top1=0.995,ppl=1.005 (or kl=..., cosine=... for encoders), or the most faithful program within "
         "energy=R of the ANN's energy; -T is then the most digits a channel keeps (default 16). Plain las "
         "without -T gets top1=0.995,ppl=1.005 (encoders: cosine=0.9999) where the model allows a budget")


def _default_or(passes: str, T: int | None, budget: str | None, whole: bool = True) -> str | None:
    """snncc.budget.budget_or_default: --budget as given, else the default budget where it applies."""
    from snncc.budget import budget_or_default

    return budget_or_default(passes, T, budget, whole)


def _budget_T(T: int | None, budget: str | None) -> int | None:
    """-T as given, or a budget's default: the most digits a channel keeps."""
    from snncc.budget import BUDGET_T

    return T if T is not None or not budget else BUDGET_T


def _check_budget(budget: str | None, pipeline) -> None:
    """A budget that parses, for a pipeline with multi-range synapse neurons to allocate."""
    from snncc.budget import DEFAULT, Budget, multirange_neurons

    if budget and budget != DEFAULT:
        Budget.parse(budget)
        multirange_neurons(pipeline)


# --- compile ------------------------------------------------------------------------------


@main.command("compile")
@click.argument("model")
@click.option("-o", "--output", default=None, help="write the artifact here (e.g. out.snn)")
@_model_options
@click.option("--eval-tokens", type=int, default=512, show_default=True,
              help="held-out tokens for the fidelity check printed after compiling (0: skip)")
@click.option("--stop-after", metavar="PASS", default=None,
              help="run the pipeline up to and including PASS: the program (with -o, an artifact) carries what "
                   "the passes after it need, to continue with --start-after PASS")
@click.option("--start-after", metavar="PASS", default=None,
              help="MODEL is an .snn written with --stop-after PASS: run the pipeline's passes after PASS (the "
                   "same -T and options; calibration comes from the artifact)")
@click.option("--dump", type=click.Path(file_okay=False), default=None,
              help="write the graph before the first pass and after each pass here (00-input.txt, 01-fold.txt, ...)")
@_budget_option
@_dtype_option
@_json_option
@_placement_options
@_fail_cleanly
def compile_cmd(model, output, passes, T, calib, calib_tokens, device, eval_tokens, stop_after, start_after, dump,
                budget, dtype, as_json, device_map, max_memory, offload_folder):
    """Compile MODEL (builtin name, HF id, directory or .onnx file) with a pipeline, or continue an .snn
    stopped part-way (--start-after); print fidelity and profile."""
    from snncc.api import compile_graph, resume
    from snncc.atomic import atomic_dir
    from snncc.blockwise import runs_by_block
    from snncc.debug import GraphDump
    from snncc.render import print_precision
    from snncc.resume import split

    with _arguments():
        _check_continued(model, start_after)
        budget = _default_or(passes, T, budget, whole=not (stop_after or start_after or dump))
        pipeline = _check_model_options(passes, _budget_T(T, budget), calib, calib_tokens, device)
        start, _ = split(pipeline, start_after, stop_after)
        _check_budget(budget, pipeline)
        if budget and _given("budget"):
            if stop_after or start_after or dump:
                raise InputError("--budget compiles the whole pipeline, more than once: it cannot take --stop-after, "
                                 "--start-after or --dump")
        _check_at_least("--eval-tokens", eval_tokens, 2, zero_ok=True)
        out_path = _check_output_path(output) if output else None
        if dump:
            _check_output_path(dump, "--dump", directory=True)
        placement = _check_placement(device_map, max_memory, offload_folder, device)
        if placement and not start_after and (dump or stop_after or not runs_by_block(pipeline)):
            raise InputError(f"--device-map places a block-by-block compile; with "
                             f"{'--dump' if dump else '--stop-after' if stop_after else repr(pipeline.spec)} it runs "
                             "on the whole model: compile without a map and give it to snncc run")
    if start_after:
        saved, prepared = _resumable(model, pipeline, start, start_after), None
    else:
        prepared = _prepare(model, calib, calib_tokens)
    # The dump appears file by file when complete; if a pass fails, the passes before it stay.
    with atomic_dir(dump, keep_partial=True) if dump else contextlib.nullcontext() as dump_dir:
        instrument = GraphDump(dump_dir, first=start + 1) if dump else None
        if start_after:
            program = resume(saved, start_after, pipeline, stop_after=stop_after, instrument=instrument, device=device,
                             progress=_progress())
            if placement:
                program.place(**placement)
        else:
            # The artifact is written as the compile goes: a big model's weights never all in memory.
            program = compile_graph(*prepared, pipeline, instrument=instrument, device=device, stop_after=stop_after,
                                    dtype=_dtype(dtype), save_to=out_path, budget=budget, **placement)
    report = {"compiled": _compiled(program, pipeline, start)}
    if not as_json:
        _print_compiled(report["compiled"])
    if program.info.precision:
        report["precision"] = program.info.precision
        if not as_json:
            print_precision(program.info.precision)
    if out_path:
        if start_after:
            program.save(out_path)
        report["artifact"] = {"path": str(out_path), "bytes": out_path.stat().st_size}
        if not as_json:
            click.echo(f"wrote {out_path} ({out_path.stat().st_size / 2**20:.1f} MiB)")
    if eval_tokens:
        report.update(_fidelity(program, prepared, eval_tokens, as_json))
    if as_json:
        click.echo(json.dumps(report, indent=1))


def _given(parameter: str) -> bool:
    """Whether the command line set `parameter` (not its default)."""
    return click.get_current_context().get_parameter_source(parameter) == click.core.ParameterSource.COMMANDLINE


def _check_continued(model: str, start_after: str | None) -> None:
    """--start-after takes an .snn written with --stop-after, calibrated already; an .snn
    without --start-after is a program, not a model."""
    if start_after:
        if _source_kind(model) != ARTIFACT:
            raise InputError(f"--start-after continues a program written with --stop-after: give its .snn file, "
                             f"not '{model}'")
        given = [f"--{name.replace('_', '-')}" for name in ("calib", "calib_tokens") if _given(name)]
        if given:
            raise InputError(f"{' and '.join(given)}: a continued compile uses the calibration its artifact carries")
        _check_artifact(model)
    elif _source_kind(model) == ARTIFACT:
        raise InputError(f"'{model}' is a compiled program: continue one written with --stop-after PASS with "
                         "--start-after PASS, or compile its model")


def _resumable(artifact: str, pipeline, start: int, start_after: str):
    """The artifact's program, checked to have run the pipeline's passes up to `start_after`
    (a mismatch is the command line's: exit 2)."""
    import snncc
    from snncc.resume import check_resumable

    program = snncc.load(artifact)
    with _arguments():
        check_resumable(program.info, program.resume, pipeline, start, start_after)
    return program


def _compiled(program, pipeline, start: int) -> dict:
    """What the compile made, and what the passes it ran (from `start` on) measured."""
    info = program.info
    return {"model": info.model, "pipeline": pipeline.spec, "T": program.T,
            "nodes": len(program.graph_module.graph.nodes), "coverage": info.coverage, "remaining": info.remaining,
            "passes": info.passes[start:]}


def _print_compiled(compiled: dict) -> None:
    from snncc.ir.verify import format_coverage

    cov = compiled["coverage"]
    stopped = f"; stopped after {compiled['passes'][-1]['name']}, to run: {', '.join(compiled['remaining'])}" \
        if compiled["remaining"] else ""
    click.echo(f"compiled {compiled['model']} with '{compiled['pipeline']}' (T={compiled['T']}{stopped}): "
               f"{compiled['nodes']} nodes, spike-driven coverage {format_coverage(cov)} of matmul MACs "
               f"({len(cov['analog_sites'])} analog matmul sites)")
    _print_reports(compiled["passes"])


def _fidelity(program, prepared, eval_tokens: int, as_json: bool) -> dict:
    """Fidelity against the ANN and a profile summary, on held-out text (printed unless
    `as_json`); a continued compile has no ANN at hand (`prepared` None): its profile only."""
    from snncc.blockwise import ann_outputs
    from snncc.evaluate import evaluate
    from snncc.render import print_eval, print_profile_summary

    chunks = _eval_chunks(program.tokenizer, None, eval_tokens, 128, program.info.max_positions)
    report = {}
    if prepared is None:
        click.echo("(no fidelity check: a continued compile does not load the ANN; `snncc eval` of the artifact "
                   "compares it with its model)", err=as_json)
    else:
        loaded, ann, _ = prepared
        report["fidelity"] = evaluate(program, ann_outputs(loaded, ann, chunks, _progress()), chunks,
                                      progress=_progress())
        if not as_json:
            print_eval(report["fidelity"])
    profile = program.profile(chunks[0])
    report["profile"] = profile.totals()
    if not as_json:
        print_profile_summary(profile)
    return report


def _print_reports(records: list[dict]) -> None:
    """What passes measured (fine-tuning and calibration losses), one line each; long series
    (a loss per step) are shown by their length, the artifact keeps them whole."""
    for record in records:
        if record.get("report"):
            click.echo(f"  {record['name']}: {json.dumps(_summarised(record['report']))}")


def _summarised(value):
    if isinstance(value, dict):
        return {key: _summarised(item) for key, item in value.items()}
    if isinstance(value, list) and len(value) > 8:
        return f"[{len(value)} values]"
    return value


# --- finetune -----------------------------------------------------------------------------


_FAS_QCFS = PIPELINE_OPTIONS["fas"]["qcfs"]  # what `fas` compiles with, so a checkpoint fits it


@main.command("finetune")
@click.argument("model")
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False),
              help="resumable checkpoint: written every 50 steps; an existing one is continued")
@click.option("--steps", type=int, default=250, show_default=True, help="steps of 128 calibration tokens")
@click.option("--mode", type=click.Choice(["full", "lambda"]), default="lambda", show_default=True,
              help="train every weight and the QCFS lambdas, or the lambdas only (on SmolLM2's 8192 dev-text "
                   "tokens full-parameter training overfits: the held-out check keeps its start)")
@click.option("--lr", type=float, default=2e-5, show_default=True, help="learning rate of the weights")
@click.option("-L", "L", type=int, default=int(_FAS_QCFS["L"]), show_default=True,
              help="QCFS quantization levels (fas's)")
@click.option("--multirange", type=float, default=float(_FAS_QCFS["multirange"]), show_default=True,
              help="leave sites more sensitive than this x the median site to multi-range neurons (0: none; "
                   "default: fas's)")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="save the loss curve here (PNG)")
@click.option("--calib", type=click.Path(dir_okay=False), default=None,
              help="text to fine-tune on (default: snncc's packaged dev text)")
@click.option("--calib-tokens", type=int, default=8192, show_default=True, help="tokens of that text to use")
@_json_option
@_fail_cleanly
def finetune_cmd(model, checkpoint, steps, mode, lr, L, multirange, plot, calib, calib_tokens, as_json):
    """Fine-tune MODEL with QCFS activations by distillation from itself (FAS stage 1)."""
    from snncc.api import compile_graph

    options = f"L={L},multirange={multirange:g},steps={steps},mode={mode},lr={lr},checkpoint={checkpoint}"
    qcfs = f"qcfs{{{options}}}"
    spec = f"fold,{qcfs}"
    with _arguments():
        _check_at_least("--steps", steps, 1)
        _check_spec_paths(checkpoint=checkpoint)
        pipeline = _check_model_options(spec, None, calib, calib_tokens)
        _check_output_path(checkpoint, "--checkpoint")
        if plot:
            _check_output_path(plot, "--plot")
    if plot:
        require("matplotlib", "--plot")  # a missing package is no usage error (exit 1), but say so before the work
    loaded, ann, ctx = _prepare(model, calib, calib_tokens)
    program = compile_graph(loaded, ann, ctx, pipeline)
    report = next(r["report"] for r in program.info.passes if r["name"] == "qcfs")
    if not as_json:
        _print_reports(program.info.passes)
    if plot:
        from snncc.plots import plot_finetune

        click.echo(f"wrote {plot_finetune(report['finetune'], Path(plot))}", err=as_json)
    if as_json:
        click.echo(json.dumps({"checkpoint": checkpoint, "passes": f"fas,{qcfs}", "report": report}, indent=1))
    else:
        click.echo(f"checkpoint {checkpoint}; compile with it: snncc compile {model} --passes 'fas,{qcfs}'")


def _check_spec_paths(**paths: str | None) -> None:
    """Paths that travel inside a pass spec (qcfs{checkpoint=...}) cannot hold its separators."""
    for option, path in paths.items():
        if path and any(c in path for c in ",{}"):
            raise InputError(f"--{option} '{path}' contains ',', '{{' or '}}', which a pass spec cannot hold: "
                             "rename the file")


# --- eval ---------------------------------------------------------------------------------


@main.command("eval")
@click.argument("model")
@_model_options
@click.option("--text", type=click.Path(dir_okay=False), default=None,
              help="held-out text to score (default: snncc's packaged held-out prose, source code and technical "
                   "documentation, each scored apart; none is used for calibration)")
@click.option("--max-tokens", type=int, default=2048, show_default=True, help="tokens of text to score (per text)")
@click.option("--seq-len", type=int, default=128, show_default=True, help="tokens per evaluated sequence")
@_json_option
@_budget_option
@_dtype_option
@_placement_options
@_fail_cleanly
def eval_cmd(model, passes, T, calib, calib_tokens, device, text, max_tokens, seq_len, as_json, budget, dtype,
             device_map, max_memory, offload_folder):
    """Fidelity of MODEL's spiking program (or of an .snn artifact) vs the ANN on held-out text:
    prose, source code and technical documentation (each, and the worst), or --text."""
    from snncc.blockwise import ann_outputs
    from snncc.calibration import HELDOUT_TEXTS
    from snncc.evaluate import evaluate, worst_of
    from snncc.render import print_domains, print_eval

    with _arguments():
        budget = _default_or(passes, T, budget, whole=_source_kind(model) != ARTIFACT)
        pipeline = _check_program_options(model, passes, _budget_T(T, budget), calib, calib_tokens, device)
        if pipeline is None and (_given("budget") or _given("dtype")):
            raise InputError(f"'{model}' is compiled already: --budget and --dtype compile a model; drop them")
        if pipeline is not None:
            _check_budget(budget, pipeline)
        _check_at_least("--max-tokens", max_tokens, 2)
        _check_at_least("--seq-len", seq_len, 2)
        if text:
            _check_text_file(text, max_tokens)
        placement = _check_placement(device_map, max_memory, offload_folder, device)
    loaded, ann, program = _program_and_ann(model, pipeline, calib, calib_tokens, device, budget, dtype)
    if placement:
        program.place(**placement)
    texts = {"text": Path(text)} if text else HELDOUT_TEXTS
    chunks = {kind: _eval_chunks(loaded.tokenizer, path, max_tokens, seq_len, loaded.max_positions)
              for kind, path in texts.items()}
    references = iter(ann_outputs(loaded, ann, [c for kind in chunks.values() for c in kind], _progress()))
    results = {kind: evaluate(program, [next(references) for _ in kind_chunks], kind_chunks, progress=_progress())
               for kind, kind_chunks in chunks.items()}
    if text:
        if as_json:
            click.echo(json.dumps(results["text"], indent=1))
        else:
            print_eval(results["text"])
        return
    worst = worst_of(results)
    if as_json:
        first = results["prose"]
        click.echo(json.dumps({key: first[key] for key in ("model", "pipeline", "T", "coverage")}
                              | {"domains": results, "worst": worst}, indent=1))
    else:
        print_domains(results, worst)


def _program_and_ann(model, pipeline, calib, calib_tokens, device, budget=None, dtype="auto"):
    """(LoadedModel, ANN graph, program): MODEL compiled with `pipeline`, or an artifact
    (`pipeline` None) with the model it was compiled from, loaded by the name it records."""
    if pipeline is None:
        import snncc
        from snncc.api import load_and_trace
        from snncc.errors import ModelError

        program = snncc.load(model, device=device, progress=_progress())
        click.echo(f"comparing with {program.info.model}, the model '{model}' names as its source", err=True)
        try:
            loaded, ann = load_and_trace(program.info.model, progress=_progress())
        except SnnccError as exc:  # not found, or not loadable (a Python module's class name, say)
            raise ModelError(f"'{model}' was compiled from '{program.info.model}', which cannot be loaded here to "
                             f"compare with ({exc}): evaluate the model itself with --passes") from None
        return loaded, ann, program
    from snncc.api import compile_graph

    loaded, ann, ctx = _prepare(model, calib, calib_tokens)
    return loaded, ann, compile_graph(loaded, ann, ctx, pipeline, device=device, dtype=_dtype(dtype), budget=budget)


# --- debug --------------------------------------------------------------------------------


@main.command("debug")
@click.argument("model")
@_model_options
@click.option("--dump", type=click.Path(file_okay=False), default=None,
              help="write each changed graph as NN_pass.txt and a passes.jsonl here")
@click.option("--text", type=click.Path(dir_okay=False), default=None, help=HELDOUT_HELP)
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="also draw error vs the ANN, agreement and coverage after each pass into this PNG")
@_json_option
@_fail_cleanly
def debug_cmd(model, passes, T, calib, calib_tokens, device, dump, text, plot, as_json):
    """Run the pipeline pass by pass: time, nodes, coverage and error vs the ANN after each."""
    from snncc.api import compile_graph
    from snncc.atomic import atomic_dir
    from snncc.debug import PassTable

    with _arguments():
        if _source_kind(model) == ARTIFACT:
            raise InputError(f"'{model}' is compiled already; debug runs the passes one by one: give its model")
        pipeline = _check_model_options(passes, T, calib, calib_tokens, device)
        if text:
            _check_text_file(text, 128)
        if dump:
            _check_output_path(dump, "--dump", directory=True)
        if plot:
            _check_output_path(plot, "--plot")
    if plot:
        require("matplotlib", "--plot")
    loaded, ann, ctx = _prepare(model, calib, calib_tokens)
    sample = _eval_chunks(loaded.tokenizer, text, 128, 128, loaded.max_positions)[0]
    # The dump appears file by file when complete; if a pass fails, the passes before it stay.
    with atomic_dir(dump, keep_partial=True) if dump else contextlib.nullcontext() as dump_dir:
        table = PassTable(loaded, sample, dump_dir, device)
        program = compile_graph(loaded, ann, ctx, pipeline, debug=True, instrument=table, device=device)
    if as_json:
        click.echo(json.dumps({"model": loaded.name, "pipeline": program.info.pipeline, "T": program.T,
                               "agreement": table.metric, "passes": [vars(row) for row in table.rows],
                               "sites": [{"pass": name, **site} for name, site in table.sites]}, indent=1))
    else:
        table.print()
    if plot:
        table.plot(Path(plot), f"{loaded.name} '{passes}' T={program.T}: pass by pass")
        click.echo(f"wrote {plot}", err=as_json)


# --- inspect ------------------------------------------------------------------------------


@main.command("inspect")
@click.argument("model")
@click.option("--wide", is_flag=True, help="every pass's column and every source module (wider than 100 columns)")
@_json_option
@_fail_cleanly
def inspect_cmd(model, wide, as_json):
    """What an .snn artifact is (model, pipeline, T, coverage, passes, versions) and its ops; or
    MODEL's ops (a builtin name, a model directory, a Hugging Face id or an .onnx file) and what
    each pipeline lowers."""
    from snncc.inventory import artifact_inventory, model_inventory
    from snncc.render import print_inventory

    with _arguments():
        kind = _source_kind(model)
        if kind == ARTIFACT:
            _check_artifact(model)
    inventory = artifact_inventory(Path(model)) if kind == ARTIFACT else model_inventory(model)
    if as_json:
        click.echo(json.dumps(inventory, indent=1))
    else:
        print_inventory(inventory, wide)


# --- run / profile --------------------------------------------------------------------------


@main.command("run")
@click.argument("model")
@click.option("--prompt", required=True, help="text to continue")
@click.option("--max-new-tokens", type=int, default=32, show_default=True,
              help="stop after this many new tokens, or where the model ends its text")
@_model_options
@click.option("--backend", type=click.Choice(["reference", "event"]), default="reference", show_default=True,
              help="dense reference executor, or event-driven execution (CPU): spikes as events, every one counted")
@click.option("--cache/--no-cache", default=True, show_default=True,
              help="reference backend: run each new token against cached attention keys and values "
                   "(the same tokens as --no-cache, which re-runs the whole sequence per token; a program "
                   "placed by --device-map always re-runs it)")
@click.option("--compile", "compiled", is_flag=True,
              help="reference backend: run through torch.compile (the same tokens, faster per token after a "
                   "first compile that takes minutes on a large model; torch caches it on disk)")
@_json_option
@_placement_options
@_fail_cleanly
def run_cmd(model, prompt, max_new_tokens, passes, T, calib, calib_tokens, device, backend, cache, compiled, as_json,
            device_map, max_memory, offload_folder):
    """Generate text greedily with an .snn artifact, or with MODEL compiled with --passes
    (a builtin name, a model directory, a Hugging Face id or an .onnx file)."""
    with _arguments():
        _check_at_least("--max-new-tokens", max_new_tokens, 1)
        _check_prompt(prompt)
        if compiled and (backend != "reference" or device_map):
            raise InputError("--compile runs the reference backend on one device: drop --backend event "
                             "and --device-map, or --compile")
        pipeline, budget = _check_model_or_program(model, passes, T, calib, calib_tokens, device)
        placement = _check_placement(device_map, max_memory, offload_folder, device, backend)
    program = _program(model, pipeline, calib, calib_tokens, device, placement, backend, budget)
    if compiled:
        program.compile()
    progress = _progress()  # the event backend's per-run bar keeps quiet while generating
    continuation = program.generate_text(prompt, max_new_tokens, progress=progress, cache=cache)
    if as_json:
        click.echo(json.dumps({"model": program.info.model, "pipeline": program.info.pipeline, "T": program.T,
                               "prompt": prompt, "continuation": continuation}, indent=1))
    else:
        click.echo(prompt + continuation)


def _program(model, pipeline, calib, calib_tokens, device="cpu", placement=None, backend="reference", budget=None):
    """The spiking program of an .snn artifact (`pipeline` None), or MODEL compiled with the
    pipeline (within `budget`); placed by `placement` (_check_placement) where it has a device map."""
    if pipeline is None:
        import snncc

        return snncc.load(model, device=device, backend=backend, progress=_progress(), **(placement or {}))
    from snncc.api import compile_graph
    from snncc.program import SpikingProgram

    loaded, ann, ctx = _prepare(model, calib, calib_tokens)
    program = compile_graph(loaded, ann, ctx, pipeline, device=device, budget=budget)
    if backend != "reference":
        program = SpikingProgram(program.graph_module, program.info, program.tokenizer, backend=backend,
                                 progress=_progress())
    return program.place(**placement) if placement else program


def _check_model_or_program(model, passes, T, calib, calib_tokens, device) -> tuple[Pipeline | None, str | None]:
    """_check_program_options, and the budget a model compiled with the plain default pipeline gets."""
    budget = _default_or(passes, T, None, whole=_source_kind(model) != ARTIFACT)
    return _check_program_options(model, passes, _budget_T(T, budget), calib, calib_tokens, device), budget


def _check_program_options(model, passes, T, calib, calib_tokens, device) -> Pipeline | None:
    """What _program will need: an existing artifact (None; then compile options are refused),
    or options that compile MODEL (its pipeline)."""
    if _source_kind(model) == ARTIFACT:
        given = [f"--{name.replace('_', '-')}" if name != "T" else "-T"
                 for name in ("passes", "T", "calib", "calib_tokens") if _given(name)]
        if given:
            raise InputError(f"'{model}' is compiled already: {' and '.join(given)} would compile a model; drop "
                             f"{'them' if len(given) > 1 else 'it'}, or give the model")
        _check_device(device)
        _check_artifact(model)
        return None
    return _check_model_options(passes, T, calib, calib_tokens, device)


@main.command("profile")
@click.argument("model")
@click.option("--prompt", required=True, help="text to run the program on")
@_model_options
@_json_option
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="also draw the firing rate per site and per step and the energy by role into this PNG")
@click.option("--energy", type=click.Choice(sorted(ENERGY_TABLES)), default="45nm", show_default=True,
              help="energy per operation: " + "; ".join(f"{t.name}: MAC {t.e_mac_pj} pJ, AC {t.e_ac_pj} pJ "
                                                       f"({t.source})" for t in ENERGY_TABLES.values())
                   + ". Each is also reported with memory traffic: " + MEMORY_SOURCE)
@_placement_options
@_fail_cleanly
def profile_cmd(model, passes, T, calib, calib_tokens, device, prompt, as_json, plot, energy, device_map, max_memory,
                offload_folder):
    """Spikes, firing rates, SOPs, MACs and energy per layer of MODEL or an artifact on PROMPT."""
    from snncc.render import print_profile

    with _arguments():
        _check_prompt(prompt)
        pipeline, budget = _check_model_or_program(model, passes, T, calib, calib_tokens, device)
        placement = _check_placement(device_map, max_memory, offload_folder, device)
        if plot:
            _check_output_path(plot, "--plot")
    if plot:
        require("matplotlib", "--plot")
    program = _program(model, pipeline, calib, calib_tokens, device, placement, budget=budget)
    ids = program.tokenizer.encode(prompt)
    if not ids:
        raise InputError("the prompt is empty: give some text")
    profile = program.profile(ids, energy=energy)
    if as_json:
        click.echo(json.dumps(profile.to_dict(), indent=1))
    else:
        print_profile(profile)
    if plot:
        from snncc.plots import plot_profile

        plot_profile(profile, Path(plot), f"{program.info.model} '{program.info.pipeline}' T={program.T}")
        click.echo(f"wrote {plot}", err=as_json)


# --- export -------------------------------------------------------------------------------


@main.command("export")
@click.argument("model")
@click.option("--format", "fmt", type=click.Choice(["onnx", "onnx-snn", "nir"]), default="onnx", show_default=True,
              help="onnx: standard opset only (neurons as Loops over time); onnx-snn: spiking ops as 'snn' domain "
                   "nodes with the function library that defines them; nir: the IF neurons and the synapses they "
                   "feed (what NIR can express), the rest listed")
@click.option("-o", "--output", required=True,
              help="file to write, e.g. dir/model.onnx; ONNX writes beside it the tokenizer, a README.md and "
                   "model.snncc.json (metadata)")
@_model_options
@click.option("--external-data", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True,
              help="weights in OUTPUT.data beside the model (auto: when the model would pass protobuf's 2 GB)")
@click.option("--verify-tokens", type=int, default=16, show_default=True,
              help="run the file (onnxruntime; nirtorch for NIR) on this many held-out tokens and compare with "
                   "the reference executor (0: skip); beyond --atol/--rtol the export fails (exit 1; the files "
                   "stay)")
@click.option("--atol", type=float, default=None,
              help="the verification fails where |output - reference| > ATOL + RTOL x |reference| anywhere, as "
                   "optimum-cli's does [default: " + ", ".join(f"{f.upper()} {a:g}" for f, (a, _) in
                                                               EXPORT_TOLERANCES.items()) + "]")
@click.option("--rtol", type=float, default=None,
              help="relative tolerance of the verification (see --atol) [default: "
                   + ", ".join(f"{f.upper()} {r:g}" for f, (_, r) in EXPORT_TOLERANCES.items()) + "]")
@_json_option
@_fail_cleanly
def export_cmd(model, passes, T, calib, calib_tokens, device, fmt, output, external_data, verify_tokens, atol, rtol,
               as_json):
    """Export an .snn artifact (or MODEL compiled with --passes) to ONNX or NIR."""
    from snncc.errors import ExportError

    with _arguments():
        _check_at_least("--verify-tokens", verify_tokens, 0)
        for option, value in (("--atol", atol), ("--rtol", rtol)):
            if value is not None and not 0 <= value < float("inf"):
                raise InputError(f"{option} must be a number >= 0, got {value}")
        pipeline, budget = _check_model_or_program(model, passes, T, calib, calib_tokens, device)
        if fmt == "nir" and pipeline is not None:
            from snncc.backends.nir import refusal

            refused = refusal(pipeline)  # a compile whose program NIR cannot take is not started
            if refused:
                raise InputError(refused)
        out_path = _check_output_path(output)
    _check_export_packages(fmt, verify_tokens > 0)
    program = _program(model, pipeline, calib, calib_tokens, device, budget=budget)
    sample = _eval_chunks(program.tokenizer, None, max(verify_tokens, 2), max(verify_tokens, 2),
                          program.info.max_positions)[0] if verify_tokens else None
    default_atol, default_rtol = EXPORT_TOLERANCES["nir" if fmt == "nir" else "onnx"]
    atol, rtol = default_atol if atol is None else atol, default_rtol if rtol is None else rtol
    say = functools.partial(click.echo, err=as_json)  # with --json, the JSON alone is on stdout
    if fmt == "nir":
        check, runtime, written = _export_nir(program, out_path, sample, atol, rtol, say), "nirtorch", \
            f"{out_path} stays"
    else:
        check = _export_onnx(program, out_path, fmt, external_data, sample, atol, rtol, say)
        runtime, written = "onnxruntime", f"{out_path} and the files beside it stay"
    if as_json:
        click.echo(json.dumps({"format": fmt, "path": str(out_path), "bytes": out_path.stat().st_size,
                               "model": program.info.model, "pipeline": program.info.pipeline, "T": program.T,
                               "verification": None if check is None else {**check.to_dict(), "runtime": runtime}},
                              indent=1))
    if check is not None and not check.passed:
        raise ExportError(f"verification failed: {runtime} differs from the reference executor by up to "
                          f"{check.max_abs_error:.2e} (max abs error; {check.mismatched} of {check.values} values "
                          f"beyond --atol {atol:g} + --rtol {rtol:g} x |reference|); {written} written: relax "
                          "--atol/--rtol to accept the export")


def _check_export_packages(fmt: str, verify: bool) -> None:
    """Name a missing optional package before anything is compiled for the export."""
    writer, runner = ((("nir",), ("nirtorch",)) if fmt == "nir"
                      else (("onnx", "onnx_ir", "onnxscript"), ("onnxruntime",)))  # onnxscript imports onnx_ir
    for module in writer:
        require(module, f"export --format {fmt}")
    for module in runner if verify else ():
        require(module, "export's check of the file (--verify-tokens 0 skips it)")


def _export_nir(program, out_path, sample, atol, rtol, say):
    """Write the NIR file; its verification (a Comparison), or None."""
    from snncc.backends.nir import to_nir, verify_nir, write_nir

    export = to_nir(program)
    write_nir(export, out_path)
    click.echo(f"snncc: warning: {export.summary()}", err=True)
    say(f"wrote {out_path} ({out_path.stat().st_size / 2**20:.1f} MiB, {len(export.graph.nodes)} NIR nodes)")
    if sample is None:
        return None
    check = verify_nir(program, export, out_path, sample, atol, rtol)
    say(f"read back with nir; nirtorch vs the reference executor at the {len(export.synapses)} synapse "
               f"outputs on {sample.shape[-1]} held-out tokens: {check.summary()}")
    return check


def _export_onnx(program, out_path, fmt, external_data, sample, atol, rtol, say):
    """Write the ONNX bundle (snncc.backends.bundle); its verification (a Comparison), or None."""
    from snncc.backends.bundle import export_bundle

    external = {"auto": None, "always": True, "never": False}[external_data]
    bundle = export_bundle(program, out_path, fmt, external, sample, atol, rtol)
    report = bundle.report
    data = f" + {report.external_data.name}" if report.external_data else ""
    say(f"wrote {out_path}{data} ({report.bytes / 2**20:.1f} MiB, {report.nodes} nodes, "
        f"{report.seconds:.1f} s); onnx.checker passed")
    say(f"beside it: {', '.join(f.name for f in bundle.files if f not in (report.path, report.external_data))}")
    if bundle.readme_kept is not None:
        click.echo(f"snncc: warning: kept {bundle.readme_kept}, which snncc did not write: the export's README is "
                   "not written", err=True)
    if bundle.verification is not None:
        say(f"onnxruntime vs the reference executor on {sample.shape[-1]} held-out tokens: "
                   f"{bundle.verification.summary()}")
    return bundle.verification


if __name__ == "__main__":
    main()
