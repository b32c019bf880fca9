"""calibrate: coarse-to-fine calibration of the IF neurons' thresholds and initial membranes (FAS stage 2).

    snn.if_encode(x, theta, v0, T, B)  ->  snn.if_encode(x, theta', v0', T, B)   (no op added or removed)

Stage 1 (layer-wise) learns one threshold gain and one initial membrane per site; stage 2
(neuron-wise) one of each per channel, starting from stage 1. Both train through time:
the T steps of every IF neuron are unrolled, with a triangle surrogate for the derivative
of firing, and Adam minimises

    mean over sites of MSE(IF output, QCFS ANN output) / mean(QCFS output^2)
      + kl_weight * KL(p_ANN || p_SNN)

on the calibration batches. kl_weight is 4: the logits term is what the fidelity targets
measure, the align term a regulariser; neuron-wise calibration lowers the KL while the
relative MSE rises, a trade that weight 1 undoes. Every `check_every` steps the same loss is
measured on `check` batches the training never sees (the next ones of the calibration text)
and the neurons keep the state with the lowest of it, the start included: surrogate
gradients are biased, at T = L the neurons start exactly at QCFS, and a few batches
overfit, so states judged on the training batches (or on too few check batches) can leave
the held-out perplexity worse than the uncalibrated program's (measured:
benchmarks/RESULTS.md). The report gives both losses before and after.
The activation-align term ties each
site to the QCFS model the fine-tuning shaped (relative, so sites of every scale count
alike), the logits term to the original ANN (forward KL: the student's excess cross-entropy on the teacher's
text). Everything but the IF neurons runs as the ANN does (later passes make it spiking).
FAS's thresholds are per position and channel (fixed-length GPT-2); here they are per
channel, so any sequence length runs. The loss before and after each stage is reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from snncc.calibration import CalibrationContext
from snncc.finetune import Kept, distillation_loss, logits_of
from snncc.ir.rewrite import get_tensor, rewired_copy, set_tensor
from snncc.pipeline import AT_LEAST_ONE, DEFAULT_T, NON_NEGATIVE, POSITIVE, Pass, PassResult, option, register_pass
from snncc.progress import bar

snn = torch.ops.snn


class _Fire(torch.autograd.Function):
    """Signed firing of membranes in threshold units (floor(m) spikes, at most `burst` of
    either sign: +1 at m >= 1, -1 at m < 0 for plain IF neurons); backward: triangle
    surrogates of width 1/2 around every threshold crossed (the integers -burst + 1 .. burst)."""

    @staticmethod
    def forward(ctx, m: torch.Tensor, burst: int) -> torch.Tensor:
        ctx.save_for_backward(m)
        ctx.burst = burst
        return m.floor().clamp(-burst, burst)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (m,) = ctx.saved_tensors
        surrogate = sum((1 - 2 * (m - k).abs()).clamp(min=0) for k in range(1 - ctx.burst, ctx.burst + 1))
        return grad * surrogate, None


def if_rate(x: torch.Tensor, theta: torch.Tensor, m0: torch.Tensor, T: int, burst: int = 1) -> torch.Tensor:
    """Differentiable IF neurons (the dynamics of snn.if_encode, unrolled): the decoded
    rate output theta * sum_t s_t / T. float64 membranes, as the op's: in float32 a few
    neurons at a threshold fire one step apart, and through 30 layers of 17-level codes
    such flips grow into a visible difference."""
    u = x.double() / theta.double()
    m = m0.double().expand_as(u)
    total = torch.zeros_like(u)
    for _ in range(T):
        m = m + u
        s = _Fire.apply(m, burst)
        m = m - s
        total = total + s
    return (theta * total / T).to(x.dtype)


@dataclass
class _Site:
    decoded: fx.Node
    x: fx.Node
    theta: fx.Node
    v0: fx.Node
    lam: torch.Tensor
    L: int
    burst: int = 1


def if_sites(gm: fx.GraphModule) -> list[_Site]:
    """Every decoded IF train that `ifencode` made from a QCFS site."""
    sites = []
    for node in gm.graph.nodes:
        if node.target == snn.decode.default and "qcfs" in node.meta and node.args[0].target == snn.if_encode.default:
            x, theta, v0, _, *burst = node.args[0].args
            sites.append(_Site(node, x, theta, v0, node.meta["qcfs"]["lambda"], node.meta["qcfs"]["L"], *burst))
    return sites


def _rewired(gm: fx.GraphModule, sites: list[_Site], fn) -> fx.GraphModule:
    """A copy of gm in which site i's decoded train is fn(x, i)."""
    return rewired_copy(gm, [(site.decoded, site.x) for site in sites], fn)


class _Neurons(torch.nn.Module):
    """Trainable thresholds (theta0 * exp(gain)) and initial membranes (threshold units)."""

    def __init__(self, gm: fx.GraphModule, sites: list[_Site], T: int):
        super().__init__()
        self.T = T
        self.theta0 = [get_tensor(gm, s.theta).detach() for s in sites]
        self.bursts = [s.burst for s in sites]
        self.gain = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(())) for _ in sites])
        self.m0 = torch.nn.ParameterList([torch.nn.Parameter(torch.full((), 0.5)) for _ in sites])
        self.outputs: dict[int, torch.Tensor] = {}

    def per_channel(self) -> None:
        """Stage 2: one gain and one membrane per neuron group (channel), from stage 1's."""
        for i, theta in enumerate(self.theta0):
            self.gain[i] = torch.nn.Parameter(self.gain[i].detach().expand(theta.shape).clone())
            self.m0[i] = torch.nn.Parameter(self.m0[i].detach().expand(theta.shape).clone())

    def threshold(self, i: int) -> torch.Tensor:
        return self.theta0[i] * torch.exp(self.gain[i])

    def site(self, x: torch.Tensor, i: int) -> torch.Tensor:
        out = if_rate(x, self.threshold(i), self.m0[i].clamp(0.0, 1.0), self.T, self.bursts[i])
        self.outputs[i] = out
        return out


