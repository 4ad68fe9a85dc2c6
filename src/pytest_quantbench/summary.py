"""``summary.md``: a Markdown page of a run for CI (GitHub's job summary and artifacts).

Sections: run settings, the worst items, failures and errors, regressions (rows that carry a
true ``regression`` field), skips counted by reason, links to the pictures. Written atomically
to the output directory and, when ``$GITHUB_STEP_SUMMARY`` is set, appended to that file (the
GitHub Actions job summary).

Pure module: no engine, no pytest.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .report import atomic_write_text, worst_items

__all__ = ["format_summary_md", "write_summary"]

Row = Mapping[str, Any]


def _cell(value: Any) -> str:
    """Markdown table cell text: ``|`` escaped, newlines flattened, long text cut."""
    text = " ".join(str(value if value is not None else "").split())
    text = text.replace("|", "\\|")
    return text if len(text) <= 200 else text[:197] + "…"


def _num(row: Row, key: str, places: int) -> str:
    try:
        value = float(row.get(key, ""))
    except (TypeError, ValueError):
        return "n/a"
    if not math.isfinite(value):
        return "n/a"
    err = row.get(key + "_err", "")
    try:
        return f"{value:.{places}f} ± {float(err):.{places}f}"
    except (TypeError, ValueError):
        return f"{value:.{places}f}"


def _item(row: Row) -> str:
    return f"`{row.get('tensor')}[{row.get('qtype')}]`"


def format_summary_md(
    rows: Sequence[Row], settings: Iterable[str], pictures: Iterable[str] = (), *, top: int = 10
) -> str:
    """The page's Markdown text.

    Args:
        rows: result rows (report.py's row keys; ``status`` passed / failed / error / skipped /
            stored); settings: lines describing the run (the run header); pictures: image file
            names relative to the page; top: how many worst items to list.
    Returns: Markdown, LF line endings, ending with a newline.
    """
    counts = Counter(str(r.get("status", "")) for r in rows)
    out = ["# quantbench summary", ""]
    out.append(", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no items")
    out += ["", "## Run settings", ""] + [f"- {_cell(line)}" for line in settings]
    worst = worst_items(rows, top)
    if worst:
        out += [
            "",
            f"## Worst {len(worst)} items by mean KLD",
            "",
            "| item | written type | mean KLD | PPL ratio | same top p (%) | status |",
            "|---|---|---|---|---|---|",
        ]
        out += [
            f"| {_item(r)} | {_cell(r.get('written_type'))} | {_num(r, 'mean_kld', 6)} | "
            f"{_num(r, 'ppl_ratio', 4)} | {_num(r, 'same_top_p', 3)} | "
            f"{_cell(r.get('status'))} |"
            for r in worst
        ]
    bad = [r for r in rows if r.get("status") in ("failed", "error")]
    out += ["", "## Failures and errors", ""]
    if bad:
        out += ["| item | status | reason |", "|---|---|---|"]
        out += [f"| {_item(r)} | {r.get('status')} | {_cell(r.get('reason'))} |" for r in bad]
    else:
        out.append("none")
    regressions = [r for r in rows if str(r.get("regression", "")).lower() in ("true", "1")]
    if regressions:
        out += ["", "## Regressions", "", "| item | mean KLD | reason |", "|---|---|---|"]
        out += [
            f"| {_item(r)} | {_num(r, 'mean_kld', 6)} | {_cell(r.get('reason'))} |"
            for r in regressions
        ]
    skips = Counter(
        _cell(r.get("reason") or "no reason given") for r in rows if r.get("status") == "skipped"
    )
    if skips:
        out += ["", "## Skips by reason", "", "| items | reason |", "|---|---|"]
        out += [f"| {n} | {reason} |" for reason, n in skips.most_common()]
    pictures = list(pictures)
    if pictures:
        out += ["", "## Pictures", ""] + [f"![{Path(p).stem}]({p})" for p in pictures]
    return "\n".join(out) + "\n"


def write_summary(
    rows: Sequence[Row],
    out_dir: str | os.PathLike[str],
    settings: Iterable[str],
    pictures: Iterable[str | os.PathLike[str]] = (),
    *,
    top: int = 10,
    step_summary: str | None = None,
) -> Path:
    """Write ``<out_dir>/summary.md`` (atomically) and append it to ``step_summary`` when given.

    Args: see :func:`format_summary_md`; pictures may be paths (their names are linked);
        step_summary: the value of ``$GITHUB_STEP_SUMMARY`` (the caller passes
        ``os.environ.get("GITHUB_STEP_SUMMARY")``), or None.
    Returns: the summary's path.
    Raises: OSError when a file cannot be written.
    """
    path = Path(out_dir) / "summary.md"
    text = format_summary_md(rows, settings, [Path(p).name for p in pictures], top=top)
    atomic_write_text(path, text)
    if step_summary:
        with open(step_summary, "a", encoding="utf-8") as f:
            f.write(text)
    return path
