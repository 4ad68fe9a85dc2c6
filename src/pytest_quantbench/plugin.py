"""pytest hooks of pytest-quantbench (the ``pytest11`` entry point). Thin: it wires pytest to the
modules that do the work, and imports them lazily so an ordinary test suite pays nothing.

Flow: ``pytest_configure`` merges the settings (:mod:`config`) and plans the work units (GGUF
header × selection rules × qtypes) or raises a usage error; ``pytest_collection_modifyitems``
adds one :class:`QuantbenchItem` per unit; an item *measures in setup* (so a broken engine, NaN
logits or a fallback type surface as errors/skips) and *checks thresholds in call* (so a regression
is a failure); the controller gathers each item's ``user_properties`` and writes the CSV tables and
the terminal summary.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pytest

from .config import OPTIONS

if TYPE_CHECKING:  # pragma: no cover
    from .storewriter import StoreWriter

SESSION_KEY = pytest.StashKey["Any"]()
SWEPT_KEY = pytest.StashKey["list"]()
# pytest-xdist's first line of a worker's failure text: "[gw1] linux -- Python 3.11.2 /usr/bin/…"
_XDIST_WORKER_LINE = re.compile(r"^\[gw\d+\] \S+ -- Python ")
REPORTER_KEY = pytest.StashKey["Any"]()
COMPARE_KEY = pytest.StashKey["Any"]()  # (Reference, fail rules) of --quantbench-compare
# ValueError covers ConfigError, GGUFError, SelectionError, UnknownQTypeError, ThresholdsError,
# KLDBaseFormatError and non-finite logits; RuntimeError the engine's EngineError and
# EngineLibraryError; OSError file access.
_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, RuntimeError)
PLANNED_KEY = pytest.StashKey["Any"]()  # every shard's units (the tables' rows and columns)
#: The cache directory of a host when --quantbench-cache-dir is not given.
CACHE_ENV = "QUANTBENCH_CACHE_DIR"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("quantbench", "pytest-quantbench: per-tensor quantization benchmarks")
    for opt in OPTIONS:
        # argparse %-formats help texts ("LIST[N % len(LIST)]" would crash pytest --help)
        kwargs: dict[str, Any] = {
            "dest": opt.dest,
            "default": None,
            "help": opt.help.replace("%", "%%"),
        }
        if opt.kind == "list" and opt.name == "tensors":
            kwargs.update(nargs="+", action="extend", metavar="RULE")
        elif opt.kind == "groups":
            kwargs.update(nargs="+", action="extend", metavar="REGEX[,REGEX]")
        elif opt.kind == "paths":
            kwargs.update(nargs="+", action="extend", metavar="PATH")
        elif opt.kind == "list":
            kwargs.update(action="append", metavar="LIST")
        elif opt.kind == "bool":
            kwargs.update(action="store_const", const=True)
        else:
            kwargs["metavar"] = opt.kind.upper() if opt.kind != "path" else "PATH"
        group.addoption(opt.flag, **kwargs)
        ini_type: Literal["linelist", "string"] = (
            "linelist" if opt.kind in ("list", "groups", "paths") else "string"
        )
        parser.addini(opt.dest, opt.help, type=ini_type, default=None)
    group.addoption(
        "--quantbench-config",
        dest="quantbench_config",
        default=None,
        metavar="PATH",
        help="YAML file of quantbench settings (default: quantbench.yaml in the "
        "rootdir, if present)",
    )
    group.addoption(
        "--quantbench-shard",
        dest="quantbench_shard",
        default=None,
        metavar="I/N",
        help="keep share I of N of the planned items (cost-balanced, the same on "
        "every host and rerun), or 'auto' from SLURM_ARRAY_TASK_ID/"
        "SLURM_ARRAY_TASK_COUNT or JOB_COMPLETION_INDEX/QUANTBENCH_SHARD_COUNT",
    )


def _build_config(config: pytest.Config):
    from .config import DEFAULT_CONFIG_FILE, build_config

    invocation = Path(config.invocation_params.dir)
    cfg_file = config.getoption("quantbench_config")
    return build_config(
        config.getoption,
        lambda dest: config.getini(dest),
        invocation_dir=invocation,
        ini_dir=Path(config.inipath).parent if config.inipath else config.rootpath,
        config_file=(invocation / cfg_file) if cfg_file else None,
        default_config_file=config.rootpath / DEFAULT_CONFIG_FILE,
    )


def _cache_dir(config: pytest.Config, qb_config) -> Path:
    if qb_config.cache_dir is not None:
        path = qb_config.cache_dir
    elif os.environ.get(CACHE_ENV):  # a host's own local cache (e.g. --tx ...//env:CACHE_ENV=DIR)
        path = Path(os.environ[CACHE_ENV])
    elif getattr(config, "cache", None) is not None:
        path = config.cache.mkdir("quantbench")
    else:
        path = config.rootpath / ".pytest_cache" / "d" / "quantbench"
    path.mkdir(parents=True, exist_ok=True)
    return path


MARKER = (
    "quantbench(tensor, qtype, layer, kind): a pytest-quantbench item; select with "
    '-m quantbench, or exactly by argument, e.g. -m "quantbench(layer=1)" or '
    "-m \"quantbench(qtype='q4_0') and quantbench(kind='attn_v')\""
)


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    started = time.time()  # before any long step: what the summary calls "in this run"
    config.addinivalue_line("markers", MARKER)  # always: --markers and --strict-markers know it
    # the quantbench fixture (issue 18), in every run; fixture.py imports only pytest
    from .fixture import register

    register(config, lambda: config.stash.get(SESSION_KEY, None), _builtin)
    try:
        qb_config = _build_config(config)
        if qb_config is None:
            return
        from .report import check_csv_metrics

        check_csv_metrics(qb_config.csv_metrics)
        from .planfacts import types_needing_imatrix
        from .planning import plan_units
        from .session import QuantbenchSession

        _progress_to_terminal(config)

        numprocesses = getattr(config.option, "numprocesses", None)
        n_workers = int(
            os.environ.get("PYTEST_XDIST_WORKER_COUNT")
            or (numprocesses if isinstance(numprocesses, int) else 0)
            or 1
        )
        cache_dir = _cache_dir(config, qb_config)
        if not hasattr(config, "workerinput"):  # the cache is opened: a killed run's temp files
            from .cachefiles import sweep_stale_temps

            config.stash[SWEPT_KEY] = sweep_stale_temps(cache_dir)
        session = QuantbenchSession(qb_config, cache_dir, n_workers)
        session.command = " ".join(
            shlex.quote(a) for a in ["pytest", *config.invocation_params.args]
        )
        session.units = plan_units(
            session,
            warn=lambda msg: config.issue_config_time_warning(
                pytest.PytestWarning(msg), stacklevel=2
            ),
        )
        # a type that needs an importance matrix gets one computed when none is given (from
        # the units of every shard: all shards of a run share the imatrix identity)
        session.inputs.imatrix_needed_by = types_needing_imatrix(
            session.units, session.model_header, qb_config.allow_fallback
        )
        if session.inputs.gpu_problem and not hasattr(config, "workerinput"):
            config.issue_config_time_warning(
                pytest.PytestWarning(f"quantbench: {session.inputs.gpu_problem}"), stacklevel=2
            )
        config.stash[PLANNED_KEY] = session.units
        session.units = _shard_units(config, session)
        if not hasattr(config, "workerinput"):
            _check_separate_path_args(config)
        _ = session.thresholds  # a bad thresholds file is a usage error now, not an item failure
        session.validate_inputs()
        if not hasattr(config, "workerinput"):  # not in workers: a baseline being written by
            from .diskspace import check_cache_space  # one of them takes space already

            check_cache_space(session.inputs.cache_plan)
        if qb_config.compare is not None:  # another corpus, n_ctx… is a usage error now
            config.stash[COMPARE_KEY] = _load_comparison(session)
    except _USER_ERRORS as exc:  # config, GGUF, selection, qtype, thresholds, corpus, and the
        raise pytest.UsageError(str(exc)) from None  # engine refusing the model or library
    config.stash[SESSION_KEY] = session
    from .faults import install_fault_reports  # a crashed xdist worker's engine stderr on its item

    install_fault_reports(config, session, QuantbenchItem)
    from .storewriter import HandoffStore, worker_lookup

    if hasattr(config, "workerinput"):  # items measure here; the controller stores their rows
        session.results.store = HandoffStore(worker_lookup(config.workerinput))
    else:
        import secrets

        from .baseline import RUN_TOKEN_ENV

        os.environ[RUN_TOKEN_ENV] = secrets.token_hex(8)  # one id per run, inherited by workers
        _sigterm_as_interrupt()
        reporter = ResultCollector(config, session, started)
        config.stash[REPORTER_KEY] = reporter
        config.pluginmanager.register(reporter, "quantbench-reporter")
        session.results.store = HandoffStore(
            (lambda key: None) if session.config.rerun else reporter.store.get
        )


def _shard_units(config: pytest.Config, session) -> list:
    """The units of ``--quantbench-shard`` (all of them without it), see :mod:`shard`."""
    from .shard import parse_shard, select_shard, unit_cost

    shard = parse_shard(config.getoption("quantbench_shard"))
    if shard is None:
        return session.units
    cost = unit_cost(session.model_header, session.run_identity.chunks)
    return select_shard(session.units, shard, cost, lambda u: u.id)


def _check_separate_path_args(config: pytest.Config) -> None:
    """xdist with ``--tx`` (other than a plain popen) aborts with an internal error about rsync
    roots when a path option's value is a separate argument that exists (xdist #971): say so."""
    specs = config.getoption("tx", None) or []
    if not any(not s.startswith(("popen", "2*popen")) or "chdir=" in s for s in specs):
        return
    import itertools

    flags = {opt.flag for opt in OPTIONS if opt.kind == "path"} | {"--quantbench-config"}
    args = [str(a) for a in config.invocation_params.args]
    for flag, value in itertools.pairwise(args):
        if flag in flags and Path(config.invocation_params.dir, value).exists():
            raise pytest.UsageError(
                f"{flag} {value}: with --tx workers write the path in the "
                f"same argument, {flag}={value} (pytest-xdist takes a "
                "separate path argument for a test path to send to the "
                "hosts, and stops)"
            )


