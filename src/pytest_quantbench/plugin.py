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
import shlex
import time
from pathlib import Path
from typing import Any

import pytest

from .config import OPTIONS

SESSION_KEY = pytest.StashKey["Any"]()
REPORTER_KEY = pytest.StashKey["Any"]()
# ValueError covers ConfigError, GGUFError, SelectionError, UnknownQTypeError, ThresholdsError,
# KLDBaseFormatError and non-finite logits; RuntimeError the engine's EngineError and
# EngineLibraryError; OSError file access.
_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, RuntimeError)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("quantbench", "pytest-quantbench: per-tensor quantization benchmarks")
    for opt in OPTIONS:
        kwargs: dict[str, Any] = {"dest": opt.dest, "default": None, "help": opt.help}
        if opt.kind == "list" and opt.name == "tensors":
            kwargs.update(nargs="+", action="extend", metavar="RULE")
        elif opt.kind == "groups":
            kwargs.update(nargs="+", action="extend", metavar="REGEX[,REGEX]")
        elif opt.kind == "list":
            kwargs.update(action="append", metavar="LIST")
        elif opt.kind == "bool":
            kwargs.update(action="store_const", const=True)
        else:
            kwargs["metavar"] = opt.kind.upper() if opt.kind != "path" else "PATH"
        group.addoption(opt.flag, **kwargs)
        ini_type = "linelist" if opt.kind in ("list", "groups") else "string"
        parser.addini(opt.dest, opt.help, type=ini_type, default=None)
    group.addoption("--quantbench-config", dest="quantbench_config", default=None, metavar="PATH",
                    help="YAML file of quantbench settings (default: quantbench.yaml in the "
                         "rootdir, if present)")


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
    elif getattr(config, "cache", None) is not None:
        path = config.cache.mkdir("quantbench")
    else:
        path = config.rootpath / ".pytest_cache" / "d" / "quantbench"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    started = time.time()  # before any long step: what the summary calls "in this run"
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
        n_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT")
                        or (numprocesses if isinstance(numprocesses, int) else 0) or 1)
        session = QuantbenchSession(qb_config, _cache_dir(config, qb_config), n_workers)
        session.command = " ".join(shlex.quote(a) for a in ["pytest", *config.invocation_params.args])
        session.units = plan_units(session, warn=lambda msg: config.issue_config_time_warning(
            pytest.PytestWarning(msg), stacklevel=2))
        # a type that needs an importance matrix gets one computed when none is given
        session.inputs.imatrix_needed_by = types_needing_imatrix(
            session.units, session.model_header, qb_config.allow_fallback)
        if session.inputs.gpu_problem and not hasattr(config, "workerinput"):
            config.issue_config_time_warning(pytest.PytestWarning(
                f"quantbench: {session.inputs.gpu_problem}"), stacklevel=2)
        session.thresholds  # a bad thresholds file is a usage error now, not an item failure
        session.validate_inputs()
    except _USER_ERRORS as exc:  # config, GGUF, selection, qtype, thresholds, corpus, and the
        raise pytest.UsageError(str(exc)) from None  # engine refusing the model or library
    config.stash[SESSION_KEY] = session
    from .faults import install_fault_reports  # a crashed xdist worker's engine stderr on its item
    install_fault_reports(config, session, QuantbenchItem)
    config.addinivalue_line("markers", "quantbench(tensor, qtype, layer, kind): a quantbench item")
    if not hasattr(config, "workerinput"):
        import secrets

        from .baseline import RUN_TOKEN_ENV

        os.environ[RUN_TOKEN_ENV] = secrets.token_hex(8)  # one id per run, inherited by workers
        _sigterm_as_interrupt()
        reporter = ResultCollector(config, session, started)
        config.stash[REPORTER_KEY] = reporter
        config.pluginmanager.register(reporter, "quantbench-reporter")


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
        with (capture.global_and_fixture_disabled() if capture is not None
              else contextlib.nullcontext()):
            reporter.write_line(line)

    progress.set_writer(write)


def _sigterm_as_interrupt() -> None:
    """Treat SIGTERM like Ctrl-C in the controller (when nobody else handles it), so a terminated
    run still ends its session: the tables are rewritten, complete, from what was measured."""
    import signal
    import threading

    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL):
        def interrupt(signum, frame):
            raise KeyboardInterrupt(f"signal {signum} (SIGTERM)")

        signal.signal(signal.SIGTERM, interrupt)


def pytest_unconfigure(config: pytest.Config) -> None:
    session = config.stash.get(SESSION_KEY, None)
    if session is not None:
        from .progress import set_writer

        set_writer(None)
        session.close()


def pytest_report_header(config: pytest.Config) -> list[str] | None:
    session = config.stash.get(SESSION_KEY, None)
    if session is None:
        return None
    from .planfacts import fallback_notes

    notes = fallback_notes(session.units, session.model_header, session.config.allow_fallback)
    return (session.header_lines() + [f"quantbench items: {len(session.units)}"]
            + [f"quantbench note: {note}" for note in notes])


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    """Add the quantbench collector beside the session's own top-level nodes."""
    report = yield
    if (isinstance(collector, pytest.Session) and SESSION_KEY in collector.config.stash
            and report.passed):
        model = collector.config.stash[SESSION_KEY].model_path
        report.result.append(QuantbenchCollector.from_parent(collector, name="quantbench",
                                                             nodeid="quantbench", path=model))
    return report


