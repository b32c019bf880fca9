"""A program placed by accelerate's device maps (snncc.backends.placed) computes what the plain
reference executor computes, bit for bit: on the CPU, with stages offloaded to the disk, from a
compiled program and from a memory-mapped bf16 artifact; maps that cannot run are refused.

This machine has no GPU: CPU and disk placement are what is tested here.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch
from accelerate.utils import compute_module_sizes

import snncc
from snncc.api import compile_graph
from snncc.backends import create_executor
from snncc.backends.placed import PlacedExecutor, StagedProgram, parse_device_map, parse_max_memory
from snncc.backends.reference import ReferenceExecutor
from snncc.errors import InputError, PipelineError
from snncc.program import SpikingProgram
from tests.conftest import compiled, heldout_ids, prepared
from tests.snncc_process import run_snncc
from tests.test_cli_errors import assert_clean_error, listing

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: a GPU in a map is valid here")


def _program() -> SpikingProgram:
    return compiled("tiny-llama", "las", 8)


def _ids() -> torch.Tensor:
    return heldout_ids("tiny-llama")[:2, :48]


def _disk_budget(gm) -> int:
    """A CPU budget that holds the prologue but not the blocks. accelerate keeps room for the
    largest stage on the CPU (where disk stages are loaded to run), so the prologue fits on it
    once the budget passes the largest stage plus the prologue (with 10% to spare)."""
    sizes = compute_module_sizes(StagedProgram(gm, "fused"))
    stages = [size for name, size in sizes.items() if name.count(".") == 1]
    return int(1.1 * (sizes["stages.0"] + max(stages)))


@pytest.fixture(scope="module")
def bf16_artifact(tmp_path_factory) -> Path:
    """tiny-llama's las program stored in bf16, saved as an artifact (loaded, its weights are
    views of the file)."""
    loaded, ann, ctx = prepared("tiny-llama")
    path = tmp_path_factory.mktemp("artifact") / "bf16.snn"
    compile_graph(loaded, ann, ctx, "las", 8, dtype="bfloat16").save(path)
    return path


# --- placement gives the plain executor's outputs ----------------------------------------


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert"])
def test_auto_on_the_cpu_gives_the_plain_executors_outputs(name):
    program = compiled(name, "las", 8)
    ids = heldout_ids(name)[:2, :48]
    executor = create_executor(program.graph_module, device_map="auto")
    assert isinstance(executor, PlacedExecutor)
    assert executor.device_map == {f"stages.{i}": "cpu" for i in range(4)}  # prologue, two blocks, epilogue
    assert torch.equal(executor(ids), program(ids))


def test_a_small_cpu_budget_offloads_stages_to_the_disk(tmp_path):
    program, ids = _program(), _ids()
    executor = create_executor(program.graph_module, device_map="auto",
                               max_memory={"cpu": _disk_budget(program.graph_module)}, offload_folder=tmp_path)
    assert "disk" in executor.device_map.values() and "cpu" in executor.device_map.values()
    for name, stage in zip(executor.device_map, executor._staged.stages, strict=True):
        on_disk = executor.device_map[name] == "disk"
        assert all(tensor.is_meta == on_disk for tensor in stage.buffers()), name  # offloaded: out of memory
    assert torch.equal(executor(ids), program(ids))
    assert torch.equal(executor(ids), program(ids))  # the disk stages load again, and the same


def test_a_loaded_bf16_artifact_runs_from_cpu_and_disk(bf16_artifact, tmp_path):
    plain = snncc.load(bf16_artifact)
    assert plain.info.dtype == "bfloat16"
    placed = snncc.load(bf16_artifact, device_map="sequential", offload_folder=tmp_path,
                        max_memory={"cpu": _disk_budget(plain.graph_module)})
    device_map = placed.executor.device_map
    assert "disk" in device_map.values() and "cpu" in device_map.values()
    ids = _ids()
    assert torch.equal(placed(ids), plain(ids))
    assert not torch.equal(plain(ids), _program()(ids))  # bf16 weights: not the float32 program's outputs
    mapped = {tensor.data_ptr() for tensor in placed.graph_module.buffers()}
    cpu_stages = [stage for name, stage in zip(device_map, placed.executor._staged.stages, strict=True)
                  if device_map[name] == "cpu"]
    assert all(tensor.data_ptr() in mapped for stage in cpu_stages for tensor in stage.buffers())  # no copy


def test_an_explicit_map_places_each_stage(tmp_path):
    program, ids = _program(), _ids()
    executor = create_executor(program.graph_module, device_map={"": "cpu", "stages.1": "disk", "stages.3": "disk"},
                               offload_folder=tmp_path)
    assert executor.device_map == {"stages.0": "cpu", "stages.1": "disk", "stages.2": "cpu", "stages.3": "disk"}
    assert torch.equal(executor(ids), program(ids))


def test_every_stage_on_the_disk(tmp_path):
    """accelerate writes {"": "disk"} for a budget below its reserve; it runs stage by stage."""
    program, ids = _program(), _ids()
    executor = create_executor(program.graph_module, device_map="auto", max_memory={"cpu": 1000},
                               offload_folder=tmp_path)
    assert set(executor.device_map.values()) == {"disk"}
    assert torch.equal(executor(ids), program(ids))


def test_a_stale_offload_folder_is_not_read_and_the_executors_folder_goes_with_it(tmp_path):
    """accelerate would reuse an index.json it finds: each executor writes to a fresh folder."""
    program, ids = _program(), _ids()
    (tmp_path / "index.json").write_text(json.dumps({"stages.1.graph_module.x": {"dtype": "float32", "shape": [1]}}))
    executor = create_executor(program.graph_module, device_map={"": "disk"}, offload_folder=tmp_path)
    assert torch.equal(executor(ids), program(ids))
    assert len(listing(tmp_path)) == 2
    del executor
    gc.collect()
    assert listing(tmp_path) == {"index.json"}


def test_greedy_generation_under_a_map_equals_the_plain_programs(tmp_path):
    program = _program()
    placed = SpikingProgram(program.graph_module, program.info, program.tokenizer, device_map="auto",
                            max_memory={"cpu": _disk_budget(program.graph_module)}, offload_folder=tmp_path)
    assert not hasattr(placed.executor, "step")  # generate re-runs the sequence, uncached
    prompt = _ids()[:1, :12]
    assert torch.equal(placed.generate(prompt, 6), program.generate(prompt, 6))


def test_to_drops_the_map_and_place_sets_one(tmp_path):
    program, ids = _program(), _ids()
    again = SpikingProgram(program.graph_module, program.info, program.tokenizer)
    assert isinstance(again.place({"": "cpu"}).executor, PlacedExecutor)
    assert torch.equal(again(ids), program(ids))
    assert isinstance(again.to("cpu").executor, ReferenceExecutor)


# --- maps that cannot run ----------------------------------------------------------------------


def test_disk_without_an_offload_folder_is_refused():
    gm = _program().graph_module
    with pytest.raises(InputError, match="offload folder: give one"):
        create_executor(gm, device_map={"": "cpu", "stages.2": "disk"})
    with pytest.raises(InputError, match="offload folder"):
        create_executor(gm, device_map="auto", max_memory={"cpu": _disk_budget(gm)})


@no_cuda
@pytest.mark.parametrize("placement", [{"": 0}, {"": "cuda:0"}, {"stages.0": "cpu", "": "cuda"}])
def test_cuda_in_a_map_is_refused_without_cuda(placement):
    with pytest.raises(InputError, match="no CUDA GPU is available"):
        create_executor(_program().graph_module, device_map=placement)


@no_cuda
def test_a_gpu_budget_is_refused_without_cuda():
    with pytest.raises(InputError, match="no CUDA GPU is available"):
        create_executor(_program().graph_module, device_map="auto", max_memory={0: "1GiB", "cpu": "1GiB"})
    with pytest.raises(InputError, match="no CUDA GPU is available"):
        parse_max_memory("cpu=2GiB,0=20GiB")


@pytest.mark.parametrize("placement, words", [
    ({"stages.0": "cpu"}, "places no device for stages.1"),
    ({"": "cpu", "stages.9": "cpu"}, "'stages.9', which is not a stage"),
    ({"": "gpu"}, "'gpu' is not a device"),
    ("everywhere", "unknown device map 'everywhere'"),
])
def test_a_map_that_does_not_fit_the_program_is_refused(placement, words):
    with pytest.raises(InputError, match=words):
        create_executor(_program().graph_module, device_map=placement)


def test_a_map_goes_with_the_reference_backend_on_the_cpu():
    gm = _program().graph_module
    with pytest.raises(InputError, match="not the event backend"):
        create_executor(gm, "event", device_map="auto")
    with pytest.raises(InputError, match="not both"):
        create_executor(gm, device="meta", device_map="auto")


# --- option text -----------------------------------------------------------------------------


def test_max_memory_text_parses_to_accelerates_dict():
    assert parse_max_memory("cpu=2GiB") == {"cpu": 2 * 2**30}
    assert parse_max_memory(" cpu = 500MB , disk=1000") == {"cpu": 500 * 10**6, "disk": 1000}


@pytest.mark.parametrize("text", ["cpu", "cpu=", "=1GiB", "cpu=lots", "gpu=1GiB", "cpu=1GiB,cpu=2GiB", "cpu=-1GiB",
                                  "cpu=infGiB", ""])
def test_bad_max_memory_text_is_refused_on_one_line(text):
    with pytest.raises(InputError, match="max memory") as raised:
        parse_max_memory(text)
    assert "\n" not in str(raised.value)


def test_a_device_map_file_is_parsed_and_checked(tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"": "cpu", "stages.2": "disk"}))
    assert parse_device_map(str(path)) == {"": "cpu", "stages.2": "disk"}
    assert parse_device_map("balanced") == "balanced"
    for text, words in [('{"layers.0": "cpu"}', "name stages"), ('{"": "tpu"}', "not a device"), ("[1]", "object"),
                        ("{", "not a readable JSON")]:
        path.write_text(text)
        with pytest.raises(InputError, match=words):
            parse_device_map(str(path))
    with pytest.raises(InputError, match="neither"):
        parse_device_map(str(tmp_path / "missing.json"))
    path.write_text(" " * (2**20 + 1))
    with pytest.raises(InputError, match="not a device map"):  # refused before it is read
        parse_device_map(str(path))


# --- compiling under a map ----------------------------------------------------------------


def test_a_compile_under_a_map_returns_the_program_placed(tmp_path):
    """The calibration runs where the map puts each block (here the CPU), the program is the
    one compiled without a map, and it comes back placed, some stages on the disk."""
    loaded, ann, ctx = prepared("tiny-llama")
    plain = compile_graph(loaded, ann, ctx, "las", 8)
    placed = compile_graph(loaded, ann, ctx, "las", 8, device_map="auto",
                           max_memory={"cpu": _disk_budget(plain.graph_module)}, offload_folder=tmp_path)
    assert isinstance(placed.executor, PlacedExecutor) and "disk" in placed.executor.device_map.values()
    tensors, plain_tensors = placed.graph_module.state_dict(), plain.graph_module.state_dict()
    assert tensors.keys() == plain_tensors.keys()
    assert all(torch.equal(tensor, plain_tensors[name]) for name, tensor in tensors.items())
    assert torch.equal(placed(_ids()), plain(_ids()))


def test_blocks_calibrated_on_another_device_give_the_same_program():
    """Each block moves to its device to calibrate and back for the passes. "cpu:0" is the CPU
    under another name: the move and the way back run without a GPU, and change nothing."""
    from snncc.blockwise import compile_stages
    from snncc.calibration import CalibrationContext
    from snncc.ir.stages import split_stages
    from snncc.pipeline import Pipeline

    _, ann, ctx = prepared("tiny-llama")
    count = len(split_stages(ann))
    programs = []
    for devices in (None, [torch.device("cpu", 0)] * count):
        fresh = CalibrationContext(ctx.batches, ctx.source)
        fresh.attach(ann)
        gm, _ = compile_stages(ann, fresh, Pipeline.parse("las", 8), devices=devices)
        programs.append(gm)
    plain, moved = programs
    assert all(t.device == torch.device("cpu") for t in moved.state_dict().values())
    assert torch.equal(moved(_ids()), plain(_ids()))
    assert all(torch.equal(t, plain.state_dict()[k]) for k, t in moved.state_dict().items())


def test_a_map_is_refused_where_the_compile_runs_the_whole_model():
    loaded, ann, ctx = prepared("tiny-llama")
    with pytest.raises(PipelineError, match="places a block-by-block compile"):
        compile_graph(loaded, ann, ctx, "fas", device_map="auto")


# --- the command line --------------------------------------------------------------------------


def test_snncc_run_placed_prints_what_it_prints_unplaced(bf16_artifact, tmp_path):
    budget = _disk_budget(snncc.load(bf16_artifact).graph_module)
    args = ("run", str(bf16_artifact), "--prompt", "Once upon", "--max-new-tokens", "4")
    plain = run_snncc(tmp_path, *args)
    placed = run_snncc(tmp_path, *args, "--device-map", "auto", "--max-memory", f"cpu={budget}",
                       "--offload-folder", "offload")
    assert plain.returncode == 0 and placed.returncode == 0, placed.stderr
    assert placed.stdout == plain.stdout and placed.stdout.startswith("Once upon")
    assert placed.stderr == ""
    assert listing(tmp_path / "offload") == set()  # the run's offload files went with it


def test_snncc_profile_placed_prints_what_it_prints_unplaced(bf16_artifact, tmp_path):
    args = ("profile", str(bf16_artifact), "--prompt", "Hello", "--json")
    plain = run_snncc(tmp_path, *args)
    placed = run_snncc(tmp_path, *args, "--device-map", "auto")
    assert plain.returncode == 0 and placed.returncode == 0, placed.stderr
    assert placed.stdout == plain.stdout


@pytest.mark.parametrize("options, words", [
    (["--device-map", "auto", "--max-memory", "cpu=lots"], ["max memory", "cpu=lots"]),
    pytest.param(["--device-map", "auto", "--max-memory", "cpu=1GiB,0=1GiB"], ["CUDA"], marks=no_cuda),
    (["--max-memory", "cpu=1GiB"], ["--device-map"]),
    (["--device-map", "nowhere.json"], ["device map", "nowhere.json"]),
    (["--device-map", "disk.json"], ["--offload-folder"]),
    (["--device-map", "auto", "--backend", "event"], ["--device-map", "event"]),
])
def test_bad_placement_options_fail_on_one_line(bf16_artifact, tmp_path, options, words):
    (tmp_path / "disk.json").write_text(json.dumps({"": "disk"}))
    before = listing(tmp_path)
    result = run_snncc(tmp_path, "run", str(bf16_artifact), "--prompt", "hi", *options)
    assert_clean_error(result, *words, folder=tmp_path, before=before)
    assert result.returncode == 2  # the command line must change, found before any model loads


@pytest.mark.parametrize("options", [["--passes", "fas"], ["--passes", "las", "--stop-after", "fold"]])
def test_snncc_compile_refuses_a_map_where_it_runs_the_whole_model(tmp_path, options):
    before = listing(tmp_path)
    result = run_snncc(tmp_path, "compile", "tiny-llama", *options, "--device-map", "auto")
    assert_clean_error(result, "--device-map", "whole model", folder=tmp_path, before=before)
    assert result.returncode == 2
