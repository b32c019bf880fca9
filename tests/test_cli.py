"""The CLI's working paths, in-process with click's runner (error paths: test_cli_errors.py)."""

from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner

from snncc.calibration import HELDOUT_TEXTS
from snncc.cli import main


def _run(*args: str):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def test_inspect_lists_ops_sources_and_what_no_pass_lowers_in_100_columns():
    out = _run("inspect", "tiny-llama")
    assert "aten.linear" in out and "lowered" in out and "ANALOG" in out
    assert "aten.neg: model.layers.*.self_attn" in out  # RoPE's rotation: reported with its source module
    assert max(len(line) for line in out.splitlines()) <= 100
    wide = _run("inspect", "tiny-llama", "--wide")
    assert "model.layers.*.mlp.down_proj" in wide and "nonlinear" in wide.splitlines()[1]  # every pass's column
    assert max(len(line) for line in wide.splitlines()) > 100


def test_inspect_of_an_artifact_shows_its_manifest(tmp_path):
    _run("compile", "tiny-gpt2", "--passes", "encode", "-T", "6", "--eval-tokens", "0", "--calib-tokens", "256",
         "-o", str(tmp_path / "p.snn"))
    out = _run("inspect", str(tmp_path / "p.snn"))
    for fact in ("model:", "tiny-gpt2", "pipeline:    'encode', T=6", "coverage:    100.00%", "passes:      encode",
                 "written by:  snncc", "artifact format"):
        assert fact in out
    assert max(len(line) for line in out.splitlines()) <= 100


def test_inspect_json_reports_every_arithmetic_op():
    inventory = json.loads(_run("inspect", "tiny-gpt2", "--json"))
    ops = {row["op"]: row for row in inventory["ops"]}
    assert ops["aten.addmm"]["status"]["encode"] == "lowered"
    assert ops["aten.addmm"]["status"]["none"] == "ANALOG"
    assert ops["aten.softmax.int"]["status"]["las"] == "lowered"
    assert {item["op"] for item in inventory["no_pass_lowers"]} == {"aten.add.Tensor"}  # residual adds


def test_eval_json_has_every_field_for_every_kind_of_text_and_the_worst():
    report = json.loads(_run("eval", "tiny-llama", "--passes", "encode", "-T", "12", "--max-tokens", "256",
                             "--calib-tokens", "512", "--json"))
    assert report["T"] == 12 and report["pipeline"] == "encode" and report["coverage"] == 1.0
    assert set(report["domains"]) == {"prose", "code", "docs"}
    for result in report["domains"].values():
        for key in ("ppl_ann", "ppl_snn", "ppl_ratio", "top1_agreement", "mean_abs_logit_err",
                    "max_abs_logit_err", "tokens", "T", "pipeline", "coverage"):
            assert key in result
    ratios = {kind: result["ppl_ratio"] for kind, result in report["domains"].items()}
    assert report["worst"]["ppl_ratio"] == {"value": max(ratios.values()), "domain": max(ratios, key=ratios.get)}
    agreement = {kind: result["top1_agreement"] for kind, result in report["domains"].items()}
    assert report["worst"]["top1_agreement"]["value"] == min(agreement.values())


def test_eval_of_one_text_file_is_flat():
    flat = json.loads(_run("eval", "tiny-llama", "--passes", "encode", "-T", "12", "--max-tokens", "256",
                           "--calib-tokens", "512", "--text", str(HELDOUT_TEXTS["code"]), "--json"))
    assert flat["tokens"] > 0 and "domains" not in flat and 0 < flat["top1_agreement"] <= 1


def test_eval_encoder_reports_cosine():
    report = json.loads(_run("eval", "tiny-bert", "-T", "12", "--max-tokens", "256", "--calib-tokens", "512", "--json"))
    assert all(r["cosine"] > 0.99 and "ppl_ratio" not in r for r in report["domains"].values())
    assert report["worst"]["cosine"]["value"] == min(r["cosine"] for r in report["domains"].values())


