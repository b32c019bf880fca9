"""Pictures of a profile: firing rate and synaptic operations per layer and per step."""

from __future__ import annotations

from pathlib import Path

from snncc.profile import Profile


def plot_profile(profile: Profile, path: Path, title: str) -> None:
    """Three panels: firing rate per site, SOPs (and ANN MACs) per site, firing rate per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = [layer for layer in profile.layers]
    labels = [layer.source or layer.node for layer in sites]
    positions = range(len(sites))
    fig, (rates, ops, steps) = plt.subplots(3, 1, figsize=(max(8, 0.22 * len(sites)), 11))
    colors = ["tab:blue" if layer.kind == "spike_linear" else "tab:orange" if layer.kind == "spike_matmul"
              else "tab:red" for layer in sites]
    rates.bar(positions, [layer.firing_rate for layer in sites], color=colors)
    rates.set_ylabel("firing rate (spikes / neuron / step)")
    rates.set_title("input firing rate per site (blue: spike linear, orange: spike x spike, red: analog)")
    ops.bar(positions, [layer.sops for layer in sites], color=colors, label="SOPs (SNN)")
    ops.plot(positions, [layer.ann_macs for layer in sites], "k.", label="MACs (ANN)")
    ops.set_yscale("log")
    ops.set_ylabel("operations")
    ops.legend()
    for axis in (rates, ops):
        axis.set_xticks(list(positions))
        axis.set_xticklabels(labels, rotation=90, fontsize=6)
        axis.set_xlim(-0.6, len(sites) - 0.4)
    per_step = profile.firing_rate_per_step()
    steps.bar(range(1, len(per_step) + 1), per_step)
    steps.set_xlabel("time step t (threshold 2^-t of the range)")
    steps.set_ylabel("firing rate")
    steps.set_title("firing rate per time step, all encoders")
    totals = profile.totals()
    fig.suptitle(f"{title}: {totals['spikes_per_neuron']:.2f} spikes per activation, energy SNN/ANN "
                 f"{totals['energy_ratio']:.3f} ({profile.energy.name})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
