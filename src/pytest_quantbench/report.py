"""Reports: the suite's wide CSVs, a tidy results CSV, the terminal summary.

Pure module (pandas is imported lazily, only by the CSV builders; no engine,
no pytest). Results arrive as rows: ``dict[str, str | int | float]`` with at
least ``tensor``, ``qtype``, ``written_type`` and ``status``, plus the metric
keys of :data:`METRIC_KEYS` (absent when not measured), the run-identity keys
of :data:`RUN_IDENTITY_KEYS`, ``nodeid`` and ``reason``; ``results.csv`` has the
columns of :data:`RESULT_COLUMNS`.

Formats and where they are specified:

* the wide tables ``kld_results.csv`` / ``ppl_results.csv`` (and
  ``topp_results.csv``, the suite's ``--regex`` table for "Same top p", and
  ``<metric>_results.csv`` for the metrics of ``--quantbench-csv-metrics``):
  ``docs/suite-formats.md#csv-layout``, including
  its percent mode and baseline row;
* the values and their printed precision: ``docs/llama-perplexity.md#statistics`` (definitions) and
  docs/llama-perplexity.md#kld-output (``printf`` formats);
* atomic replacement of output files: ``docs/suite-formats.md#atomic-writes``.

:func:`atomic_write_text` is the one function here that writes files; the
other writers call it.
"""

from __future__ import annotations

import csv
import math
import os
import secrets
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .selection import natural_key

if TYPE_CHECKING:  # pragma: no cover
    import pandas

__all__ = [
    "COMPARED_METRICS",
    "GATING_KEYS",
    "ITEM_KEYS",
    "METRIC_KEYS",
    "MISSING",
    "MISSING_PERCENT",
    "PRINT_DECIMALS",
    "RESULT_COLUMNS",
    "RUN_IDENTITY_KEYS",
    "SUITE_TABLES",
    "atomic_write_text",
    "check_csv_metrics",
    "comparable_metrics",
    "comparison_columns",
    "format_summary",
    "tidy_columns",
    "wide_table",
    "worst_items",
    "write_suite_tables",
    "write_tidy_csv",
    "write_wide_csv",
]

Row = Mapping[str, Any]

#: Keys that identify an item and its outcome.
ITEM_KEYS: tuple[str, ...] = ("tensor", "qtype", "written_type", "status")

#: Keys that identify the run (what makes two numbers comparable): ``eval`` is the evaluation
#: layout (``fa=…,ub=…,seq=…``).
RUN_IDENTITY_KEYS: tuple[str, ...] = (
    "model_sha256",
    "corpus_sha256",
    "n_ctx",
    "chunks",
    "engine",
    "eval",
)

#: Metric keys in llama-perplexity's order (docs/llama-perplexity.md#statistics, #kld-output); Δp
#: and same-top-p values are in percent.
METRIC_KEYS: tuple[str, ...] = (
    "ppl_q",
    "ppl_q_err",
    "ppl_base",
    "ppl_base_err",
    "cor_ln_ppl",
    "ln_ratio",
    "ln_ratio_err",
    "ppl_ratio",
    "ppl_ratio_err",
    "ppl_diff",
    "ppl_diff_err",
    "mean_kld",
    "mean_kld_err",
    "max_kld",
    "kld_p99_9",
    "kld_p99",
    "kld_p95",
    "kld_p90",
    "median_kld",
    "kld_p10",
    "kld_p5",
    "kld_p1",
    "kld_p0_1",
    "min_kld",
    "mean_dp",
    "mean_dp_err",
    "max_dp",
    "dp_p99_9",
    "dp_p99",
    "dp_p95",
    "dp_p90",
    "dp_p75",
    "median_dp",
    "dp_p25",
    "dp_p10",
    "dp_p5",
    "dp_p1",
    "dp_p0_1",
    "min_dp",
    "rms_dp",
    "rms_dp_err",
    "same_top_p",
    "same_top_p_err",
    "n_tokens",
)