def test_plain_las_compiles_to_the_default_budget_and_says_when_it_cannot():
    report = json.loads(_run("compile", "tiny-llama", "--calib-tokens", "512", "--eval-tokens", "0", "--json"))
    precision = report["precision"]
    assert precision["default"] and precision["budget"] == "top1=0.995,ppl=1.005" and precision["met_on_check"]
    assert report["compiled"]["T"] == 16  # the most digits a channel keeps
    uniform = json.loads(_run("compile", "tiny-llama", "-T", "14", "--calib-tokens", "512", "--eval-tokens", "0",
                              "--json"))
    assert "precision" not in uniform and uniform["compiled"]["T"] == 14
    fallback = _run("compile", "tiny-llama", "--calib-tokens", "100", "--eval-tokens", "0")
    assert "(T=14)" in fallback
    assert "uniform steps, not the default budget: a budget needs 2 calibration batches" in fallback


@pytest.mark.slow  # a budget compiles more than once (about 20 s on 2 cores)
def test_compile_to_a_budget_prints_the_check_and_saves_the_plan(tmp_path):
    out = _run("compile", "tiny-llama", "--budget", "kl=2e-3", "--calib-tokens", "1024", "--eval-tokens", "0",
               "-o", str(tmp_path / "out.snn"))
    assert "budget kl=0.002: met on 256 held-out calibration tokens" in out and "digits kept" in out
    assert "  time: sensitivity " in out and "compiled and checked" in out
    import snncc

    precision = snncc.load(tmp_path / "out.snn").info.precision
    assert precision["budget"] == "kl=0.002" and precision["check"]["kl_per_token"] <= 1e-3
    assert precision["plan"]["T"] == 16  # a budget's default: the most digits a channel keeps


@pytest.mark.slow
def test_eval_to_an_encoder_budget_reports_the_domains():
    report = json.loads(_run("eval", "tiny-bert", "--budget", "cosine=0.999", "--max-tokens", "256",
                             "--calib-tokens", "1024", "--json"))
    assert report["T"] == 16 and all(r["cosine"] > 0.999 for r in report["domains"].values())


def test_debug_table_and_dump(tmp_path):
    out = _run("debug", "tiny-llama", "--passes", "encode", "-T", "8", "--calib-tokens", "512",
               "--dump", str(tmp_path / "dump"), "--plot", str(tmp_path / "passes.png"))
    assert (tmp_path / "passes.png").read_bytes()[:4] == b"\x89PNG"
    assert "(traced ANN)" in out and "encode" in out and "100.00%" in out
    files = sorted(p.name for p in (tmp_path / "dump").iterdir())
    assert files == ["00_traced_ANN.txt", "01_encode.txt", "passes.jsonl"]
    lines = [json.loads(line) for line in (tmp_path / "dump" / "passes.jsonl").read_text().splitlines()]
    assert [line["name"] for line in lines] == ["(traced ANN)", "encode"]
    assert lines[1]["options"]["T"] == 8
    assert "snn.mt_encode" in (tmp_path / "dump" / "01_encode.txt").read_text()


def test_profile_json(tmp_path):
    profile = json.loads(_run("profile", "tiny-opt", "-T", "8", "--calib-tokens", "512", "--prompt",
                              "Spikes travel as events.", "--json"))
    assert profile["totals"]["sops"] > 0 and profile["totals"]["analog_macs"] == 0
    assert all(0 <= row["firing_rate"] <= 1 for row in profile["layers"])


