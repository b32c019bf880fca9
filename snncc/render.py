"""Plain-text rendering of results for the CLI (library code returns data, not text)."""

from __future__ import annotations

import click

from snncc.profile import Profile


def print_table(header: list[str], rows: list[list], max_width: int | None = None) -> None:
    """A left-aligned text table; with `max_width`, its last column cut to fit."""
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    if max_width is not None:
        widths[-1] = max(len(header[-1]), min(widths[-1], max_width - sum(widths[:-1]) - 2 * (len(widths) - 1)))
        cells = [row[:-1] + [_fitted(row[-1], widths[-1])] for row in cells]
    for i, row in enumerate(cells):
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            click.echo("  ".join("-" * w for w in widths))


def print_eval(result: dict) -> None:
    """Fidelity metrics, one per line."""
    click.echo(f"fidelity vs ANN ({result['model']}, '{result['pipeline']}', T={result['T']}, "
               f"{result['tokens']} held-out tokens):")
    for key, value in result.items():
        if key in ("model", "pipeline", "T", "tokens"):
            continue
        shown = "unknown" if value is None else f"{value:.6f}" if isinstance(value, float) else value
        click.echo(f"  {key:20s} {shown}")


def print_domains(results: dict[str, dict], worst: dict[str, dict]) -> None:
    """Fidelity per kind of held-out text, a row each, and the worst of each figure."""
    first = next(iter(results.values()))
    causal = "ppl_ratio" in first
    keys = ["ppl_ratio", "top1_agreement", "max_abs_logit_err"] if causal else ["cosine", "min_cosine", "token_cosine"]
    click.echo(f"fidelity vs ANN ({first['model']}, '{first['pipeline']}', T={first['T']}) on held-out text:")
    click.echo(f"  {'text':8s} {'tokens':>7s} " + " ".join(f"{key:>18s}" for key in keys))
    for domain, result in results.items():
        click.echo(f"  {domain:8s} {result['tokens']:7d} " + " ".join(f"{result[key]:18.6f}" for key in keys))
    click.echo(f"  {'worst':8s} {'':7s} " + " ".join(f"{worst[key]['value']:11.6f} ({worst[key]['domain']:>4s})"
                                                for key in keys))


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def print_profile_summary(profile: Profile, top: int = 5) -> None:
    """Totals and the layers with the most synaptic operations."""
    t = profile.totals()
    click.echo(f"profile ({profile.energy.name} energy table, one {t['T']}-step forward):")
    click.echo(f"  spikes {_si(t['spikes'])} from {_si(t['neurons'])} neuron inputs "
               f"({t['spikes_per_neuron']:.2f} per activation, firing rate {t['firing_rate']:.3f})")
    click.echo(f"  SOPs {_si(t['sops'])}, analog MACs left {_si(t['analog_macs'])}, ANN MACs {_si(t['ann_macs'])}")
    ratio = (f"ratio {t['energy_ratio']:.3f}" if t["energy_ratio"] is not None
             else f"ratio unknown: {t['unknown_mac_sites']} analog matmul sites with uncountable MACs")
    click.echo(f"  energy SNN {t['energy_snn_uj']:.2f} uJ vs ANN {t['energy_ann_uj']:.2f} uJ ({ratio})")
    if t["memory_energy_ratio"] is not None:
        click.echo(f"  with memory traffic (SRAM) SNN {t['memory_energy_snn_uj']:.2f} uJ vs ANN "
                   f"{t['memory_energy_ann_uj']:.2f} uJ (ratio {t['memory_energy_ratio']:.3f})")
    if not top:
        return
    busiest = sorted(profile.layers, key=lambda layer: -layer.sops)[:top]
    print_table(["site", "kind", "firing rate", "SOPs", "ANN MACs"],
                [[layer.source or layer.node, layer.kind, f"{layer.firing_rate:.3f}", _si(layer.sops),
                  _si(layer.ann_macs)] for layer in busiest])


def print_profile(profile: Profile) -> None:
    """Every site, then the totals."""
    print_table(["site", "node", "kind", "spikes in", "firing rate", "SOPs", "analog MACs", "ANN MACs"],
                [[layer.source, layer.node, layer.kind, _si(layer.spikes_in), f"{layer.firing_rate:.3f}",
                  _si(layer.sops), _si(layer.analog_macs), _si(layer.ann_macs)] for layer in profile.layers])
    print_profile_summary(profile, top=0)


INVENTORY_WIDTH = 100  # columns `snncc inspect` keeps to (--wide: all of it)
INVENTORY_PIPELINES = ("none", "las", "fas")


