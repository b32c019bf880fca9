"""Big-model machinery on a tiny checkpoint: weights read a block at a time in their stored
dtype, programs stored in bf16, artifacts written block by block in shards, and a killed
compile resuming at its first unfinished block."""

from __future__ import annotations

import functools
import zipfile
from pathlib import Path

import pytest
import torch
from test_models import _byte_level_tokenizer

import snncc
import snncc.shards
from snncc.errors import PipelineError
from snncc.ir.rewrite import get_tensor
from snncc.ir.stages import block_index
from snncc.models import load_model
from snncc.parts import parts_folder
from snncc.pipeline import PassManager
from snncc.shards import storage_key


@functools.cache
def _checkpoint(folder: str, dtype: torch.dtype) -> Path:
    """tiny-llama saved as a user's Hugging Face directory, weights in `dtype`."""
    path = Path(folder) / str(dtype).removeprefix("torch.")
    if not path.exists():
        load_model("tiny-llama").module.model.to(dtype).save_pretrained(path)
        _byte_level_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory) -> Path:
    return _checkpoint(str(tmp_path_factory.mktemp("ckpt")), torch.bfloat16)


@functools.cache
def _las(folder: Path, dtype: str | None = None):
    """The las program of a checkpoint folder, compiled once per session (tests only read it)."""
    return snncc.compile(str(folder), passes="las", T=14, calib_tokens=512, dtype=dtype)


def _ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))


def test_a_checkpoint_is_read_lazily_in_its_own_dtype(bf16_dir):
    loaded = load_model(str(bf16_dir))
    assert loaded.weights is not None and loaded.dtype == torch.bfloat16
    assert all(p.is_meta for p in loaded.module.parameters())  # nothing read yet


def test_the_program_stores_weights_in_the_checkpoint_dtype_and_computes_in_float32(bf16_dir):
    program, as_fp32 = _las(bf16_dir), _las(bf16_dir, "float32")
    assert program.info.dtype == "bfloat16" and as_fp32.info.dtype == "float32"
    dtypes = {t.dtype for t in program.graph_module.state_dict().values() if t.is_floating_point()}
    assert dtypes == {torch.bfloat16, torch.float32}  # weights bf16; ranges and tables float32
    assert {t.dtype for t in as_fp32.graph_module.state_dict().values() if t.is_floating_point()} == {torch.float32}
    out, reference = program(_ids()), as_fp32(_ids())
    assert out.dtype == torch.float32
    # Only weights a pass rewrote (folded norms) round to bf16: far below the conversion's own error.
    assert float((out - reference).abs().max()) < 1e-2 * float(reference.abs().max())
    gm = program.graph_module
    synapses = [n for n in gm.graph.nodes if n.target == torch.ops.snn.spike_linear.default]
    assert synapses
    for node in synapses:  # every synapse reads its weight through a cast of a stored bf16 tensor
        cast = node.args[1]
        assert cast.target == torch.ops.aten._to_copy.default and cast.kwargs["dtype"] == torch.float32
        assert get_tensor(gm, cast.args[0]).dtype == torch.bfloat16


