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
