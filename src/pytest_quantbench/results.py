"""The run's results: the durable store of measured items (reuse or measure and store) and the
per-item suite-style logs.

:class:`RunResults` keys every item by the run's settings (:func:`store.run_key`,
:func:`store.item_key`), returns stored statistics unless ``--quantbench-rerun``, and stores a
freshly measured item at once, so an interrupted run loses only the items in flight.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import cached_property
from typing import Any

from .measure import ItemSkip, WorkUnit

#: The row facts the results store keeps with an item's statistics.
_FACTS = (
    "members",
    "requested_type",
    "written_type",
    "engine_mode",
    "engine_note",
    "kernel_probe_kld",
    "reason",
    "fallback",
    "seconds",
    # chunk-level ± and early verdicts (earlystop.gating_facts)
    "mean_kld_err_chunks",
    "mean_dp_err_chunks",
    "same_top_p_err_chunks",
    "chunks_used",
    "stopped_early",
    "early_verdict",
    "file_size",
    "bpw",
    "types",  # whole-file items (variants.file_facts)
    "eval_path",
    "prefix_note",  # prefix reuse: facts of the path, never part of a key
    "device",
)  # which device measured it (engine.devices): a merged table keeps it


class RunResults:
    """The results store of one run and the item logs.

    Args:
        inputs: the run's :class:`~pytest_quantbench.runinputs.RunInputs` (config, identity,
            imatrix identity).
    """

    def __init__(self, inputs) -> None:
        self.inputs = inputs
        self.command = "pytest"  # the invocation, for item logs (set by the plugin)

    @cached_property
    def run_key(self) -> str:
        """The store's key of this run's settings (:func:`store.run_key`)."""
        from .store import run_key

        return run_key(self.inputs.run_identity.as_row(), self.inputs.imatrix_identity)

    @cached_property
    def store(self):
        """The durable :class:`~pytest_quantbench.store.ResultsStore` in the output directory."""
        from .store import STORE_FILE, ResultsStore

        return ResultsStore(self.inputs.config.output / STORE_FILE)

    def item_key(self, unit: WorkUnit) -> str:
        """The store key of ``unit`` under this run's settings (:func:`store.item_key`)."""
        from .store import item_key

        return item_key(self.run_key, unit.tensors, unit.qtype)

    def reuse_or_measure(
        self,
        unit: WorkUnit,
        row: dict[str, Any],
        measure: Callable[[WorkUnit, dict[str, Any]], Any],
        early_limits: Mapping[str, float] | None = None,
    ) -> dict[str, Any]:
        """The statistics of ``unit``: reused from the results store when it holds them for these
        settings (unless ``--quantbench-rerun``), else ``measure(unit, row)`` (a KLDStats) and
        stored at once.

        ``early_limits``: the item's threshold limits under ``--quantbench-early-stop`` (empty or
        None without it). A result that stopped early (``row["stopped_early"]``) is stored under
        :func:`~pytest_quantbench.earlystop.early_item_key` of these limits, so a full-chunk run
        never reuses it; a run with the same limits reuses a full or an early result.
        ``row`` is updated in place (stored facts and ``reused`` on reuse). Returns
        :meth:`KLDStats.as_dict` (floats/ints). Raises ItemSkip (a stored fallback without
        ``--quantbench-allow-fallback``), StoreError, and whatever ``measure`` raises.
        """
        from .earlystop import early_item_key, early_store_run

        config = self.inputs.config
        key, run = self.item_key(unit), self.run_key
        early_key = (
            early_item_key(
                run, unit.tensors, unit.qtype, early_limits, config.early_stop_confidence
            )
            if early_limits
            else None
        )
        stored = (
            None
            if config.rerun
            else (self.store.get(key) or (self.store.get(early_key) if early_key else None))
        )
        if stored is not None:
            row.update(stored["facts"], reused=True)
            if row.get("fallback") and not config.allow_fallback:
                raise ItemSkip(row["reason"])
            return stored["stats"]
        stats = measure(unit, row)
        facts = {k: row[k] for k in _FACTS if k in row}
        if row.get("stopped_early"):  # never reused for, nor listed by, a full-chunk run
            assert early_key is not None  # only a run with early-stop limits stops early
            key, run = early_key, early_store_run(run)
        self.store.put(
            key,
            run,
            {"tensor": unit.name, "qtype": unit.qtype, "facts": facts, "stats": stats.as_dict()},
        )
        return stats.as_dict()

    def write_item_log(self, unit: WorkUnit, row: dict[str, Any], stats: dict[str, Any]) -> None:
        """With ``--quantbench-logs DIR``: the item's suite-style log
        (``bench_ppl_kld_result.<tensor>.<qtype>.<chunks>.txt``, :mod:`itemlog`). Raises OSError."""
        config = self.inputs.config
        if config.logs is None:
            return
        from .itemlog import write_item_log
        from .metrics import KLDStats

        facts = {
            k: row.get(k)
            for k in ("members", "requested_type", "written_type", "engine_mode", "n_ctx", "reused")
        }
        write_item_log(
            config.logs,
            unit.name,
            unit.qtype,
            self.inputs.run_identity.chunks,
            KLDStats(**stats),
            command=self.command,
            facts=facts,
        )

    def close(self) -> None:
        """Close the store if it was opened."""
        if "store" in self.__dict__:
            self.store.close()
