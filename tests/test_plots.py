"""Plots: the files exist with the expected pixel size; a measured cell is coloured, an
unmeasured one grey (pixels read back from the PNG)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from pytest_quantbench.plots import (
    DPI,
    NOT_MEASURED_GREY,
    heatmap_figure,
    heatmap_grid,
    pareto_front,
    write_plots,
)

ROWS = [
    {"tensor": f"blk.{layer}.{kind}.weight", "qtype": "q4_0", "mean_kld": kld}
    for layer, kind, kld in [
        (0, "attn_q", 0.001),
        (0, "attn_k", 0.01),
        (1, "attn_q", 0.1),
        (2, "attn_k", 0.05),
        (2, "attn_q", 0.002),
    ]
] + [
    {"tensor": "token_embd.weight", "qtype": "q4_0", "mean_kld": 0.02},
    {"tensor": "blk.1.attn_k.weight", "qtype": "q4_0", "mean_kld": "", "status": "skipped"},
    {"tensor": "group0", "qtype": "q4_0", "mean_kld": 0.3, "members": "a,b", "bpw": 4.5},
    {"tensor": "group0", "qtype": "q8_0", "mean_kld": 0.01, "members": "a,b", "bpw": 8.5},
    {"tensor": "group0", "qtype": "q5_1", "mean_kld": 0.4, "members": "a,b", "bpw": 6.0},
]


def test_grid_layers_down_kinds_across():
    layers, kinds, grid = heatmap_grid(ROWS, "q4_0")
    assert layers == ["other", "0", "1", "2"] and kinds == ["attn_k", "attn_q", "token_embd"]
    assert grid[1, 1] == 0.001 and np.isnan(grid[2, 0])  # blk.1.attn_k skipped
    assert heatmap_figure(ROWS, "q6_K") is None


def _pixel(fig, ax, img, col, row):
    x, y = ax.transData.transform((col, row))
    return img[round(img.shape[0] - y), round(x), :3]


def test_heatmap_pixels_measured_coloured_unmeasured_grey(tmp_path):
    import matplotlib.image as mpimg

    fig = heatmap_figure(ROWS, "q4_0")
    ax = fig.axes[0]
    path = tmp_path / "h.png"
    fig.savefig(path, dpi=DPI)
    img = mpimg.imread(path)
    w, h = fig.get_size_inches() * DPI
    assert img.shape[:2] == (round(h), round(w))
    grey = np.array(NOT_MEASURED_GREY)
    unmeasured = _pixel(fig, ax, img, 0, 2)  # blk.1.attn_k
    assert np.allclose(unmeasured, grey, atol=0.02)
    low, high = _pixel(fig, ax, img, 1, 1), _pixel(fig, ax, img, 1, 2)  # 0.001 / 0.1
    for cell in (low, high):
        assert not np.allclose(cell, grey, atol=0.05)
        assert cell.max() - cell.min() > 0.2  # a colour, not a grey
    assert not np.allclose(low, high, atol=0.1)  # the log scale separates them
    assert fig.axes[1].get_ylabel() == "mean KLD (nats, log scale)"


def test_pareto_front():
    assert pareto_front([(4.5, 0.3), (8.5, 0.01), (6.0, 0.4), (5.0, 0.1)]) == [0, 3, 1]


def test_write_plots_files_and_nothing_to_draw(tmp_path):
    import matplotlib.image as mpimg

    written = write_plots(ROWS, tmp_path)
    assert sorted(p.name for p in written) == ["heatmap-q4_0.png", "kld_vs_bpw.png"]
    assert mpimg.imread(tmp_path / "kld_vs_bpw.png").shape[:2] == (5 * DPI, 7 * DPI)
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("*.png.*"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert write_plots([{"tensor": "blk.0.attn_q.weight", "qtype": "q4_0"}], empty) == []
    assert list(empty.iterdir()) == []


def test_a_run_writes_heatmaps_unless_plots_off(pytester, qb_args):
    args = [
        *qb_args,
        "--quantbench-qtypes=q4_0",
        "--quantbench-tensors",
        r"^blk\.0\.attn_(q|v)\.weight$",
    ]
    pytester.runpytest_subprocess(*args).assert_outcomes(passed=2)
    out = pytester.path / "quantbench-results"
    assert (out / "heatmap-q4_0.png").is_file() and not (out / "kld_vs_bpw.png").exists()
    assert "![heatmap-q4_0](heatmap-q4_0.png)" in (out / "summary.md").read_text()
    (out / "heatmap-q4_0.png").unlink()
    pytester.runpytest_subprocess(*args, "--quantbench-plots=off").assert_outcomes(passed=2)
    assert not (out / "heatmap-q4_0.png").exists()


def test_recipe_and_variant_files_are_drawn_beside_the_curve():
    from pytest_quantbench.plots import kld_vs_bpw_figure

    def bpw(row):
        return row.get("bpw")

    plain = kld_vs_bpw_figure(ROWS, bpw)
    assert len(plain.axes[0].collections) == 1
    with_file = kld_vs_bpw_figure(
        [*ROWS, {"tensor": "recipe", "qtype": "mix", "mean_kld": 0.05, "bpw": 5.5}], bpw
    )
    files = with_file.axes[0].collections[1]
    assert files.get_offsets().tolist() == [[5.5, 0.05]]
    assert "mix" in [t.get_text() for t in with_file.axes[0].texts]
