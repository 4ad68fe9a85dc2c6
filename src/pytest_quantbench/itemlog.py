"""One suite-style log file per item (``--quantbench-logs DIR``).

The files are named and laid out like the bash suite's per-tensor logs
(``docs/suite-formats.md#log-files`` and ``docs/suite-formats.md#log-header``),
so that the suite's collector ``collect_ppl_results.sh`` (docs/suite-formats.md#value-extraction)
reads the same numbers from them as from a real ``llama-perplexity --kl-divergence`` log. Layout of
a file::

    === Command used to generate this file (recorded: <ts>) ===
    <command>
    === End of command header ===
    quantbench: unit = <tensor or groupN>
    quantbench: qtype = <qtype>
    quantbench: chunks = <chunks>
    quantbench: <key> = <value>          (the caller's facts, in order)
    <llama-perplexity's stdout>

where the stdout part is the per-chunk table when rows are given and the
final statistics block, byte-for-byte as the tool prints them
(:func:`pytest_quantbench.metrics.format_kld_output`,
:meth:`~pytest_quantbench.metrics.KLDStats.format_block`; docs/llama-perplexity.md#kld-output). A
``--kl-divergence`` run prints no ``Final estimate`` line, so none is
written: the collector reads PPL from ``Mean PPL(Q)`` (docs/suite-formats.md#value-extraction, PPL
rule 2).
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from .metrics import KLDStats, format_kld_output
from .report import atomic_write_text

__all__ = ["log_file_name", "format_item_log", "write_item_log"]

_FORBIDDEN_IN_NAME = ("/", "\\", "\0", "\n", "\r")


def _check_chunks(chunks: Any) -> int:
    if isinstance(chunks, bool) or not isinstance(chunks, numbers.Integral) or chunks < 1:
        raise ValueError(f"chunks={chunks!r}: give the number of evaluated chunks, an integer >= 1")
    return int(chunks)


def log_file_name(unit_name: str, qtype: str, chunks: int) -> str:
    """The suite's log file name of one item:
    ``bench_ppl_kld_result.<unit_name>.<qtype>.<chunks>.txt`` (docs/suite-formats.md#log-files),
    e.g. ``bench_ppl_kld_result.blk.3.attn_output.weight.q4_1.4.txt`` or, for a group,
    ``bench_ppl_kld_result.group0.q4_1.4.txt``.

    Inputs: ``unit_name``, the tensor name or group name (``group<N>``);
    ``qtype``, as in the CSV rows; ``chunks``, the number of evaluated chunks
    (int ≥ 1; part of every suite file name). Output: the bare file name.

    Raises :class:`ValueError` naming the input when ``unit_name`` or
    ``qtype`` is empty or holds a path separator, NUL or line break, or
    ``chunks`` is not an integer ≥ 1.
    """
    for what, value in (("unit_name", unit_name), ("qtype", qtype)):
        if not isinstance(value, str) or not value or any(c in value for c in _FORBIDDEN_IN_NAME):
            raise ValueError(
                f"{what}={value!r}: give a non-empty name without '/', '\\\\', NUL or line "
                "breaks (it becomes part of a file name)"
            )
    return f"bench_ppl_kld_result.{unit_name}.{qtype}.{_check_chunks(chunks)}.txt"


def _one_line(what: str, text: str) -> str:
    if "\n" in text or "\r" in text:
        raise ValueError(
            f"{what} {text!r} contains a line break; the log header holds one line "
            "per entry: quote or replace it (e.g. shlex.join of the arguments)"
        )
    return text


def format_item_log(
    unit_name: str,
    qtype: str,
    chunks: int,
    stats: KLDStats,
    *,
    command: str,
    facts: Mapping[str, Any],
    chunk_rows: Sequence[str] | None = None,
    recorded: datetime | None = None,
) -> str:
    """The text of one item's log (layout: module docstring; docs/suite-formats.md#log-files).

    Inputs: ``unit_name``/``qtype``/``chunks`` as :func:`log_file_name`;
    ``stats``, the item's :class:`~pytest_quantbench.metrics.KLDStats`;
    ``command``, the command line that produced the run (one line); ``facts``,
    more ``quantbench: key = value`` lines in the given order (values via
    ``str``; ``None`` values are left out); ``chunk_rows``, the per-chunk table
    rows of :meth:`~pytest_quantbench.metrics.KLDAccumulator.chunk_row`
    (written with the table header, as the tool prints them) or None for the
    final block alone; ``recorded``, the header's time stamp (default: now,
    local time, ISO 8601 to the second).

    The final block is written even below 100 tokens, where llama-perplexity
    itself would omit it, so that every log carries its numbers.

    Output: the text (``\\n`` line endings, ends with a newline). Raises
    :class:`ValueError` for bad names/chunks (see :func:`log_file_name`), a
    ``command``, fact key or value with a line break, a fact key that is
    empty, holds ``=`` or repeats ``unit``/``qtype``/``chunks``, or a chunk
    row with a line break.
    """
    log_file_name(unit_name, qtype, chunks)
    stamp = (recorded or datetime.now().astimezone()).isoformat(timespec="seconds")
    lines = [
        f"=== Command used to generate this file (recorded: {stamp}) ===",
        _one_line("command", command),
        "=== End of command header ===",
    ]
    all_facts: dict[str, Any] = {"unit": unit_name, "qtype": qtype, "chunks": int(chunks)}
    for key, value in facts.items():
        key = _one_line("fact key", str(key)).strip()
        if not key or "=" in key or key in ("unit", "qtype", "chunks"):
            raise ValueError(
                f"fact key {key!r}: give a non-empty key without '=' other than "
                "unit, qtype and chunks (those are written from the arguments)"
            )
        if value is not None:
            all_facts[key] = value
    lines += [
        f"quantbench: {k} = {_one_line(f'fact {k!r} value', str(v))}" for k, v in all_facts.items()
    ]
    if chunk_rows is None:
        body = "\n" + stats.format_block()
    else:
        rows = [_one_line("chunk row", r) for r in chunk_rows]
        body = format_kld_output(rows, None) + stats.format_block()
    return "\n".join(lines) + "\n" + body


def write_item_log(
    logs_dir: str | os.PathLike[str],
    unit_name: str,
    qtype: str,
    chunks: int,
    stats: KLDStats,
    *,
    command: str,
    facts: Mapping[str, Any],
    chunk_rows: Sequence[str] | None = None,
    recorded: datetime | None = None,
) -> Path:
    """Write one item's log to ``logs_dir / log_file_name(unit_name, qtype, chunks)``.

    The text is :func:`format_item_log` (same arguments), written UTF-8 and
    atomically (:func:`pytest_quantbench.report.atomic_write_text`: a reader
    never sees a partial file, which the suite would count as done, docs/suite-formats.md#resume);
    ``logs_dir`` is created if missing and an existing file is replaced.
    Output: the path written. Raises :class:`ValueError` as
    :func:`format_item_log`, :class:`OSError` naming the file when it cannot
    be written.
    """
    text = format_item_log(
        unit_name,
        qtype,
        chunks,
        stats,
        command=command,
        facts=facts,
        chunk_rows=chunk_rows,
        recorded=recorded,
    )
    path = Path(logs_dir) / log_file_name(unit_name, qtype, chunks)
    atomic_write_text(path, text)
    return path
