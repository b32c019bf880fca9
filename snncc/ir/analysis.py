"""Graph facts the passes, verifier and profiler share: data dependence, matmul sites, MACs."""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from snncc.ir.spec import COST_ELEMENTWISE, COST_LINEAR, COST_MATMUL, spec_of, synapses

aten = torch.ops.aten

LINEAR_TARGETS = {aten.linear.default, aten.addmm.default}
MATMUL_TARGETS = {aten.matmul.default, aten.mm.default, aten.bmm.default}
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

Shape = torch.Size | None
ShapeOf = Callable[[object], Shape]
MacCount = Callable[[tuple, Shape, ShapeOf], int | None]


def _numel(shape: Sequence[int]) -> int:
    return math.prod(int(d) for d in shape)


def _out_times(k_of: Callable[[tuple, ShapeOf], int | None]) -> MacCount:
    """MACs of an op whose every output element sums k products (linear, matmul, vector ops)."""
    def count(args: tuple, out: Shape, shape: ShapeOf) -> int | None:
        k = k_of(args, shape)
        return None if out is None or k is None else _numel(out) * k
    return count


def _last_dim(position: int) -> Callable[[tuple, ShapeOf], int | None]:
    def k_of(args: tuple, shape: ShapeOf) -> int | None:
        operand = shape(args[position])
        return int(operand[-1]) if operand else None
    return k_of


def _attention_macs(args: tuple, out: Shape, shape: ShapeOf) -> int | None:
    """Fused attention: Q K^T (L x S x E per head) plus P V (L x S x Ev per head)."""
    q, k, v = (shape(a) for a in args[:3])
    if q is None or k is None or v is None:
        return None
    return _numel(q[:-2]) * int(q[-2]) * int(k[-2]) * (int(q[-1]) + int(v[-1]))


def _conv_macs(transposed: bool | None) -> MacCount:
    """A convolution: each output element (each input element when transposed) meets one
    weight slice of in/groups x kernel; `transposed` None reads convolution's own flag."""
    def count(args: tuple, out: Shape, shape: ShapeOf) -> int | None:
        flipped = bool(args[6]) if transposed is None else transposed
        x, weight = shape(args[0]), shape(args[1])
        fanned = x if flipped else out
        return None if fanned is None or weight is None else _numel(fanned) * _numel(weight[1:])
    return count


def _addbmm_macs(args: tuple, out: Shape, shape: ShapeOf) -> int | None:
    b1, b2 = shape(args[1]), shape(args[2])
    return None if b1 is None or b2 is None else _numel(b1) * int(b2[-1])


def _matrix_macs(position: int) -> MacCount:
    """Matrix-vector products: one MAC per matrix element."""
    def count(args: tuple, out: Shape, shape: ShapeOf) -> int | None:
        matrix = shape(args[position])
        return None if matrix is None else _numel(matrix)
    return count


def _tensordot_macs(args: tuple, out: Shape, shape: ShapeOf) -> int | None:
    a, b = shape(args[0]), shape(args[1])
    if a is None or b is None:
        return None
    return _numel(a) * _numel(b) // max(_numel([b[d] for d in args[3]]), 1)


def _chain_macs(args: tuple, out: Shape, shape: ShapeOf) -> int | None:
    """A chain of matrix products, multiplied left to right (an upper bound for any order)."""
    shapes = [shape(a) for a in args[0]]
    if any(s is None for s in shapes):
        return None
    total, rows = 0, [int(d) for d in shapes[0][:-1]] or [1]
    for left, right in itertools.pairwise(shapes):
        inner, cols = int(left[-1]), int(right[-1]) if len(right) > 1 else 1
        total += _numel(rows) * inner * cols
    return total


def _einsum_letters(term: str, rank: int) -> list[str] | None:
    """An einsum operand's index letters, with '...' spelled out as digits counted from the right."""
    if "..." not in term:
        return list(term) if len(term) == rank else None
    head, tail = term.split("...")
    hidden = rank - len(head) - len(tail)
    return None if hidden < 0 else [*head, *(str(hidden - i) for i in range(hidden)), *tail]


