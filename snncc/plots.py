"""Pictures of a profile: firing rate and synaptic operations per layer and per step.

Sites are laid out as a grid, one column per transformer block and one row per role in the
block (q_proj, attention products, down_proj, ...), so a 30-block model reads as easily as a
2-block one; sites outside the blocks (e.g. the LM head) get a column of their own.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from snncc.atomic import atomic_file
from snncc.profile import LayerProfile, Profile


def _save(fig, path: Path, dpi: int) -> None:
    """Save atomically (a failed or interrupted plot leaves no half-written PNG) and free the figure."""
    import matplotlib.pyplot as plt

    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)


_BLOCK = re.compile(r"\.(\d+)(?=\.|$)")


_KIND_LABELS = {"spike_matmul": " (spike x spike)", "spike_mul": " (elementwise product)",
                "spike_normalize": " (normaliser)"}


def _grid(layers: list[LayerProfile]) -> tuple[list[str], list[str], dict[tuple[str, str], LayerProfile]]:
    """(row roles, column names, cell -> site); repeated roles in a block get #1, #2."""
    cells: dict[tuple[str, str], LayerProfile] = {}
    seen: dict[tuple[str, str], int] = defaultdict(int)
    roles: list[str] = []
    columns: list[str] = []
    for layer in layers:
        source = layer.source or layer.node
        match = _BLOCK.search(source)
        column = match.group(1) if match else "other"
        base = _BLOCK.sub(".*", source, count=1) if match else source
        base += _KIND_LABELS.get(layer.kind, "")
        seen[(column, base)] += 1
        role = base if seen[(column, base)] == 1 else f"{base} #{seen[(column, base)]}"
        cells[(role, column)] = layer
        roles += [role] if role not in roles else []
        columns += [column] if column not in columns else []
    return roles, columns, cells


def plot_passes(rows: list, path: Path, title: str, metric: str) -> None:
    """Error vs the ANN, agreement and coverage after each pass of a pipeline (`snncc debug`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row.name for row in rows]
    fig, (err, agree, cover) = plt.subplots(1, 3, figsize=(max(9.0, 1.2 * len(rows) * 3), 3.6))
    err.bar(names, [max(row.max_abs_err, 1e-12) for row in rows])
    err.set_yscale("log")
    err.set_title("max |output - ANN| (0 drawn at 1e-12)")
    agree.bar(names, [row.agreement for row in rows])
    agree.set_ylim(min(0.9, min(row.agreement for row in rows)), 1.0)
    agree.set_title(metric)
    cover.bar(names, [float("nan") if row.coverage is None else 100 * row.coverage for row in rows])
    cover.set_ylim(0, 100)
    cover.set_title("coverage (% of matmul MACs)")
    for axis in (err, agree, cover):
        axis.tick_params(axis="x", rotation=45)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path, dpi=110)


def plot_profile(profile: Profile, path: Path, title: str) -> None:
    """Firing rate and SOPs per site (block x role heatmaps), and firing rate per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roles, columns, cells = _grid(profile.layers)
    rate = np.full((len(roles), len(columns)), np.nan)
    sops = np.full_like(rate, np.nan)
    for (role, column), layer in cells.items():
        rate[roles.index(role), columns.index(column)] = layer.firing_rate
        sops[roles.index(role), columns.index(column)] = layer.sops or layer.analog_macs
    width = max(8.0, 0.32 * len(columns) + 4)
    height = 2 * (0.32 * len(roles) + 1.2) + 2.6
    fig, (ax_rate, ax_sops, ax_steps) = plt.subplots(
        3, 1, figsize=(width, height), gridspec_kw={"height_ratios": [len(roles) + 2, len(roles) + 2, 6]})
    for axis, values, label, cmap in ((ax_rate, rate, "firing rate (spikes / neuron / step)", "viridis"),
                                      (ax_sops, np.log10(np.where(sops > 0, sops, np.nan)),
                                       "log10 SOPs (analog sites: log10 MACs)", "magma")):
        image = axis.imshow(values, aspect="auto", cmap=cmap, interpolation="nearest")
        axis.set_yticks(range(len(roles)), roles, fontsize=7)
        axis.set_xticks(range(len(columns)), [f"block {c}" if c != "other" else c for c in columns],
                        rotation=90, fontsize=7)
        fig.colorbar(image, ax=axis, label=label, fraction=0.03)
    ax_rate.set_title("input firing rate per site")
    ax_sops.set_title("synaptic operations per site")
    per_step = profile.firing_rate_per_step()
    ax_steps.bar(range(1, len(per_step) + 1), per_step)
    ax_steps.set_xlabel("time step t (MT codes: threshold 2^-t of the range; IF: equal weight)")
    ax_steps.set_ylabel("firing rate")
    ax_steps.set_title("firing rate per time step, all encoders")
    totals = profile.totals()
    ratio = "unknown" if totals["energy_ratio"] is None else f"{totals['energy_ratio']:.3f}"
    memory = "unknown" if totals["memory_energy_ratio"] is None else f"{totals['memory_energy_ratio']:.3f}"
    fig.suptitle(f"{title}: {totals['spikes_per_neuron']:.2f} spikes per activation\nenergy SNN/ANN "
                 f"{ratio} ({profile.energy.name}), {memory} with memory traffic")
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # room for the two-line title
    _save(fig, path, dpi=110)


def plot_losses(curves: dict[str, list[float]], path: Path, title: str,
                checks: list[tuple[int, float]] | None = None, kept_step: int | None = None) -> Path:
    """Loss per step, one line per curve, with its running mean over an epoch-like window
    (per-batch losses differ more than they fall); log scale. `checks` (step, loss) on
    held-out batches show where training stops generalising; `kept_step` marks the state kept."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
