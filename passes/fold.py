"""fold: norm weights (per-channel constant scales) fold into the linear layers that read them.

    aten.linear(aten.mul(gamma, n), W, b)                -> aten.linear(n, W * gamma, b)
    aten.linear(aten.layer_norm(x, s, gamma, beta), W, b) -> aten.linear(aten.layer_norm(x, s), W * gamma, W beta + b)

The same through views that keep the last dim (GPT-2's addmm over a 2-D view). Only where
every reader of the scaled tensor is a linear layer: BERT's post-LN output also feeds the
residual stream, so its norms stay as they are. Exact in real arithmetic; float32 results
differ by rounding only (tested). Spiking norms then need no per-channel multiply, and the
linear layers' input ranges are those of the normalised values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from snncc.calibration import CalibrationContext
from snncc.ir.analysis import LINEAR_TARGETS, matmul_operands
from snncc.ir.rewrite import add_constant, drop_unused_constants, get_tensor
from snncc.pipeline import Pass, PassResult, register_pass

aten = torch.ops.aten
# Ops that pass channels through unchanged when the last dim keeps its size (checked per node).
_KEEPS_LAST_DIM = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.dropout.default,
                   aten.contiguous.default, aten.clone.default, aten.to.dtype, aten.alias.default,
                   aten.slice.Tensor}


def _last_dim(node: fx.Node):
    value = node.meta.get("val")
    return value.shape[-1] if isinstance(value, torch.Tensor) else None


def _linear_readers(node: fx.Node) -> list[fx.Node] | None:
    """The linear layers reading `node` (through last-dim-preserving views), or None if
    anything else reads it."""
    readers = []
    for user in node.users:
        if user.target in LINEAR_TARGETS and matmul_operands(user)[0] is node:
            if matmul_operands(user)[1].op != "get_attr":
                return None
            readers.append(user)
        elif user.target in _KEEPS_LAST_DIM and _last_dim(user) == _last_dim(node):
            below = _linear_readers(user)
            if below is None:
                return None
            readers += below
        else:
            return None
    return readers or None


def _norm_scale(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node | None] | None:
    """(normalised input, gamma, beta) for an RMSNorm-style multiply or an affine layer_norm."""
    if node.target == aten.mul.Tensor and len(node.args) == 2:
        a, b = node.args
        for gamma, other in ((a, b), (b, a)):
            if isinstance(gamma, fx.Node) and gamma.op == "get_attr" and isinstance(other, fx.Node):
                value = gamma.meta.get("val")
                if value is None or (value.dim() == 1 and value.shape[0] == _last_dim(node)):
                    return other, gamma, None
    if node.target == aten.layer_norm.default and len(node.args) >= 3 and isinstance(node.args[2], fx.Node):
        beta = node.args[3] if len(node.args) > 3 and isinstance(node.args[3], fx.Node) else None
        return node, node.args[2], beta
    return None


@register_pass
@dataclass
class FoldPass(Pass):
    name = "fold"
    stage = 20
    summary = "norm weights -> columns of the linear layers that read the norm"

    def run(self, gm: fx.GraphModule, ctx: CalibrationContext) -> PassResult:
        modified = False
        for node in list(gm.graph.nodes):
            match = _norm_scale(node) if node.op == "call_function" else None
            readers = _linear_readers(node) if match else None
            if not readers:
                continue
            source, gamma_node, beta_node = match
            gamma = get_tensor(gm, gamma_node)
            beta = get_tensor(gm, beta_node) if beta_node is not None else None
            for linear in readers:
                self._fold_into(gm, linear, gamma, beta)
            if node.target == aten.layer_norm.default:
                node.args = (node.args[0], node.args[1], None, None, *node.args[4:])
            else:
                node.replace_all_uses_with(source)
            modified = True
        drop_unused_constants(gm)
        return PassResult(gm, modified)

    @staticmethod
    def _fold_into(gm: fx.GraphModule, linear: fx.Node, gamma: torch.Tensor, beta: torch.Tensor | None) -> None:
        _, w_node = matmul_operands(linear)
        weight = get_tensor(gm, w_node)
        addmm = linear.target == aten.addmm.default
        folded = weight * (gamma[:, None] if addmm else gamma)
        new_w = add_constant(gm, f"{w_node.target}_fold", folded, linear)
        if addmm:
            linear.args = (linear.args[0], linear.args[1], new_w)
        else:
            linear.args = (linear.args[0], new_w, *linear.args[2:])
        if beta is None:
            return
        shift = beta @ weight if addmm else weight @ beta  # the bias beta adds after the layer
        bias_node = linear.args[0] if addmm else (linear.args[2] if len(linear.args) > 2 else None)
        bias = get_tensor(gm, bias_node) + shift if bias_node is not None else shift
        new_b = add_constant(gm, f"{w_node.target}_fold_bias", bias, linear)
        linear.args = (new_b, *linear.args[1:]) if addmm else (linear.args[0], linear.args[1], new_b)
