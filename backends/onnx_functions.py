"""The `snn` ONNX domain: one operator schema per spiking op and a function library that
defines each in the standard opset, so onnxruntime runs an `onnx-snn` graph as it is and
inlining the library gives a plain-ONNX graph.

Time is an explicit leading axis: every spike train is an int8 tensor (T, ...) in
{-1, 0, 1} (graded +-2^j for multi-range neurons). Stateful neurons are ONNX `Loop`s over the
T steps, their membranes loop-carried state and their spikes the loop's scan output, so a
graph's size does not grow with T and each neuron reads as the recurrence it is (a
time-stepped machine runs the loop body once per step). Synapses read the trains with the
code's step gains (2^-(t+1) for multi-threshold (MT) codes, 1/T for rate codes) on float64
membranes rounded to float32 once per op: the reference executor's `exact` mode, which the
event backend also matches. Because a synapse is linear, its membrane sums each input's
weighted spikes and applies the weights once (sum_t gain_t W s_t = W sum_t gain_t s_t), so a
layer costs one MatMul, not T. Every function reproduces its `snncc.ir.ops` kernel: neurons
bit for bit (same float64 membranes, same comparisons), synapses up to float64 summation order.
NaN and inf follow snncc.ir.ops's rule: a neuron whose input has no code sends POISON (int8
-128) at step 0 and nothing after, and every reader turns POISON into NaN.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from snncc.errors import require

# Imported only for an ONNX export: without the `onnx` extra, importing this module (or
# snncc.backends.onnx) raises MissingDependencyError rather than ModuleNotFoundError.
onnx = require("onnx", "ONNX export")
TensorProto, helper, OpSchema = onnx.TensorProto, onnx.helper, onnx.defs.OpSchema

DOMAIN = "snn"
DOMAIN_VERSION = 1
STANDARD_OPSET = 18  # the opset the bodies use (and torch.onnx emits)

FLOAT, DOUBLE, INT64 = TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.INT64
INT8, BOOL = TensorProto.INT8, TensorProto.BOOL
_ATTRIBUTE_FIELDS = {"int": ("value_int", onnx.AttributeProto.INT), "float": ("value_float", onnx.AttributeProto.FLOAT)}
_SCHEMA_ATTRIBUTES = {"int": OpSchema.AttrType.INT, "float": OpSchema.AttrType.FLOAT}


# --- a small builder for function and loop bodies ----------------------------------------


class Body:
    """Nodes of one ONNX graph or function body; `op` names its outputs itself."""

    _ids = itertools.count()

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attributes) -> str | list[str]:
        names = [f"_{op_type.lower()}{next(self._ids)}" for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attributes))
        return names[0] if outputs == 1 else names

    def constant(self, value: float | int | Sequence, dtype: int = DOUBLE) -> str:
        """A constant tensor: a scalar for a number, 1-D for a sequence."""
        dims = [] if isinstance(value, (int, float)) else [len(value)]
        values = [value] if isinstance(value, (int, float)) else list(value)
        return self.op("Constant", value=helper.make_tensor("value", dtype, dims, values))

    def attribute(self, name: str, kind: str = "int") -> str:
        """A scalar tensor holding the calling node's attribute `name` (kind "int": int64, "float")."""
        field, proto_type = _ATTRIBUTE_FIELDS[kind]
        node = helper.make_node("Constant", [], [f"_attr_{name}{next(self._ids)}"])
        node.attribute.append(onnx.AttributeProto(name=field, ref_attr_name=name, type=proto_type))
        self.nodes.append(node)
        return node.output[0]

    def cast(self, value: str, dtype: int) -> str:
        return self.op("Cast", value, to=dtype)


def _loop(body: Body, steps: str, carried: list[str], step_fn, scans: int) -> tuple[list[str], list[str]]:
    """An ONNX Loop of `steps` iterations: step_fn(inner Body, carried names) returns (new
    carried values, per-step values). Returns (final carried values, stacked per-step values
    with a leading time axis)."""
    inner = Body()
    state = [f"_state{next(Body._ids)}" for _ in carried]
    new_state, per_step = step_fn(inner, state)
    keep = inner.op("Identity", "_loop_cond_in")
    graph = helper.make_graph(
        inner.nodes, f"step{next(Body._ids)}",
        [helper.make_tensor_value_info("_loop_iter", INT64, []),
         helper.make_tensor_value_info("_loop_cond_in", BOOL, []), *(onnx.ValueInfoProto(name=name) for name in state)],
        [onnx.ValueInfoProto(name=name) for name in (keep, *new_state, *per_step)])
    outputs = body.op("Loop", steps, "", *carried, outputs=len(carried) + scans, body=graph)
    outputs = [outputs] if isinstance(outputs, str) else outputs
    return outputs[: len(carried)], outputs[len(carried):]


