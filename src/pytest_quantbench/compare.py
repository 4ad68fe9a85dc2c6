"""Comparing a run with a reference run (``--quantbench-compare``, ``--quantbench-compare-fail``).

The reference is an earlier run's ``results.csv`` (or the output directory holding it). Items are
matched by tensor set and requested qtype. The settings that decide every number (model and corpus
hashes, n_ctx, chunks, importance matrix) must be those of this run: another reference is a usage
error naming the difference. The engine identity and evaluation layout may differ (that is what a
comparison is for) and the run header lists what differs.

A fail rule ``METRIC:N%`` or ``METRIC:X`` (:class:`FailRule`) turns a change beyond the tolerance
into a failure; the sign of the tolerance says which direction is worse (``mean_kld:5%``: an
increase of more than 5 % fails; ``same_top_p:-0.5``: a drop of more than 0.5 percentage points
fails). The uncertainties shown are the chunk-level (batch-means) ones
(:func:`pytest_quantbench.metrics.chunk_mean_errors`) where the rows carry them.

Pure module: pandas reads the reference, nothing here knows pytest or the engine.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from .report import COMPARED_METRICS

__all__ = [
    "COMPARED_METRICS",
    "CompareError",
    "FailRule",
    "Reference",
    "format_comparison",
    "load_reference",
    "parse_fail_rules",
]


#: Row columns that must agree between the reference and this run (``imatrix`` may be absent in
#: a reference written before it was recorded).
SETTING_KEYS: tuple[str, ...] = ("model_sha256", "corpus_sha256", "n_ctx", "chunks", "imatrix")
#: Row columns that may differ; the header lists them when they do.
ENGINE_KEYS: tuple[str, ...] = ("engine", "eval")

_RESULTS_CSV = "results.csv"


class CompareError(ValueError):
    """The reference or a fail rule is unusable; the message names it and the fix."""


@dataclass(frozen=True)
class FailRule:
    """``METRIC:N%`` (relative, percent of the reference value) or ``METRIC:X`` (absolute, in the
    metric's own unit: nats, percent points …). A positive tolerance fails an increase beyond
    it, a negative one a decrease beyond it (use it for higher-is-better metrics)."""

    metric: str
    tolerance: float
    relative: bool
    text: str

    def change(self, ref: float, value: float) -> float:
        """``value − ref``, or that in percent of ``|ref|`` for a relative rule (±inf when the
        reference is 0 and the value is not; 0 when both are)."""
        delta = value - ref
        if not self.relative:
            return delta
        if ref == 0.0:
            return 0.0 if delta == 0.0 else math.copysign(math.inf, delta)
        return 100.0 * delta / abs(ref)

    def violated(self, ref: float, value: float) -> bool:
        """Whether the change from ``ref`` to ``value`` goes beyond the tolerance, in its
        direction."""
        change = self.change(ref, value)
        return change < self.tolerance if self.tolerance < 0 else change > self.tolerance


def parse_fail_rules(texts: Iterable[str], metrics: Sequence[str]) -> tuple[FailRule, ...]:
    """Parse ``--quantbench-compare-fail`` values (``mean_kld:5%``, ``same_top_p:-0.5`` …).

    ``metrics``: the valid metric names. Raises CompareError naming the bad rule and the fix.
    """
    rules = []
    for text in texts:
        match = re.fullmatch(r"\s*([A-Za-z0-9_]+)\s*:\s*([-+]?[0-9.eE+-]+)\s*(%?)\s*", text)
        value = None
        if match:
            try:
                value = float(match.group(2))
            except ValueError:
                value = None
        if match is None or value is None or not math.isfinite(value):
            raise CompareError(
                f"--quantbench-compare-fail {text!r}: write METRIC:N% or "
                "METRIC:X, e.g. mean_kld:5% or same_top_p:-0.5"
            )
        metric = match.group(1)
        if metric not in metrics:
            import difflib

            close = difflib.get_close_matches(metric, metrics, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise CompareError(
                f"--quantbench-compare-fail {text!r}: unknown metric {metric!r}"
                f"{hint} (metrics are results.csv columns: mean_kld, same_top_p, "
                "ppl_ratio, kld_p99 …)"
            )
        rules.append(FailRule(metric, value, match.group(3) == "%", text.strip()))
    return tuple(rules)


def _item_key(tensors: Iterable[str], qtype: str) -> tuple[frozenset[str], str]:
    return frozenset(tensors), str(qtype).lower()


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _both_auto(a: Any, b: Any) -> bool:
    """Both runs computed their imatrix from the corpus (``--quantbench-imatrix=auto``): its key
    holds the engine, which may differ, so the two matrices may differ as the engines do."""
    return str(a).startswith("auto:") and str(b).startswith("auto:")


def _is_true(value: Any) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")


def _same(a: Any, b: Any) -> bool:
    na, nb = _number(a), _number(b)
    if na is not None and nb is not None:
        return na == nb
    return str(a if a is not None else "") == str(b if b is not None else "")


@dataclass
class Reference:
    """A loaded reference run: ``path`` (its results.csv), ``rows`` keyed by (tensor set, qtype)
    (measured rows only), ``identity`` (the setting and engine columns' values), ``skipped``
    (item id → why the reference row is not compared, e.g. early-stopped or not measured)."""

    path: Path
    rows: dict[tuple[frozenset[str], str], dict[str, Any]]
    identity: dict[str, Any]
    skipped: dict[str, str]

    def header_lines(self, current: Mapping[str, Any]) -> list[str]:
        """Run-header lines: the reference and what differs between the two runs' engines."""
        lines = [f"quantbench compare: {self.path} ({len(self.rows)} measured items)"]
        for key in (*ENGINE_KEYS, "imatrix"):
            ref, cur = self.identity.get(key), current.get(key)
            if ref is not None and not _same(ref, cur):  # (imatrix: both auto, per engine)
                lines.append(f"quantbench compare: {key} differs: reference {ref}, this run {cur}")
        if "imatrix" not in self.identity:
            lines.append(
                "quantbench compare: the reference does not record its imatrix "
                "(written by an older version); make sure it used the same one"
            )
        return lines

    def row_for(self, tensors: Iterable[str], qtype: str) -> dict[str, Any] | None:
        """The reference row of an item, or None."""
        return self.rows.get(_item_key(tensors, qtype))

    def compare(
        self,
        tensors: Iterable[str],
        qtype: str,
        measured: Mapping[str, Any],
        rules: Sequence[FailRule] = (),
    ) -> tuple[dict[str, float], list[str]]:
        """One item against the reference.

        Returns ``(properties, failures)``: ``ref_<metric>`` and ``delta_<metric>`` (value −
        reference, in the metric's unit) for :data:`COMPARED_METRICS` and every rule's metric
        (metrics either side lacks are left out), and one message per rule violated, e.g.
        ``mean KLD 0.011000 ± 0.000420 vs reference 0.010000 ± 0.000400 (chunk-level ±):
        change +10.00% > mean_kld:5% (--quantbench-compare-fail)``. ``({}, [])`` when the
        reference has no such item.
        """
        ref = self.row_for(tensors, qtype)
        if ref is None:
            return {}, []
        props: dict[str, float] = {}
        metrics = list(dict.fromkeys([*COMPARED_METRICS, *(r.metric for r in rules)]))
        for metric in metrics:
            a, b = _number(ref.get(metric)), _number(measured.get(metric))
            if a is not None and b is not None:
                props[f"ref_{metric}"] = a
                props[f"delta_{metric}"] = b - a
        failures = []
        for rule in rules:
            a, b = _number(ref.get(rule.metric)), _number(measured.get(rule.metric))
            if a is None or b is None:
                failures.append(
                    f"{rule.metric} cannot be compared: "
                    f"{'reference' if a is None else 'this run'} has no value for "
                    f"it ({rule.text}, --quantbench-compare-fail)"
                )
            elif rule.violated(a, b):
                failures.append(_failure_message(rule, ref, measured, a, b))
        return props, failures

    def missing(
        self, items: Iterable[tuple[Iterable[str], str, str]]
    ) -> tuple[list[str], list[str]]:
        """Items missing on either side: ``items`` are this run's (tensors, qtype, id).

        Returns (ids of this run's items the reference lacks, ids of reference items this run
        lacks), each sorted.
        """
        ours = {_item_key(t, q): name for t, q, name in items}
        not_in_ref = sorted(name for key, name in ours.items() if key not in self.rows)
        not_here = sorted(
            f"{row['tensor']}[{row['qtype']}]" for key, row in self.rows.items() if key not in ours
        )
        return not_in_ref, not_here


def _label(metric: str) -> str:
    from .metrics import FIELD_LABELS

    return FIELD_LABELS.get(metric, metric)


def _value_text(row: Mapping[str, Any], metric: str, value: float) -> tuple[str, bool]:
    """``value ± err`` with the chunk-level ± where the row has it (flag True), else
    llama-perplexity's ± (flag False), else the bare value."""
    places = 3 if ("dp" in metric or "same_top" in metric) else 6
    chunk = _number(row.get(f"{metric}_err_chunks"))
    err = chunk if chunk is not None else _number(row.get(f"{metric}_err"))
    text = f"{value:.{places}f}"
    if err is not None:
        text += f" ± {err:.{places}f}"
    return text, chunk is not None


def _failure_message(
    rule: FailRule, ref: Mapping[str, Any], measured: Mapping[str, Any], a: float, b: float
) -> str:
    now, chunk_now = _value_text(measured, rule.metric, b)
    then, chunk_then = _value_text(ref, rule.metric, a)
    kind = "chunk-level ±" if chunk_now and chunk_then else "± as available"
    change = rule.change(a, b)
    shown = f"{change:+.2f}%" if rule.relative else f"{change:+.6g}"
    op = "<" if rule.tolerance < 0 else ">"
    return (
        f"{_label(rule.metric)} {now} vs reference {then} ({kind}): change {shown} {op} "
        f"{rule.text} (--quantbench-compare-fail)"
    )


def load_reference(path: Path, current: Mapping[str, Any]) -> Reference:
    """Read a reference ``results.csv`` (``path`` may be its output directory) and check it
    against this run's settings.

    ``current``: this run's identity columns (:meth:`RunIdentity.as_row` plus ``imatrix``, the
    importance matrix identity or "").
    Raises CompareError: the file is missing, unreadable, not a quantbench results.csv, mixes
    settings, or was measured with other settings (the message names each difference).
    """
    import pandas as pd

    path = Path(path)
    csv_path = path / _RESULTS_CSV if path.is_dir() else path
    where = f"--quantbench-compare {csv_path}"
    if not csv_path.is_file():
        raise CompareError(
            f"{where}: no such file; give an earlier run's results.csv or its output directory"
        )
    try:
        df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CompareError(f"{where}: cannot read it as CSV ({exc})") from None
    needed = {"tensor", "qtype", "mean_kld", *SETTING_KEYS[:-1]}
    lacking = sorted(needed - set(df.columns))
    if lacking:
        raise CompareError(
            f"{where}: not a quantbench results.csv (no column {', '.join(lacking)})"
        )
    identity: dict[str, Any] = {}
    for key in (*SETTING_KEYS, *ENGINE_KEYS):
        if key not in df.columns:
            continue
        values = sorted({v for v in df[key] if v != ""})
        if len(values) > 1:
            raise CompareError(
                f"{where}: its rows mix several {key} values ({', '.join(values[:3])}"
                "); compare with one run's results.csv"
            )
        if values:
            identity[key] = values[0]
        elif key == "imatrix":
            identity[key] = ""
    diffs = [
        f"{key} {identity[key] or 'none'!s:.16} (reference) vs "
        f"{current.get(key) or 'none'!s:.16} (this run)"
        for key in SETTING_KEYS
        if key in identity
        and not _same(identity[key], current.get(key))
        and not _both_auto(identity[key], current.get(key))
    ]
    if diffs:
        raise CompareError(
            f"{where} was measured with other settings: {'; '.join(diffs)}. "
            "Only the engine may differ; run the reference again with this run's "
            "model, corpus, --quantbench-ctx, --quantbench-chunks and "
            "--quantbench-imatrix"
        )
    rows: dict[tuple[frozenset[str], str], dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for record in df.to_dict("records"):
        name = f"{record['tensor']}[{record['qtype']}]"
        members = [m for m in str(record.get("members", "")).split(",") if m] or [record["tensor"]]
        if _is_true(record.get("stopped_early", "")):
            skipped[name] = "early-stopped in the reference (not a full-chunk result)"
        elif _number(record.get("mean_kld")) is None:
            skipped[name] = f"not measured in the reference ({record.get('status') or 'no value'})"
        else:
            # to_dict keys are the CSV's column names, all str
            rows[_item_key(members, record["qtype"])] = cast(dict[str, Any], record)
    return Reference(csv_path, rows, identity, skipped)


def format_comparison(
    rows: Iterable[Mapping[str, Any]],
    reference: Reference,
    missing: tuple[list[str], list[str]],
    n: int = 10,
) -> list[str]:
    """Terminal-summary lines: the ``n`` largest regressions and improvements of mean KLD against
    the reference (relative change), then the items missing on either side.

    ``rows``: this run's result rows (with ``ref_mean_kld`` / ``delta_mean_kld`` where compared).
    """
    changes = []
    for row in rows:
        ref, delta = _number(row.get("ref_mean_kld")), _number(row.get("delta_mean_kld"))
        if ref is None or delta is None:
            continue
        rel = (
            100.0 * delta / ref if ref else (0.0 if delta == 0 else math.copysign(math.inf, delta))
        )
        changes.append((rel, f"{row.get('tensor')}[{row.get('qtype')}]", ref, ref + delta, row))
    lines = [f"compared with {reference.path}: {len(changes)} item(s)"]

    def entry(item) -> str:
        rel, name, ref, now, row = item
        err = _number(row.get("mean_kld_err_chunks"))
        pm = f" ± {err:.6f}" if err is not None else ""
        return f"  {name}: mean KLD {ref:.6f} -> {now:.6f}{pm} ({rel:+.2f}%)"

    worse = sorted((c for c in changes if c[0] > 0), key=lambda c: -c[0])[:n]
    better = sorted((c for c in changes if c[0] < 0), key=lambda c: c[0])[:n]
    if worse:
        lines += ["largest regressions (mean KLD up):", *map(entry, worse)]
    if better:
        lines += ["largest improvements (mean KLD down):", *map(entry, better)]
    not_in_ref, not_here = missing
    for label, names in (("not in the reference", not_in_ref), ("in the reference only", not_here)):
        if names:
            more = f" … and {len(names) - n} more" if len(names) > n else ""
            lines.append(f"{len(names)} item(s) {label}: {', '.join(names[:n])}{more}")
    if reference.skipped:
        name, why = next(iter(sorted(reference.skipped.items())))
        lines.append(f"{len(reference.skipped)} reference item(s) not compared, e.g. {name}: {why}")
    return lines
