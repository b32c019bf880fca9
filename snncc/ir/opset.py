"""The ops a saved spiking program may call: one explicit table, by exact overload name.

An artifact's graph names its ops as strings; the loader resolves a name only through this
table, so a shared file can never reach an op snncc does not emit (an ATen op that reads
files, a Python function that runs commands). Saving refuses a graph that calls anything
else, so a program that saves also loads. The ATen entries are the ops torch.export and the
ONNX frontend leave in transformer graphs and the passes keep or emit (a test compiles every
pipeline on every builtin model and checks each op is here), plus pure tensor arithmetic of
the same kind; none reads or writes files, draws random numbers or takes Python callables.
The snn entries are the ops snncc.ir.spec describes, whose integer arguments the loader
bounds by spec.INT_BOUNDS.
"""

from __future__ import annotations

import operator

import torch

from snncc.ir.spec import specs

ATEN_OPS = frozenset({
    # what the pipelines leave in the builtin models' programs
    "__and__.Tensor", "_to_copy.default", "add.Tensor", "addmm.default", "alias.default", "amax.default",
    "arange.default", "cat.default", "contiguous.default", "cos.default", "cumsum.default", "diff.default",
    "dropout.default", "embedding.default", "eq.Tensor", "expand.default", "gather.default", "ge.Scalar",
    "gelu.default", "index.Tensor", "layer_norm.default", "le.Tensor", "linear.default", "matmul.default",
    "mean.dim", "mul.Tensor", "ne.Scalar", "neg.default", "new_ones.default", "ones.default",
    "pow.Tensor_Scalar", "relu.default", "reshape.default", "rsqrt.default", "silu.default", "sin.default",
    "slice.Tensor", "softmax.int", "split.Tensor", "sub.Tensor", "sum.dim_IntList", "sym_size.int",
    "tanh.default", "to.device", "to.dtype", "to.dtype_layout", "transpose.int", "unsqueeze.default",
    "view.default", "where.ScalarOther", "zeros.default",
    # the same kind of pure arithmetic, shape and comparison ops other transformers export to
    "abs.default", "add.Scalar", "amin.default", "any.default", "argmax.default", "arange.start",
    "arange.start_step", "baddbmm.default", "bitwise_not.default", "bmm.default", "chunk.default",
    "clamp.default", "clamp.Tensor", "clamp_max.default", "clamp_min.default", "clone.default",
    "detach.default", "div.Scalar", "div.Tensor", "div.Tensor_mode", "einsum.default", "eq.Scalar", "erf.default",
    "exp.default", "flatten.using_ints", "full.default", "full_like.default", "ge.Tensor",
    "gt.Scalar", "gt.Tensor", "index_select.default", "isinf.default", "isnan.default", "le.Scalar",
    "lift_fresh_copy.default", "log.default", "logical_and.default", "logical_not.default",
    "logical_or.default", "lt.Scalar", "lt.Tensor", "masked_fill.Scalar", "masked_fill.Tensor", "max.default",
    "max.dim", "maximum.default", "mean.default", "min.default", "min.dim", "minimum.default", "mm.default",
    "mul.Scalar", "ne.Tensor", "new_zeros.default", "ones_like.default", "permute.default", "pow.Scalar",
    "pow.Tensor_Tensor", "reciprocal.default", "repeat.default", "rsub.Scalar", "rsub.Tensor",
    "scaled_dot_product_attention.default", "select.int", "sigmoid.default", "sign.default",
    "split_with_sizes.default", "sqrt.default", "squeeze.dim", "squeeze.dims", "sub.Scalar", "sum.default",
    "sym_numel.default", "t.default", "tril.default", "triu.default", "type_as.default", "unflatten.int",
    "_unsafe_view.default", "var_mean.correction", "where.self", "where.ScalarSelf", "zeros_like.default",
    "_softmax.default", "_log_softmax.default", "log_softmax.int",
})
# Every op snncc.ir.spec describes (its quantizers included: a program never holds them, and
# a loaded graph that calls one still runs); ops registered after import are not loadable.
SNN_OPS = frozenset(f"{spec.op._opname}.{spec.op._overloadname}" for spec in specs() if spec.op.namespace == "snn")
OPERATOR_FUNCTIONS = {"getitem": operator.getitem}


def op_name(target) -> str | None:
    """The table's name of a graph target ('aten.linear.default', 'operator.getitem'), or None
    when the target is not in the table."""
    if isinstance(target, torch._ops.OpOverload):
        name = str(target)  # 'aten.linear.default'
        return name if resolve_op(name) is target else None
    for name, function in OPERATOR_FUNCTIONS.items():
        if target is function:
            return f"operator.{name}"
    return None


def resolve_op(name: str):
    """The op a table name stands for, or None: nothing outside the table is ever looked up."""
    namespace, _, rest = name.partition(".")
    if namespace == "operator":
        return OPERATOR_FUNCTIONS.get(rest)
    table = {"aten": ATEN_OPS, "snn": SNN_OPS}.get(namespace)
    if table is None or rest not in table:
        return None
    packet, _, overload = rest.rpartition(".")
    try:
        return getattr(getattr(getattr(torch.ops, namespace), packet), overload)
    except (AttributeError, RuntimeError):  # an op this torch does not have
        return None