# --- shared pieces of the neurons and synapses -------------------------------------------


def _power_of_two(b: Body, exponent: str) -> str:
    """2^exponent in float64 (exponent float64, integral): exact."""
    return b.op("Pow", b.constant(2.0), exponent)


def _mt_digits(b: Body, magnitude: str, T: str) -> str:
    """The T binary digits, most significant first, of non-negative integers (float64, < 2^T):
    a multi-threshold neuron whose threshold halves every step, firing where its residual
    reaches the threshold and subtracting it. (T, ...) float64 in {0, 1}."""
    first = _power_of_two(b, b.op("Sub", b.cast(T, DOUBLE), b.constant(1.0)))

    def step(inner: Body, state):
        residual, threshold = state
        fire = inner.cast(inner.op("GreaterOrEqual", residual, threshold), DOUBLE)
        residual = inner.op("Sub", residual, inner.op("Mul", fire, threshold))
        return [residual, inner.op("Mul", threshold, inner.constant(0.5))], [fire]

    _, (digits,) = _loop(b, T, [magnitude, first], step, scans=1)
    return digits


POISON = -128  # snncc.ir.ops.POISON


def _uncodable(b: Body, x: str, u: str) -> str:
    """Where a linear-code neuron with input x and normalised input u has no code: u is NaN
    or x is +-inf (a finite x whose u overflows clips, ops.uncodable)."""
    return b.op("Or", b.op("IsNaN", u), b.op("IsInf", x))


def _codable(b: Body, value: str, bad: str) -> str:
    """value with 0 where `bad`: those neurons send no digits (they are poisoned after)."""
    return b.op("Where", bad, b.op("CastLike", b.constant(0.0), value), value)


def _poisoned(b: Body, train: str, bad: str) -> str:
    """The train (T, ...) int8 with the neurons where `bad` sending POISON at step 0 and
    nothing after (ops.poisoned)."""
    steps = _train_length(b, train)
    first = b.op("Equal", b.op("Range", b.constant(0, INT64), steps, b.constant(1, INT64)), b.constant(0, INT64))
    rank = b.op("Size", b.op("Shape", bad))
    ones = b.op("ConstantOfShape", b.op("Unsqueeze", rank, b.constant([0], INT64)),
                value=helper.make_tensor("v", INT64, [1], [1]))
    first = b.op("Reshape", first, b.op("Concat", b.op("Unsqueeze", steps, b.constant([0], INT64)), ones, axis=0))
    bad_steps = b.op("Unsqueeze", bad, b.constant([0], INT64))
    poison = b.op("Where", first, b.constant(POISON, INT8), b.constant(0, INT8))
    return b.op("Where", bad_steps, poison, train)


def _spike_values(b: Body, spikes: str, dtype: int) -> str:
    """Spikes as numbers of `dtype`, POISON as NaN (ops.spike_values)."""
    nan = b.cast(b.constant(float("nan")), dtype)
    return b.op("Where", b.op("Equal", spikes, b.constant(POISON, INT8)), nan, b.cast(spikes, dtype))


def _signed_train(b: Body, code: str, T: str) -> str:
    """The MT train (T, ...) int8 of signed integer codes (float64)."""
    digits = _mt_digits(b, b.op("Abs", code), T)
    return b.cast(b.op("Mul", digits, b.op("Sign", code)), INT8)


def _step_gains(b: Body, T: str, rate: str) -> str:
    """(T,) float32 membrane gain per step: 2^-(t+1) for MT codes, 1/T for rate codes."""
    t = b.op("Range", b.constant(1.0), b.op("Add", b.cast(T, DOUBLE), b.constant(1.0)), b.constant(1.0))
    mt = _power_of_two(b, b.op("Neg", t))
    rate_gain = b.op("Expand", b.op("Reciprocal", b.cast(T, DOUBLE)), b.op("Shape", t))
    return b.cast(b.op("Where", b.cast(rate, BOOL), rate_gain, mt), FLOAT)


