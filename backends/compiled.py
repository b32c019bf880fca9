"""torch.compile for the reference executor: neuron ops as code Inductor fuses.

To torch.compile, the `snn` ops are opaque custom ops: each stays a separate call, its chain
of ten to thirty element-wise ops a kernel launch apiece on CUDA, and its Python body runs
per call (the per-token overhead of cached generation). `compilable_graph` swaps the fused
graph's quantizers and normalisers for their plain-PyTorch definitions in snncc.ir.ops
(a table neuron's lookup is built once, its tensors held as buffers of a small module), so
Inductor traces them and fuses each chain with the ops around it. The definitions are the
same functions the custom ops call, and Inductor is told to round as eager PyTorch does, so
the outputs stay bit for bit those of the eager executor (tested). An op without such a
definition (a spike train in unrolled mode, a table no guide fits) stays a custom-op call:
still correct, only not fused.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx as fx

import snncc.ir.ops as ops
from snncc.ir.rewrite import copy_graph_module, get_tensor
from snncc.ir.spec import arguments

snn = torch.ops.snn
_FLOAT32_CODES_MAX_T = 22  # multi-range and MT codes of up to 22 digits are exact float32 code
# Inductor settings that keep its numerics those of eager PyTorch (where this torch has them):
# IEEE-rounded division and no flushing of subnormals to zero in Triton kernels.
EAGER_NUMERICS = {"eager_numerics.division_rounding": True, "eager_numerics.disable_ftz": True}


class TableNeuron(torch.nn.Module):
    """A table neuron (fn_quantize) or normaliser (spike_normalize) with its table lookup
    prebuilt: the lookup's tensors are buffers, so they move with the module. A table
    neuron reads direct rows where its table takes them (ops.direct_table; direct=False:
    the guided lookup always, to compare)."""

    def __init__(self, lookup: ops.TableLookup, T: int, power: float | None = None, direct: bool = True):
        super().__init__()
        self.T, self.power, self.channels = T, power, lookup.channels
        direct = ops.direct_table(lookup, T) if power is None and direct else None
        self._direct_fields = None if direct is None else direct._replace(rows=None)
        if direct is not None:
            self.register_buffer("direct_rows", direct.rows)
        self.register_buffer("codes", lookup.codes)
        self.register_buffer("code_base", lookup.code_base)
        self._guide_type = type(lookup.guide)
        self._guide_values = {}
        for name, value in lookup.guide._asdict().items():
            if isinstance(value, torch.Tensor):
                self.register_buffer(f"guide_{name}", value)
            else:
                self._guide_values[name] = value

    def lookup(self) -> ops.TableLookup:
        tensors = {name: buffer for name, buffer in self.named_buffers() if name.startswith("guide_")}
        guide = self._guide_type(**self._guide_values, **{name[6:]: value for name, value in tensors.items()})
        return ops.TableLookup(guide, self.codes, self.code_base, self.channels)

    def forward(self, x: torch.Tensor, a: torch.Tensor | None = None) -> torch.Tensor:
        if self._direct_fields is not None and x.dtype == torch.float32:
            return ops.direct_table_value(x, self._direct_fields._replace(rows=self.direct_rows))
        if self.power is None:
            return ops.table_neuron_value(x, self.lookup(), self.T)
        return ops.normalized(x, a, self.power, None, None, self.T, self.lookup())


def compilable_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` (a fused graph) whose quantizers and normalisers call their PyTorch
    definitions instead of the custom ops."""
    lowered = copy_graph_module(gm)
    graph = lowered.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        bound = arguments(node.target, node.args, node.kwargs) if isinstance(node.target, torch._ops.OpOverload) else {}
        if node.target == snn.mr_quantize.default and bound["T"] <= _FLOAT32_CODES_MAX_T:
            node.target = ops.multi_range_value
        elif node.target == snn.mt_quantize.default and bound["T"] <= _FLOAT32_CODES_MAX_T:
            node.target = ops.multi_threshold_value
        elif node.target in (snn.fn_quantize.default, snn.spike_normalize.default):
            neuron = _table_neuron(lowered, node, bound)
            if neuron is not None:
                name = f"neuron_{node.name}"
                lowered.add_module(name, neuron)
                inputs = (bound["x"],) if neuron.power is None else (bound["x"], bound["a"])
                with graph.inserting_before(node):
                    call = graph.call_module(name, inputs)
                node.replace_all_uses_with(call)
                graph.erase_node(node)
    graph.lint()
    lowered.recompile()
    return lowered


def _table_neuron(gm: fx.GraphModule, node: fx.Node, bound: dict) -> TableNeuron | None:
    """The TableNeuron for an fn_quantize or spike_normalize call whose tables are constants
    and fit a guide at their T, else None."""
    tables = ("thresholds", "codes", "bucket") if node.target == snn.fn_quantize.default else ("thresholds", "codes")
    if not all(isinstance(bound[name], fx.Node) and bound[name].op == "get_attr" for name in tables):
        return None
    thresholds, codes = get_tensor(gm, bound["thresholds"]), get_tensor(gm, bound["codes"])
    if node.target == snn.fn_quantize.default:
        if bound["T"] + bound["G"] > ops.TABLE_MAX_BITS:
            return None
        lookup = ops.table_lookup(thresholds, codes, get_tensor(gm, bound["bucket"]), ops.NARROW_GUIDE_WIDTHS)
        return None if lookup is None else TableNeuron(lookup, bound["T"])
    if bound["T"] > ops.TABLE_MAX_BITS:
        return None
    lookup = ops.table_lookup(thresholds, codes, torch.zeros(1, dtype=torch.int64, device=codes.device),
                              ops.NARROW_GUIDE_WIDTHS)
    return None if lookup is None else TableNeuron(lookup, bound["T"], bound["power"])


def inductor_options() -> dict:
    """EAGER_NUMERICS, less what this torch's Inductor does not know."""
    from torch._inductor import config

    return {name: value for name, value in EAGER_NUMERICS.items() if name in config._config}


def compile_graph_module(gm: fx.GraphModule, dynamic: bool | None = None, cuda_graphs: bool = False) -> Callable:
    """gm (a fused or unrolled graph) lowered and compiled by torch.compile (Inductor);
    cuda_graphs: its kernels recorded once per shape and replayed as a CUDA graph (what
    mode="reduce-overhead" sets), for graphs whose shapes stay fixed from call to call."""
    options = inductor_options() | ({"triton.cudagraphs": True} if cuda_graphs else {})
    return torch.compile(compilable_graph(gm), dynamic=dynamic, options=options)
