"""What a crashed xdist worker's engine said last, on the controller's report of its item.

A worker that dies in native code (a ``GGML_ASSERT``, a segfault, an ``abort()``) takes its memory
with it: pytest's captured output, the engine log tail kept by
:class:`~pytest_quantbench.engine.bindings.LogTail`. xdist then reports only "worker 'gw0' crashed
while running …". This module keeps the evidence on disk so the controller can show it:

* **worker** (:class:`WorkerFaultRecorder`): around each phase of a quantbench item it points the
  process's fd 2 at a file ``<cache_dir>/tmp/faults-<run>-<worker>.stderr`` (emptied when the item
  starts), so what native code writes with ``fprintf(stderr)`` — ggml prints its asserts that way,
  not through the log callback — lands on disk at once, synchronously, with no thread that could
  die before copying it. After the phase the text is copied to the fd 2 it replaced (pytest's
  capture, or the terminal), so captured output is unchanged. The engine log goes, as it arrives,
  to ``…-<worker>.enginelog`` (the last :data:`RING_BYTES` or so are kept).
* **controller** (:class:`CrashReporter`): tells each worker where to write (``workerinput``);
  in xdist's ``pytest_handlecrashitem`` reads the dead worker's two files (then deletes them) and
  completes xdist's report: its text ends with the last lines the engine wrote to stderr (an
  assert line is kept even when gdb's backtrace followed it) and its last log lines; its phase is
  the one the item died in (``setup``, where items measure, so the crash is an *error*, as every
  engine failure of an item; xdist's own report says ``???`` and counts a failure); its
  ``user_properties`` carry the item's result row with a one-line ``reason``, so the tables list
  the crashed item (status ``error``).

Both halves are registered by :func:`install_fault_reports`, only under xdist. Without xdist a
crash ends the whole run and there is no controller left to report it.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import sys
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

__all__ = [
    "RING_BYTES",
    "CrashReporter",
    "WorkerFaultRecorder",
    "crash_text",
    "install_fault_reports",
    "read_tail",
]

#: How much of each file the controller reads (the end), and about how much engine log is kept.
RING_BYTES = 64 * 1024
#: Lines of engine stderr and of engine log shown on a crash report.
STDERR_LINES = 20
LOG_LINES = 10
#: ``workerinput`` key: the path prefix of the worker's fault files.
WORKERINPUT_KEY = "quantbench_fault_prefix"

# Lines worth showing even when more output followed them (gdb's backtrace after a GGML_ASSERT).
_KEY_LINE = re.compile(
    r"GGML_ASSERT|GGML_ABORT|\berror\b|\bfatal\b|\bfailed\b|\babort|"
    r"segmentation fault|terminate called",
    re.IGNORECASE,
)


def install_fault_reports(
    config: pytest.Config, session: Any, item_type: type[pytest.Item]
) -> None:
    """Register the half of fault reporting this process needs (call from ``pytest_configure``).

    session: the :class:`~pytest_quantbench.session.QuantbenchSession`, with its units planned.
    item_type: the plugin's item class (``plugin.QuantbenchItem``): only its items are recorded
    (passed in, so this module needs nothing of the plugin that registers it).
    A worker registers a :class:`WorkerFaultRecorder` when the controller sent it a file prefix;
    a controller with pytest-xdist loaded registers a :class:`CrashReporter`. Otherwise nothing.
    """
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:
        prefix = workerinput.get(WORKERINPUT_KEY)
        if prefix:
            config.pluginmanager.register(
                WorkerFaultRecorder(prefix, str(workerinput.get("workerid", "gw")), item_type),
                "quantbench-fault-recorder",
            )
    elif config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(CrashReporter(session), "quantbench-crash-reporter")


def _fault_paths(prefix: str, worker_id: str) -> tuple[Path, Path]:
    """(stderr file, engine log file) of one worker."""
    return Path(f"{prefix}-{worker_id}.stderr"), Path(f"{prefix}-{worker_id}.enginelog")


class _LogRing:
    """Appends engine log text to a file as it arrives; rewrites it with the recent text when it
    grows past twice :data:`RING_BYTES`. Never raises: a full disk must not break the engine."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        self.size = 0
        self.recent: deque[bytes] = deque()
        self.recent_size = 0

    def write(self, text: str) -> None:
        """Append ``text`` (engine log, possibly partial lines)."""
        data = text.encode("utf-8", "replace")
        self.recent.append(data)
        self.recent_size += len(data)
        while self.recent_size > RING_BYTES and len(self.recent) > 1:
            self.recent_size -= len(self.recent.popleft())
        try:
            if self.size + len(data) > 2 * RING_BYTES:
                os.ftruncate(self.fd, 0)
                kept = b"".join(self.recent)
                os.write(self.fd, kept)
                self.size = len(kept)
            else:
                os.write(self.fd, data)
                self.size += len(data)
        except OSError:
            pass

    def close(self) -> None:
        """Close the file (it stays on disk)."""
        with contextlib.suppress(OSError):
            os.close(self.fd)