def _accumulate(b: Body, per_step: str, gains: str) -> str:
    """sum_t gains[t] * per_step[t]: a membrane integrating T weighted inputs."""
    shape = b.op("Shape", per_step)
    flat = b.op("Reshape", per_step, b.constant([0, -1], INT64))
    total = b.op("MatMul", b.op("Unsqueeze", gains, b.constant([0], INT64)), flat)
    return b.op("Reshape", total, b.op("Slice", shape, b.constant([1], INT64), b.constant([2**62], INT64)))


def _table_codes(b: Body, x: str, thresholds: str, codes: str, bucket: str) -> str:
    """Codes of the intervals the membranes x land in: channel c (last axis) compares with the
    sorted thresholds of table bucket[c], one comparison per loop step (a binary search: the
    count of thresholds <= x, as searchsorted(right=True)). Returns float64 codes."""
    width = b.op("Gather", b.op("Shape", thresholds), b.constant(1, INT64))  # M, +inf padded
    powers = b.constant([2**i for i in range(40)], INT64)
    steps = b.op("ReduceSum", b.cast(b.op("GreaterOrEqual", width, powers), INT64), keepdims=0)
    first = b.op("Gather", powers, b.op("Sub", steps, b.constant(1, INT64)))
    flat_thresholds = b.op("Reshape", thresholds, b.constant([-1], INT64))
    row = b.op("Mul", bucket, width)
    position = b.op("ConstantOfShape", b.op("Shape", x), value=helper.make_tensor("v", INT64, [1], [0]))

    def step(inner: Body, state):
        pos, stride = state
        candidate = inner.op("Add", pos, stride)
        inside = inner.op("LessOrEqual", candidate, width)
        index = inner.op("Add", row, inner.op("Sub", inner.op("Min", candidate, width), inner.constant(1, INT64)))
        below = inner.op("LessOrEqual", inner.op("Gather", flat_thresholds, index), x)
        pos = inner.op("Where", inner.op("And", inside, below), candidate, pos)
        return [pos, inner.op("Div", stride, inner.constant(2, INT64))], []

    (pos, _), _ = _loop(b, steps, [position, first], step, scans=0)
    code_row = b.op("Mul", bucket, b.op("Add", width, b.constant(1, INT64)))
    flat_codes = b.op("Reshape", codes, b.constant([-1], INT64))
    return b.cast(b.op("Gather", flat_codes, b.op("Add", code_row, pos)), DOUBLE)


# --- the operators -------------------------------------------------------------------------


@dataclass(frozen=True)
class SnnOp:
    """One operator of the snn domain: its schema and the builder of its function body."""

    name: str
    doc: str
    inputs: tuple[tuple[str, str], ...]  # (name, type string)
    output: tuple[str, str]
    attributes: tuple[tuple[str, str], ...]  # (name, "int" or "float")
    body: Callable[..., str]  # (Body, input names..., attribute values...) -> output name

    def schema(self) -> OpSchema:
        types = {"float": "tensor(float)", "int8": "tensor(int8)", "int64": "tensor(int64)"}
        return OpSchema(
            self.name, DOMAIN, DOMAIN_VERSION, self.doc,
            inputs=[OpSchema.FormalParameter(name, types[kind]) for name, kind in self.inputs],
            outputs=[OpSchema.FormalParameter(self.output[0], types[self.output[1]])],
            attributes=[OpSchema.Attribute(name, _SCHEMA_ATTRIBUTES[kind], required=True)
                        for name, kind in self.attributes])

    def function(self) -> onnx.FunctionProto:
        b = Body()
        names = [name for name, _ in self.inputs]
        attributes = [b.attribute(name, kind) for name, kind in self.attributes]
        result = self.body(b, *names, *attributes)
        b.op("Identity", result)
        b.nodes[-1].output[0] = self.output[0]
        return helper.make_function(DOMAIN, self.name, names, [self.output[0]], b.nodes,
                                    [helper.make_opsetid("", STANDARD_OPSET)],
                                    attributes=[name for name, _ in self.attributes])


def _mt_encode(b: Body, x, scale, T):
    u = b.cast(b.op("Div", x, scale), DOUBLE)
    bad = _uncodable(b, x, u)
    u = b.op("Clip", _codable(b, u, bad), b.constant(-1.0), b.constant(1.0))
    levels = _power_of_two(b, b.cast(T, DOUBLE))
    code = b.op("Floor", b.op("Add", b.op("Mul", b.op("Abs", u), levels), b.constant(0.5)))
    code = b.op("Min", code, b.op("Sub", levels, b.constant(1.0)))
    return _poisoned(b, _signed_train(b, b.op("Mul", code, b.op("Sign", u)), T), bad)


