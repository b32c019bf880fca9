"""The reference executor on another device: CUDA matches the CPU (where a GPU is present);
on the meta device, which exists everywhere, every tensor of a program follows it."""

from __future__ import annotations

import pytest
import torch

from snncc.api import compile_graph
from snncc.backends import create_executor
from snncc.ir.ops import execution_mode
from snncc.ir.rewrite import copy_graph_module
from snncc.models import CAUSAL_LM
from tests.conftest import heldout_ids, prepared

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


@needs_cuda
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-bert"])
@pytest.mark.parametrize("mode", ["fused", "unrolled"])
def test_cuda_matches_cpu(name, mode):
    loaded, ann, ctx = prepared(name)
    program = compile_graph(loaded, ann, ctx, "encode", 24)
    ids = heldout_ids(name)[:2]
    with execution_mode(mode):
        cpu = program.graph_module(ids)
    program.to("cuda")
    program.executor.mode = mode
    gpu = program(ids).cpu()
    program.to("cpu")
    # Float order differs on the GPU; at T = 24 a flipped code is worth ~1e-6 of a range.
    torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-4)


@needs_cuda
def test_a_compile_placed_on_the_gpu_calibrates_there_and_matches_the_cpu():
    """device_map {"": 0}: every block calibrates on the GPU and the program runs there."""
    loaded, ann, ctx = prepared("tiny-llama")
    cpu = compile_graph(loaded, ann, ctx, "encode", 24)
    gpu = compile_graph(loaded, ann, ctx, "encode", 24, device_map={"": 0})
    assert set(gpu.executor.device_map.values()) == {0}
    ids = heldout_ids("tiny-llama")[:2]
    # Ranges recorded on the GPU may differ in the last bit; at T = 24 that is ~1e-6 of a range.
    torch.testing.assert_close(gpu(ids), cpu(ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert"])
@pytest.mark.parametrize("mode", ["fused", "unrolled"])
def test_program_follows_the_device(name, mode):
    """A tensor the executor leaves on the CPU (a traced `aten.to(x, device)` of llama's rotary
    table, say) fails against meta weights as it would against CUDA ones."""
    loaded, ann, ctx = prepared(name)
    program = compile_graph(loaded, ann, ctx, "las", 8)
    executor = create_executor(copy_graph_module(program.graph_module), "reference", "meta", mode)
    ids = heldout_ids(name)[:1, :9]
    assert executor(ids).device.type == "meta"
    if loaded.task == CAUSAL_LM:
        _, past = executor.step(ids, None, 0)
        logits, _ = executor.step(ids[:, :1], past, ids.shape[1])
        assert logits.device.type == "meta"


@needs_cuda
@pytest.mark.parametrize("name", ["tiny-llama"])
def test_the_compiled_executor_on_cuda_matches_the_cpu(name):
    """torch.compile on CUDA (Triton kernels for the neurons): the forward within the CPU's
    bounds (T = 22, the longest code the compiled neurons take; a flipped code is worth ~1e-6
    of a range) and cached greedy generation token for token, its decoding steps CUDA graphs
    replayed on static caches."""
    loaded, ann, ctx = prepared(name)
    program = compile_graph(loaded, ann, ctx, "las", 22)
    ids = heldout_ids(name)[:2, :40]
    cpu, cpu_tokens = program(ids), program.generate(ids[:, :24], 8)
    program.executor = create_executor(copy_graph_module(program.graph_module), "reference", "cuda", compiled=True)
    assert program.executor.static_cache
    torch.testing.assert_close(program(ids).cpu(), cpu, rtol=1e-4, atol=1e-4)
    assert torch.equal(program.generate(ids[:, :24], 8), cpu_tokens)