class QuantbenchCollector(pytest.Collector):
    """Yields one :class:`QuantbenchItem` per planned work unit, in the planned (sorted) order."""

    def collect(self):
        for unit in self.config.stash[SESSION_KEY].units:
            yield QuantbenchItem.from_parent(self, name=unit.id, unit=unit)


class QuantbenchItem(pytest.Item):
    """One (tensor or group, qtype) work unit: measured in setup, judged in call."""

    def __init__(self, *, unit, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        from .selection import layer_of, tensor_kind

        self.unit = unit
        self.measured: dict[str, Any] | None = None
        tensor = unit.tensors[0]
        layer, kind = layer_of(tensor), tensor_kind(tensor)
        self.add_marker(pytest.mark.quantbench(tensor=unit.name, qtype=unit.qtype, layer=layer,
                                               kind=kind))
        self.extra_keyword_matches.update(
            {unit.qtype, kind} | ({f"layer{layer}"} if layer is not None else set()))

    def _session(self):
        return self.config.stash[SESSION_KEY]

    def setup(self) -> None:
        from .measure import ItemSkip

        qb = self._session()
        row = qb.identity_row(self.unit)
        error: str | None = None
        try:
            self.measured = qb.measure(self.unit, row)
            row.update(self.measured)
            qb.write_item_log(self.unit, row, self.measured)
            unmeasured = [v for v in qb.thresholds.check(self.unit.name, self.unit.qtype,
                                                         self.measured) if not v.measured]
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
        violations = qb.thresholds.check(self.unit.name, self.unit.qtype, self.measured)
        if violations:
            pytest.fail("\n".join(v.message for v in violations), pytrace=False)

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, _USER_ERRORS) and not isinstance(excinfo.value, AssertionError):
            return f"{type(excinfo.value).__name__}: {excinfo.value}"
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self):
        return self.path, 0, f"quantbench {self.name}"


def _builtin(value: Any) -> Any:
    """Reports travel through execnet, which accepts builtin types only (no numpy scalars)."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)


class ResultCollector:
    """Controller-side: gathers result rows from reports, writes the tables, prints the summary."""

    def __init__(self, config: pytest.Config, session, started: float) -> None:
        self.config = config
        self.session = session
        self.rows: dict[str, dict[str, Any]] = {}
        self.written: list[Path] = []
        self.write_error: str | None = None
        self._table_rows: list[dict[str, Any]] | None = None
        self.started = started  # the run's start (Unix time): what was computed in this run

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        props = dict(report.user_properties)
        if "qtype" not in props or "model_sha256" not in props:
            return
        if report.when == "call" or (report.when == "setup" and not report.passed):
            status = "error" if report.when == "setup" and report.failed else report.outcome
            row = {**props, "status": status, "nodeid": report.nodeid}
            if report.failed and "reason" not in row:
                row["reason"] = str(getattr(report, "longreprtext", ""))[-500:]
            self.rows[report.nodeid] = row

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        from .report import write_group_files, write_suite_tables

        rows = self.table_rows()
        if not rows:
            return
        units = self.session.units
        tensors = sorted({u.name for u in units} | {r["tensor"] for r in rows}, key=_natural)
        qtypes = sorted({u.qtype for u in units} | {r["qtype"] for r in rows})
        out = self.session.config.output
        try:
            cfg = self.session.config
            self.written = write_suite_tables(
                rows, out, tensors=tensors, qtypes=qtypes, metrics=cfg.csv_metrics,
                ppl_percent=cfg.ppl_percent, baseline_ppl=cfg.baseline_ppl,
                baseline_qtype=cfg.baseline_qtype)
            if self.session.groups:
                self.written += write_group_files(self.session.groups, out,
                                                  baseline=self.session.config.baseline_qtype,
                                                  chunks=self.session.run_identity.chunks)
        except OSError as exc:
            self.write_error = str(exc)
            session.exitstatus = pytest.ExitCode.INTERNAL_ERROR

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
            stored = self.session.store.rows(self.session.run_key)
        except OSError as exc:
            self.write_error = str(exc)
            stored = []
        for item in stored:
            key = (item["tensor"], item["qtype"])
            if key not in rows:
                rows[key] = {**self.session.run_identity.as_row(), "tensor": item["tensor"],
                             "qtype": item["qtype"], **item["facts"], **item["stats"],
                             "status": "stored", "reused": True}
        return list(rows.values())

    def pytest_terminal_summary(self, terminalreporter) -> None:
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
            tr.write_line(f"{failed[0]['reason']} ({len(failed)} item(s) errored at once)",
                          red=True)
        for line in format_summary(session_rows, self.session.config.top):
            tr.write_line(line)
        reused = sum(1 for r in rows if r.get("reused") and r.get("status") != "stored")
        stored = sum(1 for r in rows if r.get("status") == "stored")
        if reused or stored:
            tr.write_line(f"{reused} item(s) reused from the results store "
                          f"{self.session.store.path} (--quantbench-rerun measures again); "
                          f"{stored} more stored result(s) of these settings are in the tables")
        skipped = [r for r in rows if r.get("status") == "skipped"]
        if skipped:
            tr.write_line(f"{len(skipped)} skipped, e.g. {skipped[0]['tensor']}[{skipped[0]['qtype']}]:"
                          f" {skipped[0].get('reason', '')} (-rs lists all)")
        if self.write_error:
            tr.write_line(f"could not write the result tables: {self.write_error}", red=True)
        for path in self.written:
            tr.write_line(f"wrote {path}")


def _natural(name: str):
    from .selection import natural_key

    return natural_key(name)
