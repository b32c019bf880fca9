"""ONNX frontend: an ONNX language model becomes a torch module that `trace` exports like any
other, so it goes through the same passes.

`OnnxModule.forward` walks the ONNX graph and runs each node with the torch op of the same
meaning. Shape arithmetic (Shape -> Gather -> Concat -> Reshape ...) is carried out on Python
lists of sizes, not tensors, so torch.export keeps the batch and sequence length symbolic
instead of treating them as data. Only the standard ops that torch.onnx emits for
transformer LLMs are covered; any other op is refused with its node name.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from snncc.errors import ModelError, first_line


def _attr(node, name: str, default=None):
    import onnx

    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def _is_shape(value) -> bool:
    return isinstance(value, list)


def _elementwise(fn: Callable) -> Callable:
    """A binary op that also works on shape lists (elementwise, with scalar broadcast)."""

    def op(node, a, b):
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            return fn(_tensor(a), _tensor(b))
        if not (_is_shape(a) or _is_shape(b)):
            return fn(a, b)
        a_list, b_list = _listed(a), _listed(b)
        n = max(len(a_list), len(b_list))
        a_list = a_list * n if len(a_list) == 1 else a_list
        b_list = b_list * n if len(b_list) == 1 else b_list
        return [fn(x, y) for x, y in zip(a_list, b_list, strict=True)]

    return op


def _listed(value) -> list:
    """A size list as it is; a single size or index as a one-element list."""
    return value if isinstance(value, list) else [value]


def _tensor(value):
    """A shape list or a Python number as a tensor (where it meets real tensors)."""
    if isinstance(value, (list, int, float)) and not isinstance(value, bool):
        return torch.tensor(value)
    return value


def _reshape(node, x, shape):
    if not isinstance(x, torch.Tensor):  # shape arithmetic: a size list stays a list
        return _listed(x)
    sizes = _listed(shape)
    sizes = [x.shape[i] if s == 0 and not _attr(node, "allowzero", 0) else s for i, s in enumerate(sizes)]
    return x.reshape(sizes)


def _gather(node, data, indices):
    axis = _attr(node, "axis", 0)
    if _is_shape(data):
        return [data[i] for i in indices] if isinstance(indices, list) else data[indices]
    if isinstance(indices, int):
        return data.select(axis, indices)
    indices = _tensor(indices)
    indices = torch.where(indices < 0, indices + data.shape[axis], indices)
    return torch.index_select(data, axis, indices.reshape(-1)).reshape(
        (*data.shape[:axis], *indices.shape, *data.shape[axis + 1:]))


def _slice(node, data, starts, ends, axes=None, steps=None):
    starts, ends = _listed(starts), _listed(ends)
    axes = _listed(axes) if axes is not None else list(range(len(starts)))
    steps = _listed(steps) if steps is not None else [1] * len(starts)
    if _is_shape(data):
        (start, end, step), = zip(starts, ends, steps, strict=True)
        return data[start:min(end, len(data)):step]
    index = [slice(None)] * data.dim()
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        if step < 0:
            raise ModelError(f"ONNX node '{node.name}': Slice with a negative step is not supported")
        size = data.shape[axis]
        end = size if isinstance(end, int) and end > 2**40 else end
        index[axis] = slice(start, end, step)
    return data[tuple(index)]


def _unsqueeze(node, x, axes=None):
    axes = sorted(_listed(axes if axes is not None else _attr(node, "axes")))
    if not isinstance(x, torch.Tensor):  # a scalar size becomes a one-element shape list
        return _listed(x)
    for axis in axes:
        x = x.unsqueeze(axis if axis >= 0 else axis + x.dim() + 1)
    return x


def _squeeze(node, x, axes=None):
    if _is_shape(x):
        return x[0]
    axes = _listed(axes) if axes is not None else None
    return x.squeeze() if axes is None else x.squeeze(tuple(axes))


def _concat(node, *values):
    if any(_is_shape(v) for v in values):
        return [s for v in values for s in _listed(v)]
    return torch.cat(values, _attr(node, "axis"))


def _cast(node, x):
    return x.to(_DTYPES[_attr(node, "to")]) if isinstance(x, torch.Tensor) else x


def _constant_of_shape(node, shape):
    import onnx

    value = _attr(node, "value")
    array = np.array([0.0], dtype=np.float32) if value is None else onnx.numpy_helper.to_array(value)
    return torch.full(_listed(shape), array.reshape(-1)[0].item(), dtype=torch.from_numpy(array).dtype)


def _range(node, start, limit, delta):
    return torch.arange(start, limit, delta)


def _where(node, condition, a, b):
    if not any(isinstance(v, torch.Tensor) for v in (condition, a, b)):
        c, a, b = _listed(condition), _listed(a), _listed(b)
        return [x if keep else y for keep, x, y in zip(c, a * len(c) if len(a) == 1 else a,
                                                       b * len(c) if len(b) == 1 else b, strict=True)]
    return torch.where(_tensor(condition), _tensor(a), _tensor(b))


def _expand(node, x, shape):
    sizes = _listed(shape)
    ndim = max(len(sizes), x.dim())
    sizes = [1] * (ndim - len(sizes)) + sizes
    current = [1] * (ndim - x.dim()) + list(x.shape)
    target = [c if s == 1 else s for s, c in zip(sizes, current, strict=True)]
    return x.reshape(current).expand(target)


def _reduce(fn):
    def op(node, x, axes=None):
        axes = _listed(axes) if axes is not None else _attr(node, "axes")
        keep = bool(_attr(node, "keepdims", 1))
        return fn(x, dim=tuple(axes), keepdim=keep) if axes else fn(x)

    return op


def _layer_norm(node, x, weight, bias=None):
    return F.layer_norm(x, tuple(x.shape[_attr(node, "axis", -1):]), weight, bias, _attr(node, "epsilon", 1e-5))


def _gemm(node, a, b, c=None):
    a = a.transpose(-1, -2) if _attr(node, "transA", 0) else a
    b = b.transpose(-1, -2) if _attr(node, "transB", 0) else b
    out = _attr(node, "alpha", 1.0) * (a @ b)
    return out if c is None else out + _attr(node, "beta", 1.0) * c


def _split(node, x, split=None):
    axis = _attr(node, "axis", 0)
    sizes = _listed(split) if split is not None else _attr(node, "split")
    if sizes is None:
        parts = len(node.output)
        sizes = [x.shape[axis] // parts] * parts
    return list(torch.split(x, sizes, dim=axis))


def _gather_nd(node, data, indices):
    if _attr(node, "batch_dims", 0):
        raise ModelError(f"ONNX node '{node.name}': GatherND with batch_dims is not supported")
    depth = indices.shape[-1]
    return data[tuple(indices[..., i] for i in range(depth))]


def _softmax(node, x):
    return torch.softmax(x, _attr(node, "axis", -1))


def _transpose(node, x):
    perm = _attr(node, "perm") or list(range(x.dim()))[::-1]
    return x.permute(perm)


def _trilu(node, x, k=None):
    k = 0 if k is None else int(k)
    return torch.triu(x, k) if _attr(node, "upper", 1) else torch.tril(x, k)


_DTYPES = {1: torch.float32, 6: torch.int32, 7: torch.int64, 9: torch.bool, 10: torch.float16, 11: torch.float64}

OPS: dict[str, Callable] = {
    "Add": _elementwise(lambda a, b: a + b), "Sub": _elementwise(lambda a, b: a - b),
    "Mul": _elementwise(lambda a, b: a * b),
    "Div": _elementwise(lambda a, b: a // b if isinstance(a, int) and isinstance(b, int) else a / b),
    "Equal": _elementwise(lambda a, b: a == b), "Max": _elementwise(lambda a, b: max(a, b) if isinstance(a, int)
                                                                  else torch.maximum(a, b)),
    "Min": _elementwise(lambda a, b: min(a, b) if isinstance(a, int) else torch.minimum(a, b)),
    "Pow": lambda node, a, b: torch.pow(a, b), "And": lambda node, a, b: a & b, "Not": lambda node, a: ~a,
    "Or": lambda node, a, b: a | b,
    "Less": lambda node, a, b: a < b, "LessOrEqual": lambda node, a, b: a <= b, "Greater": lambda node, a, b: a > b,
    "GreaterOrEqual": lambda node, a, b: a >= b,
    "Neg": lambda node, a: -a, "Sqrt": lambda node, a: torch.sqrt(a), "Reciprocal": lambda node, a: torch.reciprocal(a),
    "Exp": lambda node, a: torch.exp(a), "Log": lambda node, a: torch.log(a),
    "Cos": lambda node, a: torch.cos(a), "Sin": lambda node, a: torch.sin(a), "Tanh": lambda node, a: torch.tanh(a),
    "Erf": lambda node, a: torch.erf(a), "Sigmoid": lambda node, a: torch.sigmoid(a), "Relu": lambda node, a: F.relu(a),
    "Abs": lambda node, a: torch.abs(a),
    "MatMul": lambda node, a, b: torch.matmul(a, b), "Gemm": _gemm,
    "Softmax": _softmax, "LayerNormalization": _layer_norm,
    "ReduceMean": _reduce(torch.mean), "ReduceSum": _reduce(torch.sum), "ReduceMax": _reduce(torch.amax),
    "Shape": lambda node, x: list(x.shape)[_attr(node, "start", 0):_attr(node, "end", None)],
    "Gather": _gather, "GatherND": _gather_nd, "Slice": _slice, "Concat": _concat, "Split": _split,
    "Unsqueeze": _unsqueeze, "Squeeze": _squeeze, "Reshape": _reshape, "Expand": _expand, "Transpose": _transpose,
    "Cast": _cast, "ConstantOfShape": _constant_of_shape, "Range": _range, "Where": _where,
    "CumSum": lambda node, x, axis: torch.cumsum(x, int(axis)), "Identity": lambda node, x: x,
    "Trilu": _trilu,
    "GatherElements": lambda node, data, index: torch.gather(data, _attr(node, "axis", 0), _tensor(index)),
}


class OnnxModule(torch.nn.Module):
    """forward(input_ids) runs the ONNX graph with torch ops; initializers are buffers."""

    def __init__(self, model) -> None:
        super().__init__()
        import onnx

        graph = model.graph
        unsupported = [(n.op_type, n.name) for n in graph.node if n.domain not in ("", "ai.onnx") or n.op_type not in
                       OPS and n.op_type != "Constant"]
        if unsupported:
            op, name = unsupported[0]
            raise ModelError(f"the ONNX model uses op '{op}' (node '{name}'), which the ONNX frontend does not "
                             f"support; supported: {', '.join(sorted(OPS))}")
        self.nodes = list(graph.node)
        constants = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
        constants |= {n.output[0]: onnx.numpy_helper.to_array(_attr(n, "value"))
                      for n in self.nodes if n.op_type == "Constant"}
        self.linear_of = self._linear_layers(constants)
        self.rsqrt_of = self._reciprocal_square_roots()
        self.input_name = graph.input[0].name
        self.output_name = graph.output[0].name
        self.nodes = self._live_nodes()  # a linear layer's weight is its own buffer: the original is dead
        read = {name for node in self.nodes for name in self._reads(node)}
        # x ** c with a constant c: a Python exponent, as PyTorch code writes it
        exponents = {n.input[1] for n in self.nodes
                     if n.op_type == "Pow" and n.input[1] in constants and constants[n.input[1]].size == 1}
        self.python_values: dict = {}  # exponents and small integer constants (shapes, axes, indices)
        self.buffer_of: dict[str, str] = {}
        for name in read & constants.keys():
            array = constants[name]
            if name in exponents:
                self.python_values[name] = float(array.reshape(-1)[0])
            elif array.dtype in (np.int64, np.int32) and array.ndim <= 1 and array.size <= 64:
                self.python_values[name] = array.tolist()
            else:
                self.buffer_of[name] = self._buffer(array)

    def _reads(self, node) -> list[str]:
        """The values a node reads as it runs here: a linear layer its activation only (its
        weight is a buffer of its own), 1/sqrt(a) the Sqrt's input."""
        if node.name in self.linear_of:
            return [node.input[0]]
        if node.name in self.rsqrt_of:
            return [self.rsqrt_of[node.name]]
        return list(node.input)

    def _live_nodes(self) -> list:
        """The nodes the output depends on, in graph order (Constant nodes are values)."""
        producer = {out: node for node in self.nodes if node.op_type != "Constant" for out in node.output}
        live, wanted = set(), [self.output_name]
        while wanted:
            node = producer.get(wanted.pop())
            if node is not None and node.name not in live:
                live.add(node.name)
                wanted.extend(self._reads(node))
        return [node for node in self.nodes if node.name in live]

    def _linear_layers(self, constants) -> dict[str, tuple[str, str | None]]:
        """MatMul / Gemm nodes with a constant 2-D weight, as linear layers: {node: (weight
        buffer (out, in), bias buffer or None)}. torch.onnx stores nn.Linear's weight
        transposed for MatMul; tracing F.linear gives the graph the PyTorch frontend gives,
        which the passes match on (a weight read through a transpose would look like an
        activation)."""
        arrays = dict(constants)
        for node in self.nodes:  # a constant read through a transpose (a tied LM head) is a constant
            if node.op_type == "Transpose" and node.input[0] in arrays and arrays[node.input[0]].ndim == 2 \
                    and list(_attr(node, "perm") or [1, 0]) == [1, 0]:
                arrays[node.output[0]] = arrays[node.input[0]].T
        layers = {}
        for node in self.nodes:
            weight = arrays.get(node.input[1]) if len(node.input) > 1 else None
            if weight is None or weight.ndim != 2 or weight.dtype != np.float32:
                continue
            if node.op_type == "MatMul":
                layers[node.name] = (self._buffer(weight.T), None)
            elif node.op_type == "Gemm" and not _attr(node, "transA", 0) and _attr(node, "alpha", 1.0) == 1.0 \
                    and _attr(node, "beta", 1.0) == 1.0:
                bias = arrays.get(node.input[2]) if len(node.input) > 2 else None
                if len(node.input) > 2 and (bias is None or bias.ndim != 1):
                    continue
                out_in = weight if _attr(node, "transB", 0) else weight.T
                layers[node.name] = (self._buffer(out_in), self._buffer(bias) if bias is not None else None)
        return layers

    def _reciprocal_square_roots(self) -> dict[str, str]:
        """{Reciprocal node: the input of the Sqrt it reads} where that Sqrt feeds nothing else."""
        producer = {out: node for node in self.nodes for out in node.output}
        readers: dict[str, int] = {}
        for node in self.nodes:
            for name in node.input:
                readers[name] = readers.get(name, 0) + 1
        pairs = {}
        for node in self.nodes:
            source = producer.get(node.input[0]) if node.op_type == "Reciprocal" else None
            if source is not None and source.op_type == "Sqrt" and readers[source.output[0]] == 1:
                pairs[node.name] = source.input[0]
        return pairs

    def _buffer(self, array: np.ndarray) -> str:
        key = f"constant_{len(self._buffers)}"
        self.register_buffer(key, torch.from_numpy(np.array(array, order="C")), persistent=False)
        return key

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        values = {name: getattr(self, key) for name, key in self.buffer_of.items()}
        values.update(self.python_values)
        values[self.input_name] = input_ids
        values[""] = None
        for node in self.nodes:
            if node.name in self.rsqrt_of:  # 1 / sqrt(a): torch.rsqrt, which the passes know as a norm
                values[node.output[0]] = torch.rsqrt(values[self.rsqrt_of[node.name]])
                continue
            if node.name in self.linear_of:
                weight, bias = (getattr(self, key) if key else None for key in self.linear_of[node.name])
                values[node.output[0]] = F.linear(values[node.input[0]], weight, bias)
                continue
            inputs = [values[name] for name in node.input]
            while inputs and inputs[-1] is None:
                inputs.pop()
            result = OPS[node.op_type](node, *inputs)
            outputs = result if isinstance(result, list) and node.op_type == "Split" else [result]
            for name, value in zip(node.output, outputs, strict=False):
                values[name] = value
        return values[self.output_name]


