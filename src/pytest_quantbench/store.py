"""The results store: every measured item, kept durably and found again by what decides its numbers.

One SQLite file (``<output>/results-store.sqlite``), written by one process: the pytest controller
(:mod:`pytest_quantbench.storewriter`), which stores an item's row from its report the moment it
arrives (one committed transaction), so Ctrl-C, SIGTERM or a crashed worker lose only the items in
flight; xdist workers (local or on other hosts) never open it. The controller reads every row of
the current settings to write the CSV tables, like the suite's collect step reads every log file.

The item key (:func:`item_key`) is the run key (model and corpus content hashes, n_ctx, chunks,
engine version and evaluation layout, imatrix hash) plus the tensor set and the requested qtype,
so a rerun with the same settings measures nothing twice and any changed input measures again.
SQLite's own locking (with a generous busy timeout) serializes concurrent writers; the primary
key keeps each result exactly once. Opening the store (switching it to WAL, creating the table) is
serialized by a file lock next to it: SQLite answers a concurrent journal-mode switch with
"database is locked" at once, without waiting on its busy timeout.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

STORE_FILE = "results-store.sqlite"
SCHEMA_VERSION = 2  # 2: the engine mode is stored as engine_mode
_BUSY_TIMEOUT_S = 600.0  # a writer holds the lock for milliseconds; this covers slow disks


class StoreError(OSError):
    """The results store cannot be opened or written; the message names the file and the fix."""


def run_key(identity: dict[str, Any], imatrix_sha256: str | None) -> str:
    """The sha256 (hex) of the settings that decide every number of a run.

    identity: :meth:`RunIdentity.as_row` (model/corpus sha256, n_ctx, chunks, engine, eval);
    imatrix_sha256: the importance matrix file's hash, or None.
    """
    payload = {**identity, "imatrix_sha256": imatrix_sha256, "schema": SCHEMA_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def item_key(run: str, tensors: Iterable[str], qtype: str) -> str:
    """The key of one item: run key + sorted tensor set + requested qtype (sha256 hex)."""
    payload = {"run": run, "tensors": sorted(tensors), "qtype": qtype}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class ResultsStore:
    """The store file; opened lazily, one connection per process.

    Rows are dicts of builtin values (str, int, float, bool, None); NaN and ±inf survive (JSON
    with Python's extensions).

    Raises StoreError (an OSError) when the file cannot be created, read or written.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with FileLock(f"{self.path}.lock", timeout=_BUSY_TIMEOUT_S):
                    conn = self._open()
            except (OSError, sqlite3.Error, Timeout) as exc:
                raise StoreError(
                    f"results store {self.path}: cannot open it ({exc}); check that "
                    "the output directory is writable and has free space, or "
                    "remove the file if it is not a quantbench store"
                ) from None
            self._conn = conn
        return self._conn

    def _open(self) -> sqlite3.Connection:
        """Connect, switch to WAL and create the table; the caller holds the store's file lock."""
        conn = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_S)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS results (item_key TEXT PRIMARY KEY, "
            "run_key TEXT NOT NULL, tensor TEXT NOT NULL, qtype TEXT NOT NULL, "
            "row_json TEXT NOT NULL, stored_at REAL NOT NULL)"
        )
        conn.execute("CREATE INDEX IF NOT EXISTS by_run ON results (run_key)")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS runs (run_key TEXT PRIMARY KEY, "
            "record_json TEXT NOT NULL, stored_at REAL NOT NULL)"
        )
        conn.commit()
        return conn

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored row of ``key``, or None."""
        try:
            cur = self._connect().execute("SELECT row_json FROM results WHERE item_key = ?", (key,))
            found = cur.fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"results store {self.path}: cannot read it ({exc})") from None
        return json.loads(found[0]) if found else None

    def put(self, key: str, run: str, row: dict[str, Any]) -> None:
        """Store (or replace, for ``--quantbench-rerun``) one measured row, committed at once."""
        text = json.dumps(row, sort_keys=True)
        try:
            conn = self._connect()
            with conn:
                conn.execute(
                    "INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?, ?)",
                    (key, run, str(row.get("tensor")), str(row.get("qtype")), text, time.time()),
                )
        except sqlite3.Error as exc:
            raise StoreError(
                f"results store {self.path}: cannot write the result of "
                f"{row.get('tensor')}[{row.get('qtype')}] ({exc}); check free "
                "space and permissions of the output directory"
            ) from None

    def rows(self, run: str) -> list[dict[str, Any]]:
        """Every stored row of the run key ``run``, oldest first."""
        if not self.path.exists():
            return []
        try:
            cur = self._connect().execute(
                "SELECT row_json FROM results WHERE run_key = ? ORDER BY stored_at", (run,)
            )
            return [json.loads(text) for (text,) in cur.fetchall()]
        except sqlite3.Error as exc:
            raise StoreError(f"results store {self.path}: cannot read it ({exc})") from None

    def items(self, run: str) -> dict[str, dict[str, Any]]:
        """Every stored row of the run key ``run``, by item key."""
        if not self.path.exists():
            return {}
        try:
            cur = self._connect().execute(
                "SELECT item_key, row_json FROM results WHERE run_key = ?", (run,)
            )
            return {key: json.loads(text) for key, text in cur.fetchall()}
        except sqlite3.Error as exc:
            raise StoreError(f"results store {self.path}: cannot read it ({exc})") from None

    def put_run(self, run: str, record: dict[str, Any]) -> None:
        """Record what the tables of run key ``run`` are written from (the settings that are not
        in the run key: planned tensors and qtypes, groups, table options; see
        :mod:`pytest_quantbench.resultset`), replacing an older record, committed at once."""
        try:
            conn = self._connect()
            with conn:
                conn.execute(
                    "INSERT OR REPLACE INTO runs VALUES (?, ?, ?)",
                    (run, json.dumps(record, sort_keys=True), time.time()),
                )
        except sqlite3.Error as exc:
            raise StoreError(
                f"results store {self.path}: cannot write the run record ({exc})"
            ) from None

    def close(self) -> None:
        """Close this process's connection (idempotent)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
