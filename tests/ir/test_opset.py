"""snncc.ir.opset: the one table of ops an artifact may call covers every op the pipelines
emit (every builtin tiny model here; SmolLM2 and MiniLM in tests/test_real_models.py), and
nothing outside it resolves or saves."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

from snncc.api import compile_graph
from snncc.artifact import save_program
from snncc.errors import ArtifactError
from snncc.ir.opset import ATEN_OPS, SNN_OPS, op_name, resolve_op
from snncc.models import TINY_MODELS
from snncc.program import ProgramInfo, SpikingProgram
from snncc.tokenizer import ByteTokenizer
from tests.conftest import compiled, prepared

# fas with short calibration: the same ops as the default's, and the compile test_event shares.
PIPELINES = ("none", "las", "fas,calibrate{layer_steps=3,neuron_steps=3,batches=1}")


def ops_outside_the_table(gm: fx.GraphModule) -> set[str]:
    """The graph's call targets the table does not hold."""
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function" and op_name(n.target) is None}


@pytest.mark.parametrize("spec", PIPELINES)
@pytest.mark.parametrize("name", TINY_MODELS)
def test_every_op_the_pipelines_emit_is_in_the_table(name, spec):
    T = 8 if spec.startswith("fas") else 12  # the T the other tests compile these at (shared compiles)
    assert not ops_outside_the_table(compiled(name, spec, T).graph_module)


def test_a_program_stopped_before_ifencode_is_in_the_table():
    """Its QCFS activations (snn.qcfs) are ops no full pipeline leaves."""
    loaded, ann, ctx = prepared("tiny-llama")
    gm = compile_graph(loaded, ann, ctx, "fold,qcfs", 6).graph_module
    assert any(n.target == torch.ops.snn.qcfs.default for n in gm.graph.nodes)
    assert not ops_outside_the_table(gm)


def test_every_entry_resolves_to_its_own_name():
    for namespace, table in (("aten", ATEN_OPS), ("snn", SNN_OPS)):
        for entry in table:
            op = resolve_op(f"{namespace}.{entry}")
            assert op is not None and op_name(op) == f"{namespace}.{entry}", entry


@pytest.mark.parametrize("name", ["aten.from_file.default", "aten.save", "operator.attrgetter", "operator.call",
                                  "builtins.eval", "snn.missing.default", "aten.linear", "os.system", ""])
def test_names_outside_the_table_resolve_to_nothing(name):
    assert resolve_op(name) is None


def test_a_graph_calling_an_op_outside_the_table_does_not_save(tmp_path):
    graph = fx.Graph()
    x = graph.placeholder("input_ids")
    graph.output(graph.call_function(torch.ops.aten.erfinv.default, (x,)))
    info = ProgramInfo("m", "causal-lm", "none", 0, 8, 256)
    program = SpikingProgram(fx.GraphModule(torch.nn.Module(), graph), info, ByteTokenizer())
    with pytest.raises(ArtifactError, match="snncc.ir.opset"):
        save_program(program, tmp_path / "a.snn")
    assert not list(tmp_path.iterdir())