def _einsum_macs(args: tuple, out: Shape, shape: ShapeOf) -> int | None:
    """einsum contracted pairwise left to right, as torch does without opt_einsum: each
    pair costs the product of every index size it spans."""
    equation, operands = args[0].replace(" ", ""), args[1]
    shapes = [shape(a) for a in operands]
    terms = equation.split("->")[0].split(",")
    if any(s is None for s in shapes) or len(terms) != len(shapes):
        return None
    letters = [_einsum_letters(t, len(s)) for t, s in zip(terms, shapes, strict=True)]
    if any(ls is None for ls in letters):
        return None
    sizes: dict[str, int] = {}
    for ls, s in zip(letters, shapes, strict=True):
        for letter, size in zip(ls, s, strict=True):
            sizes[letter] = max(sizes.get(letter, 1), int(size))
    explicit = equation.split("->")[1] if "->" in equation else None
    kept = {x for x in sizes if x.isdigit() or (x in explicit if explicit is not None
                                                 else sum(ls.count(x) for ls in letters) == 1)}
    total, current = 0, set(letters[0])
    for i in range(1, len(letters)):
        spanned = current | set(letters[i])
        total += _numel(sizes[x] for x in spanned)
        current = spanned & (kept | set().union(*map(set, letters[i + 1:])))
    return total


def _weight_slice(position: int) -> Callable[[tuple, ShapeOf], int | None]:
    def k_of(args: tuple, shape: ShapeOf) -> int | None:
        weight = shape(args[position])
        return None if weight is None else _numel(weight[1:])
    return k_of


# Every matmul-like ATen op, with how many multiply-accumulates it does at given shapes.
# Passes lower LINEAR_TARGETS and MATMUL_TARGETS; any of these left in a program is analog.
MATMUL_MACS: dict = {
    aten.linear.default: _out_times(_last_dim(0)),
    aten.addmm.default: _out_times(_last_dim(1)),
    aten._addmm_activation.default: _out_times(_last_dim(1)),
    aten.baddbmm.default: _out_times(_last_dim(1)),
    aten.matmul.default: _out_times(_last_dim(0)),
    aten.linalg_matmul.default: _out_times(_last_dim(0)),
    aten.mm.default: _out_times(_last_dim(0)),
    aten.bmm.default: _out_times(_last_dim(0)),
    aten._int_mm.default: _out_times(_last_dim(0)),
    aten.inner.default: _out_times(_last_dim(0)),
    aten.linalg_vecdot.default: _out_times(_last_dim(0)),
    aten.outer.default: _out_times(lambda args, shape: 1),
    aten.ger.default: _out_times(lambda args, shape: 1),
    aten.addr.default: _out_times(lambda args, shape: 1),
    aten.bilinear.default: _out_times(_weight_slice(2)),
    aten.addbmm.default: _addbmm_macs,
    aten.mv.default: _matrix_macs(0),
    aten.addmv.default: _matrix_macs(1),
    aten.dot.default: _matrix_macs(0),
    aten.vdot.default: _matrix_macs(0),
    aten.tensordot.default: _tensordot_macs,
    aten.chain_matmul.default: _chain_macs,
    aten.linalg_multi_dot.default: _chain_macs,
    aten.einsum.default: _einsum_macs,
    aten.convolution.default: _conv_macs(None),
    aten._convolution.default: _conv_macs(None),
    aten.conv_transpose1d.default: _conv_macs(True),
    aten.conv_transpose2d.input: _conv_macs(True),
    aten.conv_transpose3d.input: _conv_macs(True),
    **{getattr(getattr(aten, f"conv{d}d"), o): _conv_macs(False) for d in (1, 2, 3) for o in ("default", "padding")},
    **{getattr(aten, name).default: _attention_macs for name in (
        "scaled_dot_product_attention", "_scaled_dot_product_attention_math", "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_fused_attention_overrideable",
        "_scaled_dot_product_attention_math_for_mps")},
}
ANALOG_MATMULS = frozenset(MATMUL_MACS)
FUSED_ATTENTION = frozenset(t for t, count in MATMUL_MACS.items() if count is _attention_macs)
# Words in an ATen op's name that say it multiplies matrices (quantized mm, backend convolutions).
_MATMUL_WORDS = frozenset({"mm", "bmm", "addmm", "baddbmm", "addbmm", "matmul", "dot", "vdot", "einsum",
                           "bilinear", "linear", "mv", "addmv", "tensordot", "outer", "ger", "addr", "inner",
                           "vecdot", "attention"})


