"""Numbers snncc reports never come from NaN or inf: evaluation, compilation and fine-tuning
stop with one line naming where the non-finite value started."""

from __future__ import annotations

import pytest
import torch

from snncc.api import compile_graph
from snncc.calibration import ActivationStats, CalibrationContext
from snncc.errors import InputError, ModelError, NumericsError, PipelineError
from snncc.evaluate import evaluate
from snncc.finetune import FinetuneConfig, finetune
from snncc.ir.rewrite import get_tensor
from snncc.program import SpikingProgram
from tests.backends.test_nan import _poison_input_of_last_encoder, _program, _with_embedding
from tests.conftest import heldout_ids, prepared

NAN = float("nan")


def _chunks() -> list[torch.Tensor]:
    return [heldout_ids("tiny-llama")[:1, :16]]


def test_evaluate_refuses_nan_logits_and_names_the_node_that_made_them():
    program = _program("las")
    ids = _chunks()[0]
    gm = _poison_input_of_last_encoder(program.graph_module, {int(ids[0, 3]): (2, NAN)})
    broken = SpikingProgram(gm, program.info, program.tokenizer)
    with pytest.raises(NumericsError, match=r"^the spiking program's outputs hold NaN \(first produced by node "
                                            r"'poison_0'") as caught:
        evaluate(broken, prepared("tiny-llama")[1], _chunks())
    assert "\n" not in str(caught.value)


def test_evaluate_refuses_an_ann_with_nan_outputs():
    program = _program("las")
    ann = prepared("tiny-llama")[1]
    table = next(n for n in ann.graph.nodes if n.target == torch.ops.aten.embedding.default).args[0]
    weight = get_tensor(ann, table).clone()
    weight[:, 0] = NAN
    with pytest.raises(NumericsError, match=r"^the ANN's outputs hold NaN \(first produced by node 'nan_embedding'"):
        evaluate(program, _with_embedding(ann, weight), _chunks())


def test_compile_refuses_a_nan_weight_naming_the_tensor():
    loaded, ann, ctx = prepared("tiny-llama")
    weight = torch.zeros(256, 64)
    weight[5, 1] = NAN
    with pytest.raises(ModelError, match=r"^tensor 'nan_embedding' of the traced model holds NaN"):
        compile_graph(loaded, _with_embedding(ann, weight), ctx, "las")


@pytest.mark.parametrize("value", [float("inf"), float("-inf")])
def test_compile_refuses_an_infinite_weight_naming_the_tensor(value):
    loaded, ann, ctx = prepared("tiny-llama")
    weight = torch.zeros(256, 64)
    weight[7, 3] = value
    with pytest.raises(ModelError, match=r"^tensor 'nan_embedding' of the traced model holds inf"):
        compile_graph(loaded, _with_embedding(ann, weight), ctx, "las")


def test_compile_refuses_nan_calibration_ranges():
    loaded, ann, ctx = prepared("tiny-llama")
    compile_graph(loaded, ann, ctx, "fold,encode", 8)  # records the ranges
    stats = {name: ActivationStats(torch.full_like(s.absmax, NAN), s.samples) for name, s in ctx.stats.items()}
    broken = CalibrationContext(ctx.batches, ctx.source, stats=stats)
    broken.attach(ann)
    for spec in ("fold,encode", "fold,nonlinear"):
        with pytest.raises(PipelineError, match=r"the calibration range of '\w+' is NaN"):
            compile_graph(loaded, ann, broken, spec, 8)


class _Student(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(0.5, 1.5, 8))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return ids.float().unsqueeze(-1) * self.w


def _run(config: FinetuneConfig, checkpoint=None):
    student = torch.fx.symbolic_trace(_Student())
    teacher = torch.fx.symbolic_trace(_Student())
    batches = [torch.arange(1, 9).view(1, 8) * (i + 1) * 10 for i in range(3)]
    tensors = {"w": student.w}
    return finetune(student, teacher, batches, tensors, {"w"}, config, checkpoint)


@pytest.mark.parametrize("lr", [NAN, float("inf"), 0.0, -1e-3])
def test_finetune_refuses_a_non_finite_or_non_positive_learning_rate(lr):
    with pytest.raises(InputError, match="learning rate must be a finite number > 0"):
        _run(FinetuneConfig(steps=2, lr=1e-3, lambda_lr=lr, mode="lambda", check=0))


def test_finetune_stops_at_the_step_whose_loss_is_not_finite_and_saves_nothing_from_it(tmp_path):
    checkpoint = tmp_path / "ft.pt"
    config = FinetuneConfig(steps=10, lr=1e-3, lambda_lr=1e37, mode="lambda", save_every=1, check=0)
    with pytest.raises(NumericsError, match=r"^fine-tuning diverged: .* (step|after step) \d+") as caught:
        _run(config, checkpoint)
    assert "\n" not in str(caught.value)
    if checkpoint.exists():  # what was saved before the divergence is finite
        state = torch.load(checkpoint, weights_only=True)
        assert all(bool(torch.isfinite(t).all()) for t in state["tensors"].values())


@pytest.mark.parametrize("option, value", [("--lr", "nan"), ("--lr", "-1"), ("--multirange", "nan")])
def test_finetune_cli_refuses_bad_numbers_before_loading_and_writes_no_checkpoint(tmp_path, option, value):
    from tests.test_cli_errors import assert_clean_error, run_snncc

    result = run_snncc(tmp_path, "finetune", "tiny-llama", "--checkpoint", "ft.pt", option, value)
    assert_clean_error(result, option.lstrip("-"), "out of range", folder=tmp_path)
    assert "compile with it" not in result.stdout and not (tmp_path / "ft.pt").exists()