#: Columns of the gating features, after the metrics: the run's imatrix identity (sha256 of the
#: file, or the key of an auto imatrix; "" without one), which a comparison checks, the
#: chunk-level (batch-means) ± of
#: :meth:`~pytest_quantbench.metrics.KLDAccumulator.chunk_errors` and the early-verdict facts of
#: :mod:`~pytest_quantbench.earlystop` (the comparison's columns: :func:`comparison_columns`).
GATING_KEYS: tuple[str, ...] = (
    "imatrix",
    "mean_kld_err_chunks",
    "mean_dp_err_chunks",
    "same_top_p_err_chunks",
    "chunks_used",
    "stopped_early",
    "early_verdict",
)

#: Metrics every item compared with a reference run (``--quantbench-compare``) gets
#: ``ref_<metric>`` / ``delta_<metric>`` for; each fail rule's metric adds its own pair.
COMPARED_METRICS: tuple[str, ...] = ("mean_kld", "ppl_ratio", "mean_dp", "same_top_p")


def comparison_columns(metrics: Iterable[str] = COMPARED_METRICS) -> tuple[str, ...]:
    """The ``results.csv`` columns of a comparison with a reference run: ``ref_<metric>``
    (the reference's value) and ``delta_<metric>`` (this run − reference, the metric's unit) for
    each of ``metrics`` (:data:`COMPARED_METRICS` and the fail rules' metrics), in order, once."""
    return tuple(f"{side}_{m}" for m in dict.fromkeys(metrics) for side in ("ref", "delta"))


#: The columns of ``results.csv``: all of them in every run, in this order, whatever the rows hold
#: (an absent value is an empty cell; a key not listed here is not written). A new row key
#: becomes a column by adding one line here (and one line to the README's results.csv list).
RESULT_COLUMNS: tuple[str, ...] = (
    *ITEM_KEYS,  # tensor, qtype, written_type, status
    "requested_type",  # the ggml type asked for, or "preset Q4_K_M"
    "members",  # the tensors quantized (comma-separated)
    "fallback",  # True: written_type is llama-quantize's fallback
    "reused",  # True: statistics from the results store
    *RUN_IDENTITY_KEYS,
    "engine_mode",  # inplace or file
    "device",  # cpu, or cuda:<visible id> <GPU name>
    "engine_note",  # why the file engine was used instead
    "kernel_probe_kld",  # the type's kernel vs its dequantized weights
    "seconds",  # the item's measuring time
    "eval_path",  # full, or tail:L (prefix reuse from layer L)
    "prefix_note",  # why prefix reuse measured it in full instead
    "file_size",  # whole-file items: the file's bytes
    "bpw",  # whole-file items: bits per weight
    "types",  # whole-file items: type of each tensor class
    *METRIC_KEYS,
    *GATING_KEYS,  # imatrix, chunk-level ±, early-verdict facts
    *comparison_columns(),  # ref_/delta_ of --quantbench-compare
    "nodeid",
    "reason",  # skip/failure/error message, whole
)

#: Values written where a row has no value for a boolean column.
_RESULT_DEFAULTS: Mapping[str, Any] = {"fallback": False, "reused": False}

#: Decimals llama-perplexity prints for each statistic (docs/llama-perplexity.md#kld-output):
#: ``%10.6lf`` for the PPL and KLD blocks, ``%6.3lf`` for Δp and same top p, ``%6.2lf``
#: for the correlation.
PRINT_DECIMALS: Mapping[str, int] = {
    **{k: 6 for k in METRIC_KEYS if "kld" in k or k.startswith(("ppl", "ln_ratio"))},
    **{k: 3 for k in METRIC_KEYS if "dp" in k or k.startswith("same_top_p")},
    "cor_ln_ppl": 2,
    "n_tokens": 0,
}

#: The cell text for "not measured" (docs/suite-formats.md#missing-404).
MISSING = "404"

#: The cell text for "not measured" in percent mode (docs/suite-formats.md#missing-404).
MISSING_PERCENT = "404%"

