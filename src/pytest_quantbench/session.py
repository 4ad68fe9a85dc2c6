"""One process's quantbench state: a thin holder of the run's parts, and the measurement of one
work unit from them.

Every pytest process (controller or xdist worker) holds one :class:`QuantbenchSession` in
``config.stash``. Its parts, one role each, are lazy: the controller only reads headers and
tokenizes (for the run header), workers load the baseline model once, ensure the baseline logits
(computed once across workers by :mod:`baseline`) and measure items.

* :class:`~runinputs.RunInputs` (``inputs``): model, corpus, chunks, settings, imatrix, identity;
* :class:`~baseline.RunBaseline` (``base``): the baseline logits file;
* :class:`~results.RunResults` (``results``): the results store and item logs;
* :class:`~typeplan.TypePlanner` (``planner``): the written type of each tensor;
* :class:`~enginechoice.EngineChoice` (``engines``): engine path, swap model, kernel probe;
* :mod:`measure`: the two measuring paths and the chunk loop.

Nothing here knows pytest: skips are raised as :class:`ItemSkip`, engine failures as EngineError /
ValueError. The names other modules imported from here stay importable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import measure as measuring
from .baseline import RunBaseline
from .config import QuantbenchConfig
from .enginechoice import KERNEL_PROBE_MAX_KLD, EngineChoice
from .measure import ChunkBuffers, ItemSkip, WorkUnit, fallback_reason
from .prefix import PrefixReuse, eval_path
from .results import RunResults
from .runinputs import RunInputs, default_threads
from .typeplan import TypePlanner

__all__ = [
    "QuantbenchSession",
    "ItemSkip",
    "WorkUnit",
    "ChunkBuffers",
    "default_threads",
    "fallback_reason",
    "KERNEL_PROBE_MAX_KLD",
]


def _part(part: str, name: str) -> property:
    """A read-only attribute of the session that is ``name`` of its part ``part``."""
    return property(
        lambda self: getattr(getattr(self, part), name),
        doc=f"``{part}.{name}`` (read by plugin.py, planning.py, faults.py, tests).",
    )


class QuantbenchSession:
    """The parts of one run, and :meth:`measure` for one work unit.

    Takes the arguments of :class:`~runinputs.RunInputs` (``config, cache_dir, n_workers``) and
    raises what it raises.
    """

    def __init__(self, config: QuantbenchConfig, cache_dir: Path, n_workers: int = 1) -> None:
        self.inputs = RunInputs(config, cache_dir, n_workers)
        self.engines = EngineChoice(self.inputs)
        self.prefix = PrefixReuse(self.inputs, lambda: self.engines.swap_model, lambda: self.units)
        self.base = RunBaseline(self.inputs, lambda: self.engines.swap_model, self.prefix)
        self.planner = TypePlanner(self.inputs)
        self.results = RunResults(self.inputs)
        self.chunk_buffers = ChunkBuffers()  # the chunk loop's arrays, kept across items
        self.units: list[WorkUnit] = []
        self.groups: tuple = ()
        self.whole_paths: dict = {}  # issue 15: (variant|recipe, stem) → file (planning.py)

    # ---- the parts' facts that other modules read ---------------------------------------------
    config = _part("inputs", "config")
    cache_dir = _part("inputs", "cache_dir")
    threads = _part("inputs", "threads")
    model_path = _part("inputs", "model_path")
    model_header = _part("inputs", "model_header")
    run_identity = _part("inputs", "run_identity")
    thresholds = _part("inputs", "thresholds")
    imatrix = _part("inputs", "imatrix")
    imatrix_identity = _part("inputs", "imatrix_identity")  # [gating] rows' imatrix column
    swap_model = _part("engines", "swap_model")  # None where the in-process engine cannot bind
    baseline = _part("base", "file")  # the baseline logits file, computed once
    store = _part("results", "store")
    run_key = _part("results", "run_key")

    @property
    def command(self) -> str:
        """The invocation, for item logs (set by the plugin)."""
        return self.results.command

    @command.setter
    def command(self, value: str) -> None:
        self.results.command = value

    def validate_inputs(self) -> None:
        """:meth:`RunInputs.validate_inputs`, then the cache's free space for prefix reuse
        (:meth:`PrefixReuse.check_disk_space`; DiskSpaceError)."""
        self.inputs.validate_inputs()
        self.prefix.check_disk_space()

    def header_lines(self) -> list[str]:
        """:meth:`RunInputs.header_lines` and the prefix-reuse line."""
        return self.inputs.header_lines() + self.prefix.header_lines()

    def baseline_lines(self) -> list[str]:
        """:meth:`RunBaseline.summary_lines`."""
        return self.base.summary_lines()

    def write_item_log(self, unit: WorkUnit, row: dict[str, Any], stats: dict[str, Any]) -> None:
        """:meth:`RunResults.write_item_log`."""
        self.results.write_item_log(unit, row, stats)

    def close(self) -> None:
        """Free the engine objects and remove temporary files."""
        self.inputs.close()
        self.prefix.close()  # the tails point at the swap model's weights: closed first
        self.engines.close()
        self.results.close()
        self.chunk_buffers = ChunkBuffers()

    # ---- one item -----------------------------------------------------------------------------
    def identity_row(self, unit: WorkUnit) -> dict[str, Any]:
        """The row columns every result of ``unit`` carries (builtin types)."""
        return {
            "tensor": unit.name,
            "qtype": unit.qtype,
            "members": ",".join(unit.tensors),
            **self.run_identity.as_row(),
            "device": self.inputs.identity_engine.device,
        }

    def measure(self, unit: WorkUnit, row: dict[str, Any]) -> dict[str, Any]:
        """The statistics of ``unit``: reused from the results store when it holds them for these
        settings (unless ``--quantbench-rerun``), else measured and stored at once.

        ``row`` is updated in place as facts become known (``requested_type``, ``written_type``,
        ``engine``, ``reason``, ``reused``), so the caller keeps them even when this raises.
        Returns: :meth:`KLDStats.as_dict` (floats/ints).
        Raises: ItemSkip (fallback type, missing imatrix, a type this build cannot run),
            EngineError, StoreError, ValueError (non-finite logits: the message says where).
        """
        return self.results.reuse_or_measure(
            unit, row, self._measure, early_limits=self.early_limits(unit)
        )  # [gating]

    def _measure(self, unit: WorkUnit, row: dict[str, Any]):
        """Plan the written types, quantize, evaluate every chunk; return the KLDStats."""
        import time

        from .earlystop import EarlyVerdict, gating_facts, item_accumulator  # [gating]
        from .qtypes import resolve_qtype

        if unit.name in ("variant", "recipe"):  # issue 15: whole files and recipes (variants.py)
            from .variants import measure_whole

            return measure_whole(
                unit,
                self.whole_paths[(unit.name, unit.qtype)],
                row,
                inputs=self.inputs,
                planner=self.planner,
                engines=self.engines,
                baseline=self.base,
                buffers=self.chunk_buffers,
            )
        started = time.perf_counter()
        qtype = resolve_qtype(unit.qtype)
        written = self.planner.plan_types(unit, qtype, row)
        base = self.baseline
        engine, note = self.engines.choose_engine(unit)
        note = "; ".join(filter(None, (note, self.engines.device_note(written)))) or None  # GPU
        row["engine_mode"] = engine  # "engine" (the run identity) is the engine library's id
        if note:
            row["engine_note"] = note
        header = self.model_header
        probes = [
            self.engines.check_kernel(name, wtype, base)
            for name, wtype in written.items()
            if wtype.name != header.tensor(name).type_name
        ]
        probes = [k for k in probes if k is not None]
        if probes:  # how far the type's kernel is from its dequantized weights (nats), probed on
            row["kernel_probe_kld"] = max(probes)  # one fixed tensor per type (enginechoice)
        n_chunks = self.run_identity.chunks
        acc = item_accumulator(
            self.early_limits(unit),
            n_chunks,  # [gating]
            self.config.early_stop_confidence,
        )
        try:
            if engine == "inplace":  # on the unit's tail or the full model (prefix.run_item)
                row["eval_path"] = measuring.measure_inplace(
                    self.engines.swap_model,
                    header,
                    self.imatrix,
                    written,
                    base,
                    acc,
                    self.chunk_buffers,
                    run=lambda *args: self.prefix.run_item(unit, row, *args),
                )
            else:
                row["eval_path"] = eval_path(None)  # the file engine never uses tails
                measuring.measure_file(
                    self.inputs, unit, qtype, written, base, acc, self.chunk_buffers
                )
        except EarlyVerdict:  # [gating] the verdict is sure: acc holds the chunks looked at
            pass
        row.update(gating_facts(acc, n_chunks))  # [gating] chunk-level ±, chunks_used
        row["seconds"] = round(time.perf_counter() - started, 3)
        return acc.stats()

    def early_limits(self, unit: WorkUnit) -> dict[str, float]:  # [gating]
        """``unit``'s threshold limits (key → value) under --quantbench-early-stop, else {}."""
        if not self.config.early_stop:
            return {}
        limits = self.thresholds.limits_for(unit.name, unit.qtype)
        return {key: limit.value for key, limit in limits.items()}
