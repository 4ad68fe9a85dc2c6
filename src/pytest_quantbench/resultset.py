"""A run's result set: the record its tables are written from, its table rows, and the tables.

The results store keys rows by what decides their numbers (the run key); the tables also depend
on settings that are not in it: the planned tensors and qtypes (columns and rows with no result
are written ``404``), the groups, and the table options. A run keeps these as its *run record*
(:func:`run_record`, stored beside the rows), so ``python -m pytest_quantbench merge`` writes the
tables of several shards' stores exactly as one run with the same settings writes them
(:func:`write_run_tables`, used by both).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

#: The record fields a merge requires to agree (the shard's own index is not among them).
RECORD_FIELDS = (
    "identity",
    "imatrix",
    "tensors",
    "qtypes",
    "csv_metrics",
    "ppl_percent",
    "baseline_ppl",
    "baseline_qtype",
    "groups",
)


def run_record(session, units: Sequence[Any]) -> dict[str, Any]:
    """The run record of ``session`` (a :class:`QuantbenchSession`) for its full plan ``units``
    (every shard's units, before ``--quantbench-shard`` keeps its share). Builtin types only."""
    from .selection import natural_key

    cfg = session.config
    return {
        "identity": session.run_identity.as_row(),
        "imatrix": session.inputs.imatrix_identity,
        "tensors": sorted({u.name for u in units}, key=natural_key),
        "qtypes": sorted({u.qtype for u in units}),
        "csv_metrics": list(cfg.csv_metrics),
        "ppl_percent": bool(cfg.ppl_percent),
        "baseline_ppl": cfg.baseline_ppl,
        "baseline_qtype": cfg.baseline_qtype,
        "groups": [
            {"name": g.name, "spec": g.spec, "members": list(g.members)} for g in session.groups
        ],
    }


def stored_row(record: dict[str, Any], stored: dict[str, Any]) -> dict[str, Any]:
    """The table row of a stored item as the run that measured it wrote it: the run identity,
    tensor, qtype, facts, statistics and the outcome (status, nodeid, reason) it was judged
    with. Rows stored before outcomes were kept get ``status="stored"``."""
    outcome = stored.get("outcome") or {"status": "stored"}
    return {
        **record["identity"],
        "tensor": stored["tensor"],
        "qtype": stored["qtype"],
        **stored["facts"],
        **stored["stats"],
        **outcome,
    }


def write_run_tables(
    rows: Sequence[dict[str, Any]], out: Path, record: dict[str, Any]
) -> list[Path]:
    """Write the suite tables, ``results.csv`` and (for a grouped run) the group files of
    ``rows`` into ``out`` (each file atomically), as :func:`report.write_suite_tables` and
    :func:`report.write_group_files` do. Returns the paths written. Raises OSError."""
    from .report import write_group_files, write_suite_tables
    from .selection import natural_key

    tensors = sorted(set(record["tensors"]) | {r["tensor"] for r in rows}, key=natural_key)
    qtypes = sorted(set(record["qtypes"]) | {r["qtype"] for r in rows})
    written = write_suite_tables(
        rows,
        out,
        tensors=tensors,
        qtypes=qtypes,
        metrics=record["csv_metrics"],
        ppl_percent=record["ppl_percent"],
        baseline_ppl=record["baseline_ppl"],
        baseline_qtype=record["baseline_qtype"],
    )
    if record["groups"]:
        groups = [
            SimpleNamespace(name=g["name"], spec=g["spec"], members=tuple(g["members"]))
            for g in record["groups"]
        ]
        written += write_group_files(
            groups, out, baseline=record["baseline_qtype"], chunks=record["identity"]["chunks"]
        )
    return written
