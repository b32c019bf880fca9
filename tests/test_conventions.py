"""A SpikingProgram follows PyTorch's and transformers' conventions: it is a module, and its
`generate` is transformers' greedy `generate`, token for token, batched and padded."""

from __future__ import annotations

import functools

import pytest
import torch

import snncc
from snncc.api import compile_graph
from snncc.errors import InputError
from tests.conftest import byte_level_hf_tokenizer, heldout_ids, prepared

CAUSAL = ["tiny-llama", "tiny-qwen2", "tiny-gpt2", "tiny-opt"]


@functools.cache
def _ann_program(name: str):
    """The `none` pipeline: the ANN's own graph, so its tokens must be the model's."""
    loaded, ann, ctx = prepared(name)
    return compile_graph(loaded, ann, ctx, "none")


def _transformers_greedy(name: str, ids: torch.Tensor, new: int, **kwargs) -> torch.Tensor:
    model = prepared(name)[0].module.model
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new, do_sample=False, **kwargs)


def _left_padded(rows: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
    return ids, mask


def test_a_program_is_a_module_with_a_useful_repr():
    program = _ann_program("tiny-llama")
    assert isinstance(program, torch.nn.Module) and not program.training
    assert set(program.state_dict()) == {f"graph_module.{key}" for key in program.graph_module.state_dict()}
    assert sum(p.numel() for p in program.parameters()) + sum(b.numel() for b in program.buffers()) > 0
    assert program.device == torch.device("cpu")
    text = repr(program)
    for fact in ("tiny-llama", "pipeline='none'", "T=0", "coverage=", "device=cpu", "backend=reference"):
        assert fact in text
    assert len(text.splitlines()) < 10  # not the graph's own repr
    with pytest.raises(InputError, match="keeps the weight dtype"):
        program.to(torch.float16)


@pytest.mark.parametrize("name", CAUSAL)
def test_generate_equals_transformers_greedy_generate(name):
    ids = heldout_ids(name)[:2, :12]
    ours = _ann_program(name).generate(ids, max_new_tokens=16)
    assert ours.shape == (2, 28) and torch.equal(ours[:, :12], ids)
    assert torch.equal(ours, _transformers_greedy(name, ids, 16))


@pytest.mark.parametrize("name", CAUSAL)
def test_padded_batches_generate_as_each_row_alone_and_as_transformers(name):
    program = _ann_program(name)
    rows = [heldout_ids(name)[0, :12], heldout_ids(name)[1, :7], heldout_ids(name)[2, :12]]
    ids, mask = _left_padded(rows, pad=0)
    batched = program.generate(ids, max_new_tokens=10, attention_mask=mask)
    for row, prompt in zip(batched, rows, strict=True):
        alone = program.generate(prompt, max_new_tokens=10)[0]
        assert torch.equal(row[ids.shape[1] - len(prompt):], alone)
    assert torch.equal(batched, _transformers_greedy(name, ids, 10, attention_mask=mask))


def test_generation_stops_at_end_of_sequence_and_pads_as_transformers():
    program, ids = _ann_program("tiny-llama"), heldout_ids("tiny-llama")[:2, :12]
    free = program.generate(ids, max_new_tokens=12, eos_token_id=[])
    eos = int(free[0, 15])  # row 0 ends on its 4th new token
    ended = program.generate(ids, max_new_tokens=12, eos_token_id=eos, pad_token_id=1)
    expected = _transformers_greedy("tiny-llama", ids, 12, eos_token_id=eos, pad_token_id=1)
    assert torch.equal(ended, expected)
    first_eos = (free[0, 12:] == eos).nonzero()[0, 0] + 12
    assert torch.all(ended[0, first_eos + 1:] == 1) and ended[0, first_eos] == eos


def test_forward_with_a_padding_mask_computes_each_row_alone():
    program = _ann_program("tiny-qwen2")
    rows = [heldout_ids("tiny-qwen2")[0, :10], heldout_ids("tiny-qwen2")[1, :6]]
    ids, mask = _left_padded(rows, pad=0)
    outputs = program(ids, attention_mask=mask)
    torch.testing.assert_close(outputs[1, 4:], program(rows[1])[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(outputs[1, :4], torch.zeros_like(outputs[1, :4]))


def test_bad_generation_inputs_are_refused_in_words():
    program, ids = _ann_program("tiny-llama"), heldout_ids("tiny-llama")[:2, :8]
    with pytest.raises(InputError, match="not text"):
        program.generate("The cat", max_new_tokens=4)
    right = torch.ones_like(ids)
    right[1, -2:] = 0
    with pytest.raises(InputError, match="padding on the left"):
        program.generate(ids, max_new_tokens=4, attention_mask=right)
    gap = torch.ones_like(ids)
    gap[0, 3] = 0
    with pytest.raises(InputError, match="between tokens"):
        program.generate(ids, max_new_tokens=4, attention_mask=gap)
    with pytest.raises(InputError, match="all padding"):
        program.generate(ids, max_new_tokens=4, attention_mask=torch.zeros_like(ids))


def test_a_transformers_tokenizer_object_is_accepted_and_saved(tmp_path):
    model = prepared("tiny-llama")[0].module.model
    hf_tokenizer = byte_level_hf_tokenizer()
    program = snncc.compile(model, passes="none", tokenizer=hf_tokenizer, calib_tokens=64)
    program.save(tmp_path / "p.snn")
    loaded = snncc.load(tmp_path / "p.snn")
    text = chr(0x141) + chr(0x142)
    assert loaded.tokenizer.encode(text) == hf_tokenizer.encode(text) == [0x41, 0x42]
    with pytest.raises(InputError, match="not a tokenizer"):
        snncc.compile(model, passes="none", tokenizer=object())