def matmul_like(target) -> bool:
    """A matmul-like ATen op: one of MATMUL_MACS, or one whose name says so (`_weight_int8pack_mm`,
    `mkldnn_convolution`) whose MACs this table cannot count: it must be reported, not dropped."""
    if target in ANALOG_MATMULS:
        return True
    if getattr(target, "namespace", None) != "aten":
        return False
    words = [w for w in str(target).split(".")[1].split("_") if w]
    return "backward" not in words and any(w in _MATMUL_WORDS or w.startswith("conv") for w in words)


def data_dependent_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose value depends on the input *values* (not just the input shapes).

    Position tables (RoPE angles, causal masks) depend only on the sequence length; they
    are input-independent constants per length and are not synaptic work. So is a stage's
    input that the whole model computes that way (meta `input_independent`, snncc.ir.stages).
    """
    dependent: set[fx.Node] = set()
    for node in graph.nodes:  # topological order
        if node.op == "placeholder":
            if not node.meta.get("input_independent"):
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
    """Runs a graph under a FakeTensorMode, its stored tensors made fake too: with a real
    operand an op would compute for real (a cast of every weight: time, and memory the
    size of the program)."""

    def __init__(self, gm: fx.GraphModule, mode: FakeTensorMode):
        super().__init__(gm)
        self.mode = mode

    def get_attr(self, target, args, kwargs):
        value = super().get_attr(target, args, kwargs)
        return self.mode.from_tensor(value) if isinstance(value, torch.Tensor) else value

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
        _ShapeRecorder(gm, mode).run(example)


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
    """One matmul-like node and the multiply-accumulates it does at the recorded shapes
    (None: its shapes are unknown, so its MACs are too)."""

    node: fx.Node
    macs: int | None
    spiking: bool


def _recorded(value: object) -> Shape:
    return shape_of(value) if isinstance(value, fx.Node) else None


def _spike_macs(node: fx.Node, shape: ShapeOf, out: Shape) -> int | None:
    """By the synapse's cost model: linear, out x in (the weight's last dim); matmul, out x k
    (the first train's last dim); elementwise, one product per element."""
    if out is None:
        return None
    cost = spec_of(node.target).cost
    if cost == COST_ELEMENTWISE:
        return _numel(out)
    operand = {COST_LINEAR: shape(node.args[1]), COST_MATMUL: shape(node.args[0])}.get(cost)
    return None if operand is None else _numel(out) * int(operand[-1])


def site_macs(node: fx.Node, shape: ShapeOf = _recorded, out: Shape | None = None) -> int | None:
    """Multiply-accumulates of a matmul-like or synapse node: `shape` gives an argument's
    shape (by default the one `propagate_shapes` recorded), `out` the result's. None when a
    shape it needs is unknown: callers must report that, never count it as zero."""
    out = shape_of(node) if out is None else out
    if node.target in synapses():
        return _spike_macs(node, shape, out)
    count = MATMUL_MACS.get(node.target)
    return None if count is None else count(node.args, out, shape)


def matmul_sites(gm: fx.GraphModule) -> list[MatmulSite]:
    """Every data-dependent matmul-like node, spiking or analog, with its MACs."""
    dependent = data_dependent_nodes(gm.graph)
    spiking = synapses()
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node not in dependent:
            continue
        if matmul_like(node.target) or node.target in spiking:
            sites.append(MatmulSite(node, site_macs(node), node.target in spiking))
    return sites


def is_python_builtin(target) -> bool:
    """getitem and friends that FX graphs use for tuples and symbolic sizes."""
    return getattr(target, "__module__", None) in ("_operator", "operator") or target is operator.getitem
