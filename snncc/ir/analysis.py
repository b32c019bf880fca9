"""Graph facts the passes, verifier and profiler share: data dependence, matmul sites, MACs."""

from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from snncc.ir.ops import SPIKE_SYNAPSES

aten = torch.ops.aten
snn = torch.ops.snn

LINEAR_TARGETS = {aten.linear.default, aten.addmm.default}
MATMUL_TARGETS = {aten.matmul.default, aten.mm.default, aten.bmm.default}
ANALOG_MATMULS = LINEAR_TARGETS | MATMUL_TARGETS
# Ops that move, view or look up data without arithmetic: nothing to convert.
DATA_MOVEMENT = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
    aten.t.default, aten.permute.default, aten.expand.default, aten.slice.Tensor, aten.select.int,
    aten.unsqueeze.default, aten.squeeze.dim, aten.cat.default, aten.contiguous.default,
    aten.clone.default, aten.alias.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device,
    aten._to_copy.default, aten.dropout.default, aten.embedding.default, aten.index.Tensor,
    aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.gather.default,
    aten.sym_size.int, aten.detach.default, aten.lift_fresh_copy.default,
}
# Ops that only read a tensor's shape: their result does not depend on the token values.
_SHAPE_ONLY = {aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int}


def data_dependent_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose value depends on the input *values* (not just the input shapes).

    Position tables (RoPE angles, causal masks) depend only on the sequence length; they
    are input-independent constants per length and are not synaptic work.
    """
    dependent: set[fx.Node] = set()
    for node in graph.nodes:  # topological order
        if node.op == "placeholder":
            dependent.add(node)
        elif node.op == "call_function" and node.target not in _SHAPE_ONLY:
            if any(arg in dependent for arg in node.all_input_nodes):
                dependent.add(node)
    return dependent


def matmul_operands(node: fx.Node) -> tuple[fx.Node, fx.Node]:
    """(activation-side, weight-side) operands of an ATen matmul-like node."""
    if node.target == aten.addmm.default:
        return node.args[1], node.args[2]
    return node.args[0], node.args[1]


def weight_linear(node: fx.Node) -> bool:
    """A linear layer, or a matmul whose right operand is a parameter (GPT-2's views)."""
    if node.target in LINEAR_TARGETS:
        return True
    return node.target in MATMUL_TARGETS and matmul_operands(node)[1].op == "get_attr"


def activation_product(node: fx.Node, dependent: set[fx.Node]) -> tuple[fx.Node, fx.Node] | None:
    """The two activation operands of an elementwise product (a * b, or a^2), or None."""
    if node.target == aten.mul.Tensor and len(node.args) == 2:
        a, b = node.args
        if isinstance(a, fx.Node) and isinstance(b, fx.Node) and a in dependent and b in dependent:
            return a, b
    if node.target == aten.pow.Tensor_Scalar and node.args[1] == 2 and node.args[0] in dependent:
        return node.args[0], node.args[0]
    return None


def shape_of(node: fx.Node) -> torch.Size | None:
    """The concrete shape recorded by `propagate_shapes`, if any."""
    value = node.meta.get("snncc_shape")
    return value if isinstance(value, torch.Size) else None


class _ShapeRecorder(fx.Interpreter):
    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta["snncc_shape"] = torch.Size(int(d) for d in result.shape)
        return result


def propagate_shapes(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> None:
    """Record concrete shapes for an input of `input_shape` without computing (fake tensors).
    The input sits on the weights' device: fake tensors check devices as real ones do."""
    weights = next(itertools.chain(gm.parameters(), gm.buffers()), None)
    device = weights.device if weights is not None else torch.device("cpu")
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        example = mode.from_tensor(torch.zeros(input_shape, dtype=torch.long, device=device))
        _ShapeRecorder(gm).run(example)


def capture(gm: fx.GraphModule, names: set[str], batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """The values of the named nodes when `gm` runs on `batch`."""
    values: dict[str, torch.Tensor] = {}

    class _Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node):
            result = super().run_node(n)
            if n.name in names:
                values[n.name] = result.detach()
            return result

    with torch.no_grad():
        _Recorder(gm).run(batch)
    return values


@dataclass(frozen=True)
class MatmulSite:
    """One matmul-like node and the multiply-accumulates it does at the recorded shapes."""

    node: fx.Node
    macs: int
    spiking: bool


def _macs(node: fx.Node) -> int:
    out = shape_of(node)
    if out is None:
        return 0
    if node.target in (snn.spike_linear.default,):
        k = shape_of(node.args[1])[1]
    elif node.target == snn.spike_matmul.default:
        k = shape_of(node.args[0])[-1]
    else:
        a, _ = matmul_operands(node)
        k = shape_of(a)[-1]
    return int(torch.Size(out).numel()) * int(k)


def matmul_sites(gm: fx.GraphModule) -> list[MatmulSite]:
    """Every data-dependent matmul-like node, spiking or analog, with its MACs."""
    dependent = data_dependent_nodes(gm.graph)
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node not in dependent:
            continue
        if node.target in ANALOG_MATMULS or node.target in SPIKE_SYNAPSES:
            spiking = node.target not in ANALOG_MATMULS
            sites.append(MatmulSite(node, _macs(node), spiking))
    return sites


def is_python_builtin(target) -> bool:
    """getitem and friends that FX graphs use for tuples and symbolic sizes."""
    return getattr(target, "__module__", None) in ("_operator", "operator") or target is operator.getitem