def _mr_encode(b: Body, x, scale, T, G):
    u = b.cast(b.op("Div", x, scale), DOUBLE)
    bad = _uncodable(b, x, u)
    u = _codable(b, u, bad)
    magnitude = b.op("Abs", u)
    Td = b.cast(T, DOUBLE)
    top = b.op("Floor", b.op("Div", b.op("Sub", _power_of_two(b, b.op("Add", Td, b.constant(1.0))), b.constant(1.0)),
                              b.constant(3.0)))
    limit = b.op("Mul", b.op("Add", top, b.constant(0.5)), _power_of_two(b, b.op("Neg", Td)))
    ranges = b.op("Range", b.constant(0.0), b.cast(G, DOUBLE), b.constant(1.0))
    range_thresholds = b.op("Mul", _power_of_two(b, ranges), limit)
    reached = b.op("GreaterOrEqual", b.op("Unsqueeze", magnitude, b.constant([-1], INT64)), range_thresholds)
    j = b.op("ReduceSum", b.cast(reached, DOUBLE), b.constant([-1], INT64), keepdims=0)
    scaled = b.op("Mul", magnitude, _power_of_two(b, b.op("Sub", Td, j)))
    code = b.op("Min", b.op("Floor", b.op("Add", scaled, b.constant(0.5))), top)
    # non-adjacent form: digit = bit of 3k/2 - bit of k/2 (two MT neurons whose spikes cancel)
    high = _mt_digits(b, b.op("Floor", b.op("Mul", code, b.constant(1.5))), T)
    low = _mt_digits(b, b.op("Floor", b.op("Mul", code, b.constant(0.5))), T)
    graded = b.op("Mul", b.op("Sign", u), _power_of_two(b, j))
    return _poisoned(b, b.cast(b.op("Mul", b.op("Sub", high, low), graded), INT8), bad)


def _fn_encode(b: Body, x, thresholds, codes, bucket, T):
    """NaN poisons; +-inf takes the outermost interval's code (ops.fn_encode)."""
    return _poisoned(b, _signed_train(b, _table_codes(b, x, thresholds, codes, bucket), T), b.op("IsNaN", x))


def _fn_mr_encode(b: Body, x, thresholds, codes, bucket, T, G):
    """The multi-range train of the table's value k 2^-T (exact in float32: |k| < 2^24), NaN
    (so poisoned) where x is NaN."""
    value = b.op("Mul", _table_codes(b, x, thresholds, codes, bucket), _power_of_two(b, b.op("Neg", b.cast(T, DOUBLE))))
    value = b.op("Where", b.op("IsNaN", x), b.constant(float("nan")), value)
    return _mr_encode(b, b.cast(value, FLOAT), b.constant(1.0, FLOAT), T, G)


def _if_encode(b: Body, x, threshold, membrane, T, burst):
    theta = b.cast(threshold, DOUBLE)
    u = b.op("Div", b.cast(x, DOUBLE), theta)
    m = b.op("Clip", b.op("Div", b.cast(membrane, DOUBLE), theta), b.constant(0.0), b.constant(1.0))
    shape = b.op("Shape", b.op("Add", u, m))
    u, m = b.op("Expand", u, shape), b.op("Expand", m, shape)
    bad = _uncodable(b, b.cast(x, DOUBLE), u)
    u = _codable(b, u, bad)
    most = b.cast(burst, DOUBLE)
    least = b.op("Neg", most)

    def step(inner: Body, state):
        (membrane,) = state
        membrane = inner.op("Add", membrane, u)
        fired = inner.op("Clip", inner.op("Floor", membrane), least, most)
        return [inner.op("Sub", membrane, fired)], [fired]

    _, (spikes,) = _loop(b, T, [m], step, scans=1)
    return _poisoned(b, b.cast(spikes, INT8), bad)


def _train_length(b: Body, spikes: str) -> str:
    return b.op("Gather", b.op("Shape", spikes), b.constant(0, INT64))


def _decode(b: Body, spikes, scale, rate):
    gains = _step_gains(b, _train_length(b, spikes), rate)
    return b.op("Mul", _accumulate(b, _spike_values(b, spikes, FLOAT), gains), scale)


