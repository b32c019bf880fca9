"""Fine-tuning a traced graph by distillation from the original ANN (FAS stage 1).

The student is the graph with QCFS sites; the teacher is the ANN it came from. The loss is
KL(p_teacher || p_student) over every next-token distribution of the calibration text:
it is the student's excess cross-entropy where the text follows the teacher, so it aims at
what is measured (perplexity and agreement with the ANN), and it needs no labels.

Training is resumable: every `save_every` steps the trained tensors, the optimizer and the
loss curve go to a checkpoint (written to a temporary file, then renamed, so a stopped run
never leaves a half-written one); a run given an existing checkpoint continues from it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn.functional as F
from tqdm import tqdm

from snncc.errors import InputError

log = logging.getLogger(__name__)


@dataclass
class FinetuneConfig:
    steps: int
    lr: float  # for the weights (mode "full")
    lambda_lr: float  # for the QCFS clipping levels
    mode: str  # "full": weights and lambdas; "lambda": lambdas only
    save_every: int = 50


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_teacher || p_student), mean over positions."""
    vocab = student_logits.shape[-1]
    log_student = F.log_softmax(student_logits.reshape(-1, vocab).float(), dim=-1)
    log_teacher = F.log_softmax(teacher_logits.reshape(-1, vocab).float(), dim=-1)
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")


def logits_of(output) -> torch.Tensor:
    """The logits tensor of a traced model's output (a tensor or a tuple led by one)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def probe_kl(student: fx.GraphModule, teacher: fx.GraphModule, batch: torch.Tensor) -> float:
    """The distillation loss on one batch, without training."""
    with torch.no_grad():
        return float(distillation_loss(logits_of(student(batch)), logits_of(teacher(batch))))


def finetune(student: fx.GraphModule, teacher: fx.GraphModule, batches: list[torch.Tensor],
             tensors: dict[str, torch.Tensor], lambdas: set[str], config: FinetuneConfig,
             checkpoint: Path | None = None, progress: bool = False) -> list[float]:
    """Train `tensors` (name -> leaf tensor of `student`, updated in place) for config.steps
    steps over `batches` in turn; returns the loss of every step (resumed ones included)."""
    if config.mode not in ("full", "lambda"):
        raise InputError(f"fine-tuning mode must be 'full' or 'lambda', got {config.mode!r}")
    groups = [{"params": [t for n, t in tensors.items() if n in lambdas], "lr": config.lambda_lr}]
    weights = [t for n, t in tensors.items() if n not in lambdas]
    if weights:
        groups.append({"params": weights, "lr": config.lr})
    optimizer = torch.optim.Adam(groups)
    losses: list[float] = []
    if checkpoint is not None and checkpoint.exists():
        losses = _resume(checkpoint, tensors, optimizer, config)
    for t in tensors.values():
        t.requires_grad_(True)
    bar = tqdm(total=config.steps, initial=len(losses), desc="fine-tuning", unit="step", disable=not progress)
    try:
        for step in range(len(losses), config.steps):
            batch = batches[step % len(batches)]
            with torch.no_grad():
                target = logits_of(teacher(batch))
            loss = distillation_loss(logits_of(student(batch)), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            _keep_lambdas_positive(tensors, lambdas)
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(kl=f"{losses[-1]:.4f}")
            if checkpoint is not None and ((step + 1) % config.save_every == 0 or step + 1 == config.steps):
                _save(checkpoint, tensors, optimizer, config, losses)
    finally:
        bar.close()
        for t in tensors.values():
            t.requires_grad_(False)
    return losses


def _keep_lambdas_positive(tensors: dict[str, torch.Tensor], lambdas: set[str]) -> None:
    with torch.no_grad():
        for name in lambdas:
            tensors[name].clamp_(min=1e-6)


def _save(path: Path, tensors, optimizer, config: FinetuneConfig, losses: list[float]) -> None:
    state = {"config": asdict(config), "losses": losses, "optimizer": optimizer.state_dict(),
             "tensors": {name: t.detach() for name, t in tensors.items()}}
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def _resume(path: Path, tensors, optimizer, config: FinetuneConfig) -> list[float]:
    """Load a checkpoint written by a run of the same set-up into tensors and optimizer."""
    try:
        state = torch.load(path, weights_only=True)
    except Exception:
        raise InputError(f"fine-tuning checkpoint '{path}' is not a readable snncc checkpoint; "
                         "delete it to start over") from None
    saved = state["tensors"]
    if saved.keys() != tensors.keys() or any(saved[n].shape != t.shape for n, t in tensors.items()):
        raise InputError(f"fine-tuning checkpoint '{path}' was written for another model, pipeline or "
                         "mode; delete it or give another --checkpoint path")
    if state["config"]["mode"] != config.mode:
        raise InputError(f"checkpoint '{path}' is a '{state['config']['mode']}' run; this one is "
                         f"'{config.mode}': give another --checkpoint path")
    with torch.no_grad():
        for name, t in tensors.items():
            t.copy_(saved[name])
    optimizer.load_state_dict(state["optimizer"])
    losses = list(state["losses"])[: config.steps]
    log.info("resumed fine-tuning from '%s' at step %d", path, len(losses))
    return losses
