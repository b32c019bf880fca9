"""The README's Python API example and command lines run as written and do what it says, so
the README cannot drift from the code. Two things differ from a user's run, both for time:
SmolLM2 is swapped for a tiny model of the same family, and compiles calibrate on fewer tokens."""

from __future__ import annotations

import functools
import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import snncc
from snncc.cli import main
from tests.conftest import byte_level_hf_tokenizer, prepared

README = Path(__file__).resolve().parent.parent / "README.md"
TINY = "tiny-llama"  # stands for smollm2-135m: a Llama too
FAST_CALIB = 1024


def _section(heading: str) -> str:
    return README.read_text().split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def _python_example() -> str:
    return re.search(r"```python\n(.*?)```", _section("Python API"), re.S).group(1)


def _saved_tiny_llama(folder: Path) -> Path:
    """A model directory as users have them: config, weights and a tokenizer."""
    prepared(TINY)[0].module.model.save_pretrained(folder)
    byte_level_hf_tokenizer().save_pretrained(folder)
    return folder


def test_the_python_example_runs_and_does_what_its_comments_say(tmp_path, monkeypatch, capsys):
    code = _python_example()
    assert code.count('"smollm2-135m"') >= 2 and '"./llama-7b-dir"' in code
    code = code.replace('"smollm2-135m"', f'"{TINY}"')
    code = code.replace('"./llama-7b-dir"', repr(str(_saved_tiny_llama(tmp_path / "llama-7b-dir"))))
    monkeypatch.chdir(tmp_path)
    full_compile = snncc.compile
    monkeypatch.setattr(snncc, "compile", functools.partial(full_compile, calib_tokens=FAST_CALIB))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own example

    printed = capsys.readouterr().out
    assert f"model='{TINY}'" in printed and "pipeline='las'" in printed and "T=16" in printed  # a budget's most
    ids, logits, out = scope["ids"], scope["logits"], scope["out"]
    assert logits.shape == (1, ids.shape[1], prepared(TINY)[0].module.model.config.vocab_size)
    assert out.shape == (1, ids.shape[1] + 16) and torch.equal(out[:, :ids.shape[1]], ids)
    assert (tmp_path / "out.snn").is_file() and (tmp_path / "llama7b.snn").is_file()
    precision = scope["prog"].info.precision
    assert precision["budget"] == "energy=0.6" and precision["check_energy_ratio"] <= 0.6


# Each command line of the README's "Commands" section, with its placeholders filled for a
# tiny model; the set must match the README's, so a command added or changed there is tested.
COMMANDS = {
    "snncc compile MODEL [--passes P] [-T N] [-o out.snn] [--dtype auto|float32|bfloat16]":
        "compile tiny-gpt2 --passes las -T 12 -o {tmp}/c.snn --dtype float32",
    "snncc eval MODEL_OR_ARTIFACT [--passes P] [-T N]": "eval {artifact} --max-tokens 128",
    "snncc finetune MODEL --checkpoint F [--steps N] [--mode full|lambda]":
        "finetune tiny-llama --checkpoint {tmp}/q.pt --steps 2 --mode lambda",
    "snncc compile MODEL --passes las --stop-after PASS -o part.snn":
        "compile tiny-gpt2 --passes las --stop-after attention -o {tmp}/part.snn",
    "snncc compile part.snn --passes las --start-after PASS -o full.snn":
        "compile {tmp}/part.snn --passes las --start-after attention -o {tmp}/full.snn",
    "snncc debug MODEL --passes P [--dump DIR] [--plot F.png]": "debug tiny-gpt2 --passes las --dump {tmp}/dump",
    "snncc inspect MODEL_OR_ARTIFACT [--wide]": "inspect {artifact}",
    "snncc run MODEL_OR_ARTIFACT --prompt TEXT [--backend event] [--no-cache] [--compile]":
        "run {artifact} --prompt 'The cat' --no-cache",
    "snncc compile MODEL --budget top1=0.995,ppl=1.005": "compile tiny-gpt2 --budget top1=0.995,ppl=1.005",
    "snncc profile MODEL_OR_ARTIFACT --prompt TEXT [--plot F.png] [--energy 45nm]":
        "profile {artifact} --prompt 'The cat' --energy 45nm",
    "snncc export MODEL_OR_ARTIFACT --format onnx|onnx-snn|nir -o dir/model.onnx":
        "export {artifact} --format onnx-snn -o {tmp}/dir/model.onnx --verify-tokens 8",
}
SPEED = {"compile": ["--calib-tokens", str(FAST_CALIB), "--eval-tokens", "64"],  # calibrate on fewer tokens
         "debug": ["--calib-tokens", str(FAST_CALIB)], "finetune": ["--calib-tokens", str(FAST_CALIB)]}


def _readme_commands() -> set[str]:
    return {command for command in re.findall(r"`(snncc [^`]+)`", _section("Commands"))}


def test_the_commands_section_lists_exactly_the_tested_commands():
    assert _readme_commands() == set(COMMANDS)


@functools.cache
def _artifact(folder: str) -> str:
    from snncc.api import compile_graph

    loaded, ann, ctx = prepared("tiny-gpt2")
    path = f"{folder}/t.snn"
    compile_graph(loaded, ann, ctx, "las").save(path)
    return path


def _invoke(arguments: list[str]):
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, (arguments, result.output)
    return result


def _run_readme_command(command: str, folder: Path, artifact: str):
    arguments = shlex.split(COMMANDS[command].format(tmp=folder, artifact=artifact))
    if "--start-after" in arguments:  # it continues the part-way program of the command before it
        _run_readme_command("snncc compile MODEL --passes las --stop-after PASS -o part.snn", folder, artifact)
    arguments += [] if "--start-after" in arguments else SPEED.get(arguments[0], [])
    return arguments, _invoke(arguments)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_each_command_runs_as_the_readme_shows(command, tmp_path_factory):
    folder = tmp_path_factory.mktemp("readme")
    artifact = _artifact(str(tmp_path_factory.getbasetemp()))
    arguments, result = _run_readme_command(command, folder, artifact)
    assert result.output.strip()
    if arguments[0] == "export":  # the bundle the README promises
        assert {"model.onnx", "model.snncc.json", "README.md", "snncc_tokenizer.json"} <= set(
            path.name for path in (folder / "dir").iterdir())
    if "--json" not in arguments and arguments[0] in ("inspect", "profile", "eval", "run", "debug"):
        as_json = _invoke(arguments + ["--json"])
        assert isinstance(json.loads(as_json.stdout), dict)
