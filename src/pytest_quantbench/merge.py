"""``python -m pytest_quantbench merge OUT... --output DIR``: one result set from several stores.

Each shard (``--quantbench-shard``) or host writes its own results store in its own output
directory. The merge unions their rows into ``DIR/results-store.sqlite`` (SQLite ``ATTACH`` and an
insert keyed by the item key; an existing store in ``DIR`` is one of the inputs) and writes the
tables as one run with the same settings writes them (:func:`resultset.write_run_tables`). A later
run pointed at ``DIR`` (``--quantbench-output=DIR``) reuses every merged item and measures only
what is missing.

Refused, before anything is written: an item key stored with different statistics in two stores
(the message names the item and both files), and stores whose runs have other settings (another
run key, or other planned tensors, qtypes, groups or table options).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .resultset import RECORD_FIELDS, stored_row, write_run_tables
from .store import STORE_FILE

#: Row facts that depend on the process, not on the item: the time it took. The one place that
#: excludes them from comparisons (merge, tests, bench_shards); the kernel probe
#: (``kernel_probe_kld``) is a fact of the type, the same in every process (issue 11 item 8).
PER_PROCESS = ("seconds",)


class MergeError(ValueError):
    """The stores cannot be merged; the message names the files and the fix."""


def _store_path(path: Path) -> Path:
    """A store file, or the store inside an output directory. Raises MergeError."""
    store = path / STORE_FILE if path.is_dir() else path
    if not store.is_file():
        raise MergeError(
            f"{path}: no results store ({STORE_FILE}) there; give the output "
            "directory of a quantbench run (--quantbench-output)"
        )
    return store


def _read(store: Path) -> tuple[list[tuple[str, dict]], list[tuple]]:
    """(run records oldest first, result rows) of one store. Raises MergeError."""
    try:
        conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
        try:
            tables = {n for (n,) in conn.execute("SELECT name FROM sqlite_master")}
            runs = (
                []
                if "runs" not in tables
                else [
                    (key, json.loads(text))
                    for key, text in conn.execute(
                        "SELECT run_key, record_json FROM runs ORDER BY stored_at"
                    )
                ]
            )
            rows = conn.execute(
                "SELECT item_key, run_key, tensor, qtype, row_json, stored_at FROM results"
            ).fetchall()
        finally:
            conn.close()
    except (sqlite3.Error, ValueError) as exc:
        raise MergeError(f"{store}: not a readable quantbench results store ({exc})") from None
    return runs, rows


def _numbers(row_json: str) -> str:
    """What must agree between two copies of an item: its statistics and facts, not those of the
    process that measured it (:data:`PER_PROCESS`)."""
    row = json.loads(row_json)
    facts = {k: v for k, v in row.get("facts", {}).items() if k not in PER_PROCESS}
    return json.dumps({"stats": row.get("stats"), "facts": facts}, sort_keys=True)


def merge(sources: Sequence[Path], output: Path) -> list[Path]:
    """Merge the stores of ``sources`` (output directories or store files) into ``output``
    and write its tables. Returns the paths written (store first).

    Raises MergeError: no store, conflicting rows, other settings, no run record.
    """
    output.mkdir(parents=True, exist_ok=True)
    target = output / STORE_FILE
    stores = [_store_path(Path(s)) for s in sources]
    if target.is_file() and all(s.resolve() != target.resolve() for s in stores):
        stores.append(target)  # merge into what is there
    stores = list(dict.fromkeys(s.resolve() for s in stores))
    latest: dict[Path, tuple[str, dict]] = {}
    seen: dict[str, tuple[str, Path, str, str]] = {}
    for store in stores:
        runs, rows = _read(store)
        if not runs:
            raise MergeError(
                f"{store}: the store has no run record (written by a run of this "
                "version of pytest-quantbench); rerun that shard to add it"
            )
        latest[store] = runs[-1]
        for item_key, run, tensor, qtype, text, _at in rows:
            numbers = _numbers(text)
            if item_key in seen and seen[item_key][0] != numbers:
                raise MergeError(
                    f"{tensor}[{qtype}]: stored with different numbers in "
                    f"{seen[item_key][1]} and {store} (same settings, item key "
                    f"{item_key[:12]}); rerun it in one of them with "
                    "--quantbench-rerun, or leave that store out"
                )
            seen.setdefault(item_key, (numbers, store, text, run))
    run_key, record = _agreed_run(latest)
    _write_store(stores, target)
    table = [
        stored_row(record, json.loads(text))
        for _n, _s, text, run in seen.values()
        if run == run_key
    ]
    return [target, *write_run_tables(table, output, record)]


def _agreed_run(latest: dict[Path, tuple[str, dict]]) -> tuple[str, dict]:
    """The one run key and record every store's latest run has. Raises MergeError naming the
    files and the fields that differ."""
    (first_path, (first_key, first)), *rest = latest.items()
    for path, (key, record) in rest:
        differ = [f for f in RECORD_FIELDS if record.get(f) != first.get(f)]
        if key != first_key or differ:
            if "identity" in differ:
                ident = [
                    k
                    for k in first["identity"]
                    if first["identity"].get(k) != record["identity"].get(k)
                ]
                differ = [
                    f"identity ({', '.join(ident)})" if f == "identity" else f for f in differ
                ]
            raise MergeError(
                f"{first_path} and {path} hold runs of other settings (differing: "
                f"{', '.join(differ) or 'run key'}); merge only the shards of one "
                "run (same model, corpus, n_ctx, chunks, engine, qtypes, selection)"
            )
    return first_key, first


def _write_store(stores: list[Path], target: Path) -> None:
    """Union every row of ``stores`` into a fresh store, then move it onto ``target`` atomically
    (the first copy of an item key wins; they agree, :func:`merge` checked)."""
    from .store import ResultsStore

    fd, tmp = tempfile.mkstemp(prefix=".merge-", suffix=".sqlite", dir=target.parent)
    os.close(fd)
    os.unlink(tmp)
    try:
        fresh = ResultsStore(Path(tmp))
        fresh._connect()
        fresh.close()
        conn = sqlite3.connect(tmp)
        try:
            conn.execute("PRAGMA journal_mode=DELETE")
            for i, store in enumerate(stores):
                conn.execute(f"ATTACH DATABASE ? AS s{i}", (f"file:{store}?mode=ro",))
            with conn:
                for i, _store in enumerate(stores):
                    conn.execute(f"INSERT OR IGNORE INTO results SELECT * FROM s{i}.results")
                    conn.execute(
                        f"INSERT OR REPLACE INTO runs SELECT * FROM s{i}.runs "
                        f"WHERE stored_at >= coalesce((SELECT stored_at FROM runs "
                        f"WHERE runs.run_key = s{i}.runs.run_key), 0)"
                    )
        finally:
            conn.close()
        _checkpoint(target)
        os.replace(tmp, target)
    finally:
        for leftover in (tmp, f"{tmp}-journal", f"{tmp}.lock"):
            if os.path.exists(leftover):
                os.unlink(leftover)


def _checkpoint(store: Path) -> None:
    """Fold an existing store's WAL into it and remove the -wal/-shm files, so replacing the main
    file leaves no stale journal beside it."""
    if not store.exists():
        return
    conn = sqlite3.connect(store)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("PRAGMA journal_mode=DELETE")
    finally:
        conn.close()
    for suffix in ("-wal", "-shm"):
        Path(f"{store}{suffix}").unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    """``merge OUT... --output DIR``; exit 0, or 4 with one ``error:`` line for bad input."""
    parser = argparse.ArgumentParser(
        prog="python -m pytest_quantbench merge",
        description="Union the results stores of several runs (shards, hosts) and write the "
        "tables as one run would.",
    )
    parser.add_argument(
        "sources",
        nargs="+",
        type=Path,
        metavar="OUT",
        help="output directories (or results-store.sqlite files) of the runs",
    )
    parser.add_argument(
        "--output",
        required=True,
        type=Path,
        metavar="DIR",
        help="directory for the merged store and tables",
    )
    args = parser.parse_args(argv)
    try:
        written = merge(args.sources, args.output)
    except (MergeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 4
    for path in written:
        print(f"wrote {path}")
    return 0
