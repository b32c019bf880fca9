"""The figures of `snncc debug --plot` and `snncc profile --plot`: their structure, labels and scales."""

from __future__ import annotations

import pytest
import torch

from snncc.debug import PassRow
from snncc.plots import _site_labels, energy_by_role, passes_figure, profile_figure
from snncc.profile import LayerProfile
from tests.conftest import compiled

pytest.importorskip("matplotlib")


def _rows(errors, coverage=(0.0, 0.0, None, 0.5, 1.0), agreement=(1.0, 1.0, 0.99, 0.95, 0.93)):
    names = ["(traced ANN)", "fold", "nonlinear", "attention", "encode"]
    return [PassRow(name, 0.0, True, 100, cover, err, agree)
            for name, err, cover, agree in zip(names, errors, coverage, agreement, strict=True)]


def _close(fig) -> None:
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_passes_figure_stacks_three_panels_over_the_passes_with_units():
    fig = passes_figure(_rows([0.0, 0.0, 0.05, 0.4, 2.5]), "t", "top-1 agreement")
    try:
        err, agree, cover = fig.axes
        width, height = fig.get_size_inches()
        assert width / height < 1.5  # not a strip
        assert err.get_shared_x_axes().joined(err, cover)
        assert [t.get_text() for t in cover.get_xticklabels()] == [
            "(traced ANN)", "fold", "nonlinear", "attention", "encode"]
        assert "logits" in err.get_ylabel() and "%" in agree.get_ylabel() and "%" in cover.get_ylabel()
        # agreement 93..100 %: the axis zooms to it instead of drawing full 0..100 bars
        low, high = agree.get_ylim()
        assert 85 < low < 93 and 100 <= high < 101
    finally:
        _close(fig)


def test_exact_zero_errors_sit_on_the_bottom_edge_not_at_a_fake_value():
    fig = passes_figure(_rows([0.0, 0.0, 0.05, 0.4, 2.5]), "t", "top-1 agreement")
    try:
        err = fig.axes[0]
        assert err.get_yscale() == "log"
        data_lines = [line for line in err.get_lines() if line.get_transform() == err.transData]
        plotted = [y for line in data_lines for y in line.get_ydata() if y == y]  # NaNs break the line
        assert sorted(plotted) == [0.05, 0.4, 2.5]  # no zero drawn as 1e-12 (or anything else) in data space
        zeros = [line for line in err.get_lines() if line.get_label() == "exactly 0"]
        assert len(zeros) == 1 and list(zeros[0].get_xdata()) == [0, 1]
        assert zeros[0].get_transform() == err.get_xaxis_transform() and set(zeros[0].get_ydata()) == {0}
        assert "exactly 0" in [text.get_text() for text in err.get_legend().get_texts()]
    finally:
        _close(fig)


def test_only_zero_errors_make_a_linear_axis_and_unknown_coverage_is_marked():
    fig = passes_figure(_rows([0.0] * 5), "t", "token cosine", "last hidden state")
    try:
        err, agree, cover = fig.axes
        assert err.get_yscale() == "linear" and err.get_ylim() == (0, 1)
        assert "last hidden state" in err.get_ylabel() and "%" not in agree.get_ylabel()
        unknown = [line for line in cover.get_lines() if line.get_label().startswith("unknown")]
        assert len(unknown) == 1 and list(unknown[0].get_xdata()) == [2]
    finally:
        _close(fig)


def _site(source: str, kind: str, sops: int = 10, ann_macs: int = 10) -> LayerProfile:
    return LayerProfile(source.replace(".", "_"), source, kind, sops=sops, ann_macs=ann_macs)


def test_site_labels_strip_the_block_prefix_and_name_the_attention_products():
    layers = [_site("transformer.h.0.attn.c_attn", "spike_linear"), _site("transformer.h.0.attn", "spike_matmul"),
              _site("transformer.h.0.attn", "spike_normalize"), _site("transformer.h.0.attn", "spike_matmul"),
              _site("transformer.h.0.attn", "spike_normalize"), _site("transformer.h.11.mlp.c_proj", "spike_linear"),
              _site("transformer.ln_f", "spike_normalize"), _site("lm_head", "spike_linear")]
    assert _site_labels(layers) == [
        ("L0", "attn.c_attn", "attn.c_attn"), ("L0", "attn QK^T", "QK^T"),
        ("L0", "attn (normaliser)", "normalisers (1/x neurons)"), ("L0", "attn PV", "PV"),
        ("L0", "attn (normaliser) #2", "normalisers (1/x neurons)"), ("L11", "mlp.c_proj", "mlp.c_proj"),
        ("other", "ln_f (normaliser)", "normalisers (1/x neurons)"), ("other", "lm_head", "lm_head")]
    # a lone product is not guessed to be either
    assert _site_labels([_site("model.layers.0.mixer", "spike_matmul")]) == [
        ("L0", "mixer", "mixer")]


def test_energy_by_role_sums_to_the_programs_energy():
    from snncc.profile import Profile

    layers = [_site("model.layers.0.self_attn", "spike_matmul", 30, 10),
              _site("model.layers.0.self_attn", "spike_matmul", 20, 10),
              _site("model.layers.0.mlp.down_proj", "spike_linear", 100, 50),
              _site("model.layers.1.mlp.down_proj", "spike_linear", 100, 50)]
    profile = Profile(layers=layers)
    roles = energy_by_role(profile)
    assert [role for role, _, _ in roles] == ["mlp.down_proj", "QK^T", "PV"]  # most energy first
    assert sum(snn for _, snn, _ in roles) == pytest.approx(profile.energy_snn_pj)
    assert roles[0][1:] == pytest.approx((200 * profile.energy.e_ac_pj, 100 * profile.energy.e_mac_pj))


def test_profile_figure_of_a_tiny_llama_reads_by_role_and_block():
    program = compiled("tiny-llama", "encode", 4)
    profile = program.profile(torch.tensor([list(b"The cat sat on the mat")]))
    fig = profile_figure(profile, "tiny-llama 'encode' T=4")
    try:
        ax_rate, ax_energy, ax_steps, colorbar = fig.axes
        width, height = fig.get_size_inches()
        assert height / width > 0.6  # not a strip
        rows = [t.get_text() for t in ax_rate.get_yticklabels()]
        assert "self_attn QK^T" in rows and "self_attn PV" in rows and "mlp.down_proj" in rows
        assert not any("model.layers" in row or "#" in row for row in rows)
        assert [t.get_text() for t in ax_rate.get_xticklabels()] == ["L0", "L1", "other"]
        roles = [t.get_text() for t in ax_energy.get_yticklabels()]
        assert {"QK^T", "PV", "self_attn.q_proj", "mlp.gate_proj", "lm_head"} <= set(roles)
        assert sum(bar.get_width() for bar in ax_energy.patches) == pytest.approx(100)
        assert "%" in ax_energy.get_xlabel() and "spikes / neuron / step" in colorbar.get_ylabel()
        fig.canvas.draw()  # runs the constrained layout
        renderer = fig.canvas.get_renderer()
        title, = (text.get_window_extent(renderer) for text in fig.texts if text.get_text() == fig.get_suptitle())
        assert title.y0 >= ax_rate.get_tightbbox(renderer).y1  # the title sits above the first panel
    finally:
        _close(fig)