def print_inventory(inventory: dict, wide: bool = False) -> None:
    """An artifact's manifest, then the op table: a status column per pipeline (for an
    artifact, compiled already, none), fitted to INVENTORY_WIDTH columns unless `wide` (then a
    column per pass too, and every source module), then the ops no pass can lower."""
    if "manifest" in inventory:
        print_manifest(inventory)
        pipelines = inventory["pipelines"] if wide else []
    else:
        pipelines = inventory["pipelines"] if wide else [p for p in INVENTORY_PIPELINES if p in inventory["pipelines"]]
    header = ["op", "count", "kind"] + pipelines + ["source modules"]
    rows = []
    for row in inventory["ops"]:
        statuses = [row["status"][p] if row["kind"] == "arithmetic" else "-" for p in pipelines]
        shown = row["sources"] if wide else row["sources"][:2]
        sources = ", ".join(shown) + (f" (+{len(row['sources']) - len(shown)})" if len(row["sources"]) > len(shown)
                                      else "")
        rows.append([row["op"], row["count"], row["kind"], *statuses, sources])
    click.echo(f"op inventory of {inventory['model']}" + (" (--wide: every pass and source module)" if not wide
                                                          else "") + ":")
    print_table(header, rows, None if wide else INVENTORY_WIDTH)
    if inventory["no_pass_lowers"]:
        click.echo("arithmetic no pass can lower yet (stays analog, listed by the verifier):")
        for item in inventory["no_pass_lowers"]:
            click.echo(_fitted(f"  {item['op']}: {', '.join(item['sources'])}", None if wide else INVENTORY_WIDTH))


def print_manifest(inventory: dict) -> None:
    """What an artifact is: its model, pipeline, T, coverage, passes and versions."""
    from snncc.ir.verify import format_coverage

    manifest = inventory["manifest"]
    facts = {
        "model": f"{inventory['model']} ({manifest['task']}, {manifest['vocab_size']} token ids, at most "
                 f"{manifest['max_positions']} positions)",
        "pipeline": f"'{inventory['pipeline']}', T={inventory['T']}" + (f", budget {manifest['budget']}"
                                                                        if manifest["budget"] else ""),
        "coverage": f"{format_coverage(manifest['coverage'])} of matmul MACs spike-driven "
                    f"({len(manifest['coverage'].get('analog_sites', []))} analog matmul sites)",
        "passes": ", ".join(f"{p['name']} {p['seconds']:.1f} s" for p in manifest["passes"]) or "none",
        "weights": manifest["weights"],
        "calibration": f"{manifest['calibration'].get('tokens', '?')} tokens of "
                       f"{manifest['calibration'].get('source', '?')}",
        "written by": f"snncc {manifest['snncc_version']}, torch {manifest['torch_version']} (artifact format "
                      f"{manifest['format_version']})",
    }
    if manifest["remaining"]:
        facts["to run"] = ", ".join(manifest["remaining"]) + " (stopped part-way)"
    for key, value in facts.items():
        click.echo(_fitted(f"{key + ':':13s}{value}", INVENTORY_WIDTH))
    click.echo("")


def _fitted(text: str, width: int | None) -> str:
    return text if width is None or len(text) <= width else text[:width - 1] + "…"


def print_precision(precision: dict) -> None:
    """A budgeted compile's plan and how it did on the calibration text held out from it; for a
    default compile that could not take a budget, why its steps are uniform."""
    if "plan" not in precision:
        click.echo(f"precision: uniform steps, not the default budget: {precision['why']}")
        return
    plan, check = precision["plan"], precision["check"]
    met = "met" if precision["met_on_check"] else "NOT met"
    default = " (the default: no -T or --budget given)" if precision.get("default") else ""
    click.echo(f"budget {precision['budget']}{default}: {met} on {precision['check_tokens']} held-out calibration "
               f"tokens (margins {precision['margins'] or 'none'}); plan fitted on {precision['fit_tokens']} tokens")
    click.echo(f"  {plan['sites']} synapse inputs, {plan['mean_digits']:.2f} of {plan['T']} digits kept per channel "
               f"on average; predicted divergence {plan['predicted_divergence_per_token']:.3g} per token")
    figures = {key: check[key] for key in ("top1_agreement", "ppl_ratio", "kl_per_token", "cosine") if key in check}
    energy = precision["check_energy_ratio"]
    click.echo("  check: " + ", ".join(f"{key} {value:.6g}" for key, value in figures.items())
               + f", energy ratio {'unknown' if energy is None else f'{energy:.3f}'}")
    if "seconds" in precision:  # artifacts written before it was recorded lack it
        seconds = precision["seconds"]
        click.echo(f"  time: sensitivity {seconds['sensitivity']:.0f} s, search {seconds['search']:.0f} s, "
                   f"{precision['programs_compiled']} program(s) compiled and checked "
                   f"{seconds['compile_and_check']:.0f} s")