class WorkerFaultRecorder:
    """Worker half: keeps what the engine writes to stderr during each quantbench item, and the
    engine log, in two files the controller reads if this process dies (see the module doc).

    prefix: path prefix from the controller; worker_id: ``gw0``, ``gw1`` …; item_type: the class
    of the items whose stderr is recorded.
    """

    def __init__(self, prefix: str, worker_id: str, item_type: type[pytest.Item]) -> None:
        self.item_type = item_type
        self.stderr_path, self.log_path = _fault_paths(prefix, worker_id)
        self.stderr_path.parent.mkdir(parents=True, exist_ok=True)
        self.stderr_fd = os.open(
            self.stderr_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600
        )
        self.log = _LogRing(self.log_path)
        from .engine.bindings import LogTail

        LogTail.sinks.append(self.log.write)

    @contextlib.contextmanager
    def _stderr_to_file(self, item_start: bool) -> Iterator[None]:
        """Point fd 2 at the stderr file for the duration; then copy what arrived to the old fd 2."""
        _flush_std_streams()
        if item_start:
            with contextlib.suppress(OSError):
                os.ftruncate(self.stderr_fd, 0)
        start = os.fstat(self.stderr_fd).st_size
        saved = os.dup(2)
        os.dup2(self.stderr_fd, 2)
        try:
            yield
        finally:
            _flush_std_streams()
            os.dup2(saved, 2)
            os.close(saved)
            _copy_from(self.stderr_fd, start, 2)

    @pytest.hookimpl(wrapper=True, trylast=True)  # inside pytest's capture wrapper
    def pytest_runtest_setup(self, item: pytest.Item):
        """Record native stderr while the item measures (baseline, model load, swap, eval)."""
        if not isinstance(item, self.item_type):
            return (yield)
        with self._stderr_to_file(item_start=True):
            return (yield)

    @pytest.hookimpl(wrapper=True, trylast=True)
    def pytest_runtest_call(self, item: pytest.Item):
        """Record native stderr while the item checks its thresholds."""
        if not isinstance(item, self.item_type):
            return (yield)
        with self._stderr_to_file(item_start=False):
            return (yield)

    @pytest.hookimpl(wrapper=True, trylast=True)
    def pytest_runtest_teardown(self, item: pytest.Item):
        """Record native stderr while the item tears down."""
        if not isinstance(item, self.item_type):
            return (yield)
        with self._stderr_to_file(item_start=False):
            return (yield)

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        """A worker that ends normally removes its files: nobody needs them."""
        from .engine.bindings import LogTail

        with contextlib.suppress(ValueError):
            LogTail.sinks.remove(self.log.write)
        self.log.close()
        with contextlib.suppress(OSError):
            os.close(self.stderr_fd)
        for path in (self.stderr_path, self.log_path):
            path.unlink(missing_ok=True)


def _flush_std_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _copy_from(src_fd: int, offset: int, dest_fd: int) -> None:
    """Copy ``src_fd`` from ``offset`` to its end onto ``dest_fd`` (best effort)."""
    try:
        while True:
            data = os.pread(src_fd, 1 << 16, offset)
            if not data:
                return
            offset += len(data)
            view = memoryview(data)
            while view:
                view = view[os.write(dest_fd, view) :]
    except OSError:
        pass