def test_run_with_the_event_backend_or_without_the_cache_generates_the_same_text(tmp_path):
    artifact = tmp_path / "tiny.snn"
    _run("compile", "tiny-llama", "-T", "8", "--calib-tokens", "512", "--eval-tokens", "0", "-o", str(artifact))
    reference = _run("run", str(artifact), "--prompt", "Once upon", "--max-new-tokens", "4")
    event = _run("run", str(artifact), "--prompt", "Once upon", "--max-new-tokens", "4", "--backend", "event")
    uncached = _run("run", str(artifact), "--prompt", "Once upon", "--max-new-tokens", "4", "--no-cache")
    assert event == reference == uncached and event.startswith("Once upon")


def test_profile_plot_and_energy_tables(tmp_path):
    plot = tmp_path / "profile.png"
    args = ["profile", "tiny-llama", "-T", "8", "--calib-tokens", "512", "--prompt", "Events, not numbers.", "--json"]
    fp32 = json.loads(_run(*args, "--plot", str(plot)))
    int8 = json.loads(_run(*args, "--energy", "45nm-int8"))
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"
    assert fp32["totals"]["sops"] == int8["totals"]["sops"]
    # Same operations priced by another table: E_AC/E_MAC differs (0.9/4.6 vs 0.03/0.23).
    assert fp32["totals"]["energy_ratio"] != int8["totals"]["energy_ratio"]
    assert "Horowitz" in fp32["energy_source"]
    assert abs(sum(fp32["firing_rate_per_step"]) - fp32["totals"]["spikes_per_neuron"]) < 1e-9


@pytest.mark.slow  # 25 s; each format's export is tested in the fast tier (tests/backends), the CLI's refusals too
def test_export_onnx_and_nir_from_an_artifact(tmp_path):
    artifact = tmp_path / "fas.snn"
    fas_plain_if = "fas,qcfs{L=8,multirange=0},calibrate{layer_steps=2,neuron_steps=2,batches=1}"  # what NIR holds
    _run("compile", "tiny-llama", "--passes", fas_plain_if, "--calib-tokens", "512", "--eval-tokens", "0",
         "-o", str(artifact))
    for fmt in ("onnx-snn", "onnx"):
        out = _run("export", str(artifact), "--format", fmt, "-o", str(tmp_path / f"{fmt}.onnx"))
        assert "onnx.checker passed" in out and "max relative error 0.00e+00" in out, out
    result = CliRunner().invoke(main, ["export", str(artifact), "--format", "nir", "-o", str(tmp_path / "m.nir")],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "warning: NIR holds" in result.stderr and "left out" in result.stderr
    assert "read back with nir" in result.stdout and (tmp_path / "m.nir").is_file()


@pytest.mark.slow  # 9 s; the fast tier runs finetune through the README's command line (tests/test_readme.py)
def test_finetune_writes_a_checkpoint_and_prints_the_spec_that_compiles_with_it(tmp_path):
    checkpoint = tmp_path / "ft.pt"
    out = _run("finetune", "tiny-llama", "--checkpoint", str(checkpoint), "--steps", "2", "-L", "16",
               "--multirange", "2", "--calib-tokens", "512")
    assert checkpoint.exists()
    spec = out.strip().splitlines()[-1].split("--passes ")[-1].strip("'")
    assert spec.startswith("fas,qcfs{L=16,multirange=2,steps=2,")
    compiled = _run("compile", "tiny-llama", "--passes", spec, "--calib-tokens", "512", "-o", str(tmp_path / "a.snn"))
    assert "coverage" in compiled and (tmp_path / "a.snn").exists()


def test_every_command_takes_h_and_json_and_lists_its_main_options_first():
    assert "Usage: main [OPTIONS] COMMAND" in CliRunner().invoke(main, ["-h"]).output
    for name, command in main.commands.items():
        result = CliRunner().invoke(main, [name, "-h"])
        assert result.exit_code == 0 and f"Usage: main {name}" in result.output, name
        assert any("--json" in param.opts for param in command.params), f"{name} has no --json"
    options = [param.opts[0] for param in main.commands["compile"].params if isinstance(param, click.Option)]
    assert options[:3] == ["-o", "--passes", "-T"]  # click lists them as written
