"""ONNX frontend: an ONNX language model becomes a torch module that `trace` exports like any
other, so it goes through the same passes.

`OnnxModule.forward` walks the ONNX graph and runs each node with the torch op of the same
meaning. Shape arithmetic (Shape -> Gather -> Concat -> Reshape ...) is carried out on Python
lists of sizes, not tensors, so torch.export keeps the batch and sequence length symbolic
instead of treating them as data. Only the standard ops that torch.onnx emits for
transformer LLMs are covered; any other op is refused with its node name.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from snncc.errors import ModelError, ModelNotFoundError, SnnccError, first_line, require

# An ONNX file is untrusted input: these bound what reading one may allocate.
MAX_MODEL_BYTES = 2 * 1024**3  # protobuf cannot hold more; larger weights live in external data
MAX_TENSOR_BYTES = 16 * 1024**3  # one initializer (a 150k x 16k float32 embedding is under 10 GiB)
MAX_WEIGHT_BYTES = 64 * 1024**3  # all initializers together
MAX_ELEMENTS = 2**31  # a tensor a node builds or computes (its sizes known while tracing)
MAX_SIZE_LIST = 1024  # shape arithmetic: a list of sizes or indices
MAX_POSITIONS = 2**20  # a declared sequence length beyond this is a corrupt file, not a model
MAX_TOKENIZER_BYTES = 256 * 1024**2  # a tokenizer side file


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
            raise ModelError(f"ONNX node '{_shown(node.name)}': Slice with a negative step is not supported")
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


def _bounded(node, sizes: list) -> list:
    """`sizes` for a tensor the graph asks to build, refused when its known sizes hold more than
    MAX_ELEMENTS: a small file must not make snncc allocate without a bound. Symbolic sizes
    (batch, length) are bounded by the input."""
    known = [s for s in sizes if isinstance(s, int)]
    if any(s < 0 for s in known) or math.prod(known) > MAX_ELEMENTS:
        raise ModelError(f"ONNX node '{_shown(node.name)}' ({node.op_type}) asks for a tensor of shape {sizes[:16]}: "
                         f"sizes must be non-negative and hold at most {MAX_ELEMENTS} elements; the file is corrupt")
    return sizes


def _checked_output(node, value):
    """`value` if it stays within bounds: a tensor's known sizes (traced tensors allocate
    nothing, the program built from them would), a size list's length, an integer's int64
    range. Each node can only grow what it reads by a bounded factor, so checking every
    output stops a chain of nodes that doubles a list or squares an integer."""
    if isinstance(value, torch.Tensor):
        _bounded(node, list(value.shape))
    elif isinstance(value, list) and (len(value) > MAX_SIZE_LIST or not all(map(_int64, value))):
        raise ModelError(f"ONNX node '{_shown(node.name)}' ({node.op_type}) computes a list of {len(value)} sizes "
                         f"or a size outside int64 (shape arithmetic holds at most {MAX_SIZE_LIST}): the file is "
                         "corrupt")
    elif not _int64(value):
        raise ModelError(f"ONNX node '{_shown(node.name)}' ({node.op_type}) computes an integer outside int64: the "
                         "file is corrupt")
    return value


def _int64(value) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


def _constant_of_shape(node, shape):
    value = _attr(node, "value")
    array = np.array([0.0], dtype=np.float32) if value is None else _array(value, f"node '{_shown(node.name)}' value")
    if array.size != 1:
        raise ModelError(f"ONNX node '{_shown(node.name)}' (ConstantOfShape): its value must hold one element, not "
                         f"{array.size}")
    return torch.full(_bounded(node, _listed(shape)), array.reshape(-1)[0].item(),
                      dtype=torch.from_numpy(array).dtype)


def _range(node, start, limit, delta):
    if all(isinstance(v, (int, float)) for v in (start, limit, delta)) and delta:
        _bounded(node, [max(0, math.ceil((limit - start) / delta))])
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
    target = _bounded(node, [c if s == 1 else s for s, c in zip(sizes, current, strict=True)])
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
        raise ModelError(f"ONNX node '{_shown(node.name)}': GatherND with batch_dims is not supported")
    depth = indices.shape[-1]
    return data[tuple(indices[..., i] for i in range(depth))]


def _softmax(node, x):
    return torch.softmax(x, _attr(node, "axis", -1))


def _transpose(node, x):
    perm = _attr(node, "perm") or list(range(x.dim()))[::-1]
    return x.permute(perm)


def _cumsum(node, x, axis):
    if _attr(node, "exclusive", 0) or _attr(node, "reverse", 0):
        raise ModelError(f"ONNX node '{_shown(node.name)}': CumSum with exclusive or reverse is not supported")
    return torch.cumsum(x, int(axis))


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
    "CumSum": _cumsum, "Identity": lambda node, x: x,
    "Trilu": _trilu,
    "GatherElements": lambda node, data, index: torch.gather(data, _attr(node, "axis", 0), _tensor(index)),
}


class OnnxModule(torch.nn.Module):
    """forward(input_ids) runs the ONNX graph with torch ops; initializers are buffers."""

    def __init__(self, model) -> None:
        super().__init__()
        graph = model.graph
        _check_graph(graph)
        self.nodes = list(graph.node)
        constants = {i.name: _array(i, f"initializer '{_shown(i.name)}'") for i in graph.initializer}
        constants |= {n.output[0]: _constant_value(n) for n in self.nodes if n.op_type == "Constant"}
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
            try:
                self._run(node, values)
            except (SnnccError, torch._dynamo.exc.UserError):  # torch.export retries on UserError
                raise
            except Exception as exc:
                raise ModelError(f"ONNX node '{_shown(node.name)}' ({node.op_type}) cannot run: "
                                 f"{first_line(exc)}") from exc
        return values[self.output_name]

    def _run(self, node, values: dict) -> None:
        """Run one node on `values`, adding its outputs."""
        if node.name in self.rsqrt_of:  # 1 / sqrt(a): torch.rsqrt, which the passes know as a norm
            values[node.output[0]] = torch.rsqrt(values[self.rsqrt_of[node.name]])
            return
        if node.name in self.linear_of:
            weight, bias = (getattr(self, key) if key else None for key in self.linear_of[node.name])
            values[node.output[0]] = F.linear(values[node.input[0]], weight, bias)
            return
        inputs = [values[name] for name in node.input]
        while inputs and inputs[-1] is None:
            inputs.pop()
        result = OPS[node.op_type](node, *inputs)
        outputs = result if isinstance(result, list) and node.op_type == "Split" else [result]
        for name, value in zip(node.output, outputs, strict=False):
            values[name] = _checked_output(node, value)


def load_onnx(path: str | Path):
    """A LoadedModel of an ONNX language model file: input token ids, output logits (an
    output named *logits*) or hidden states. Its tokenizer is the one saved beside it
    (snncc's or a Hugging Face tokenizer.json); byte-level models need none.

    The file is untrusted: it is checked (graph, tensors, metadata, external data inside its
    folder) before anything is allocated from it, and whatever is wrong is a ModelError."""
    from snncc.models import LoadedModel

    path = Path(path)
    model = _read_model(path)
    try:
        module, task, max_positions, width = _imported(model, path.parent)
    except SnnccError:
        raise
    except UnicodeDecodeError as exc:  # protobuf decodes string fields when they are read
        raise ModelError(f"ONNX model '{path}' holds a name or text that is not UTF-8: the file is corrupt") from exc
    except Exception as exc:  # a check missed it: still one line, naming the file
        raise ModelError(f"cannot import ONNX model '{path}': {first_line(exc)}") from exc
    return LoadedModel(path.stem, module, _tokenizer_beside(path, task, width), task, max_positions)


def _imported(model, folder: Path) -> tuple[OnnxModule, str, int, int]:
    """(module, task, max_positions, output width) of a parsed model, checked first."""
    from snncc.models import CAUSAL_LM, ENCODER

    _check_graph(model.graph)
    _read_tensors(model.graph, folder)
    output = model.graph.output[0]
    task = CAUSAL_LM if "logits" in output.name else ENCODER
    max_positions = _max_positions(model)
    dims = output.type.tensor_type.shape.dim
    return OnnxModule(model), task, max_positions, dims[-1].dim_value if dims else 0


def _read_model(path: Path):
    """The ModelProto of `path`, size-checked before parsing; external data is not read here
    (onnx would follow its locations anywhere): `_read_tensors` reads it inside the folder."""
    onnx = require("onnx", "reading an ONNX model")

    if not path.exists():
        raise ModelNotFoundError(f"ONNX model '{path}' does not exist")
    if not path.is_file():
        raise ModelError(f"ONNX model '{path}' is not a regular file")
    size = path.stat().st_size
    if size > MAX_MODEL_BYTES:
        raise ModelError(f"ONNX model '{path}' is {size} bytes, more than an ONNX file can hold "
                         f"({MAX_MODEL_BYTES}); weights that large belong in external data")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelError(f"cannot read ONNX model '{path}': {first_line(exc)}") from exc
    if len(model.graph.input) != 1 or not model.graph.output:
        raise ModelError(f"'{path}' must take one input (token ids) and give an output; it has "
                         f"{len(model.graph.input)} inputs and {len(model.graph.output)} outputs")
    return model


def _tokenizer_beside(path: Path, task: str, width: int):
    """The tokenizer saved beside `path`; a side file that is too large or unreadable is a
    ModelError naming it (tokenizers and json raise many kinds of error on a bad file)."""
    from snncc.models import CAUSAL_LM
    from snncc.tokenizer import ByteTokenizer, load_hf_tokenizer, load_tokenizer

    folder = path.parent
    _check_side_files(folder)
    try:
        if (folder / "snncc_tokenizer.json").is_file():
            return load_tokenizer(folder)
        if (folder / "tokenizer.json").is_file():
            return load_hf_tokenizer(folder)
    except SnnccError:
        raise
    except Exception as exc:
        raise ModelError(f"cannot read the tokenizer beside '{path}': {first_line(exc)}; replace the tokenizer "
                         f"files in {folder} with the model's own") from exc
    if task == CAUSAL_LM and 0 < width <= 256:
        return ByteTokenizer()
    raise ModelNotFoundError(f"no tokenizer beside '{path}': save the model's tokenizer (tokenizer.json) in {folder}")


# the files a tokenizer loader may open in the model's folder
TOKENIZER_FILES = ("snncc_tokenizer.json", "tokenizer.json", "tokenizer_config.json", "config.json",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
                   "tokenizer.model", "spiece.model", "chat_template.jinja", "chat_template.json")


def _check_side_files(folder: Path) -> None:
    """Refuse tokenizer files a loader would read without a bound or block on: larger than
    MAX_TOKENIZER_BYTES, or not regular files (a FIFO or device would hang or stream)."""
    for name in TOKENIZER_FILES:
        file = folder / name
        if not (file.exists() or file.is_symlink()):
            continue
        if not file.is_file():
            raise ModelError(f"'{file}' beside the model is not a regular file: replace it with the tokenizer's own")
        if file.stat().st_size > MAX_TOKENIZER_BYTES:
            raise ModelError(f"the tokenizer file '{file}' is larger than {MAX_TOKENIZER_BYTES} bytes: it is "
                             "not a tokenizer; replace it with the model's own")


def _max_positions(model) -> int:
    """The longest input the model takes: its `snncc.max_positions` metadata, else a static
    input length, else 2048; a value that is not a sensible length is refused, not parsed."""
    meta = {p.key: p.value for p in model.metadata_props}
    text = meta.get("snncc.max_positions")
    if text is not None:
        if not (text.isascii() and text.isdigit() and len(text) <= 8 and 1 <= int(text) <= MAX_POSITIONS):
            raise ModelError(f"the ONNX metadata 'snncc.max_positions' is {text[:40]!r}: it must be a whole number "
                             f"from 1 to {MAX_POSITIONS}; fix or remove it")
        return int(text)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    length = dims[1].dim_value if len(dims) > 1 else 0
    if length > MAX_POSITIONS:
        raise ModelError(f"the ONNX input '{model.graph.input[0].name}' declares a length of {length} tokens, "
                         f"more than {MAX_POSITIONS}: the file is corrupt")
    return length if length > 0 else 2048


# --- checks of the untrusted graph -------------------------------------------------------

_A = {"FLOAT": 1, "INT": 2, "STRING": 3, "TENSOR": 4, "GRAPH": 5, "FLOATS": 6, "INTS": 7, "GRAPHS": 10}
# the attributes the ops above read, with the AttributeProto type each must have
_ATTRIBUTE_TYPES = {
    **dict.fromkeys(("axis", "keepdims", "to", "transA", "transB", "batch_dims", "start", "end", "upper",
                     "allowzero", "exclusive", "reverse", "value_int"), _A["INT"]),
    **dict.fromkeys(("axes", "perm", "split", "value_ints"), _A["INTS"]),
    **dict.fromkeys(("epsilon", "alpha", "beta", "value_float"), _A["FLOAT"]),
    "value_floats": _A["FLOATS"], "value": _A["TENSOR"],
}


def _shown(name: str) -> str:
    """A name from the file as an error message may show it: short, on one line."""
    return "".join(c if c.isprintable() else "?" for c in name[:80])


def _check_graph(graph) -> None:
    """Refuse, naming the node, what the graph walk would trip on: unknown ops, values read
    before they are computed (cycles) or never defined, names defined twice, attributes of
    the wrong type, subgraphs."""
    _check_ops(graph)
    _check_values(graph)
    for node in graph.node:
        _check_attributes(node)
    if graph.sparse_initializer:
        raise ModelError(f"the ONNX graph has sparse initializers ('{graph.sparse_initializer[0].values.name}'), "
                         "which the ONNX frontend does not read")


def _check_ops(graph) -> None:
    unsupported = [(n.op_type, n.name) for n in graph.node if n.domain not in ("", "ai.onnx") or n.op_type not in
                   OPS and n.op_type != "Constant"]
    if unsupported:
        op, name = unsupported[0]
        raise ModelError(f"the ONNX model uses op '{_shown(op)}' (node '{_shown(name)}'), which the ONNX frontend "
                         f"does not support; supported: {', '.join(sorted(OPS))}")


def _check_values(graph) -> None:
    """Every value defined once, before it is read (ONNX graphs are topologically sorted, so a
    value read before its producer is a cycle or a corrupt file); unnamed nodes get a name."""
    if not graph.input[0].name:
        raise ModelError("the ONNX graph's input has no name")
    defined = {graph.input[0].name}
    for tensor in graph.initializer:
        if not tensor.name or tensor.name in defined:
            raise ModelError(f"the ONNX initializer '{_shown(tensor.name)}' is unnamed or defined twice")
        defined.add(tensor.name)
    computed = {name for node in graph.node for name in node.output}
    node_names: set[str] = set()
    for index, node in enumerate(graph.node):
        node.name = node.name or f"{node.op_type}_{index}"
        if node.name in node_names:
            raise ModelError(f"two ONNX nodes are named '{_shown(node.name)}': node names must be unique")
        node_names.add(node.name)
        for name in node.input:
            if name and name not in defined:
                why = ("which a later node computes: the graph has a cycle or is not topologically sorted"
                       if name in computed else "which no node, initializer or input defines")
                raise ModelError(f"ONNX node '{_shown(node.name)}' reads '{_shown(name)}', {why}")
        for name in node.output:
            if name in defined:
                raise ModelError(f"ONNX node '{_shown(node.name)}' computes '{_shown(name)}', which is already "
                                 "defined: every value must be defined once")
            defined.update([name] if name else [])
        if not node.output or not node.output[0]:
            raise ModelError(f"ONNX node '{_shown(node.name)}' ({node.op_type}) has no output")
    outputs = [output.name for output in graph.output]
    for index, name in enumerate(outputs):
        if name not in defined or name in outputs[:index]:
            why = "is named twice" if name in outputs[:index] else "is computed by no node"
            raise ModelError(f"the ONNX graph's output '{_shown(name)}' {why}")


def _check_attributes(node) -> None:
    import onnx

    names = dict((v, k) for k, v in onnx.AttributeProto.AttributeType.items())
    for attribute in node.attribute:
        expected = _ATTRIBUTE_TYPES.get(attribute.name)
        if expected is not None and attribute.type != expected:
            raise ModelError(f"ONNX node '{_shown(node.name)}' ({node.op_type}): attribute '{attribute.name}' must be "
                             f"{names[expected]}, not {names.get(attribute.type, attribute.type)}")
        if attribute.type in (_A["GRAPH"], _A["GRAPHS"]):
            raise ModelError(f"ONNX node '{_shown(node.name)}' carries a subgraph ('{_shown(attribute.name)}'), which "
                             "the ONNX frontend does not run")
    if node.op_type == "Cast" and _attr(node, "to") not in _DTYPES:
        raise ModelError(f"ONNX node '{_shown(node.name)}' casts to data type {_attr(node, 'to')}, which the ONNX "
                         f"frontend does not support; supported: {sorted(_DTYPES)}")
    if node.op_type == "Constant" and len(node.output) != 1:
        raise ModelError(f"ONNX Constant node '{_shown(node.name)}' must have one output, not {len(node.output)}")


# --- tensors: checked before they are materialised -------------------------------------------

_NUMPY_DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 5: np.int16, 6: np.int32, 7: np.int64, 9: np.bool_,
                 10: np.float16, 11: np.float64}
# where a tensor keeps its elements when it has no raw_data (TensorProto's typed fields)
_TYPED_FIELDS = {1: "float_data", 2: "int32_data", 3: "int32_data", 5: "int32_data", 6: "int32_data",
                 7: "int64_data", 9: "int32_data", 10: "int32_data", 11: "double_data"}
MAX_RANK = 16


def _tensors(graph) -> list[tuple[object, str]]:
    """Every tensor stored in the graph, with how to name it: initializers and node attributes."""
    found = [(tensor, f"initializer '{_shown(tensor.name)}'") for tensor in graph.initializer]
    for node in graph.node:
        for attribute in node.attribute:
            tensors = [attribute.t] if attribute.type == _A["TENSOR"] else list(attribute.tensors)
            found += [(t, f"node '{_shown(node.name)}' attribute '{_shown(attribute.name)}'") for t in tensors]
    return found


def _declared_bytes(tensor, where: str) -> int:
    """The bytes `tensor` declares (elements x element size), refused past MAX_TENSOR_BYTES or
    with a data type this frontend does not read."""
    import onnx

    if tensor.data_type not in _NUMPY_DTYPES:
        kind = dict((v, k) for k, v in onnx.TensorProto.DataType.items()).get(tensor.data_type, tensor.data_type)
        raise ModelError(f"the ONNX {where} has data type {kind}, which the ONNX frontend does not read")
    if len(tensor.dims) > MAX_RANK or any(d < 0 for d in tensor.dims):
        raise ModelError(f"the ONNX {where} has an invalid shape (rank {len(tensor.dims)}, dims "
                         f"{list(tensor.dims)[:MAX_RANK]}): the file is corrupt")
    nbytes = math.prod(tensor.dims) * np.dtype(_NUMPY_DTYPES[tensor.data_type]).itemsize
    if nbytes > MAX_TENSOR_BYTES:
        raise ModelError(f"the ONNX {where} declares {nbytes} bytes, more than {MAX_TENSOR_BYTES}: the file is "
                         "corrupt")
    return nbytes


def _read_tensors(graph, folder: Path) -> None:
    """Check every tensor's declared size against the caps, then read external data from
    inside `folder` (only there) into the tensors, so nothing later opens a file."""
    import onnx

    tensors = _tensors(graph)
    total = sum(_declared_bytes(tensor, where) for tensor, where in tensors)
    if total > MAX_WEIGHT_BYTES:
        raise ModelError(f"the ONNX model declares {total} bytes of weights, more than {MAX_WEIGHT_BYTES}")
    for tensor, where in tensors:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            tensor.raw_data = _external_bytes(tensor, where, folder)
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT


def _external_bytes(tensor, where: str, folder: Path) -> bytes:
    """The bytes of an external-data tensor, read only from a file inside `folder` (after
    resolving symlinks) and only as many as the tensor declares."""
    entries = {entry.key: entry.value for entry in tensor.external_data}
    file = _inside(folder, entries.get("location", ""), where)
    expected = _declared_bytes(tensor, where)
    try:
        offset, length = int(entries.get("offset", "0")), int(entries.get("length", str(expected)))
    except ValueError:
        raise ModelError(f"the ONNX {where} has a non-numeric external data offset or length") from None
    with open(file, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if length != expected or offset < 0 or offset + length > size:
            raise ModelError(f"the ONNX {where} declares {expected} bytes but its external data holds {length} at "
                             f"offset {offset} of a {size}-byte file: the file is corrupt")
        handle.seek(offset)
        return handle.read(length)


def _inside(folder: Path, location: str, where: str) -> Path:
    """The external data file `location` names, refused unless it lies inside `folder`:
    absolute paths, '..' and symlinks that lead out would read any file on the machine."""
    relative = Path(location)
    if not location or "\0" in location or relative.is_absolute() or ".." in relative.parts:
        raise ModelError(f"the ONNX {where} keeps its data at {location[:80]!r}, outside the model's folder: "
                         "external data must be a file beside the model")
    root = folder.resolve()
    file = (root / relative).resolve()
    if not file.is_relative_to(root):
        raise ModelError(f"the ONNX {where} keeps its data at {location[:80]!r}, a link that leads outside the "
                         "model's folder: external data must be a file beside the model")
    if not file.is_file():
        raise ModelError(f"the ONNX {where} keeps its data in '{_shown(location)}', which is not a file in {folder}")
    return file


def _array(tensor, where: str) -> np.ndarray:
    """A stored tensor as an array, after checking that its stored bytes are the ones its
    shape and data type declare (onnx would otherwise reshape or read past them)."""
    import onnx

    nbytes = _declared_bytes(tensor, where)
    if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.HasField("segment"):
        raise ModelError(f"the ONNX {where} keeps its data outside the tensor, which was not read")
    itemsize = np.dtype(_NUMPY_DTYPES[tensor.data_type]).itemsize
    if tensor.HasField("raw_data"):
        stored = len(tensor.raw_data)
    else:
        stored = len(getattr(tensor, _TYPED_FIELDS[tensor.data_type])) * itemsize
    if stored != nbytes:
        raise ModelError(f"the ONNX {where} declares shape {list(tensor.dims)} ({nbytes} bytes) but stores {stored} "
                         "bytes: the file is corrupt")
    try:
        return onnx.numpy_helper.to_array(tensor)
    except Exception as exc:
        raise ModelError(f"cannot read the ONNX {where}: {first_line(exc)}") from exc


def _constant_value(node) -> np.ndarray:
    """The value of a Constant node (a tensor, or one of the value_float(s) / value_int(s) forms)."""
    for attribute in node.attribute:
        if attribute.name == "value":
            return _array(attribute.t, f"node '{_shown(node.name)}' value")
        if attribute.name in ("value_float", "value_floats"):
            return np.array(_attr(node, attribute.name), dtype=np.float32)
        if attribute.name in ("value_int", "value_ints"):
            return np.array(_attr(node, attribute.name), dtype=np.int64)
    raise ModelError(f"ONNX Constant node '{_shown(node.name)}' has no value the ONNX frontend reads (value, "
                     "value_float(s), value_int(s))")
