"""Fine-tuning a traced graph by distillation from the original ANN (FAS stage 1).

The student is the graph with QCFS sites; the teacher is the ANN it came from. The loss is
KL(p_teacher || p_student) over every next-token distribution of the calibration text:
it is the student's excess cross-entropy where the text follows the teacher, so it aims at
what is measured (perplexity and agreement with the ANN), and it needs no labels.

The last `check` batches are held out: every `check_every` steps (and at the start) the loss
is measured on them, and the state with the lowest, the start included, is what training
leaves. The dev text is small (SmolLM2: 64 batches of 128 tokens), and the loss on the
training batches keeps falling while held-out perplexity rises: fine-tuning with half the
sites left to multi-range neurons took held-out perplexity x1.128 -> x1.214.

Training is resumable: every `save_every` steps the trained tensors, the optimizer, the loss
curve and the best state so far go to a checkpoint (written to a temporary file, then
renamed, so a stopped run never leaves a half-written one); a run given an existing
checkpoint continues from it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn.functional as F

from snncc.atomic import atomic_file
from snncc.errors import InputError, NumericsError
from snncc.progress import bar as progress_bar

log = logging.getLogger(__name__)


@dataclass
class FinetuneConfig:
    steps: int
    lr: float  # for the weights (mode "full")
    lambda_lr: float  # for the QCFS clipping levels
    mode: str  # "full": weights and lambdas; "lambda": lambdas only
    save_every: int = 50
    check: int = 4  # batches held out to choose the state kept (0: keep the last)
    check_every: int = 25


@dataclass
class Kept:
    """The state training keeps: the one with the lowest loss on held-out batches so far
    (fine-tuning here, calibration in passes/calibrate.py)."""

    step: int
    loss: float
    tensors: dict[str, torch.Tensor]  # a copy: training goes on past it

    @classmethod
    def snapshot(cls, step: int, loss: float, tensors: Mapping[str, torch.Tensor]) -> Kept:
        return cls(step, loss, {name: t.detach().clone() for name, t in tensors.items()})

    def offer(self, step: int, loss: float, tensors: Mapping[str, torch.Tensor]) -> Kept:
        """This state, or a snapshot of `tensors` if their loss is lower."""
        return Kept.snapshot(step, loss, tensors) if loss < self.loss else self


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
             checkpoint: Path | None = None, progress: bool | None = False) -> tuple[list[float], dict]:
    """Train `tensors` (name -> leaf tensor of `student`, updated in place) for config.steps
    steps over all but the last config.check `batches` in turn, then leave the state that did
    best on those; returns the loss of every step (resumed ones included) and a report of
    the held-out check."""
    if config.mode not in ("full", "lambda"):
        raise InputError(f"fine-tuning mode must be 'full' or 'lambda', got {config.mode!r}")
    if config.check < 0 or config.check_every < 1:
        raise InputError(f"fine-tuning check={config.check}, check_every={config.check_every}: need check >= 0 "
                         "and check_every >= 1")
    for name, lr in (("lr", config.lr), ("lambda_lr", config.lambda_lr)):
        if not (math.isfinite(lr) and lr > 0):
            raise InputError(f"fine-tuning {name}={lr}: a learning rate must be a finite number > 0")
    held_out = config.check if len(batches) > config.check else 0
    train, check = batches[: len(batches) - held_out], batches[len(batches) - held_out:]
    groups = [{"params": [t for n, t in tensors.items() if n in lambdas], "lr": config.lambda_lr}]
    weights = [t for n, t in tensors.items() if n not in lambdas]
    if weights:
        groups.append({"params": weights, "lr": config.lr})
    optimizer = torch.optim.Adam(groups)
    targets: list[torch.Tensor] = []  # the teacher's logits on the check batches, on first use

    def check_kl() -> float:
        with torch.no_grad():
            if not targets:
                targets.extend(logits_of(teacher(batch)) for batch in check)
            return sum(float(distillation_loss(logits_of(student(b)), t)) for b, t in zip(check, targets,
                                                                                           strict=True)) / len(check)

    losses: list[float] = []
    kept, checks = None, []  # checks: (step, check KL) of every held-out check, the start first
    if checkpoint is not None and checkpoint.exists():
        losses, kept, checks = _resume(checkpoint, tensors, optimizer, config)
    start = len(losses)
    if check and kept is None:
        kept = Kept.snapshot(start, check_kl(), tensors)
        _check_finite_loss(kept.loss, start, "held-out check loss")
        checks = [(start, kept.loss)]
    for t in tensors.values():
        t.requires_grad_(True)
    bar = progress_bar(total=config.steps, initial=start, desc="fine-tuning", progress=progress, unit="step",
                       leave=True)
    try:
        for step in range(start, config.steps):
            batch = train[step % len(train)]
            with torch.no_grad():
                target = logits_of(teacher(batch))
            loss = distillation_loss(logits_of(student(batch)), target)
            _check_finite_loss(float(loss.detach()), step + 1, "training loss")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            _keep_lambdas_positive(tensors, lambdas)
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(kl=f"{losses[-1]:.4f}")
            if check and ((step + 1) % config.check_every == 0 or step + 1 == config.steps):
                kl = check_kl()
                _check_finite_loss(kl, step + 1, "held-out check loss")
                checks.append((step + 1, kl))
                kept = kept.offer(step + 1, kl, tensors)
                bar.set_postfix(kl=f"{losses[-1]:.4f}", check=f"{kl:.4f}", kept=kept.step)
            if checkpoint is not None and ((step + 1) % config.save_every == 0 or step + 1 == config.steps):
                _check_finite_tensors(tensors, step + 1)
                _save(checkpoint, tensors, optimizer, config, losses, kept, checks)
    finally:
        bar.close()
        for t in tensors.values():
            t.requires_grad_(False)
    if kept is not None:
        with torch.no_grad():
            for name, t in tensors.items():
                t.copy_(kept.tensors[name])
    report = {"check_batches": len(check), "train_batches": len(train)}
    if kept is not None:
        report.update(kept_step=kept.step, check_kl_start=checks[0][1], check_kl_kept=kept.loss, checks=checks)
    return losses, report


def _check_finite_loss(loss: float, step: int, what: str) -> None:
    """Stop a run whose loss is NaN or inf: nothing after it can be kept, saved or compiled."""
    if not math.isfinite(loss):
        raise NumericsError(f"fine-tuning diverged: the {what} at step {step} is {loss}; nothing from this step on "
                            "is saved (an existing checkpoint holds the last finite state): lower the learning rate")


def _check_finite_tensors(tensors: Mapping[str, torch.Tensor], step: int) -> None:
    """Never write a checkpoint holding NaN or inf (an update can break weights the loss has
    not yet seen)."""
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise NumericsError(f"fine-tuning diverged: '{name}' holds NaN or inf after step {step}; no checkpoint "
                                "is written from it: lower the learning rate")


def _keep_lambdas_positive(tensors: dict[str, torch.Tensor], lambdas: set[str]) -> None:
    with torch.no_grad():
        for name in lambdas:
            tensors[name].clamp_(min=1e-6)


def _save(path: Path, tensors, optimizer, config: FinetuneConfig, losses: list[float], kept: Kept | None,
          checks: list[tuple[int, float]]) -> None:
    state = {"config": asdict(config), "losses": losses, "optimizer": optimizer.state_dict(),
             "tensors": {name: t.detach() for name, t in tensors.items()}}
    if kept is not None:
        state["kept"] = {"step": kept.step, "check_kl": kept.loss, "tensors": kept.tensors,
                         "start_check_kl": checks[0][1], "checks": checks}
    with atomic_file(path) as tmp:  # a kill mid-write leaves the last whole checkpoint
        torch.save(state, tmp)


def _resume(path: Path, tensors, optimizer, config: FinetuneConfig
            ) -> tuple[list[float], Kept | None, list[tuple[int, float]]]:
    """Load a checkpoint written by a run of the same set-up into tensors and optimizer;
    returns its losses, the best state it had kept and its held-out checks (None and [] for
    checkpoints written without held-out checks)."""
    try:  # weights_only: torch's restricted unpickler, which builds tensors and containers only
        state = torch.load(path, weights_only=True)
        saved = state["tensors"]
        fits = saved.keys() == tensors.keys() and all(saved[n].shape == t.shape for n, t in tensors.items())
    except Exception:
        raise InputError(f"fine-tuning checkpoint '{path}' is not a readable snncc checkpoint; "
                         "delete it to start over") from None
    if not fits:
        raise InputError(f"fine-tuning checkpoint '{path}' was written for another model, pipeline or "
                         "mode; delete it or give another checkpoint path")
    if state["config"]["mode"] != config.mode:
        raise InputError(f"checkpoint '{path}' is a '{state['config']['mode']}' run; this one is "
                         f"'{config.mode}': give another checkpoint path")
    with torch.no_grad():
        for name, t in tensors.items():
            t.copy_(saved[name])
    optimizer.load_state_dict(state["optimizer"])
    losses = list(state["losses"])[: config.steps]
    log.info("resumed fine-tuning from '%s' at step %d", path, len(losses))
    kept = state.get("kept")  # checkpoints written before held-out checks have none
    if kept is None or kept["step"] > config.steps:
        return losses, None, []
    # checkpoints written before the checks were kept hold only the first
    checks = [tuple(c) for c in kept.get("checks", [(0, kept["start_check_kl"])]) if c[0] <= config.steps]
    return losses, Kept(kept["step"], kept["check_kl"], kept["tensors"]), checks
