"""Pictures of a profile (firing rate per site and per step, energy by role) and of a
pass-by-pass debug run (error, agreement and coverage after each pass).

Profile sites are laid out as a grid, one column per transformer block and one row per role
in the block (q_proj, QK^T, PV, down_proj, ...), so a 30-block model reads as easily as a
2-block one; sites outside the blocks (e.g. the LM head) get a column of their own.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from snncc.atomic import atomic_file
from snncc.errors import require
from snncc.profile import LayerProfile, Profile


def _pyplot():
    """matplotlib's pyplot, drawing to files only (the Agg backend: no display needed)."""
    require("matplotlib", "plotting").use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, dpi: int) -> None:
    """Save atomically (a failed or interrupted plot leaves no half-written PNG) and free the figure."""
    import matplotlib.pyplot as plt

    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)


_BLOCK = re.compile(r"\.(\d+)(?=\.|$)")


_KIND_LABELS = {"spike_mul": " (product)", "spike_normalize": " (normaliser)", "analog": " (analog)"}
_MATMUL_KINDS = ("spike_matmul", "analog")
# The energy chart folds the many small sites of a block into one bar per kind.
_KIND_ROLES = {"spike_mul": "elementwise products", "spike_normalize": "normalisers (1/x neurons)"}


def _site_labels(layers: list[LayerProfile]) -> list[tuple[str, str, str]]:
    """(column, row label, role) of each site. The column is its block ("L3") or "other"; the
    row label is its module path without the block prefix ('model.layers.3.mlp.down_proj' ->
    'mlp.down_proj'; outside the blocks without the model's root: 'model.norm' -> 'norm') and
    its kind; the role is the row label with products and normalisers folded by kind. A
    module's two matmuls between activations are QK^T then PV: the scores feed the softmax
    that feeds the value product, and the profiler meets sites in graph order. Other
    repeats in a block get #2, #3."""
    sources = [layer.source or layer.node for layer in layers]
    first = next((match for match in map(_BLOCK.search, sources) if match), None)
    root = first.string[:first.start()].rpartition(".")[0] + "." if first else ""
    keys = []
    for source, layer in zip(sources, layers, strict=True):
        match = _BLOCK.search(source)
        if match:
            column, path = f"L{match.group(1)}", source[match.end():].lstrip(".") or "block"
        else:
            column, path = "other", source.removeprefix(root) if root != "." else source
        keys.append((column, path, layer.kind))
    groups: dict[tuple[str, str, str], int] = defaultdict(int)
    for key in keys:
        groups[key] += 1
    seen: dict[tuple[str, str, str], int] = defaultdict(int)
    labels = []
    for key in keys:
        column, path, kind = key
        seen[key] += 1
        suffix = _KIND_LABELS.get(kind, "")
        if kind in _MATMUL_KINDS and groups[key] == 2:
            product = ("QK^T", "PV")[seen[key] - 1]
            labels.append((column, f"{path} {product}{suffix}", product + suffix))
            continue
        label = path + suffix + (f" #{seen[key]}" if seen[key] > 1 else "")
        labels.append((column, label, _KIND_ROLES.get(kind, path + suffix)))
    return labels


def _grid(layers: list[LayerProfile]) -> tuple[list[str], list[str], dict[tuple[str, str], LayerProfile]]:
    """(row labels, column names, cell -> site), rows and columns in graph order."""
    cells: dict[tuple[str, str], LayerProfile] = {}
    for (column, label, _), layer in zip(_site_labels(layers), layers, strict=True):
        cells[(label, column)] = layer
    rows = list(dict.fromkeys(label for label, _ in cells))
    columns = list(dict.fromkeys(column for _, column in cells))
    return rows, columns, cells


def energy_by_role(profile: Profile) -> list[tuple[str, float, float]]:
    """(role, SNN energy pJ, ANN energy pJ) summed over the blocks, most SNN energy first: a
    site costs SOPs x E_AC + analog MACs x E_MAC, its ANN MACs x E_MAC."""
    table = profile.energy
    energy: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for (_, _, role), layer in zip(_site_labels(profile.layers), profile.layers, strict=True):
        energy[role][0] += layer.sops * table.e_ac_pj + layer.analog_macs * table.e_mac_pj
        energy[role][1] += layer.ann_macs * table.e_mac_pj
    return sorted(((role, snn, ann) for role, (snn, ann) in energy.items()), key=lambda row: -row[1])