def test_saved_while_compiling_it_equals_the_program_and_loads_mapped(bf16_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(snncc.shards, "SHARD_BYTES", 4096)  # many shards from a tiny model
    path = tmp_path / "out.snn"
    program = snncc.compile(str(bf16_dir), passes="las", T=14, calib_tokens=512, save_to=path)
    assert not parts_folder(path).exists()  # the artifact moved out of it, then it was removed
    with zipfile.ZipFile(path) as archive:
        infos = [i for i in archive.infolist() if snncc.shards.SHARD_MEMBER.fullmatch(i.filename)]
    assert len(infos) >= 4  # one per block at least, plus what finish adds
    loaded = snncc.load(path)
    assert torch.equal(loaded(_ids()), program(_ids()))
    in_memory = _las(bf16_dir).graph_module.state_dict()
    assert set(program.graph_module.state_dict()) == set(in_memory)  # no tensor renamed or stored twice
    stored = sum(t.numel() * t.element_size() for t in {storage_key(t): t for t in in_memory.values()}.values())
    assert sum(i.file_size for i in infos) < stored + 4096 * len(infos)  # headers aside, each tensor once
    assert torch.equal(program(_ids()), _las(bf16_dir)(_ids()))


def _count_passes(monkeypatch, fail_at: int | None = None, error: BaseException | None = None) -> list:
    """Count PassManager runs (one per stage compiled) in the returned list; with `fail_at`,
    the run of that number raises `error` instead (a compile killed or failing there)."""
    original, runs = PassManager.run, []

    def counted(self, gm, ctx):
        runs.append(1)
        if len(runs) == fail_at:
            raise error
        return original(self, gm, ctx)

    monkeypatch.setattr(PassManager, "run", counted)
    return runs


def test_a_killed_compile_resumes_at_its_first_unfinished_block(bf16_dir, tmp_path, monkeypatch):
    path = tmp_path / "out.snn"
    fresh = _las(bf16_dir)
    _count_passes(monkeypatch, fail_at=3, error=KeyboardInterrupt())  # killed while compiling block 1
    with pytest.raises(KeyboardInterrupt):
        snncc.compile(str(bf16_dir), passes="las", T=14, calib_tokens=512, save_to=path)
    assert not path.exists() and parts_folder(path).exists()
    runs = _count_passes(monkeypatch)
    resumed = snncc.compile(str(bf16_dir), passes="las", T=14, calib_tokens=512, save_to=path)
    assert len(runs) == 2  # block 1 and the epilogue: the prologue and block 0 were kept
    assert torch.equal(resumed(_ids()), fresh(_ids()))
    assert resumed.info.coverage == fresh.info.coverage
    assert torch.equal(snncc.load(path)(_ids()), fresh(_ids()))
    assert not parts_folder(path).exists()


def test_a_compile_killed_while_writing_a_block_resumes_from_the_last_complete_one(bf16_dir, tmp_path,
                                                                                   monkeypatch):
    """The artifact is written in the parts folder as blocks finish: bytes a kill left after
    the last complete block are cut off, and the artifact ends up whole."""
    import snncc.parts

    path, original, writes = tmp_path / "out.snn", snncc.parts.write_shard, []

    def killed_on_the_third(archive, name, tensors):
        writes.append(name)
        if len(writes) == 3:  # block 1's shard, half written
            archive.fp.write(b"\x00" * 1000)
            raise KeyboardInterrupt
        return original(archive, name, tensors)

    monkeypatch.setattr(snncc.parts, "write_shard", killed_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        snncc.compile(str(bf16_dir), passes="las", T=14, calib_tokens=512, save_to=path)
    monkeypatch.setattr(snncc.parts, "write_shard", original)
    runs = _count_passes(monkeypatch)
    resumed = snncc.compile(str(bf16_dir), passes="las", T=14, calib_tokens=512, save_to=path)
    assert len(runs) == 2  # block 1 and the epilogue
    assert torch.equal(snncc.load(path)(_ids()), _las(bf16_dir)(_ids()))
    assert torch.equal(resumed(_ids()), _las(bf16_dir)(_ids()))


def test_parts_of_another_compile_are_not_resumed(bf16_dir, tmp_path, monkeypatch):
    path = tmp_path / "out.snn"
    _count_passes(monkeypatch, fail_at=2, error=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        snncc.compile(str(bf16_dir), passes="encode", T=8, calib_tokens=512, save_to=path)
    runs = _count_passes(monkeypatch)
    program = snncc.compile(str(bf16_dir), passes="encode", T=10, calib_tokens=512, save_to=path)  # another T
    assert len(runs) == 4 and program.T == 10


def test_a_compile_that_fails_leaves_no_parts(bf16_dir, tmp_path, monkeypatch):
    """An error (not an interruption) would happen again: nothing is kept to resume."""
    path = tmp_path / "out.snn"
    _count_passes(monkeypatch, fail_at=2, error=PipelineError("a pass failed"))
    with pytest.raises(PipelineError):
        snncc.compile(str(bf16_dir), passes="encode", calib_tokens=512, save_to=path)
    assert not path.exists() and not parts_folder(path).exists()
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("family", ["tiny-llama", pytest.param("tiny-gpt2", marks=pytest.mark.slow),
                                    pytest.param("tiny-bert", marks=pytest.mark.slow)])
def test_one_traced_block_serves_every_block(tmp_path, family):
    """A lazily loaded model is traced with one block and the block repeated: the same
    computation as tracing every block, to the bit."""
    from snncc import frontend
    from snncc.blockwise import load_all_weights

    load_model(family).module.model.save_pretrained(tmp_path)
    _byte_level_tokenizer().save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    repeated, full = frontend.trace(loaded), frontend._traced(loaded)
    load_all_weights(loaded, repeated)
    load_all_weights(loaded, full)
    ids = _ids()
    assert torch.equal(repeated(ids), full(ids))
    assert {block_index(n) for n in repeated.graph.nodes} == {None, 0, 1}  # block 1 has its own module path