def load_onnx(path: str | Path):
    """A LoadedModel of an ONNX language model file: input token ids, output logits (an
    output named *logits*) or hidden states. Its tokenizer is the one saved beside it
    (snncc's or a Hugging Face tokenizer.json); byte-level models need none."""
    import onnx

    from snncc.models import CAUSAL_LM, ENCODER, LoadedModel

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"ONNX model '{path}' does not exist")
    try:
        model = onnx.load(str(path))
    except Exception as exc:
        raise ModelError(f"cannot read ONNX model '{path}': {first_line(exc)}") from exc
    if len(model.graph.input) != 1 or not model.graph.output:
        raise ModelError(f"'{path}' must take one input (token ids) and give an output; it has "
                         f"{len(model.graph.input)} inputs")
    output = model.graph.output[0]
    task = CAUSAL_LM if "logits" in output.name else ENCODER
    meta = {p.key: p.value for p in model.metadata_props}
    max_positions = int(meta.get("snncc.max_positions", 0)) or _static_length(model) or 2048
    width = output.type.tensor_type.shape.dim[-1].dim_value if output.type.tensor_type.shape.dim else 0
    return LoadedModel(path.stem, OnnxModule(model), _tokenizer_beside(path, task, width), task, max_positions)


def _tokenizer_beside(path: Path, task: str, width: int):
    from snncc.models import CAUSAL_LM
    from snncc.tokenizer import ByteTokenizer, load_hf_tokenizer, load_tokenizer

    folder = path.parent
    if (folder / "snncc_tokenizer.json").is_file():
        return load_tokenizer(folder)
    if (folder / "tokenizer.json").is_file():
        return load_hf_tokenizer(folder)
    if task == CAUSAL_LM and 0 < width <= 256:
        return ByteTokenizer()
    raise ModelError(f"no tokenizer beside '{path}': save the model's tokenizer (tokenizer.json) in {folder}")


def _static_length(model) -> int:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return dims[1].dim_value if len(dims) > 1 and dims[1].dim_value > 0 else 0