@register_pass
@dataclass
class CalibratePass(Pass):
    name = "calibrate"
    stage = 26
    summary = "IF thresholds and initial membranes: layer-wise then neuron-wise, BPTT with surrogate gradients"

    T: int = DEFAULT_T["fas"]
    layer_steps: int = option(30, NON_NEGATIVE)
    neuron_steps: int = option(30, NON_NEGATIVE)
    lr: float = option(3e-3, POSITIVE)
    kl_weight: float = option(4.0, NON_NEGATIVE)
    batches: int = option(4, AT_LEAST_ONE)
    check: int = option(4, NON_NEGATIVE)
    check_every: int = option(10, AT_LEAST_ONE)

    def run(self, gm: fx.GraphModule, ctx: CalibrationContext) -> PassResult:
        sites = if_sites(gm)
        if not sites or self.layer_steps + self.neuron_steps == 0:
            return PassResult(gm, False)
        train = list(range(min(self.batches, len(ctx.batches))))
        # Held-out batches judge the states; with none left over, the training batches do.
        check = list(range(len(train), min(len(train) + self.check, len(ctx.batches)))) or train
        batches = ctx.batches[: max(train + check) + 1]
        teacher = ctx.teacher or ctx.ann
        with torch.no_grad():
            targets = self._qcfs_outputs(gm, sites, batches)
            teacher_logits = [logits_of(teacher(b)) for b in batches]
        neurons = _Neurons(gm, sites, self.T)
        snn_graph = _rewired(gm, sites, neurons.site)

        def loss(k: int) -> tuple[torch.Tensor, float, float]:
            neurons.outputs.clear()
            logits = logits_of(snn_graph(batches[k]))
            mse = torch.stack([((neurons.outputs[i] - t).pow(2).mean() / t.pow(2).mean().clamp(min=1e-12))
                               for i, t in targets[k].items()]).mean()
            kl = distillation_loss(logits, teacher_logits[k])
            return mse + self.kl_weight * kl, float(mse.detach()), float(kl.detach())

        def evaluate(ks: list[int]) -> dict:
            with torch.no_grad():
                parts = [loss(k) for k in ks]
            return {"loss": sum(float(p[0]) for p in parts) / len(parts),
                    "mse": sum(p[1] for p in parts) / len(parts), "kl": sum(p[2] for p in parts) / len(parts)}

        best = Kept.snapshot(0, evaluate(check)["loss"], neurons.state_dict())

        def measured() -> dict:
            """The kept state's losses: training batches, and the check loss already known."""
            return {**evaluate(train), "check_loss": best.loss if check != train else None}

        def keep_if_best(step: int) -> None:
            nonlocal best
            best = best.offer(step, evaluate(check)["loss"], neurons.state_dict())

        report = {"T": self.T, "sites": len(sites), "train_batches": len(train),
                  "check_batches": len(check) if check != train else 0, "before": measured()}
        for stage, steps in (("layer", self.layer_steps), ("neuron", self.neuron_steps)):
            if stage == "neuron":
                neurons.per_channel()  # from the best state so far
            best = Kept.snapshot(0, best.loss, neurons.state_dict())
            if steps:
                self._train(neurons, loss, steps, len(train), stage, ctx.progress, keep_if_best)
            neurons.load_state_dict(best.tensors)
            after = measured()
            report[f"after_{stage}"] = {**after, "kept_step": best.step, "steps": steps}
        report["after"] = after
        self._write_back(gm, sites, neurons)
        return PassResult(gm, True, report=report)

    def _qcfs_outputs(self, gm: fx.GraphModule, sites: list[_Site],
                      batches: list[torch.Tensor]) -> list[dict[int, torch.Tensor]]:
        """Per batch, each site's output in the QCFS model (the ANN with QCFS sites)."""
        outputs: list[dict[int, torch.Tensor]] = []

        def qcfs_site(x: torch.Tensor, i: int) -> torch.Tensor:
            outputs[-1][i] = snn.qcfs(x, sites[i].lam, sites[i].L)
            return outputs[-1][i]

        qcfs_model = _rewired(gm, sites, qcfs_site)
        for batch in batches:
            outputs.append({})
            qcfs_model(batch)
        return outputs

    def _train(self, neurons: _Neurons, loss, steps: int, n_batches: int, stage: str, progress: bool | None,
               keep_if_best) -> None:
        """Adam over the training batches in turn; keep_if_best(step) every check_every steps."""
        optimizer = torch.optim.Adam(neurons.parameters(), lr=self.lr)
        steps_bar = bar(range(steps), desc=f"calibrating ({stage}-wise)", progress=progress, unit="step")
        for step in steps_bar:
            total, _, kl = loss(step % n_batches)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            steps_bar.set_postfix(loss=f"{float(total.detach()):.4f}", kl=f"{kl:.4f}")
            if (step + 1) % self.check_every == 0 or step + 1 == steps:
                keep_if_best(step + 1)

    def _write_back(self, gm: fx.GraphModule, sites: list[_Site], neurons: _Neurons) -> None:
        """The calibrated thresholds and initial membranes become the graph's constants."""
        with torch.no_grad():
            for i, site in enumerate(sites):
                theta = neurons.threshold(i).expand(neurons.theta0[i].shape).contiguous()
                v0 = (neurons.m0[i].clamp(0.0, 1.0) * theta).expand(theta.shape).contiguous()
                set_tensor(gm, site.theta.target, theta.float())
                set_tensor(gm, site.v0.target, v0.float())