def passes_figure(rows: list, title: str, metric: str, output: str = "logits"):
    """Error vs the ANN, agreement with it and coverage after each pass (`snncc debug`), as
    three panels over the passes in order. `output` names what the error is measured in."""
    plt = _pyplot()

    x = np.arange(len(rows))
    fig, (err, agree, cover) = plt.subplots(3, 1, sharex=True, figsize=(8, 8), layout="constrained",
                                            gridspec_kw={"height_ratios": [3, 2, 2]})
    errors = np.array([row.max_abs_err for row in rows], dtype=float)
    zero = errors == 0
    if (~zero).any():
        # A log axis has no 0: exact zeros sit on the bottom edge with a marker of their own.
        err.set_yscale("log")
        err.plot(x, np.where(zero, np.nan, errors), "o-", color="C0", label="max |error|")
        for i in np.flatnonzero(~zero):
            err.annotate(f"{errors[i]:.2g}", (x[i], errors[i]), textcoords="offset points", xytext=(0, 6),
                         ha="center", fontsize=8)
        low, high = errors[~zero].min(), errors[~zero].max()
        err.set_ylim(low / 4, high * 4)
    else:
        err.set_ylim(0, 1)  # nothing but zeros, on the bottom edge
    if zero.any():
        err.plot(x[zero], np.zeros(zero.sum()), "v", color="C2", markersize=9, clip_on=False,
                 transform=err.get_xaxis_transform(), label="exactly 0")
    err.set_ylabel(f"max |error| vs ANN\n({output}{', log scale' if (~zero).any() else ''})")
    err.legend(loc="best", fontsize=8)
    err.set_title("error of the graph's output against the ANN's, on one sample", fontsize=10)

    percent = metric.startswith("top-1")
    full = 100.0 if percent else 1.0
    values = np.array([row.agreement for row in rows], dtype=float) * full
    agree.plot(x, values, "o-", color="C1")
    for i, value in enumerate(values):
        agree.annotate(f"{value:.1f}" if percent else f"{value:.4f}", (x[i], value), textcoords="offset points",
                       xytext=(0, -13 if value >= full - 1e-9 else 6), ha="center", fontsize=8)
    worst = values.min()
    low = max(worst - max(0.2 * (full - worst), 0.01 * full), 0.0 if percent else -1.0)
    agree.set_ylim(low, full + 0.06 * (full - low))
    agree.set_ylabel(f"{metric}\nwith ANN" + (" (%)" if percent else ""))

    coverage = np.array([np.nan if row.coverage is None else 100 * row.coverage for row in rows])
    cover.step(x, coverage, "o-", where="mid", color="C3")
    unknown = np.isnan(coverage)
    if unknown.any():
        cover.plot(x[unknown], np.zeros(unknown.sum()), "x", color="C3", clip_on=False, markersize=9,
                   transform=cover.get_xaxis_transform(), label="unknown (a matmul's MACs uncountable)")
        cover.legend(loc="upper left", fontsize=8)
    cover.set_ylim(-4, 104)
    cover.set_ylabel("coverage (% of matmul\nMACs driven by spikes)")
    cover.set_xticks(x, [row.name for row in rows], rotation=30, ha="right")
    cover.set_xlabel("after pass")
    for axis in (err, agree, cover):
        axis.grid(alpha=0.3)
    fig.suptitle(title)
    return fig


def plot_passes(rows: list, path: Path, title: str, metric: str, output: str = "logits") -> None:
    """passes_figure into a PNG."""
    _save(passes_figure(rows, title, metric, output), path, dpi=110)