#: The suite-compatible wide tables: file name → metric.
SUITE_TABLES: Mapping[str, str] = {
    "kld_results.csv": "mean_kld",
    "ppl_results.csv": "ppl_q",
    "topp_results.csv": "same_top_p",
}

# Metrics for which a *smaller* value is worse (used to rank "worst" items).
_LOWER_IS_WORSE = frozenset(
    {"same_top_p", "cor_ln_ppl", "mean_dp", "max_dp", "median_dp", "min_dp"}
    | {k for k in METRIC_KEYS if k.startswith("dp_p")}
)


# --------------------------------------------------------------------------
# Writing files
# --------------------------------------------------------------------------


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8, bytes as given: no newline
    translation), atomically.

    The text is written to a temporary file in the same directory, flushed
    and ``fsync``-ed, then moved over ``path`` with :func:`os.replace`, so a
    reader sees either the old file or the new one, never a partial file
    (docs/suite-formats.md#atomic-writes). Missing parent directories are
    created. A new file gets the default permissions (``0o666`` less the
    umask); an existing file keeps its permissions.

    Raises :class:`OSError` naming ``path`` when anything fails; the
    temporary file is then removed and an existing ``path`` is left as it
    was. Errors that are not ``OSError`` (e.g. ``KeyboardInterrupt``) are
    re-raised unchanged after the same clean-up.
    """
    target = Path(path)
    data = text.encode("utf-8")
    tmp: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = -1
        for _ in range(100):
            tmp = target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                break
            except FileExistsError:
                tmp = None
                continue
        if fd < 0:  # pragma: no cover - 100 random collisions
            raise FileExistsError(f"no free temporary name next to {target}")
        assert tmp is not None  # the loop broke with tmp created
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            mode = os.stat(target).st_mode & 0o7777
        except FileNotFoundError:
            pass
        else:
            os.chmod(tmp, mode)
        os.replace(tmp, target)
        tmp = None
    except OSError as exc:
        detail = exc.strerror or str(exc)
        import errno

        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            detail += ": the disk is full; free space there (or write elsewhere) and run again"
        raise OSError(
            exc.errno,
            f"could not write {target} (an existing file is left unchanged): {detail}",
        ) from exc
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


# --------------------------------------------------------------------------
# Wide tables (suite interop)
# --------------------------------------------------------------------------


def _finite(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def wide_table(
    rows: Iterable[Row],
    metric: str,
    *,
    tensors: Sequence[str] | None = None,
    qtypes: Sequence[str] | None = None,
    decimals: int | None = None,
    percent_of: float | None = None,
) -> pandas.DataFrame:
    """One metric as the suite's wide table (docs/suite-formats.md#csv-layout).

    Inputs: ``rows`` (result rows; a later row for the same tensor and qtype
    replaces an earlier one); ``metric``, a row key such as ``"mean_kld"``;
    ``tensors`` / ``qtypes``, columns and rows to include even without any
    result (the selected tensors and requested qtypes), added to those found
    in ``rows``; ``decimals``, the printed precision, by default the one
    llama-perplexity uses for that statistic (:data:`PRINT_DECIMALS`: 6 for
    PPL and KLD, 3 for Δp and same top p).

    Output: a :class:`pandas.DataFrame` of strings: column ``QTYPE``, then one
    column per tensor (or group) in natural order (``sort -Vu``,
    :func:`~pytest_quantbench.selection.natural_key`); one row per qtype,
    sorted (plain string order, as ``sort -u`` in the C locale); each cell
    ``"%.{decimals}f" % value``, or ``404`` where the item was not run, not
    measured, or the value is not finite.

    ``percent_of``: a baseline value b; each cell then becomes the change
    against b in percent, ``"%+.2f%%" % ((v - b) / b * 100)`` (e.g.
    ``+89.51%``), as ``collect_ppl_results.sh``'s percent mode (docs/suite-formats.md#percent-mode),
    with v read back from its printed text (``decimals`` places) as the collector reads it from the
    log; missing cells, and every cell when b is 0, are ``404%``.

    Raises :class:`ValueError` when a row lacks ``tensor`` or ``qtype``.
    """
    import pandas as pd

    places = PRINT_DECIMALS.get(metric, 6) if decimals is None else decimals
    missing = MISSING if percent_of is None else MISSING_PERCENT
    cells: dict[tuple[str, str], str] = {}
    tensor_set = set(tensors or ())
    qtype_set = set(qtypes or ())
    for row in rows:
        try:
            tensor, qtype = str(row["tensor"]), str(row["qtype"])
        except KeyError as exc:
            raise ValueError(f"result row without {exc.args[0]!r}: {dict(row)!r}") from None
        tensor_set.add(tensor)
        qtype_set.add(qtype)
        value = _finite(row.get(metric))
        if value is None:
            cells[(qtype, tensor)] = missing
        elif percent_of is None:
            cells[(qtype, tensor)] = f"{value:.{places}f}"
        else:
            cells[(qtype, tensor)] = _percent_cell(float(f"{value:.{places}f}"), percent_of)
    columns = sorted(tensor_set, key=natural_key)
    data: dict[str, list[str]] = {"QTYPE": sorted(qtype_set)}
    for tensor in columns:
        data[tensor] = [cells.get((q, tensor), missing) for q in data["QTYPE"]]
    return pd.DataFrame(data, columns=["QTYPE", *columns], dtype=object)


def _percent_cell(value: float, baseline: float) -> str:
    """``printf "%+.2f%%"`` of the change of ``value`` against ``baseline``
    (docs/suite-formats.md#percent-mode); ``404%`` for a baseline of 0."""
    if baseline == 0:
        return MISSING_PERCENT
    return f"{(value - baseline) / baseline * 100.0:+.2f}%"


_CSV_SPECIAL = (",", "\n", "\r", '"')


def write_wide_csv(df: pandas.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write a :func:`wide_table` frame as the suite writes its CSVs.

    Format (docs/suite-formats.md#csv-layout): plain comma-separated, LF line endings, no
    quoting, no index column, header ``QTYPE,<col1>,…``; the file is
    replaced atomically (:func:`atomic_write_text`). Output: the path.

    Raises :class:`ValueError` when a header or cell contains ``,``, a quote
    or a line break (the format has no quoting), :class:`OSError` when the
    file cannot be written.
    """
    for name in df.columns:
        if any(ch in str(name) for ch in _CSV_SPECIAL):
            raise ValueError(
                f"cannot write {path}: column name {str(name)!r} contains a comma, quote "
                "or line break, which the suite's unquoted CSV cannot hold"
            )
    for value in df.itertuples(index=False, name=None):
        for cell in value:
            if any(ch in str(cell) for ch in _CSV_SPECIAL):
                raise ValueError(
                    f"cannot write {path}: cell {str(cell)!r} contains a comma, quote or "
                    "line break, which the suite's unquoted CSV cannot hold"
                )
    text = df.to_csv(index=False, lineterminator="\n", quoting=csv.QUOTE_NONE)
    atomic_write_text(path, text)
    return Path(path)


# --------------------------------------------------------------------------
# Tidy table
# --------------------------------------------------------------------------


def tidy_columns(rows: Iterable[Row] = ()) -> list[str]:
    """Column order of ``results.csv``: :data:`RESULT_COLUMNS`, the same in every run, plus the
    ``ref_``/``delta_`` pair of a ``--quantbench-compare-fail`` rule's metric outside
    :data:`COMPARED_METRICS` where the rows have one (before ``nodeid`` and ``reason``)."""
    keys = {key for row in rows for key in row}
    extra = [
        c
        for c in comparison_columns(k[len("ref_") :] for k in sorted(keys) if k.startswith("ref_"))
        if c not in RESULT_COLUMNS
    ]
    return [*RESULT_COLUMNS[:-2], *extra, *RESULT_COLUMNS[-2:]]


def _tidy_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        # repr of a Python float: the shortest text that reads back to the
        # same double (float() first: numpy's repr would add "np.float64(").
        return repr(float(value))
    if isinstance(value, int):
        return str(value)
    try:  # numpy scalars and the like
        import numbers

        if isinstance(value, numbers.Integral):
            return str(int(value))
        if isinstance(value, numbers.Real):
            return repr(float(value))
    except Exception:  # pragma: no cover
        pass
    return str(value)


def _item_order(row: Row) -> tuple[Any, ...]:
    return (natural_key(str(row.get("tensor", ""))), str(row.get("qtype", "")))


def write_tidy_csv(rows: Iterable[Row], path: str | os.PathLike[str]) -> Path:
    """Write ``results.csv``: one line per item.

    Columns: :data:`RESULT_COLUMNS`, always all of them, in that order (keys
    of the rows not listed there are not written). Lines are sorted by tensor
    (natural order), then qtype. Floats are written with full precision
    (``repr``: they read back to the same double), integers as integers,
    absent values as empty cells (``False`` for ``fallback`` and ``reused``).
    Standard CSV (fields quoted only where needed), LF line endings; replaced
    atomically. Output: the path.

    Raises :class:`OSError` when the file cannot be written.
    """
    import pandas as pd

    ordered = sorted(rows, key=_item_order)
    columns = list(RESULT_COLUMNS)
    data = {
        col: [_tidy_cell(row.get(col, _RESULT_DEFAULTS.get(col))) for row in ordered]
        for col in columns
    }
    df = pd.DataFrame(data, columns=columns, dtype=object)
    text = df.to_csv(index=False, lineterminator="\n")
    atomic_write_text(path, text)
    return Path(path)


def comparable_metrics() -> tuple[str, ...]:
    """The metric names a comparison rule (``--quantbench-compare-fail``) may use: every value
    of :data:`METRIC_KEYS` (not their ± and not the token count)."""
    return tuple(k for k in METRIC_KEYS if not k.endswith("_err") and k != "n_tokens")


def check_csv_metrics(names: Iterable[str]) -> tuple[str, ...]:
    """Validate the metric names of ``--quantbench-csv-metrics``.

    Input: metric names, the field names of
    :class:`~pytest_quantbench.metrics.KLDStats` (:data:`METRIC_KEYS`, e.g.
    ``kld_p99``, ``rms_dp``, ``ppl_q_err``), or ``all`` for every one of them.
    Output: the names to write as ``<metric>_results.csv``, in the order given,
    each once; metrics that already have a suite table (:data:`SUITE_TABLES`:
    ``mean_kld``, ``ppl_q``, ``same_top_p``) are left out, since those tables
    are always written.

    Raises :class:`ValueError` ``"--quantbench-csv-metrics: unknown metric
    'x'; valid: all, ppl_q, …"`` for a name that is neither.
    """
    out: list[str] = []
    for name in names:
        if name == "all":
            chosen: tuple[str, ...] = METRIC_KEYS
        elif name in METRIC_KEYS:
            chosen = (name,)
        else:
            raise ValueError(
                f"--quantbench-csv-metrics: unknown metric {name!r}; valid: "
                f"{', '.join(('all', *METRIC_KEYS))}"
            )
        out += [m for m in chosen if m not in out and m not in SUITE_TABLES.values()]
    return tuple(out)


def _resolve_baseline_ppl(rows: Sequence[Row], baseline_ppl: float | None) -> float | None:
    """The baseline PPL b: ``baseline_ppl``, else the first finite ``ppl_base``
    of the rows in item order, else None."""
    if baseline_ppl is not None:
        b = _finite(baseline_ppl)
        if b is None or b < 0:
            raise ValueError(
                f"baseline_ppl={baseline_ppl!r}: give a finite perplexity >= 0 "
                "(--quantbench-baseline-ppl), or None to use the run's baseline PPL"
            )
        return b
    for row in sorted(rows, key=_item_order):
        b = _finite(row.get("ppl_base"))
        if b is not None:
            return b
    return None


def write_suite_tables(
    rows: Iterable[Row],
    out_dir: str | os.PathLike[str],
    *,
    tensors: Sequence[str] | None = None,
    qtypes: Sequence[str] | None = None,
    metrics: Sequence[str] = (),
    ppl_percent: bool = False,
    baseline_ppl: float | None = None,
    baseline_qtype: str | None = None,
) -> list[Path]:
    """Write every report table into ``out_dir`` (created if missing).

    Files: ``kld_results.csv`` (mean KLD), ``ppl_results.csv`` (Mean PPL(Q)),
    ``topp_results.csv`` (same top p, percent) in the suite's wide layout
    (:func:`wide_table`, docs/suite-formats.md#csv-layout); then ``<metric>_results.csv`` for
    each name of ``metrics`` (checked by :func:`check_csv_metrics`), same
    layout, printed with llama-perplexity's decimals for that statistic
    (:data:`PRINT_DECIMALS`: 6 for PPL/KLD fields, 3 for Δp and same top p, 2
    for ``cor_ln_ppl``, 0 for ``n_tokens``); then ``results.csv``, the tidy
    table (:func:`write_tidy_csv`). ``tensors``/``qtypes`` add columns/rows
    with no result (written ``404``). Every file is replaced atomically.

    Baseline PPL b: ``baseline_ppl`` (``--quantbench-baseline-ppl``), else the
    run's, taken from the first finite ``ppl_base`` of the rows (item order).

    * ``ppl_percent``: ``ppl_results.csv`` cells become ``%+.2f%%`` of
      (v − b)/b·100 (docs/suite-formats.md#percent-mode); ``404%`` for missing
      cells, and for every cell when b is 0 or unknown. No other table is
      converted (KLD never is).
    * ``baseline_qtype`` (e.g. ``bf16``): if it is one of the rows, that row
      gets KLD ``0`` in every column and PPL = b in every column (``+0.00%``
      in percent mode; unchanged when b is unknown), as the collector's
      baseline row (docs/suite-formats.md#baseline-row).

    Output: the paths in the order written. Raises :class:`OSError` when a
    file cannot be written, :class:`ValueError` for a row without
    ``tensor``/``qtype``, a name the unquoted CSV cannot hold, an unknown
    metric name, or a ``baseline_ppl`` that is negative or not finite.
    """
    rows = list(rows)
    extra = check_csv_metrics(metrics)
    b = _resolve_baseline_ppl(rows, baseline_ppl)
    out = Path(out_dir)
    written: list[Path] = []
    for name, metric in (*SUITE_TABLES.items(), *((f"{m}_results.csv", m) for m in extra)):
        percent = metric == "ppl_q" and ppl_percent
        df = wide_table(
            rows,
            metric,
            tensors=tensors,
            qtypes=qtypes,
            percent_of=(b if b is not None else 0.0) if percent else None,
        )
        is_base = df["QTYPE"] == baseline_qtype
        if baseline_qtype is not None and is_base.any():
            if metric == "mean_kld":
                df.loc[is_base, df.columns[1:]] = "0"
            elif metric == "ppl_q" and b is not None:
                cell = _percent_cell(b, b) if percent else f"{b:.{PRINT_DECIMALS['ppl_q']}f}"
                df.loc[is_base, df.columns[1:]] = cell
        written.append(write_wide_csv(df, out / name))
    written.append(write_tidy_csv(rows, out / "results.csv"))
    return written


# --------------------------------------------------------------------------
# Terminal summary
# --------------------------------------------------------------------------


def worst_items(rows: Iterable[Row], n: int = 10, metric: str = "mean_kld") -> list[Row]:
    """The ``n`` items with the worst value of ``metric``.

    Worst means largest, except for metrics where smaller is worse (same top
    p, the Δp statistics, the PPL correlation). Rows without a finite value
    for ``metric`` are left out. Ties are broken by natural tensor order,
    then qtype. Output: the rows themselves, worst first. Raises nothing.
    """
    lower_worse = metric in _LOWER_IS_WORSE
    scored = []
    for row in rows:
        value = _finite(row.get(metric))
        if value is None:
            continue
        scored.append((value if lower_worse else -value, _item_order(row), row))
    scored.sort(key=lambda item: (item[0], item[1]))
    return [row for _, _, row in scored[: max(n, 0)]]


def _pm(row: Row, key: str, places: int, unit: str = "") -> str:
    value = _finite(row.get(key))
    if value is None:
        return "n/a"
    text = f"{value:.{places}f}"
    err = _finite(row.get(key + "_err"))
    if err is not None:
        text += f" ± {err:.{places}f}"
    return text + unit


#: The summary's ``result`` cell per row status: regressions and broken items stand out.
_OUTCOME_MARKS: Mapping[str, str] = {"failed": "FAIL", "error": "ERROR"}


def _true(value: Any) -> bool:
    """A row's boolean fact: True, or its text ``"True"`` (rows read back from a store)."""
    return value is True or str(value) == "True"


def format_summary(rows: Iterable[Row], n: int = 10, *, metric: str = "mean_kld") -> list[str]:
    """Lines for the terminal summary: the ``n`` worst items by ``metric``.

    One header line, then one line per item (see :func:`worst_items`):
    rank, tensor, qtype (requested), written type (``q5_0 (impure)`` where
    the row's ``fallback`` is true: measured under llama-quantize's fallback
    type, the suite's ``--allow-impure-quant``), mean KLD ± err (6
    decimals), PPL(Q)/PPL(base) ± err (4 decimals), same top p ± err (3
    decimals, percent), and ``FAIL`` for a row whose ``status`` is
    ``failed`` (a threshold regressed) or ``ERROR`` for ``error``; ``n/a``
    where not measured. Columns are padded to align; lines have no trailing
    spaces. Output: ``[]`` when no row has a finite ``metric``. Raises
    nothing.
    """
    worst = worst_items(rows, n, metric)
    if not worst:
        return []
    header = ("rank", "tensor", "qtype", "written", "mean KLD", "PPL ratio", "same top p", "result")
    table = [header]
    for rank, row in enumerate(worst, start=1):
        table.append(
            (
                str(rank),
                str(row.get("tensor", "")),
                str(row.get("qtype", "")),
                str(row.get("written_type", "") or "n/a")
                + (" (impure)" if _true(row.get("fallback")) else ""),
                _pm(row, "mean_kld", 6),
                _pm(row, "ppl_ratio", 4),
                _pm(row, "same_top_p", 3, " %"),
                _OUTCOME_MARKS.get(str(row.get("status", "")), ""),
            )
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = []
    for line in table:
        cells = [line[0].rjust(widths[0])]
        cells += [cell.ljust(width) for cell, width in zip(line[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
    return lines


# --------------------------------------------------------------------------
# Group mapping files
# --------------------------------------------------------------------------


def write_group_files(
    groups: Sequence[Any], out_dir: str | os.PathLike[str], *, baseline: str, chunks: int
) -> list[Path]:
    """Write the group mapping files of a grouped run into ``out_dir``.

    ``bench_ppl_kld_group_mapping.<baseline>.<chunks>.txt``: one line per group,
    ``group<N>:<regex>[,<regex>…]``, as benchmark_each_tensor.sh writes it
    (docs/suite-formats.md#groups); ``groups.csv``: columns ``group,regexes,n_members,members``
    (members space-separated, natural order), so every group column of the tables can be traced to
    its tensors.

    groups: :class:`~pytest_quantbench.selection.Group` objects. Output: the two paths.
    Raises OSError when a file cannot be written (each is replaced atomically).
    """
    import pandas as pd

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mapping = out / f"bench_ppl_kld_group_mapping.{baseline}.{chunks}.txt"
    atomic_write_text(mapping, "".join(f"{g.name}:{g.spec}\n" for g in groups))
    table = pd.DataFrame(
        [
            {
                "group": g.name,
                "regexes": g.spec,
                "n_members": len(g.members),
                "members": " ".join(g.members),
            }
            for g in groups
        ],
        columns=["group", "regexes", "n_members", "members"],
    )
    csv_path = out / "groups.csv"
    atomic_write_text(csv_path, table.to_csv(index=False, lineterminator="\n"))
    return [mapping, csv_path]
