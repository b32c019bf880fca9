"""Calibrated ranges and the MT / multi-range encoders that passes insert in front of synapses.

Every pass that turns an activation into a spike train (encode, ffn, outlier) or clips it
at a calibrated range (qcfs) reads the range the same way: the ANN node's per-channel
max |x| on the calibration text, in the layout the reader needs.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from snncc.calibration import CalibrationContext
from snncc.errors import PipelineError
from snncc.ir.match import through_identity
from snncc.ir.rewrite import add_constant
from snncc.ir.spec import is_rate_train, train_steps

snn = torch.ops.snn
_RANGE_FLOOR = 1e-6  # relative to the tensor's largest range: channels that never fired in calibration


def rate_flags(**trains: fx.Node) -> dict[str, bool]:
    """Keyword flags for a synapse op: which of its trains are rate codes (IF neurons)."""
    return {key: True for key, spikes in trains.items() if is_rate_train(spikes)}


def calib_name(node: fx.Node) -> str:
    """The tensor whose calibration statistics describe `node`: the ANN node it replaced."""
    return node.meta.get("calib_name", node.name)


def calibrated_absmax(ctx: CalibrationContext, node: fx.Node) -> torch.Tensor:
    """node's per-channel max |x| on the calibration text, refused where NaN or inf: a range
    made from it would code nothing (and NaN cannot be rounded to a table's power of two).
    Times the context's range factor for node, where a precision plan drops digits there."""
    stats = ctx.stats.get(calib_name(node))
    if stats is None:
        raise PipelineError(f"no calibration range for '{node.name}': the ANN never computed it")
    if not bool(torch.isfinite(stats.absmax).all()):
        kind = "NaN" if bool(torch.isnan(stats.absmax).any()) else "inf"
        raise PipelineError(f"the calibration range of '{node.name}' is {kind}: the model computes {kind} there on "
                            "the calibration text (an overflow or a broken weight upstream); fix the model or "
                            "give other calibration text")
    factor = ctx.range_factors.get(calib_name(through_identity(node)))
    return stats.absmax if factor is None else stats.absmax * factor


def channel_range(ctx: CalibrationContext, x: fx.Node, per_last_dim: bool, headroom: float = 1.0,
                  floor: float = 0.0) -> torch.Tensor:
    """x's calibrated range: max |x| per channel (per last dim, or per static dim), raised to
    `floor` times the largest channel's (at least 1e-6 of it: channels calibration never saw
    fire still get a range), times `headroom`."""
    r = calibrated_absmax(ctx, x)
    if per_last_dim:
        r = r.reshape(-1, r.shape[-1]).amax(0)
    return (r.clamp(min=float(r.max()) * max(floor, _RANGE_FLOOR) + 1e-12) * headroom).float()


class Encoders:
    """The MT (or, with `outlier_ranges` G > 0, multi-range) encoders of one pass run: one
    per (tensor, range layout), with calibrated ranges. A tensor that is already a decoded
    spike train of T steps (a neuron's output) is read as that train, not encoded again."""

    def __init__(self, gm: fx.GraphModule, ctx: CalibrationContext, T: int, headroom: float,
                 floor: float = 0.0, outlier_ranges: int = 0):
        self.gm, self.ctx, self.T, self.G = gm, ctx, T, outlier_ranges
        self.headroom, self.floor = headroom, floor
        self.made: dict[tuple[str, bool], tuple[fx.Node, fx.Node]] = {}

    def is_train(self, x: fx.Node) -> bool:
        return x.target == snn.decode.default and train_steps(x.args[0]) == self.T

    def require(self, nodes) -> None:
        """Record the calibration ranges of every node these encoders will be asked for."""
        self.ctx.require({calib_name(x) for x in nodes if not self.is_train(x)}, self.gm)

    def __call__(self, x: fx.Node, before: fx.Node, per_last_dim: bool) -> tuple[fx.Node, fx.Node]:
        """(spike train, range) of x, inserted before `before` the first time it is asked for."""
        if self.is_train(x):
            return x.args[0], x.args[1]
        key = (x.name, per_last_dim)
        if key not in self.made:
            r = channel_range(self.ctx, x, per_last_dim, self.headroom, self.floor)
            r_node = add_constant(self.gm, f"{x.name}_range", r, before)
            with self.gm.graph.inserting_before(before):
                if self.G:
                    spikes = self.gm.graph.call_function(snn.mr_encode.default, (x, r_node, self.T, self.G))
                else:
                    spikes = self.gm.graph.call_function(snn.mt_encode.default, (x, r_node, self.T))
            spikes._rename(f"{x.name}_spikes")
            spikes.meta.update(source=x.meta.get("source", ""),
                               snn={"code": "mr" if self.G else "mt", "T": self.T, "ranges": self.G + 1,
                                    "range": tuple(r.shape)})
            self.made[key] = (spikes, r_node)
        return self.made[key]