def profile_figure(profile: Profile, title: str):
    """Firing rate per site (block x role heatmap), the SNN's energy by role, and the firing
    rate per time step."""
    plt = _pyplot()

    rows, columns, cells = _grid(profile.layers)
    rate = np.full((len(rows), len(columns)), np.nan)
    for (row, column), layer in cells.items():
        rate[rows.index(row), columns.index(column)] = layer.firing_rate
    roles = energy_by_role(profile)
    heights = [0.22 * len(rows) + 1.3, 0.26 * len(roles) + 1.0, 2.2]
    fig, (ax_rate, ax_energy, ax_steps) = plt.subplots(
        3, 1, figsize=(max(9.0, 0.22 * len(columns) + 5.5), sum(heights) + 0.8), layout="constrained",
        gridspec_kw={"height_ratios": heights})

    image = ax_rate.imshow(rate, aspect="auto", cmap="viridis", interpolation="nearest")
    ax_rate.set_yticks(range(len(rows)), rows, fontsize=8)
    ax_rate.set_xticks(range(len(columns)), columns, rotation=90 if len(columns) > 12 else 0, fontsize=8)
    ax_rate.set_xlabel("transformer block (other: sites outside the blocks)")
    ax_rate.set_title("input firing rate per site", fontsize=10)
    fig.colorbar(image, ax=ax_rate, label="spikes / neuron / step", fraction=0.04, pad=0.01)

    total = sum(snn for _, snn, _ in roles) or 1.0
    shares = [100 * snn / total for _, snn, _ in roles]
    y = np.arange(len(roles))
    ax_energy.barh(y, shares, color="C0")
    ax_energy.set_yticks(y, [role for role, _, _ in roles], fontsize=8)
    ax_energy.invert_yaxis()
    for i, (share, (_, snn, ann)) in enumerate(zip(shares, roles, strict=True)):
        ratio = f"{snn / ann:.2f}x ANN" if ann else "no ANN cost"
        ax_energy.annotate(f"{share:.1f}%  ({ratio})", (share, i), textcoords="offset points", xytext=(4, 0),
                           va="center", fontsize=8)
    ax_energy.set_xlim(0, max(shares, default=1) * 1.3)
    ax_energy.set_xlabel(f"share of the SNN's energy (%): SOPs x {profile.energy.e_ac_pj} pJ + analog MACs x "
                         f"{profile.energy.e_mac_pj} pJ, all blocks ({profile.energy.name})")
    ax_energy.set_title("where the energy goes, by role (in brackets: the role's SNN/ANN energy)", fontsize=10)
    ax_energy.grid(axis="x", alpha=0.3)

    per_step = profile.firing_rate_per_step()
    ax_steps.bar(range(1, len(per_step) + 1), per_step)
    ax_steps.set_xlabel("time step t (MT codes: threshold 2^-t of the range; IF: equal weight)")
    ax_steps.set_ylabel("share of neurons firing")
    ax_steps.set_title("firing rate per time step, all encoders", fontsize=10)
    ax_steps.grid(axis="y", alpha=0.3)

    totals = profile.totals()
    ratio = "unknown" if totals["energy_ratio"] is None else f"{totals['energy_ratio']:.3f}"
    memory = "unknown" if totals["memory_energy_ratio"] is None else f"{totals['memory_energy_ratio']:.3f}"
    fig.suptitle(f"{title}: {totals['spikes_per_neuron']:.2f} spikes per activation\nenergy SNN/ANN "
                 f"{ratio} ({profile.energy.name}), {memory} with memory traffic")
    return fig


def plot_profile(profile: Profile, path: Path, title: str) -> None:
    """profile_figure into a PNG."""
    _save(profile_figure(profile, title), path, dpi=110)


def plot_losses(curves: dict[str, list[float]], path: Path, title: str,
                checks: list[tuple[int, float]] | None = None, kept_step: int | None = None) -> Path:
    """Loss per step, one line per curve, with its running mean over an epoch-like window
    (per-batch losses differ more than they fall); log scale. `checks` (step, loss) on
    held-out batches show where training stops generalising; `kept_step` marks the state kept."""
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, losses in curves.items():
        steps = np.arange(1, len(losses) + 1)
        line, = ax.plot(steps, losses, alpha=0.35, label=f"{label} (per step)")
        window = max(1, min(50, len(losses) // 5))
        if window > 1:
            mean = np.convolve(losses, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1:], mean, color=line.get_color(), label=f"{label} (mean of {window})")
    if checks:
        ax.plot(*zip(*checks, strict=True), "o-", color="black", markersize=4, label="held-out check")
    if kept_step is not None:
        ax.axvline(kept_step, color="grey", linestyle=":", label=f"kept (step {kept_step})")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    _save(fig, path, dpi=120)
    return path


def plot_finetune(report: dict, path: Path) -> Path:
    """The loss curve of QCFS fine-tuning: the `finetune` entry of the qcfs pass's report
    (the loss of every step, the held-out checks and the step whose state was kept)."""
    return plot_losses({"distillation KL": report["losses"]}, path, "QCFS fine-tuning", report.get("checks"),
                       report.get("kept_step"))
