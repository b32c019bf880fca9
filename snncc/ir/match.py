"""Pattern matchers several passes share: which nodes are synapse inputs, softmax
probabilities, norm denominators, or elementwise functions that become table neurons.

A pass that rewrites a pattern and a pass that must leave it to that one (qcfs leaves
table-neuron outputs and probabilities alone) ask the same matcher here, so they cannot
disagree about what the pattern is.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from snncc.ir.analysis import MATMUL_TARGETS, activation_product, data_dependent_nodes, matmul_operands, weight_linear
from snncc.ir.rewrite import get_tensor

aten = torch.ops.aten

SOFTMAX_TARGETS = frozenset({aten.softmax.int, aten._softmax.default})
# Ops between a softmax and its reader that leave the values alone (in eval mode).
PASS_THROUGH = frozenset({aten.dropout.default, aten.alias.default, aten.clone.default, aten.contiguous.default,
                          aten.to.dtype})

# Ops that act on each element alone; a chain of them with one activation input is one function f.
NONLINEAR_OPS = frozenset({
    aten.silu.default, aten.gelu.default, aten.relu.default, aten.tanh.default, aten.sigmoid.default,
    aten.exp.default, aten.erf.default, aten.sqrt.default, aten.abs.default, aten.leaky_relu.default,
    aten.hardtanh.default, aten.softplus.default, aten.elu.default, aten.clamp.default,
})
AFFINE_OPS = frozenset({
    aten.mul.Tensor, aten.mul.Scalar, aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.rsub.Scalar,
    aten.div.Tensor, aten.div.Scalar, aten.neg.default, aten.pow.Tensor_Scalar,
})
IDENTITY_OPS = frozenset({aten.to.dtype, aten.alias.default, aten.clone.default, aten.contiguous.default})
ELEMENTWISE_OPS = NONLINEAR_OPS | AFFINE_OPS | IDENTITY_OPS


def through_identity(x: fx.Node) -> fx.Node:
    """The tensor x is a cast or copy of (x itself if it is none): a block-by-block compile
    drops the casts (snncc.ir.storage), so a plan keyed by tensor names the source."""
    while x.target in IDENTITY_OPS and isinstance(x.args[0], fx.Node):
        x = x.args[0]
    return x


def synapse_operands(node: fx.Node, dependent: set[fx.Node]) -> list[tuple[fx.Node, bool]]:
    """The activation operands a synapse at `node` reads, each with its range layout (True:
    per last dim, for linear layers and elementwise products; False: per static dim, for
    activation-activation matmuls). Empty where `node` is no synapse."""
    if weight_linear(node):
        x = matmul_operands(node)[0]
        return [(x, True)] if x in dependent else []
    if node.target in MATMUL_TARGETS:
        return [(a, False) for a in matmul_operands(node) if a in dependent]
    product = activation_product(node, dependent)
    return [(a, True) for a in dict.fromkeys(product)] if product else []


def is_probability(x: fx.Node) -> bool:
    """A softmax output, read directly or through no-op views (`attention` lowers it to an
    exp train)."""
    while x.target in PASS_THROUGH and isinstance(x.args[0], fx.Node):
        x = x.args[0]
    return x.target in SOFTMAX_TARGETS


def normalizer(node: fx.Node, dependent: set[fx.Node]) -> tuple[fx.Node, fx.Node, float] | None:
    """(x, a, power) where node computes x * a^power with power -1 or -1/2: a norm's
    division by its statistic."""
    if node.target == aten.div.Tensor and isinstance(node.args[1], fx.Node) and node.args[1] in dependent:
        x, d = node.args
        if d.target == aten.sqrt.default:
            return x, d.args[0], -0.5
        return x, d, -1.0
    if node.target == aten.mul.Tensor and len(node.args) == 2:
        for x, d in (node.args, node.args[::-1]):
            if isinstance(d, fx.Node) and isinstance(x, fx.Node) and x in dependent:
                if d.target == aten.rsqrt.default:
                    return x, d.args[0], -0.5
                if d.target == aten.reciprocal.default:
                    return x, d.args[0], -1.0
    return None


def _is_scalar_constant(arg, gm: fx.GraphModule) -> bool:
    if not isinstance(arg, fx.Node):
        return True
    return arg.op == "get_attr" and get_tensor(gm, arg).numel() == 1


def unary_roots(gm: fx.GraphModule) -> dict[fx.Node, fx.Node]:
    """For each elementwise node that is a function of one activation only, that activation."""
    dependent = data_dependent_nodes(gm.graph)
    root: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in ELEMENTWISE_OPS or node not in dependent:
            continue
        inputs = node.all_input_nodes
        if not all(a in dependent or _is_scalar_constant(a, gm) for a in inputs):
            continue
        roots = {root.get(a, a) for a in inputs if a in dependent}
        if len(roots) == 1:
            root[node] = roots.pop()
    return root


def _region(output: fx.Node, root: fx.Node, roots: dict[fx.Node, fx.Node]) -> list[fx.Node]:
    """The nodes between `root` and `output`, in graph order."""
    members, stack = set(), [output]
    while stack:
        node = stack.pop()
        if node in members or node is root:
            continue
        members.add(node)
        stack += [a for a in node.all_input_nodes if roots.get(a) is root]
    return [n for n in output.graph.nodes if n in members]


def _same_last_dim(a: fx.Node, b: fx.Node) -> bool:
    va, vb = a.meta.get("val"), b.meta.get("val")
    return isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.shape[-1] == vb.shape[-1]


def function_regions(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node, list[fx.Node]]]:
    """(output, root, region) of every chain that becomes a table neuron: elementwise
    functions of one activation that contain a nonlinear op."""
    roots = unary_roots(gm)
    outputs = []
    for node, root in roots.items():
        if any(roots.get(u) is not root for u in node.users):
            region = _region(node, root, roots)
            if any(n.target in NONLINEAR_OPS for n in region) and _same_last_dim(node, root):
                outputs.append((node, root, region))
    return outputs
