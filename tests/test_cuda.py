"""The reference executor on CUDA matches the CPU (runs only where a GPU is present)."""

from __future__ import annotations

import pytest
import torch

from snncc.api import compile_graph
from snncc.ir.ops import execution_mode
from tests.conftest import heldout_ids, prepared

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


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