def _decoded64(b: Body, spikes: str, scale: str, rate: str) -> str:
    """scale * sum_t gain_t s_t in float64: what a float64 membrane holds after the train
    (exact: MT gains are powers of two)."""
    gains = b.cast(_step_gains(b, _train_length(b, spikes), rate), DOUBLE)
    return b.op("Mul", _accumulate(b, _spike_values(b, spikes, DOUBLE), gains), b.cast(scale, DOUBLE))


def _spike_linear(b: Body, spikes, weight, bias, rate):
    """sum_t gain_t W s_t + B with a float64 membrane, rounded to float32 once: the synapse is
    linear, so the membrane sums each input's weighted spikes and W is applied once."""
    decoded = _decoded64(b, spikes, b.constant(1.0, FLOAT), rate)
    current = b.op("MatMul", decoded, b.op("Transpose", b.cast(weight, DOUBLE)))
    return b.cast(b.op("Add", current, b.cast(bias, DOUBLE)), FLOAT)


def _spike_product(product: str):
    """A_hat (x) B_hat with float64 partial sums, rounded once. The stored-partial-sum
    schedule (sum_t A_t P^B_t + P^A_(t-1) B_t) adds up to exactly this product."""

    def body(b: Body, sa, scale_a, sb, scale_b, rate_a, rate_b):
        out = b.op(product, _decoded64(b, sa, scale_a, rate_a), _decoded64(b, sb, scale_b, rate_b))
        return b.cast(out, FLOAT)

    return body


def _spike_normalize(b: Body, x, a, thresholds, codes, power, T):
    """x * a^power: exponent e read by comparing a with powers of two, mantissa train from the
    table neuron; out = x * 2^-e * sum_t 2^-(t+1) s_t."""
    tiny = b.constant(2.0**-126)
    value = b.op("Max", b.cast(a, DOUBLE), tiny)  # a.float().clamp(min=tiny)
    guess = b.op("Floor", b.op("Div", b.op("Log", value), b.constant(0.6931471805599453)))
    guess = b.op("Sub", guess, b.cast(b.op("Greater", _power_of_two(b, guess), value), DOUBLE))
    exponent = b.op("Add", guess, b.cast(b.op("LessOrEqual", _power_of_two(b, b.op("Add", guess, b.constant(1.0))),
                                                         value), DOUBLE))
    mantissa = b.op("Div", value, _power_of_two(b, exponent))  # in [1, 2)
    square_root = b.cast(b.op("Equal", power, b.constant(-0.5, FLOAT)), DOUBLE)
    half = b.op("Mul", exponent, b.constant(0.5))
    odd = b.op("Mul", square_root, b.op("Mul", b.op("Sub", half, b.op("Floor", half)), b.constant(2.0)))
    mantissa = b.op("Mul", mantissa, b.op("Add", odd, b.constant(1.0)))  # in [1, 4) for 1/sqrt
    exponent = b.op("Div", b.op("Sub", exponent, odd), b.op("Add", square_root, b.constant(1.0)))
    zero = b.constant([0], INT64)
    first_table = [b.op("Gather", table, zero) for table in (thresholds, codes)]
    spikes = _signed_train(b, _table_codes(b, b.cast(mantissa, FLOAT), *first_table, zero), T)
    spikes = _poisoned(b, spikes, _uncodable(b, a, a))  # ops.normalizer_train
    k = _decoded64(b, spikes, b.constant(1.0, FLOAT), b.constant(0, INT64))  # k 2^-T, exact
    factor = b.op("Mul", k, _power_of_two(b, b.op("Neg", exponent)))
    return b.cast(b.op("Mul", b.cast(x, DOUBLE), factor), FLOAT)


def _qcfs(b: Body, x, lam, L):
    Ld = b.cast(L, DOUBLE)
    lam_d = b.cast(lam, DOUBLE)
    level = b.op("Floor", b.op("Add", b.op("Div", b.op("Mul", b.cast(x, DOUBLE), Ld), lam_d), b.constant(0.5)))
    level = b.op("Clip", level, b.op("Neg", Ld), Ld)
    return b.op("Mul", b.cast(level, FLOAT), b.op("Div", lam, b.cast(L, FLOAT)))


