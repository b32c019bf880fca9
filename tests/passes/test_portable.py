"""portable: runtime-dependent analog ops read float64 and round once; nothing else changes."""

from __future__ import annotations

import torch

from snncc.ir.ops import execution_mode
from snncc.passes.portable import RUNTIME_DEPENDENT, PortablePass
from tests.conftest import assert_left_alone, compiled, heldout_ids

aten = torch.ops.aten


def _widened(node) -> bool:
    source = node.args[0]
    return source.target == aten._to_copy.default and source.kwargs.get("dtype") == torch.float64


def test_runtime_dependent_ops_run_in_float64_and_round_once(tiny_name):
    program = compiled(tiny_name, "las", 12)
    sites = [n for n in program.graph_module.graph.nodes if n.target in RUNTIME_DEPENDENT]
    assert sites and all(_widened(n) for n in sites)
    assert all(len(n.users) == 1 and next(iter(n.users)).kwargs.get("dtype") == torch.float32 for n in sites)
    # without the pass: the same program but for float32 rounding in those few ops
    narrow = compiled(tiny_name, "fold,nonlinear,attention,outlier,ffn,encode", 12)
    ids = heldout_ids(tiny_name)[:2, :48]
    with torch.no_grad(), execution_mode("exact"):
        wide_out, narrow_out = program.graph_module(ids), narrow.graph_module(ids)
    assert wide_out.dtype == torch.float32
    assert (wide_out - narrow_out).abs().max() <= 1e-2 * narrow_out.abs().max()


def test_a_portable_program_is_left_alone():
    """Run again, the pass finds no float32 input left to widen."""
    assert_left_alone(PortablePass(), compiled("tiny-llama", "las", 12).graph_module, None)
