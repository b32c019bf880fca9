"""Generation with a KV cache (snncc.ir.incremental): the same tokens as re-running the
whole sequence, on every causal tiny model, pipeline and execution mode."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.export import Dim

from snncc.api import compile_graph
from snncc.backends import create_executor
from snncc.errors import InputError
from snncc.frontend import _clean
from snncc.ir.incremental import CacheError, incremental_graph
from tests.conftest import prepared

CAUSAL = ["tiny-llama", "tiny-qwen2", "tiny-gpt2", "tiny-opt"]
PIPELINES = {"none": "none", "las": "las", "fas": "fas,calibrate{layer_steps=2,neuron_steps=2,batches=1}"}


@functools.cache
def _program(name: str, pipeline: str):
    loaded, ann, ctx = prepared(name)
    return compile_graph(loaded, ann, ctx, PIPELINES[pipeline], 8 if pipeline == "fas" else 12)


def _prompt(name: str, length: int = 9) -> torch.Tensor:
    vocab = _program(name, "none").info.vocab_size
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("mode", ["fused", "unrolled"])
@pytest.mark.parametrize("pipeline", list(PIPELINES))
@pytest.mark.parametrize("name", CAUSAL)
def test_cached_generation_gives_the_tokens_of_full_recomputation(name, pipeline, mode):
    program = _program(name, pipeline)
    program.executor = create_executor(program.graph_module, "reference", "cpu", mode)
    prompt = _prompt(name)
    cached = program.generate(prompt, 12, cache=True)
    recomputed = program.generate(prompt, 12, cache=False)
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("name", CAUSAL)
def test_cached_steps_equal_the_full_forward_bit_for_bit_in_exact_mode(name):
    """Float64 membranes make each row independent of how many rows run with it."""
    executor = create_executor(_program(name, "las").graph_module, "reference", "cpu", "exact")
    tokens = _prompt(name, 14)
    full = executor(tokens)
    first, past = executor.step(tokens[:, :9], None, 0)
    second, past = executor.step(tokens[:, 9:13], past, 9)
    third, _ = executor.step(tokens[:, 13:], past, 13)
    assert torch.equal(torch.cat([first, second, third], dim=1), full)


def _decode(executor, prompt: torch.Tensor, steps: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The logits of a prompt pass and `steps` greedy decoding steps, and the last caches."""
    logits, past = executor.step(prompt, None, 0)
    outputs = [logits]
    for _ in range(steps):
        token = outputs[-1][:, -1:].argmax(-1)
        logits, past = executor.step(token, past, prompt.shape[1] + len(outputs) - 1)
        outputs.append(logits)
    return outputs, past


@pytest.mark.parametrize(("pipeline", "mode"), [("las", "fused"), ("las", "unrolled"), ("none", "fused")])
def test_decoding_on_static_caches_gives_the_growing_caches_logits(pipeline, mode):
    """Preallocated caches (what CUDA graphs replay; eager here, compiled in
    tests/backends/test_compiled.py): `las` logits bit for bit, through a growth of the cache
    from 64 to 128 rows. The ANN's float softmax sums the extra (masked, zero) columns in
    another order: equal to float32 rounding."""
    from snncc.backends.reference import STATIC_CACHE_MIN_LENGTH, ReferenceExecutor

    program = _program("tiny-llama", pipeline)
    prompt = _prompt("tiny-llama", STATIC_CACHE_MIN_LENGTH - 3)
    growing = ReferenceExecutor(program.graph_module, "cpu", mode)
    static = ReferenceExecutor(program.graph_module, "cpu", mode, static_cache=True)
    want, _ = _decode(growing, prompt, 5)
    got, caches = _decode(static, prompt, 5)
    grown = [cache.shape[axis] for cache, axis in zip(caches, static._cache_axes, strict=True)]
    assert grown == [2 * STATIC_CACHE_MIN_LENGTH] * len(caches)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b) if pipeline == "las" else torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    static.max_cache_length = STATIC_CACHE_MIN_LENGTH + 9  # the model's positions cap the cache
    assert all(cache.shape[axis] == STATIC_CACHE_MIN_LENGTH + 9
               for cache, axis in zip(_decode(static, prompt, 5)[1], static._cache_axes, strict=True))


def test_unrolled_mode_caches_spike_trains_and_fused_mode_their_values():
    program, prompt = _program("tiny-llama", "las"), _prompt("tiny-llama")
    trains = create_executor(program.graph_module, "reference", "cpu", "unrolled").step(prompt, None, 0)[1]
    values = create_executor(program.graph_module, "reference", "cpu", "fused").step(prompt, None, 0)[1]
    layers = 2 * 2  # keys and values of each attention layer
    assert len(trains) == len(values) == layers
    assert all(t.dtype == torch.int8 and t.shape[0] == program.T for t in trains)
    assert all(v.is_floating_point() and 9 in v.shape[-2:] for v in values)  # keys transposed, values not


def test_bad_generation_requests_are_refused():
    program = _program("tiny-llama", "none")
    with pytest.raises(InputError, match="max_new_tokens must be at least 1"):
        program.generate(_prompt("tiny-llama"), 0)
    with pytest.raises(InputError, match="allows at most"):
        program.generate(_prompt("tiny-llama"), program.info.max_positions)


class _Toy(torch.nn.Module):
    """Embeddings, optionally attending over their running sum (positions mixed outside
    attention)."""

    def __init__(self, attend_to_running_sum: bool):
        super().__init__()
        self.embed = torch.nn.Embedding(32, 8)
        self.attend = attend_to_running_sum

    def forward(self, ids):
        x = self.embed(ids)
        if not self.attend:
            return x * 2
        return torch.softmax(x @ x.cumsum(dim=1).transpose(1, 2), dim=-1) @ x


def _graph(module: torch.nn.Module):
    dims = {"ids": {0: Dim("batch", min=1, max=8), 1: Dim("seq", min=1, max=64)}}
    return _clean(torch.export.export(module, (torch.zeros(2, 8, dtype=torch.long),), dynamic_shapes=dims).module())


def test_mixing_positions_outside_attention_is_refused():
    with pytest.raises(CacheError, match="cumsum.*across positions"):
        incremental_graph(_graph(_Toy(attend_to_running_sum=True)))


def test_a_graph_without_attention_has_nothing_to_cache():
    with pytest.raises(CacheError, match="no attention"):
        incremental_graph(_graph(_Toy(attend_to_running_sum=False)))
