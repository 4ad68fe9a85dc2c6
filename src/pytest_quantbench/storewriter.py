"""One writer per results store: items measure anywhere, the pytest controller stores their rows.

A measuring process (an xdist worker, local or on another host, or the single pytest process)
holds a :class:`HandoffStore` where it would hold the store: reuse looks rows up in what the
controller handed it (``workerinput``: the stored rows of this run, or the controller's own store
in a single process), and a measured row is kept as a :func:`handoff` payload that travels on the
item's setup report. The controller's :class:`StoreWriter` stores it when the item's last report
arrives, one committed transaction per item, with the outcome it was judged with: so Ctrl-C,
SIGTERM or a dead worker lose only the items in flight, SQLite never runs on a network filesystem,
and two runs on one output directory store each item once (the item key is the primary key).

The writer also refuses to mix hosts that disagree: every payload carries its host's run key and
the sha256 of the baseline logits file it measured against; a row from another run key, or from
a baseline whose hash differs from the first one seen for that run key, is not stored and fails
its item with a message naming both hosts.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: ``workerinput`` key: {item key: stored row} of the controller's run key ({} with --rerun).
WORKERINPUT_KEY = "quantbench_stored_rows"
#: Attribute of a setup report that carries a measured row (:func:`handoff`).
REPORT_ATTR = "quantbench_result"
#: Attribute of a test item: {row suffix: payload} of its ``quantbench`` fixture measurements.
FIXTURE_PAYLOADS = "_quantbench_payloads"


class HandoffStore:
    """The results store as a measuring process sees it (same ``get``/``put``/``close`` as
    :class:`~pytest_quantbench.store.ResultsStore`).

    lookup: item key → stored row or None (the controller's answer).
    """

    def __init__(self, lookup: Callable[[str], dict[str, Any] | None]) -> None:
        self._lookup = lookup
        self.pending: dict[str, tuple[str, dict[str, Any]]] = {}
        self.base_sha256: str | None = None

    def get(self, key: str) -> dict[str, Any] | None:
        return self._lookup(key)

    def put(self, key: str, run: str, row: dict[str, Any]) -> None:
        """Keep a measured row until its report leaves (:meth:`take`)."""
        self.pending[key] = (run, row)

    def take(self, tensor: str | None, qtype: str | None) -> tuple[str, str, dict[str, Any]] | None:
        """(item key, run key, row) of the row measured for (``tensor``, ``qtype``), removed; None
        when none is pending. Its key is the item key or, for a result that stopped early, the
        early-stop key (:func:`~pytest_quantbench.earlystop.early_item_key`)."""
        for key, (run, row) in self.pending.items():
            if (row.get("tensor"), row.get("qtype")) == (tensor, qtype):
                del self.pending[key]
                return key, run, row
        return None

    def close(self) -> None:
        self.pending.clear()


def handoff(session, tensor: str | None, qtype: str | None) -> dict[str, Any] | None:
    """The payload of the row measured for (``tensor``, ``qtype``) (an item's unit name and
    qtype, or a fixture measurement's) for the controller, or None (reused, not measured).

    session: the measuring process's QuantbenchSession (its ``results.store`` a
    :class:`HandoffStore`, set by the plugin).
    Keys: ``key``, ``run`` (item and run key), ``row`` (what the store keeps), ``identity``
    (run identity row), ``base_sha256`` (sha256 of the baseline logits file), ``host``.
    """
    results, inputs = session.results, session.inputs
    store = results.store
    if not isinstance(store, HandoffStore):
        return None
    taken = store.take(tensor, qtype)
    if taken is None:
        return None
    key, run, row = taken
    if store.base_sha256 is None and os.environ.get("PYTEST_XDIST_WORKER"):
        # one process has one baseline; measuring the row loaded it (session.base.file)
        from .inputs import sha256_file

        base = inputs.config.kld_base if inputs.user_base is not None else session.base.path
        store.base_sha256 = sha256_file(Path(base), inputs.cache_dir)
    return {
        "key": key,
        "run": run,
        "row": row,
        "identity": inputs.run_identity.as_row(),
        "base_sha256": store.base_sha256,
        "host": socket.gethostname(),
    }


class MixedBaselinesError(ValueError):
    """Two hosts measured one run against different baselines or settings; names both."""


class StoreWriter:
    """Controller half: stores each measured row from its reports.

    store: the controller's :class:`ResultsStore`; run: its run key; record: the run record
    (:func:`resultset.run_record`), stored with the first row.
    """

    def __init__(self, store, run: str, record: Callable[[], dict[str, Any]]) -> None:
        self.store = store
        self.run = run
        self._record = record
        self._recorded = False
        self._pending: dict[str, tuple[dict[str, Any], str]] = {}
        self._baselines: dict[str, tuple[str, str]] = {}
        self.controller_identity: dict[str, Any] | None = None

    def accept(self, nodeid: str, payload: dict[str, Any], where: str) -> None:
        """Hold the measured row of ``nodeid`` until its outcome is known.

        where: who measured it (``gw0 (ssh=host)`` …). Raises MixedBaselinesError.
        """
        host = f"{where} on {payload.get('host')}"
        from .earlystop import early_store_run

        if payload["run"] not in (self.run, early_store_run(self.run)):
            ours = self.controller_identity or {}
            diff = sorted(k for k, v in payload.get("identity", {}).items() if ours.get(k) != v)
            raise MixedBaselinesError(
                f"{host} measures with other settings than the controller (run key "
                f"{payload['run'][:12]} != {self.run[:12]}; differing: {', '.join(diff) or 'imatrix'}"
                "): give every host the same model file, engine build and options"
            )
        sha = payload.get("base_sha256")
        if sha is not None:
            first = self._baselines.setdefault(self.run, (sha, host))
            if first[0] != sha:
                raise MixedBaselinesError(
                    f"baseline logits differ between hosts for one run: {first[1]} has sha256 "
                    f"{first[0][:12]}, {host} has {sha[:12]}; results of both cannot be mixed: "
                    "use the same engine build (and threads) on every host, or run each host as "
                    "its own shard (--quantbench-shard) and compare"
                )
        self._pending[nodeid] = (payload, host)

    def finish(self, nodeid: str, outcome: dict[str, Any]) -> bool:
        """Store ``nodeid``'s held row with its ``outcome`` (status, nodeid, reason), committed at
        once; False when nothing was held (reused, skipped, errored before measuring).
        Raises StoreError."""
        held = self._pending.pop(nodeid, None)
        if held is None:
            return False
        payload = held[0]
        if not self._recorded:
            self.store.put_run(self.run, self._record())
            self._recorded = True
        self.store.put(payload["key"], payload["run"], {**payload["row"], "outcome": outcome})
        return True

    def record_run(self) -> None:
        """Store the run record now (a run whose items were all reused still updates it)."""
        if not self._recorded:
            self.store.put_run(self.run, self._record())
            self._recorded = True


def worker_lookup(workerinput: dict[str, Any]) -> Callable[[str], dict[str, Any] | None]:
    """A worker's reuse lookup: the rows the controller put in ``workerinput``."""
    stored = workerinput.get(WORKERINPUT_KEY) or {}
    return stored.get