def _current_identity(session) -> dict[str, Any]:
    """This run's identity columns, as result rows carry them (the imatrix identity included)."""
    return {**session.run_identity.as_row(), "imatrix": session.imatrix_identity or ""}


def _load_comparison(session):
    """The reference run and the fail rules of --quantbench-compare(-fail). Raises CompareError."""
    from .compare import load_reference, parse_fail_rules
    from .report import comparable_metrics

    cfg = session.config
    reference = load_reference(cfg.compare, _current_identity(session))
    return reference, parse_fail_rules(cfg.compare_fail, comparable_metrics())


def _progress_to_terminal(config: pytest.Config) -> None:
    """Long steps (:mod:`progress`) print through pytest's terminal writer in this process;
    nothing under ``-q`` or in an xdist worker (pytest shows no worker terminal output)."""
    from . import progress

    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or hasattr(config, "workerinput") or config.get_verbosity() < 0:
        progress.set_writer(None)
        return
    capture = config.pluginmanager.get_plugin("capturemanager")

    def write(line: str) -> None:  # items measure with output captured: step outside of it
        with (
            capture.global_and_fixture_disabled()
            if capture is not None
            else contextlib.nullcontext()
        ):
            reporter.write_line(line)

    progress.set_writer(write)


def _sigterm_as_interrupt() -> None:
    """Treat SIGTERM like Ctrl-C in the controller (when nobody else handles it), so a terminated
    run still ends its session: the tables are rewritten, complete, from what was measured."""
    import signal
    import threading

    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    ):

        def interrupt(signum, frame):
            raise KeyboardInterrupt(f"signal {signum} (SIGTERM)")

        signal.signal(signal.SIGTERM, interrupt)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A measured row leaves its process on a report (:mod:`storewriter`): an item's on its setup
    report, a test's ``quantbench`` fixture measurements on its call report; the report carries
    {row suffix: payload} (suffix "" or ``#n``, as :func:`fixture.measurement_rows` names rows)."""
    report = yield
    from .storewriter import FIXTURE_PAYLOADS, REPORT_ATTR, handoff

    if isinstance(item, QuantbenchItem) and call.when == "setup":
        payload = handoff(item._session(), item.unit.name, item.unit.qtype)
        if payload is not None:
            setattr(report, REPORT_ATTR, {"": payload})
    elif call.when == "call" and getattr(item, FIXTURE_PAYLOADS, None):
        setattr(report, REPORT_ATTR, getattr(item, FIXTURE_PAYLOADS))
    return report


def pytest_unconfigure(config: pytest.Config) -> None:
    session = config.stash.get(SESSION_KEY, None)
    if session is not None:
        from .progress import set_writer

        set_writer(None)
        session.close()
    reporter = config.stash.get(REPORTER_KEY, None)
    if reporter is not None:
        reporter.store.close()


def pytest_report_header(config: pytest.Config) -> list[str] | None:
    session = config.stash.get(SESSION_KEY, None)
    if session is None:
        return None
    from .cachefiles import sweep_lines
    from .planfacts import fallback_notes

    notes = session.thresholds.notes if config.get_verbosity() > 0 else ()
    lines = [
        *session.header_lines(),
        *sweep_lines(config.stash.get(SWEPT_KEY, [])),
        f"quantbench items: {len(session.units)}",
        *(f"quantbench thresholds: {note}" for note in notes),
        *(
            f"quantbench note: {note}"
            for note in fallback_notes(
                session.units, session.model_header, session.config.allow_fallback
            )
        ),
    ]
    if COMPARE_KEY in config.stash:
        lines += config.stash[COMPARE_KEY][0].header_lines(_current_identity(session))
    if session.config.early_stop:
        lines.append(
            f"quantbench early stop: items with limits are looked at after 4, 8, 16 … "
            f"chunks, {session.config.early_stop_confidence:.4g} overall confidence"
        )
    return lines


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    """Add the quantbench collector beside the session's own top-level nodes."""
    report = yield
    if (
        isinstance(collector, pytest.Session)
        and SESSION_KEY in collector.config.stash
        and report.passed
    ):
        model = collector.config.stash[SESSION_KEY].model_path
        report.result.append(
            QuantbenchCollector.from_parent(
                collector, name="quantbench", nodeid="quantbench", path=model
            )
        )
    return report


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Two things on the collected items. A configured run without items (no qtypes, variants or
    recipes) measures only through the ``quantbench`` fixture: a usage error when no collected
    test uses it (a warning in an xdist worker: the controller does not collect, and a worker's
    usage error would crash it). With prefix reuse on, the quantbench items run layer-major
    (full-model units first, then by start layer; a stable sort of the same collection, so every
    xdist worker gets the same order), so consecutive items of a worker share a tail; other items
    keep their places."""
    session = config.stash.get(SESSION_KEY, None)
    if session is None:
        return
    if not session.units and not any(
        "quantbench" in getattr(item, "fixturenames", ()) for item in items
    ):
        if hasattr(config, "workerinput"):
            import warnings

            warnings.warn(pytest.PytestWarning(NO_QTYPES), stacklevel=1)
            return
        raise pytest.UsageError(NO_QTYPES)
    if not session.prefix.active:
        return
    from .prefix import layer_major, start_layer

    slots = [i for i, item in enumerate(items) if isinstance(item, QuantbenchItem)]
    ordered = layer_major(
        [item for item in items if isinstance(item, QuantbenchItem)],
        lambda item: start_layer(item.unit.tensors),
    )
    for i, item in zip(slots, ordered, strict=True):
        items[i] = item


NO_QTYPES = (
    "no qtypes given: pass --quantbench-qtypes (e.g. --quantbench-qtypes=q4_0,q8_0), "
    "--quantbench-variant FILE.gguf or --quantbench-recipe FILE.recipe, or set qtypes "
    "in quantbench.yaml or quantbench_qtypes in ini, or use the quantbench fixture in a "
    "test"
)


class QuantbenchCollector(pytest.Collector):
    """Yields one :class:`QuantbenchItem` per planned work unit, in the planned (sorted) order."""

    def collect(self):
        for unit in self.config.stash[SESSION_KEY].units:
            # The node id is given as its text so pytest parses it as it parses the ids that
            # --lf, --ff and --sw read back from its cache (pytest 9: path, names, [params]);
            # built from the parent it would keep "[q4_0]" inside the name and never match them.
            yield QuantbenchItem.from_parent(
                self, name=unit.id, unit=unit, nodeid=f"{self.nodeid}::{unit.id}"
            )


class QuantbenchItem(pytest.Item):
    """One (tensor or group, qtype) work unit: measured in setup, judged in call."""

    def __init__(self, *, unit, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        from .selection import layer_of, tensor_kind

        self.unit = unit
        self.measured: dict[str, Any] | None = None
        self.row: dict[str, Any] = {}
        tensor = unit.tensors[0]
        layer, kind = layer_of(tensor), tensor_kind(tensor)
        if unit.name in ("variant", "recipe"):  # a whole file: tensors = (its sha256,)
            layer, kind = None, unit.name
        # No extra -k keywords: -k matches substrings ("layer1" would select layers 10-19 too,
        # "q4_0" q4_0_r8); the marker's arguments select exactly: -m "quantbench(layer=1)".
        self.add_marker(
            pytest.mark.quantbench(tensor=unit.name, qtype=unit.qtype, layer=layer, kind=kind)
        )

    def _session(self):
        return self.config.stash[SESSION_KEY]

    def setup(self) -> None:
        from .measure import ItemSkip

        qb = self._session()
        row = self.row = {**qb.identity_row(self.unit), "imatrix": qb.imatrix_identity or ""}
        error: str | None = None
        try:
            self.measured = qb.measure(self.unit, row)
            row.update(self.measured)
            qb.write_item_log(self.unit, row, self.measured)
            unmeasured = [
                v
                for v in qb.thresholds.check(self.unit.name, self.unit.qtype, self.measured)
                if not v.measured
            ]
            if unmeasured:  # a limit that cannot be checked is a broken setup, not a pass/fail
                raise ValueError("\n".join(v.message for v in unmeasured))
        except ItemSkip as exc:
            row["reason"] = str(exc)
            raise pytest.skip.Exception(str(exc), _use_item_location=True) from None
        except _USER_ERRORS as exc:  # an item error with the finding, not a deep traceback
            error = row["reason"] = f"{type(exc).__name__}: {exc}"
        finally:
            self.user_properties.extend((k, _builtin(v)) for k, v in row.items())
        if error is not None:
            pytest.fail(error, pytrace=False)  # outside the except: no chained traceback

    def runtest(self) -> None:
        qb = self._session()
        assert self.measured is not None  # runtest follows a setup that measured
        measured = {**self.row, **self.measured}  # the row has the chunk-level ±
        messages = [
            v.message for v in qb.thresholds.check(self.unit.name, self.unit.qtype, measured)
        ]
        if messages and self.row.get("stopped_early"):
            messages.append(
                f"(early verdict after {self.row.get('chunks_used')} of "
                f"{self.row.get('chunks')} chunks, --quantbench-early-stop)"
            )
        if COMPARE_KEY in self.config.stash:
            reference, rules = self.config.stash[COMPARE_KEY]
            props, failures = reference.compare(self.unit.tensors, self.unit.qtype, measured, rules)
            self.user_properties.extend(props.items())
            messages += failures
        if messages:
            message = "\n".join(messages)
            self.user_properties.append(("reason", message))  # the row's reason: value, limit, rule
            pytest.fail(message, pytrace=False)

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, _USER_ERRORS) and not isinstance(
            excinfo.value, AssertionError
        ):
            return f"{type(excinfo.value).__name__}: {excinfo.value}"
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self):
        return self.path, 0, f"quantbench {self.name}"


_BUILTIN = (bool, int, float, str)


def _builtin(value: Any) -> Any:
    """``value`` as a builtin ``bool``/``int``/``float``/``str`` or None: reports travel through
    execnet, which serializes exact builtin types only. numpy scalars (``numpy.float64``
    subclasses ``float``, ``numpy.bool_`` nothing) and 0-d arrays become their ``.item()``;
    other subclasses of a builtin (an ``IntEnum``, a ``str`` subclass) their builtin value;
    anything else its ``str``. Raises nothing."""
    if value is None or type(value) in _BUILTIN:
        return value
    item = getattr(value, "item", None)
    if callable(item):
        try:
            value = item()
        except (TypeError, ValueError):  # an array of several values, or an unrelated .item
            return str(value)
        if value is None or type(value) in _BUILTIN:
            return value
    for kind in _BUILTIN:  # bool first: it subclasses int
        if isinstance(value, kind):
            return kind(value)
    return str(value)


class ResultCollector:
    """Controller-side: gathers result rows from reports, writes the tables, prints the summary."""

    def __init__(self, config: pytest.Config, session, started: float) -> None:
        from .store import STORE_FILE, ResultsStore

        self.config = config
        self.session = session
        self.store = ResultsStore(session.config.output / STORE_FILE)  # its only writer
        self.rows: dict[str, dict[str, Any]] = {}
        self.written: list[Path] = []
        self.write_error: str | None = None
        self._table_rows: list[dict[str, Any]] | None = None
        self.started = started  # the run's start (Unix time): what was computed in this run
        self._flushed_at = time.monotonic()  # tables are rewritten mid-run from this on
        self.flush_error: str | None = None  # the last mid-run rewrite's error, if it failed
        self._writer: StoreWriter | None = None
        self._refused: dict[str, str] = {}  # nodeid -> why its row was not stored

    @property
    def writer(self):
        """The :class:`~pytest_quantbench.storewriter.StoreWriter` (its run key is computed on
        first use, not at configure time)."""
        if self._writer is None:
            from .resultset import run_record
            from .storewriter import StoreWriter

            self._writer = StoreWriter(
                self.store,
                self.session.results.run_key,
                lambda: run_record(self.session, self.config.stash[PLANNED_KEY]),
            )
            self._writer.controller_identity = self.session.run_identity.as_row()
        return self._writer

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node) -> None:
        """xdist: hand each worker the stored rows of this run; it reuses them, measures the rest."""
        from .storewriter import WORKERINPUT_KEY

        if "_handed" not in self.__dict__:
            self._handed = {} if self.session.config.rerun else self.store.items(self.writer.run)
        node.workerinput[WORKERINPUT_KEY] = self._handed

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # an item's row, or the rows of a test's fixture measurements
        from .fixture import measurement_rows
        from .store import StoreError
        from .storewriter import REPORT_ATTR, MixedBaselinesError

        measured = measurement_rows(dict(report.user_properties))
        if not measured:
            return
        for suffix, payload in (getattr(report, REPORT_ATTR, None) or {}).items():
            try:
                self.writer.accept(report.nodeid + suffix, payload, _worker_name(report))
            except MixedBaselinesError as exc:  # fail the item, stop the run
                self._refused[report.nodeid] = str(exc)
                self._stop(str(exc))
        refused = self._refused.get(report.nodeid)
        if refused is not None:  # its setup and call reports fail with the finding
            report.outcome, report.longrepr = "failed", refused
        if report.when == "call" or (report.when == "setup" and not report.passed):
            status = "error" if report.when == "setup" and report.failed else report.outcome
            for suffix, props in measured:
                if refused is not None:
                    props = {**props, "reason": refused}
                row = {**props, "status": status, "nodeid": report.nodeid}
                if report.failed and "reason" not in row:
                    row["reason"] = failure_message(report)
                self.rows[report.nodeid + suffix] = row
                outcome: dict[str, Any] = {k: row[k] for k in ("status", "nodeid") if k in row}
                if "reason" in row and "reason" not in props:
                    outcome["reason"] = row["reason"]
                try:
                    self.writer.finish(report.nodeid + suffix, outcome)
                except StoreError as exc:
                    self.write_error = str(exc)
                    self._stop(str(exc))
            self._flush_if_due()

    def _flush_if_due(self) -> None:
        """Rewrite the tables when ``--quantbench-flush-minutes`` have passed since the last
        write (0: after every item), so a long run has current CSVs before it ends. Each file is
        replaced atomically; a failed write is reported at the end, the run goes on."""
        interval = self.session.config.flush_minutes * 60.0
        if time.monotonic() - self._flushed_at < interval:
            return
        self.flush_error = self._write_tables(self._merge_stored_rows())
        self._flushed_at = time.monotonic()

    def _stop(self, why: str) -> None:
        dsession = self.config.pluginmanager.getplugin("dsession")
        if dsession is not None:
            dsession.shouldstop = why
        self.session_shouldfail = why

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if getattr(self, "session_shouldfail", None):
            session.exitstatus = pytest.ExitCode.INTERNAL_ERROR
        rows = self.table_rows()
        error = self._write_tables(rows)
        if error is None and rows:
            try:
                self.written += _pictures_and_summary(
                    self.session, rows, self.session.config.output
                )
            except OSError as exc:
                error = str(exc)
        if error is not None:
            self.write_error = error
            session.exitstatus = pytest.ExitCode.INTERNAL_ERROR

    def _write_tables(self, rows: list[dict[str, Any]]) -> str | None:
        """Write every table from ``rows`` (each file atomically, through
        :func:`resultset.write_run_tables`); the error text when one cannot be written, else
        None."""
        from .resultset import write_run_tables

        if not rows:
            return None
        try:
            self.writer.record_run()
            self.written = write_run_tables(rows, self.session.config.output, self.writer._record())
        except OSError as exc:
            return str(exc)
        return None

    def table_rows(self) -> list[dict[str, Any]]:
        """This session's rows, plus every row the results store holds for the same settings
        (marked ``status="stored"``): the tables show all results, as the suite's collect step.
        Read once, at the session's end (the tables and the summary use the same rows)."""
        if self._table_rows is None:
            self._table_rows = self._merge_stored_rows()
        return self._table_rows

    def _merge_stored_rows(self) -> list[dict[str, Any]]:
        rows = {(r["tensor"], r["qtype"]): r for r in self.rows.values()}
        if not rows:
            return []
        try:
            stored = self.store.rows(self.session.results.run_key)
        except OSError as exc:
            self.write_error = str(exc)
            stored = []
        for item in stored:
            key = (item["tensor"], item["qtype"])
            if key not in rows:
                rows[key] = {
                    **_current_identity(self.session),
                    "tensor": item["tensor"],
                    "qtype": item["qtype"],
                    **item["facts"],
                    **item["stats"],
                    "status": "stored",
                    "reused": True,
                }
        return list(rows.values())

    def pytest_terminal_summary(self, terminalreporter) -> None:
        from .prefix import summary_lines
        from .report import format_summary

        rows = self.table_rows()
        if not rows:
            return
        tr = terminalreporter
        tr.section("quantbench")
        for line in self.session.inputs.model_summary_lines(self.started):
            tr.write_line(line)
        for line in self.session.baseline_lines():
            tr.write_line(line)
        for line in self.session.inputs.imatrix_summary_lines(self.started):
            tr.write_line(line)
        session_rows = [r for r in rows if r.get("status") != "stored"]  # this run's items
        failed = [r for r in session_rows if str(r.get("reason", "")).startswith("BaselineError")]
        if failed:  # one message for the items that all stopped on the same baseline failure
            tr.write_line(
                f"{failed[0]['reason']} ({len(failed)} item(s) errored at once)", red=True
            )
        for line in format_summary(session_rows, self.session.config.top):
            tr.write_line(line)
        for line in summary_lines(session_rows):
            tr.write_line(line)
        reused = sum(1 for r in rows if r.get("reused") and r.get("status") != "stored")
        stored = sum(1 for r in rows if r.get("status") == "stored")
        if reused or stored:
            tr.write_line(
                f"{reused} item(s) reused from the results store "
                f"{self.store.path} (--quantbench-rerun measures again); "
                f"{stored} more stored result(s) of these settings are in the tables"
            )
        impure = [r for r in session_rows if r.get("fallback") and r.get("status") != "skipped"]
        if impure:
            tr.write_line(
                f"{len(impure)} item(s) measured under a fallback type (impure, "
                f"--quantbench-allow-fallback): their numbers are for written_type, "
                f"e.g. {impure[0]['tensor']}[{impure[0]['qtype']}] as "
                f"{impure[0].get('written_type')}; results.csv column fallback",
                yellow=True,
            )
        early = [r for r in session_rows if str(r.get("stopped_early")) == "True"]
        if early:
            tr.write_line(
                f"{len(early)} item(s) stopped early (--quantbench-early-stop; "
                "chunks_used and early_verdict in results.csv; stored under their own "
                "key, never reused by a full-chunk run), e.g. "
                f"{early[0]['tensor']}[{early[0]['qtype']}] after "
                f"{early[0].get('chunks_used')} chunks: {early[0].get('early_verdict')}"
            )
        if COMPARE_KEY in self.config.stash:
            from .compare import format_comparison

            reference = self.config.stash[COMPARE_KEY][0]
            missing = reference.missing((u.tensors, u.qtype, u.id) for u in self.session.units)
            for line in format_comparison(
                session_rows, reference, missing, self.session.config.top
            ):
                tr.write_line(line)
        skipped = [r for r in rows if r.get("status") == "skipped"]
        if skipped:
            tr.write_line(
                f"{len(skipped)} skipped, e.g. {skipped[0]['tensor']}[{skipped[0]['qtype']}]:"
                f" {skipped[0].get('reason', '')} (-rs lists all)"
            )
        if self.write_error:
            tr.write_line(f"could not write the result tables: {self.write_error}", red=True)
        for path in self.written:
            tr.write_line(f"wrote {path}")


def failure_message(report: pytest.TestReport) -> str:
    """The failure's own message, whole: the crash message of a traceback (``E`` lines'
    exception and text), else the report's text without the ``[gw1] linux -- Python …`` line
    pytest-xdist puts first on a worker's report. Raises nothing."""
    crash = getattr(getattr(report, "longrepr", None), "reprcrash", None)
    if crash is not None and getattr(crash, "message", None):
        return str(crash.message)
    lines = str(getattr(report, "longreprtext", "")).splitlines()
    if lines and _XDIST_WORKER_LINE.match(lines[0]):
        lines = lines[1:]
    return "\n".join(lines).strip()


def _pictures_and_summary(session, rows, out: Path) -> list[Path]:
    """``heatmap-<qtype>.png`` / ``kld_vs_bpw.png`` (unless --quantbench-plots=off) and
    ``summary.md`` (also appended to $GITHUB_STEP_SUMMARY when set). Raises OSError."""
    import math

    from .budget import group_bpw
    from .plots import write_plots
    from .summary import write_summary

    pictures: list[Path] = []
    if session.config.plots != "off":
        header = session.model_header

        def bpw_of(row):  # a whole file's own bpw, else the group's at its qtype
            value = row.get("bpw")
            if isinstance(value, (int, float)) and math.isfinite(value):
                return float(value)
            return group_bpw(header, row)

        pictures = write_plots(rows, out, bpw_of=bpw_of)
    summary = write_summary(
        rows,
        out,
        session.header_lines(),
        pictures,
        top=session.config.top,
        step_summary=os.environ.get("GITHUB_STEP_SUMMARY"),
    )
    return [*pictures, summary]


def _worker_name(report) -> str:
    """Who ran ``report``'s item: ``gw0 (ssh=host//…)`` under xdist, else ``this process``."""
    node = getattr(report, "node", None)
    if node is None:
        return "this process"
    spec = getattr(getattr(node, "gateway", None), "spec", None)
    return f"{node.gateway.id} ({getattr(spec, '_spec', spec)})"
