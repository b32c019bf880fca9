"""The dtype a program keeps its weights in.

Activations, membranes and neuron tables compute in float32 whatever the checkpoint's dtype;
synapse weights and embedding tables may be stored in bfloat16 or float16 (half the memory
and the artifact of float32). A stored weight is read through an explicit cast: a synapse
casts its weight to float32 when it runs; an embedding looks its rows up in the stored dtype
and casts the rows, which gives the same values without a float32 copy of the whole table.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from snncc.ir.rewrite import get_tensor, set_tensor
from snncc.ir.spec import synapses

aten = torch.ops.aten
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_WEIGHT_READERS = {aten.linear.default, aten.matmul.default, aten.mm.default, aten.addmm.default, aten.bmm.default}


def _reads_weights(node: fx.Node) -> bool:
    return node.target in _WEIGHT_READERS or node.target in synapses() or node.target == aten.embedding.default


def store_weights(gm: fx.GraphModule, dtype: torch.dtype) -> int:
    """Store every float32 tensor that only synapses, matmuls and embeddings read in `dtype`,
    with the casts that keep the graph computing in float32; returns how many were stored."""
    if dtype == torch.float32:
        return 0
    stored = 0
    for node in list(gm.graph.nodes):
        if node.op != "get_attr":
            continue
        tensor = get_tensor(gm, node)
        if tensor.dtype != torch.float32 or not node.users or not all(_reads_weights(u) for u in node.users):
            continue
        set_tensor(gm, node.target, tensor.to(dtype))
        for user in list(node.users):
            if user.target == aten.embedding.default:
                with gm.graph.inserting_after(user):
                    rows = gm.graph.call_function(aten._to_copy.default, (user,), {"dtype": torch.float32})
                user.replace_all_uses_with(rows, delete_user_cb=lambda u, rows=rows: u is not rows)
                rows.meta.update(source=user.meta.get("source", ""), val=user.meta.get("val"))
            else:
                with gm.graph.inserting_before(user):
                    weight = gm.graph.call_function(aten._to_copy.default, (node,), {"dtype": torch.float32})
                user.replace_input_with(node, weight)
                weight.meta.update(source=user.meta.get("source", ""), val=node.meta.get("val"))
        stored += 1
    gm.recompile()
    return stored


_LOW_PRECISION = (torch.bfloat16, torch.float16)
_CASTS = {aten._to_copy.default, aten.to.dtype}


def compute_in_float32(gm: fx.GraphModule) -> bool:
    """Make a graph traced in bfloat16 or float16 (a checkpoint's own dtype, in which it was
    calibrated) compute in float32, as passes and neuron kernels expect: its tensors cast up,
    every dtype argument naming a low precision made float32, the casts that now do nothing
    removed, and the recorded value types updated. Returns whether anything changed."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op == "get_attr":
            tensor = get_tensor(gm, node)
            if isinstance(tensor, torch.Tensor) and tensor.dtype in _LOW_PRECISION:
                set_tensor(gm, node.target, tensor.float())
                changed = True
        for key, value in node.kwargs.items():
            if value in _LOW_PRECISION:
                node.update_kwarg(key, torch.float32)
                changed = True
        for index, value in enumerate(node.args):
            if value in _LOW_PRECISION:
                node.update_arg(index, torch.float32)
                changed = True
        fake = node.meta.get("val")
        if isinstance(fake, torch.Tensor) and fake.dtype in _LOW_PRECISION and hasattr(fake, "fake_mode"):
            with fake.fake_mode:
                node.meta["val"] = torch.empty_like(fake, dtype=torch.float32)
            changed = True
    for node in list(gm.graph.nodes):
        if node.target in _CASTS and _is_float32_cast_of_float32(node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    if changed:
        gm.recompile()
    return changed


def _is_float32_cast_of_float32(node: fx.Node) -> bool:
    source = node.args[0]
    value = source.meta.get("val") if isinstance(source, fx.Node) else None
    extra = set(node.kwargs) - {"dtype"} or len(node.args) > (2 if node.target == aten.to.dtype else 1)
    dtype = node.kwargs.get("dtype", node.args[1] if len(node.args) > 1 else None)
    return (not extra and dtype == torch.float32 and isinstance(value, torch.Tensor)
            and value.dtype == torch.float32)
