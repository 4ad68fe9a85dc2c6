"""Pictures of a run's results: per-qtype KLD heatmaps and the KLD-against-bpw curve.

* ``heatmap-<qtype>.png``: layers down, tensor kinds across, colour = mean KLD on a log scale,
  grey = not measured, a labelled colour bar; tensors outside the layers (``token_embd``,
  ``output``) form a top row ``other``.
* ``kld_vs_bpw.png``: whole-model items (``group0`` of a sweep over qtypes): mean KLD (log)
  against bits per weight, one point per qtype, the Pareto front (no other point has fewer bits
  and less KLD) marked and joined.

matplotlib with the Agg backend (no display), imported only here and only when drawing. Rows are
result rows (``tensor``, ``qtype``, ``mean_kld``, ``members``; see report.py).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .selection import layer_of, natural_key, tensor_kind

__all__ = [
    "NOT_MEASURED_GREY",
    "heatmap_figure",
    "heatmap_grid",
    "kld_vs_bpw_figure",
    "pareto_front",
    "write_plots",
]

Row = Mapping[str, Any]

#: Colour of a cell that was not measured (RGB, 0..1).
NOT_MEASURED_GREY = (0.8, 0.8, 0.8)

DPI = 100


def _finite(row: Row, key: str) -> float | None:
    """``row[key]`` as a finite float, else None (absent, empty, NaN, text)."""
    try:
        v = float(row.get(key, ""))
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _kld(row: Row) -> float | None:
    return _finite(row, "mean_kld")


def _single(row: Row) -> bool:
    members = row.get("members")
    return not isinstance(members, str) or not members or members == row.get("tensor")


def heatmap_grid(rows: Iterable[Row], qtype: str):
    """The heatmap's data for one qtype.

    Returns: (layers: list of row labels — ``other`` first when tensors outside the layers were
        measured, then ``0``, ``1``… —, kinds: column labels, grid: float64 array
        (len(layers), len(kinds)) of mean KLD, NaN where not measured). Single-tensor rows only.
    """
    import numpy as np

    cells: dict[tuple[str, str], float | None] = {}
    for row in rows:
        if row.get("qtype") != qtype or not _single(row):
            continue
        tensor = str(row.get("tensor"))
        layer = layer_of(tensor)
        cells[("other" if layer is None else str(layer), tensor_kind(tensor))] = _kld(row)
    layers = sorted({k[0] for k in cells}, key=lambda s: (s != "other", natural_key(s)))
    kinds = sorted({k[1] for k in cells}, key=natural_key)
    grid = np.full((len(layers), len(kinds)), np.nan)
    for (label, kind), value in cells.items():
        if value is not None:
            grid[layers.index(label), kinds.index(kind)] = value
    return layers, kinds, grid


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def heatmap_figure(rows: Iterable[Row], qtype: str):
    """The heatmap Figure of one qtype (see :func:`heatmap_grid`), or None when no cell of this
    qtype was measured. Size: (2.5 + 0.9·kinds) × max(3.5, 2 + 0.35·layers) inches at
    :data:`DPI`.

    KLD values ≤ 0 (identical logits) are drawn at the smallest positive value's colour.
    """
    import numpy as np
    from matplotlib.colors import LogNorm

    layers, kinds, grid = heatmap_grid(rows, qtype)
    measured = grid[np.isfinite(grid)]
    if measured.size == 0:
        return None
    positive = measured[measured > 0]
    lo = float(positive.min()) if positive.size else 1e-6
    hi = float(positive.max()) if positive.size else 1e-6
    if hi <= lo:
        lo, hi = lo / 10, hi * 10
    plt = _pyplot()
    fig, ax = plt.subplots(
        figsize=(max(4.5, 2.5 + 0.9 * len(kinds)), max(3.5, 2 + 0.35 * len(layers))), dpi=DPI
    )
    cmap = plt.get_cmap("viridis").with_extremes(bad=NOT_MEASURED_GREY)
    shown = np.ma.masked_invalid(np.where(grid > 0, grid, np.where(np.isfinite(grid), lo, np.nan)))
    image = ax.imshow(
        shown, cmap=cmap, norm=LogNorm(vmin=lo, vmax=hi), aspect="auto", interpolation="nearest"
    )
    ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), layers)
    ax.set_xlabel("tensor kind")
    ax.set_ylabel("layer")
    ax.set_title(f"mean KLD per tensor at {qtype}\n(grey: not measured)")
    bar = fig.colorbar(image, ax=ax)
    bar.set_label("mean KLD (nats, log scale)")
    fig.tight_layout()
    return fig


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (bpw, kld) points that no other point beats on both (fewer or equal bits
    and less KLD, or fewer bits and equal KLD), in increasing bpw."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def kld_vs_bpw_figure(
    rows: Sequence[Row], bpw_of: Callable[[Row], float | None], group: str = "group0"
):
    """The KLD-against-bpw Figure of ``group``'s items (one point per qtype), or None when fewer
    than two points have both a KLD > 0 and a bpw. Whole-file items (``variant`` / ``recipe``
    rows with a bpw) are drawn as triangles labelled with their file stem, outside the front.

    bpw_of: the bits per weight of a row (e.g. the row's ``bpw`` column, or the model's tensor
        data at that qtype divided by its weights).
    """
    points, labels = [], []
    for row in rows:
        if row.get("tensor") != group:
            continue
        kld, bpw = _kld(row), bpw_of(row)
        if kld is not None and kld > 0 and bpw is not None:
            points.append((float(bpw), kld))
            labels.append(str(row.get("qtype")))
    if len(points) < 2:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5), dpi=DPI)
    ax.scatter(
        [p[0] for p in points], [p[1] for p in points], color="tab:blue", s=18, label="qtype"
    )
    front = pareto_front(points)
    ax.plot(
        [points[i][0] for i in front],
        [points[i][1] for i in front],
        color="tab:red",
        marker="o",
        markerfacecolor="none",
        markersize=9,
        label="Pareto front",
    )
    for (x, y), label in zip(points, labels, strict=True):
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    candidates = [
        (bpw_of(r), _kld(r), str(r.get("qtype")))
        for r in rows
        if r.get("tensor") in ("variant", "recipe")
    ]
    files = [
        (x, y, label) for x, y, label in candidates if x is not None and y is not None and y > 0
    ]
    if files:
        ax.scatter(
            [f[0] for f in files],
            [f[1] for f in files],
            marker="^",
            color="tab:green",
            s=40,
            label="variant / recipe file",
            zorder=3,
        )
        for x, y, label in files:
            ax.annotate(
                label,
                (x, y),
                textcoords="offset points",
                xytext=(4, -9),
                fontsize=7,
                color="tab:green",
            )
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (tensor data of the whole model)")
    ax.set_ylabel("mean KLD (nats, log scale)")
    ax.set_title(f"{group}: whole-model mean KLD against size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def _save(fig, path: Path) -> Path:
    """Save atomically (temp file + os.replace) and close the figure."""
    import tempfile

    plt = _pyplot()
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=DPI, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _safe(qtype: str) -> str:
    return "".join(c if c.isalnum() or c in "_-." else "_" for c in qtype)


def write_plots(
    rows: Sequence[Row],
    out_dir: str | os.PathLike[str],
    bpw_of: Callable[[Row], float | None] | None = None,
) -> list[Path]:
    """Write ``heatmap-<qtype>.png`` for every qtype with a measured single-tensor row, and
    ``kld_vs_bpw.png`` when at least two ``group0`` qtypes have a KLD and a bpw.

    Args: rows: result rows; out_dir: the output directory (exists); bpw_of: bits per weight of
        a row (default: its ``bpw`` column).
    Returns: the paths written (none when there is nothing to draw).
    """
    out = Path(out_dir)
    written = []
    qtypes = sorted({str(r.get("qtype")) for r in rows if _single(r) and _kld(r) is not None})
    for qtype in qtypes:
        fig = heatmap_figure(rows, qtype)
        if fig is not None:
            written.append(_save(fig, out / f"heatmap-{_safe(qtype)}.png"))
    fig = kld_vs_bpw_figure(rows, bpw_of or (lambda row: _finite(row, "bpw")))
    if fig is not None:
        written.append(_save(fig, out / "kld_vs_bpw.png"))
    return written