_T = ("T", "int")
OPS: dict[str, SnnOp] = {op.name: op for op in (
    SnnOp("MtEncode", "Multi-threshold neuron: T-step signed binary successive approximation of X / scale "
          "(step t fires where the residual reaches 2^-(t+1)); decodes as scale * sum_t 2^-(t+1) s_t.",
          (("X", "float"), ("scale", "float")), ("spikes", "int8"), (_T,), _mt_encode),
    SnnOp("MrEncode", "Multi-range (outlier-aware) ternary neuron: the non-adjacent-form MT code of X at the smallest "
          "range scale * 2^j (j <= G) holding |X|, sent as graded spikes +-2^j.",
          (("X", "float"), ("scale", "float")), ("spikes", "int8"), (_T, ("G", "int")), _mr_encode),
    SnnOp("FnEncode", "Table neuron: compares its membrane X with sorted thresholds (table bucket[c] for channel c) "
          "and fires the MT code of f(X) for the function the thresholds encode.",
          (("X", "float"), ("thresholds", "float"), ("codes", "int64"), ("bucket", "int64")), ("spikes", "int8"),
          (_T,), _fn_encode),
    SnnOp("FnMrEncode", "Table neuron with multi-range codes: as FnEncode, but the interval's code k (units of "
          "2^-T) is sent as MrEncode sends k 2^-T at scale 1: ternary digits of the range 2^j holding it, "
          "graded spikes +-2^j.",
          (("X", "float"), ("thresholds", "float"), ("codes", "int64"), ("bucket", "int64")), ("spikes", "int8"),
          (_T, ("G", "int")), _fn_mr_encode),
    SnnOp("IfEncode", "Signed integrate-and-fire neurons (rate code): m += X / threshold; fires floor(m) spikes, "
          "at most burst of either sign (burst 1: +1 at m >= 1, -1 at m < 0), reset by subtraction; "
          "m(0) = membrane / threshold clipped to [0, 1]. Decodes as threshold * mean_t s_t.",
          (("X", "float"), ("threshold", "float"), ("membrane", "float")), ("spikes", "int8"),
          (_T, ("burst", "int")), _if_encode),
    SnnOp("Decode", "Reads a train back into the ANN's units: scale * sum_t gain_t s_t (gain 2^-(t+1), or 1/T "
          "if rate).", (("spikes", "int8"), ("scale", "float")), ("Y", "float"), (("rate", "int"),), _decode),
    SnnOp("SpikeLinear", "Synaptic layer: sum_t gain_t W s_t + B on a float64 membrane, rounded to float32 once "
          "(input ranges folded into W's columns; B may be a scalar 0).",
          (("spikes", "int8"), ("W", "float"), ("B", "float")), ("Y", "float"), (("rate", "int"),), _spike_linear),
    SnnOp("SpikeMatMul", "Spike x spike matrix product of two trains by stored partial sums: "
          "sum_t A_t P^B_t + P^A_(t-1) B_t = A_hat B_hat.",
          (("A", "int8"), ("scale_A", "float"), ("B", "int8"), ("scale_B", "float")), ("Y", "float"),
          (("rate_A", "int"), ("rate_B", "int")), _spike_product("MatMul")),
    SnnOp("SpikeMul", "Elementwise spike x spike product of two trains by stored partial sums.",
          (("A", "int8"), ("scale_A", "float"), ("B", "int8"), ("scale_B", "float")), ("Y", "float"),
          (("rate_A", "int"), ("rate_B", "int")), _spike_product("Mul")),
    SnnOp("SpikeNormalize", "X * A^power (power -1 or -1/2) with A^power sent by a floating-point neuron: an "
          "exponent from comparisons with powers of two and a T-step mantissa train from a table neuron.",
          (("X", "float"), ("A", "float"), ("thresholds", "float"), ("codes", "int64")), ("Y", "float"),
          (("power", "float"), _T), _spike_normalize),
    SnnOp("Qcfs", "Signed quantization-clip-floor-shift activation: "
          "lambda / L * clip(floor(X L / lambda + 1/2), -L, L).",
          (("X", "float"), ("lambda", "float")), ("Y", "float"), (("L", "int"),), _qcfs),
)}


def register_schemas() -> None:
    """Make the snn operators known to onnx (checker, shape inference, onnxscript); idempotent."""
    for op in OPS.values():
        if not onnx.defs.has(op.name, DOMAIN):
            onnx.defs.register_schema(op.schema())


def function_library(names: Sequence[str]) -> list[onnx.FunctionProto]:
    """The functions defining the snn operators `names` in the standard opset."""
    return [OPS[name].function() for name in sorted(set(names))]
