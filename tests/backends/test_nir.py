"""NIR export: IF populations and their synapses round-trip through nir and run in nirtorch
as the reference does; what NIR cannot express is listed, and a program with nothing
expressible is refused."""

from __future__ import annotations

import functools
import json
import re

import nir
import numpy as np
import pytest
import torch

from snncc.api import compile_graph
from snncc.backends.nir import _if_population, _synapse, refusal, run_synapse, to_nir, verify_nir, write_nir
from snncc.errors import ExportError
from snncc.pipeline import Pipeline
from tests.conftest import compiled, heldout_ids, prepared

# FAS's setting: every synapse input on plain IF neurons (at T = 8 no bursts), what NIR holds
_QUICK_CALIBRATION = "calibrate{layer_steps=3,neuron_steps=3,batches=1}"
_FAS_QUICK = f"fas,qcfs{{L=8,multirange=0}},{_QUICK_CALIBRATION}"


@functools.cache
def _fas_quick():
    loaded, ann, ctx = prepared("tiny-llama")
    return compile_graph(loaded, ann, ctx, _FAS_QUICK)


def test_nir_if_population_spikes_as_the_signed_if_neuron():
    theta = np.array([1.0, 2.0, 0.5, 1.5])
    v0 = np.array([0.5, 1.0, 0.0, 1.5])  # any initial membrane in [0, theta]
    nodes, edges = {}, []
    _if_population(nodes, edges, "p", theta, v0)
    _synapse(nodes, edges, "s", "p", np.eye(4), np.zeros(4), 7)
    graph = nir.NIRGraph(nodes=nodes, edges=edges)
    currents = torch.tensor([[0.3, -0.7, 0.26, 2.5], [-1.4, 1.1, -0.05, -0.2]], dtype=torch.float64)
    spikes = torch.ops.snn.if_encode(currents, torch.tensor(theta), torch.tensor(v0), 7)
    expected = spikes.double().sum(0) / 7  # identity synapse: the mean spike per step
    # equal spike counts: one spike more or less would move an output by 1/7
    assert (run_synapse(graph, "s", currents, 7) - expected).abs().max() < 1e-12


def test_fas_program_round_trips_and_runs_in_nirtorch(tmp_path):
    program = _fas_quick()
    export = to_nir(program)
    path = tmp_path / "fas.nir"
    write_nir(export, path)
    # every linear layer fed by IF neurons (q/k/v, o, gate/up, down, LM head), none silently dropped
    linears = [n for n in program.graph_module.graph.nodes if n.target == torch.ops.snn.spike_linear.default]
    assert len(export.synapses) == len(linears)
    assert export.left_out and "spike x spike" in export.summary()
    assert 0.0 < export.exported_macs < export.spiking_macs
    check = verify_nir(program, export, path, heldout_ids("tiny-llama")[:1, :24])
    assert check.passed and check.max_relative_error <= 1e-6
    metadata = nir.read(str(path)).metadata
    assert metadata["snncc.pipeline"] == program.info.pipeline and metadata["snncc.T"] == "8"
    assert all(type(value) is str for value in metadata.values()), metadata  # no numpy scalars read back
    assert json.loads(metadata["snncc.left_out"]) == dict(export.left_out)


def test_burst_populations_are_left_out_by_name():
    """NIR's Threshold sends one spike per step: a fas program whose IF neurons burst (T = 4
    < L = 8) has nothing to export and says why; with plain IF neurons it exports."""
    loaded, ann, ctx = prepared("tiny-llama")
    bursting = compile_graph(loaded, ann, ctx, _FAS_QUICK, 4)
    with pytest.raises(ExportError, match=r"send bursts.*fas,qcfs\{L=4,multirange=0\}.*burst=1"):
        to_nir(bursting)
    plain = compile_graph(loaded, ann, ctx, f"{_FAS_QUICK},ifencode{{burst=1}}", 4)
    assert to_nir(plain).populations


def test_las_program_has_nothing_nir_can_express_and_the_refusal_names_a_pipeline_that_exports():
    """The pipeline the refusal names exports at once (its calibration here quicker, which
    changes no neuron's kind), and the check made before a compile agrees with both."""
    program = compiled("tiny-llama", "las")
    with pytest.raises(ExportError, match="nothing in this program can be expressed in NIR") as refused:
        to_nir(program)
    (spec,) = re.findall(r'the pipeline "([^"]+)"', str(refused.value))
    assert refusal(Pipeline.parse("las")) is not None and refusal(Pipeline.parse(spec)) is None
    assert f"{spec},{_QUICK_CALIBRATION}" == _FAS_QUICK
    assert to_nir(_fas_quick()).populations
