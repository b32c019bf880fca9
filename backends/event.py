"""Event backend: runs a spiking program time step by time step with spikes as events.

A spike train travels as, for each step t, the flat indices and signs of the neurons that
fired. A synaptic layer adds, for every event, the weight column of the neuron that fired
into its targets' membranes (`index_add`, never a dense matmul over spike tensors), and
counts one synaptic operation per weight entry it adds. Layers are synchronous: an MT
encoder needs its whole input before its first (most significant) step, so each spiking op
runs its T steps once its inputs are complete; analog ATen ops run as in the ANN.

Membranes are float64 and rounded to float32 once per op, like the reference executor's
`exact` mode, so outputs match it to float32 rounding and spike counts match exactly.
A neuron whose input has no code (NaN, inf: snncc.ir.ops) sends one POISON event at step 0,
which every synapse and decoder reads as NaN, as the reference executor does.

Each `snn` op runs the handler its entry in snncc.ir.spec names; an op without an event-driven
form runs its torch kernel only where its entry declares that (and how its result counts),
and a handler missing for any entry stops this module from loading.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from snncc.ir.analysis import data_dependent_nodes, matmul_like, site_macs
from snncc.ir.ops import (
    POISON,
    burst_sizes,
    code_digits,
    if_shape,
    if_spikes,
    mt_initial_membrane,
    multi_range_code,
    normalizer_train,
    poisoned,
    signed_code_digits,
    spike_values,
    step_gains,
    table_codes,
    table_value,
    uncodable,
)
from snncc.ir.spec import TorchKernel, event_gaps, require_covered, spec_of
from snncc.progress import bar

_EVENT_CHUNK_ELEMENTS = 1 << 22  # events x fan-out gathered at once: bounds scratch memory


@dataclass
class SpikeEvents:
    """A spike train as events: per step, flat neuron indices and their signed payloads
    (+-1; +-2^j for a multi-range neuron's graded spikes, one spike each; +-n for a burst
    of n spikes of an IF neuron, n spikes)."""

    shape: torch.Size  # the neuron array (the encoded tensor's shape)
    steps: list[tuple[torch.Tensor, torch.Tensor]]
    gains: list[float]  # what one unit event weighs at each step on a membrane (ops.step_gains)
    bursts: bool = False  # whether a payload counts as |payload| spikes

    @property
    def T(self) -> int:
        return len(self.steps)

    def spikes_per_step(self) -> list[int]:
        """Spikes sent per step (a POISON event counts as one)."""
        return [int(burst_sizes(payload).sum()) if self.bursts else int(idx.numel())
                for idx, payload in self.steps]

    def count(self) -> int:
        return sum(self.spikes_per_step())

    def dense(self) -> torch.Tensor:
        """The (T, *shape) int8 train, for consumers that are not synapses."""
        out = torch.zeros((self.T, self.shape.numel()), dtype=torch.int8)
        for t, (idx, sign) in enumerate(self.steps):
            out[t, idx] = sign.to(torch.int8)
        return out.view(self.T, *self.shape)


@dataclass
class EventCounts:
    """What the backend did: spikes per encoder and step, SOPs and membrane updates per op."""

    spikes_per_step: dict[str, list[int]] = field(default_factory=dict)
    sops: dict[str, int] = field(default_factory=dict)
    membrane_updates: dict[str, int] = field(default_factory=dict)
    analog_macs: dict[str, int | None] = field(default_factory=dict)  # None: not countable

    def totals(self) -> dict:
        return {"spikes": sum(sum(s) for s in self.spikes_per_step.values()),
                "sops": sum(self.sops.values()),
                "membrane_updates": sum(self.membrane_updates.values()),
                "analog_macs": None if None in self.analog_macs.values() else sum(self.analog_macs.values())}


def _accumulate(out: torch.Tensor, rows: torch.Tensor, table: torch.Tensor, table_rows: torch.Tensor,
                values: torch.Tensor) -> None:
    """out[rows[i]] += values[i] * table[table_rows[i]], in chunks of bounded size."""
    chunk = max(1, _EVENT_CHUNK_ELEMENTS // max(1, table.shape[1]))
    for start in range(0, rows.numel(), chunk):
        part = slice(start, start + chunk)
        out.index_add_(0, rows[part], table[table_rows[part]] * values[part, None])


_HANDLERS: dict[str, Callable] = {}  # handler name (an op's `event` in snncc.ir.spec) -> EventExecutor method


def _handler(method: Callable) -> Callable:
    """Register an EventExecutor method as the event handler of the ops whose spec names it."""
    _HANDLERS[method.__name__] = method
    return method


class EventExecutor(fx.Interpreter):
    """Interprets the graph; `snn` ops run as event-driven neurons and synapses (or, where
    their spec says so, as their torch kernel on dense tensors)."""

    def __init__(self, gm: fx.GraphModule, progress: bool | None = False):
        super().__init__(gm)
        self.counts = EventCounts()
        self.dependent = data_dependent_nodes(gm.graph)
        # One bar per run over the ops that run step by step, each counted once when its T steps are done.
        self.spiking = {n for n in gm.graph.nodes if n.op == "call_function" and _steps_events(_event(n.target))}
        self.bar = bar(total=len(self.spiking), desc="event-driven run", progress=progress, unit="op")

    def run_node(self, n: fx.Node):
        self.node = n
        result = super().run_node(n)
        if n in self.spiking:
            self.bar.update(1)
        return result

    def call_function(self, target, args, kwargs):
        event = _event(target)
        if isinstance(event, str):
            if event not in _HANDLERS:
                raise NotImplementedError(f"the event backend has no handler '{event}' for {target}")
            return _HANDLERS[event](self, *args, **kwargs)
        args = tuple(a.dense() if isinstance(a, SpikeEvents) else a for a in args)
        result = super().call_function(target, args, kwargs)
        if isinstance(event, TorchKernel) and event.counted_as == "train":
            return self._dense_train(result)
        if matmul_like(target) and self.node in self.dependent:
            self.counts.analog_macs[self.node.name] = site_macs(self.node, self._shape, getattr(result, "shape", None))
        return result

    def _dense_train(self, train: torch.Tensor) -> SpikeEvents:
        """The events of a train its op's torch kernel sent (the op has no event-driven form)."""
        flat = train.reshape(train.shape[0], -1)
        steps = []
        for spikes in flat:
            fired = torch.nonzero(spikes).squeeze(1)
            steps.append((fired, spikes[fired].long()))
        return self._train(train.shape[1:], steps)

    def _shape(self, value: object) -> torch.Size | None:
        return getattr(self.env.get(value), "shape", None) if isinstance(value, fx.Node) else None

    # --- neurons -----------------------------------------------------------------------

    @_handler
    def mt_encode(self, x: torch.Tensor, scale: torch.Tensor, T: int) -> SpikeEvents:
        """MT neurons: the residual is compared with each step's threshold; those at or above
        it fire (an event) and subtract it."""
        u = x / scale
        bad, u = uncodable(x, u).reshape(-1), u.reshape(-1)
        membrane, sign = mt_initial_membrane(u, T)
        steps = []
        for t in range(T):
            threshold = 1 << (T - 1 - t)
            fired = torch.nonzero(membrane >= threshold).squeeze(1)
            membrane[fired] -= threshold
            live = fired[sign[fired] != 0]  # a zero input never fires
            steps.append((live, sign[live]))
        return self._train(x.shape, _poison_events(steps, bad))

    @_handler
    def if_encode(self, x: torch.Tensor, threshold: torch.Tensor, membrane: torch.Tensor, T: int,
                  burst: int = 1) -> SpikeEvents:
        """Integrate-and-fire neurons: each step every membrane integrates its input and those
        that cross a threshold fire (+1 per theta above, -1 below 0; a burst neuron sends its
        n spikes as one event of payload n) and reset by subtraction."""
        steps = []
        for spikes in if_spikes(x, threshold, membrane, T, burst):
            fired = torch.nonzero(spikes).squeeze(1)
            steps.append((fired, spikes[fired].long()))
        return self._train(if_shape(x, threshold, membrane), steps)

    @_handler
    def mr_encode(self, x: torch.Tensor, scale: torch.Tensor, T: int, G: int) -> SpikeEvents:
        """Multi-range ternary neurons: each picks its range 2^j by comparing |x| with its
        range thresholds, then fires its non-adjacent-form digits as graded events +-2^j."""
        u = x / scale
        bad, u = uncodable(x, u).reshape(-1), u.reshape(-1)
        membrane, sign, j = multi_range_code(u, T, G)
        return self._digit_events(x.shape, poisoned(code_digits(membrane, sign, T, ternary=True), bad), j)

    @_handler
    def fn_encode(self, x: torch.Tensor, thresholds: torch.Tensor, codes: torch.Tensor, bucket: torch.Tensor,
                  T: int, G: int = 0) -> SpikeEvents:
        """Table neurons: compare the membrane with the sorted thresholds (a binary search,
        one comparison per step) and fire the digits of the interval's code (G > 0: the
        graded ternary digits of its range, as a multi-range neuron sends that value). NaN
        poisons."""
        if G:
            return self.mr_encode(table_value(x, thresholds, codes, bucket, T), torch.ones(()), T, G)
        digits = signed_code_digits(table_codes(x, thresholds, codes, bucket, T), T)
        return self._digit_events(x.shape, poisoned(digits, torch.isnan(x)), None)

    def _digit_events(self, shape: torch.Size, digits: torch.Tensor, exponent: torch.Tensor | None) -> SpikeEvents:
        steps = []
        for digit in digits:
            fired = torch.nonzero(digit).squeeze(1)
            payload = digit[fired].long()
            if exponent is not None:  # graded spikes +-2^j; POISON stays POISON
                payload = torch.where(payload == POISON, payload, payload << exponent[fired])
            steps.append((fired, payload))
        return self._train(shape, steps)

    def _train(self, shape: torch.Size, steps: list[tuple[torch.Tensor, torch.Tensor]]) -> SpikeEvents:
        """The events of the current encoder, counted: spikes per step, one membrane update
        per neuron and step. Its spec says whether the train is a rate code and whether a
        payload n is n spikes (a burst) or one graded spike."""
        spec = spec_of(self.node.target)
        events = SpikeEvents(shape, steps, step_gains(len(steps), spec.rate), spec.bursts)
        self.counts.spikes_per_step[self.node.name] = events.spikes_per_step()
        self.counts.membrane_updates[self.node.name] = shape.numel() * len(steps)
        return events

    # --- synapses ----------------------------------------------------------------------

    @_handler
    def spike_mul(self, a: SpikeEvents, scale_a: torch.Tensor, b: SpikeEvents, scale_b: torch.Tensor,
                  rate_a: bool = False, rate_b: bool = False):
        """Elementwise spike x spike product: at step t an event of B adds P^A_{t-1} at its
        element, then an event of A adds P^B_t (one synaptic operation each)."""
        shape = torch.broadcast_shapes(a.shape, b.shape)
        if a.shape != shape or b.shape != shape:
            raise NotImplementedError(f"event spike_mul needs equal shapes, got {a.shape} and {b.shape}")
        amp_a = scale_a.double().expand(shape).reshape(-1)
        amp_b = scale_b.double().expand(shape).reshape(-1)
        partial_a = torch.zeros(shape.numel(), dtype=torch.float64)
        partial_b = torch.zeros(shape.numel(), dtype=torch.float64)
        out = torch.zeros(shape.numel(), dtype=torch.float64)
        for t, ((idx_a, pay_a), (idx_b, pay_b)) in enumerate(zip(a.steps, b.steps, strict=True)):
            value_b = spike_values(pay_b, torch.float64) * b.gains[t] * amp_b[idx_b]
            out.index_add_(0, idx_b, value_b * partial_a[idx_b])
            partial_b.index_add_(0, idx_b, value_b)
            value_a = spike_values(pay_a, torch.float64) * a.gains[t] * amp_a[idx_a]
            out.index_add_(0, idx_a, value_a * partial_b[idx_a])
            partial_a.index_add_(0, idx_a, value_a)
        self.counts.sops[self.node.name] = a.count() + b.count()
        self.counts.membrane_updates[self.node.name] = out.numel() * a.T
        return out.view(shape).to(scale_a.dtype)

    @_handler
    def spike_normalize(self, x: torch.Tensor, a: torch.Tensor, power: float, thresholds: torch.Tensor,
                        codes: torch.Tensor, T: int) -> torch.Tensor:
        """Floating-point neurons for a^power (one per row of x): the exponent from range
        thresholds, the mantissa's digits as events; each event adds its row of x, shifted
        by the exponent and the step, into the output."""
        digits, e = normalizer_train(a, power, thresholds, codes, T)
        shape = torch.broadcast_shapes(x.shape, a.shape)
        rows = x.expand(shape).reshape(e.numel(), -1).double()
        exponent = e.reshape(-1)
        out = torch.zeros_like(rows)
        for t, digit in enumerate(digits):
            fired = torch.nonzero(digit).squeeze(1)
            gain = torch.ldexp(spike_values(digit[fired], torch.float64), -(exponent[fired] + t + 1).double())
            out.index_add_(0, fired, rows[fired] * gain[:, None])
        name = self.node.name
        self.counts.spikes_per_step[f"{name}_mantissa"] = [int(torch.count_nonzero(d)) for d in digits]
        self.counts.sops[name] = int(torch.count_nonzero(digits)) * rows.shape[1]
        self.counts.membrane_updates[name] = out.numel() * T
        return out.view(shape).to(x.dtype)

    @_handler
    def spike_linear(self, events: SpikeEvents, weight: torch.Tensor, bias: torch.Tensor | None,
                     rate: bool = False) -> torch.Tensor:
        """Each event (row, k, sign) at step t adds sign * gain_t * W[:, k] to row's membranes."""
        fan_in, fan_out = events.shape[-1], weight.shape[0]
        rows = events.shape.numel() // fan_in
        membranes = torch.zeros((rows, fan_out), dtype=torch.float64)
        columns = weight.detach().double().t().contiguous()  # one row per input neuron
        for t, (idx, sign) in enumerate(events.steps):
            values = spike_values(sign, torch.float64) * events.gains[t]
            _accumulate(membranes, idx // fan_in, columns, idx % fan_in, values)
        if bias is not None:
            membranes += bias.double()
        self.counts.sops[self.node.name] = events.count() * fan_out
        self.counts.membrane_updates[self.node.name] = membranes.numel() * events.T
        return membranes.to(weight.dtype).view(*events.shape[:-1], fan_out)

    @_handler
    def spike_matmul(self, a: SpikeEvents, scale_a: torch.Tensor, b: SpikeEvents, scale_b: torch.Tensor,
                     rate_a: bool = False, rate_b: bool = False):
        """Spike x spike product. With stored partial sums P^A, P^B, step t does
        out += A_t P^B_t + P^A_{t-1} B_t: a spike of B at (k, j) adds column k of P^A into
        output column j (m targets); then a spike of A at (i, k) adds row k of P^B into
        output row i (n targets)."""
        *batch, m, k = a.shape
        n = b.shape[-1]
        if list(b.shape[:-2]) != batch or b.shape[-2] != k:
            raise NotImplementedError(f"event spike_matmul needs matching batch dims, got {a.shape} @ {b.shape}")
        groups = torch.Size(batch).numel()
        amp_a = scale_a.double().expand(a.shape).reshape(-1)
        amp_b = scale_b.double().expand(b.shape).reshape(-1)
        partial_a_t = torch.zeros((groups * k, m), dtype=torch.float64)  # P^A transposed, per group
        partial_b = torch.zeros((groups * k, n), dtype=torch.float64)
        out_rows = torch.zeros((groups * m, n), dtype=torch.float64)  # contributions of A's spikes
        out_cols = torch.zeros((groups * n, m), dtype=torch.float64)  # contributions of B's spikes
        for t, ((idx_a, sign_a), (idx_b, sign_b)) in enumerate(zip(a.steps, b.steps, strict=True)):
            g_b, kb, j = idx_b // (k * n), (idx_b // n) % k, idx_b % n
            value_b = spike_values(sign_b, torch.float64) * b.gains[t] * amp_b[idx_b]
            _accumulate(out_cols, g_b * n + j, partial_a_t, g_b * k + kb, value_b)  # uses P^A_{t-1}
            partial_b.index_put_((g_b * k + kb, j), value_b, accumulate=True)
            g_a, i, ka = idx_a // (m * k), (idx_a // k) % m, idx_a % k
            value_a = spike_values(sign_a, torch.float64) * a.gains[t] * amp_a[idx_a]
            _accumulate(out_rows, g_a * m + i, partial_b, g_a * k + ka, value_a)  # uses P^B_t
            partial_a_t.index_put_((g_a * k + ka, i), value_a, accumulate=True)
        out = out_rows.view(groups, m, n) + out_cols.view(groups, n, m).transpose(1, 2)
        self.counts.sops[self.node.name] = a.count() * n + b.count() * m
        self.counts.membrane_updates[self.node.name] = out.numel() * a.T
        return out.to(scale_a.dtype).reshape(*batch, m, n)

    @_handler
    def decode(self, events: SpikeEvents, scale: torch.Tensor, rate: bool = False) -> torch.Tensor:
        """Read a train back into the ANN's units by summing its events."""
        value = torch.zeros(events.shape.numel(), dtype=torch.float64)
        for t, (idx, sign) in enumerate(events.steps):
            value.index_add_(0, idx, spike_values(sign, torch.float64) * events.gains[t])
        return (value.view(events.shape) * scale.double()).to(scale.dtype)


def _poison_events(steps: list[tuple[torch.Tensor, torch.Tensor]],
                   bad: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Step 0 gains one POISON event per neuron where `bad` (those neurons never fire: their
    membranes start at 0)."""
    if bool(bad.any()):
        idx, payload = steps[0]
        where = torch.nonzero(bad).squeeze(1)
        steps[0] = (torch.cat([idx, where]), torch.cat([payload, torch.full_like(where, POISON)]))
    return steps


def _event(target) -> str | TorchKernel | None:
    """How the spec says to run a target: a handler name, a torch kernel, or None (not an snn op)."""
    spec = spec_of(target)
    return None if spec is None else spec.event


def _steps_events(event: str | TorchKernel | None) -> bool:
    """Whether an op runs step by step here (a handler, or a torch kernel whose train is read out)."""
    return isinstance(event, str) or (isinstance(event, TorchKernel) and event.counted_as == "train")


require_covered("snncc.backends.event", event_gaps(_HANDLERS))


class EventBackend:
    """Runs a program's graph event by event on the CPU; `counts` holds the last run's counts."""

    def __init__(self, gm: fx.GraphModule, progress: bool | None = None):
        self.gm = gm.to("cpu")
        self.progress = progress  # a bar over each run's spiking ops (snncc.progress); not while `quiet`
        self.counts = EventCounts()
        self.device = torch.device("cpu")
        self.mode = "exact"  # the reference mode whose outputs and counts this backend matches

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        executor = EventExecutor(self.gm, self.progress)
        with torch.no_grad(), executor.bar:
            out = executor.run(input_ids.cpu())
        self.counts = executor.counts
        return out

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """No bar per run inside the block: a generation loop runs once per token and shows its own."""
        progress, self.progress = self.progress, False
        try:
            yield
        finally:
            self.progress = progress