def read_tail(path: Path, max_bytes: int = RING_BYTES) -> str:
    """The last ``max_bytes`` of ``path`` as text ("" when it is missing or unreadable)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except OSError:
        return ""
    if size > max_bytes:  # drop the partial first line
        data = data.partition(b"\n")[2]
    return data.decode("utf-8", "replace")


# gdb, which ggml's abort handler runs for a backtrace, prints one of these per frame whose source
# file is absent: noise that would push the assert out of the excerpt.
_GDB_NO_SOURCE = re.compile(r"^\d+\s+\S.*: No such file or directory\.$")


def _lines(text: str) -> list[str]:
    return [
        line.rstrip()
        for line in text.replace("\r", "\n").split("\n")
        if line.strip() and not _GDB_NO_SOURCE.match(line.strip())
    ]


def _stderr_excerpt(lines: list[str], n: int = STDERR_LINES) -> list[str]:
    """The last ``n`` lines, preceded by up to 5 earlier assert/error lines (a GGML_ASSERT is
    followed by gdb's backtrace, which would push it out of the tail)."""
    if len(lines) <= n:
        return lines
    earlier = [line for line in lines[:-n] if _KEY_LINE.search(line)][-5:]
    return [*earlier, "…", *lines[-n:]] if earlier else lines[-n:]


def crash_text(header: str, stderr_text: str, log_text: str) -> tuple[str, str]:
    """(report text, one-line reason) for a crashed item.

    header: xdist's "worker 'gw0' crashed while running '…'"; stderr_text: what the engine wrote to
    fd 2 during the item; log_text: the end of the engine log. The report text is ``header``, then
    the last engine stderr lines and the last engine log lines (each indented); the reason is the
    header plus the most telling line: the last assert/error line of stderr, else its last line,
    else the last log line.
    """
    err_lines, log_lines = _lines(stderr_text), _lines(log_text)[-LOG_LINES:]
    parts = [header]
    if err_lines:
        parts.append("last lines the engine wrote to stderr:")
        parts += [f"    {line}" for line in _stderr_excerpt(err_lines)]
    else:
        parts.append("the engine wrote nothing to stderr during this item")
    if log_lines:
        parts.append("last engine log lines:")
        parts += [f"    {line}" for line in log_lines]
    key = [line for line in err_lines if _KEY_LINE.search(line)]
    if key:
        detail = f"; engine stderr: {key[-1].strip()}"
    elif err_lines:
        detail = f"; engine stderr: {err_lines[-1].strip()}"
    elif log_lines:
        detail = f"; last engine log line: {log_lines[-1].strip()}"
    else:
        detail = "; the engine printed nothing (a crash outside it, or a kill)"
    reason = (header + detail)[:500]
    return "\n".join(parts), reason


class CrashReporter:
    """Controller half: hands each worker its file prefix and completes xdist's crash reports.

    session: the controller's :class:`~pytest_quantbench.session.QuantbenchSession` (units
    planned), for the item's result row.
    """

    def __init__(self, session: Any) -> None:
        self.session = session
        self.dir = Path(session.cache_dir) / "tmp"
        self.token = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.prefix = str(self.dir / f"faults-{self.token}")
        self.units = {f"quantbench::{unit.id}": unit for unit in session.units}
        self.phases: dict[str, str] = {}

    def pytest_configure_node(self, node: Any) -> None:
        """Tell a starting worker where to keep its fault files: only a worker on this machine
        (popen), since the controller reads them; an ssh/socket host's crash gets xdist's report."""
        spec = getattr(getattr(node, "gateway", None), "spec", None)
        if spec is not None and not spec.popen:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        node.workerinput[WORKERINPUT_KEY] = self.prefix

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Remember the last phase each quantbench item finished (to name where it crashed)."""
        if report.nodeid in self.units and report.when in ("setup", "call", "teardown"):
            self.phases[report.nodeid] = report.when

    def _unit(self, nodeid: str):
        return self.units.get(nodeid) or self.units.get(nodeid.rsplit("@", 1)[0])

    def pytest_handlecrashitem(self, crashitem: str, report: pytest.TestReport, sched: Any) -> None:
        """Add the engine's last stderr and log lines to the crash report of a quantbench item,
        make it an error of the phase it died in, and give it the item's result row."""
        unit = self._unit(crashitem)
        if unit is None:
            return
        worker = getattr(getattr(report, "node", None), "gateway", None)
        worker_id = str(getattr(worker, "id", "") or "")
        stderr_text = log_text = ""
        if worker_id:
            stderr_path, log_path = _fault_paths(self.prefix, worker_id)
            stderr_text, log_text = read_tail(stderr_path), read_tail(log_path)
            for path in (stderr_path, log_path):
                path.unlink(missing_ok=True)
        header = str(report.longrepr or f"worker crashed while running {crashitem!r}")
        text, reason = crash_text(header, stderr_text, log_text)
        done = self.phases.get(crashitem)
        report.when = {None: "setup", "setup": "call"}.get(done, "teardown")  # type: ignore[assignment]
        report.longrepr = text
        report.location = (report.location[0], None, f"quantbench {unit.id}")
        try:
            row = dict(self.session.identity_row(unit))
        except Exception:  # the row is a courtesy; the report must go out regardless
            row = {"tensor": unit.name, "qtype": unit.qtype}
        row["reason"] = reason
        report.user_properties = [(key, value) for key, value in row.items()]

    def pytest_sessionfinish(self) -> None:
        """Remove fault files left by workers that ended without a crash report."""
        for path in self.dir.glob(f"faults-{self.token}-*"):
            path.unlink(missing_ok=True)
