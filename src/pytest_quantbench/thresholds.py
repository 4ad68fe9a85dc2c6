"""Pass/fail thresholds: a YAML rules file → per-item limits → violations.

Pure module (PyYAML only; no numpy, no engine, no pytest). The metric names
and their meaning are those of ``llama-perplexity --kl-divergence``
(``docs/llama-perplexity.md#statistics``,
labels as printed in docs/llama-perplexity.md#kld-output); Δp and same-top-p are in percent there
and here.

File format (YAML, read with ``yaml.safe_load``)::

    defaults:              # optional: limits for every item
      max_kld: 0.05
    rules:                 # optional: applied in order, later ones win per limit
      - tensor: 'attn_v'   # regex, unanchored search (as the suite's rules,
                           #   docs/suite-formats.md#selection); optional, default: every tensor
        qtype: q4_0        # optional; a string or a list; any qtype name as
                           #   --quantbench-qtypes takes it (q4_k = q4_K); one
                           #   not in the run is ignored, an unknown one an error
        max_kld: 0.01      # mean KLD
        max_ppl_ratio: 1.02          # or max_ppl_increase_pct: 2.0 (not both)
        min_same_top_p: 95           # percent
        max_kld_p99: 0.1

A limit set to ``null`` in a later rule removes the limit inherited from
``defaults`` or an earlier rule. ``max_ppl_ratio`` and
``max_ppl_increase_pct`` are one limit written two ways
(``pct = (ratio − 1)·100``): a later rule setting either replaces both.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "LIMIT_SPECS",
    "Limit",
    "LimitSpec",
    "Thresholds",
    "ThresholdsError",
    "ThresholdRule",
    "Violation",
    "load_thresholds",
]


class ThresholdsError(ValueError):
    """The thresholds file is missing, unreadable or invalid."""


@dataclass(frozen=True)
class LimitSpec:
    """What one limit key checks.

    ``key``: the YAML key. ``metric``: the row key it reads. ``err``: the row
    key of its ± (or ``None``). ``label``: how llama-perplexity labels the
    statistic (docs/llama-perplexity.md#kld-output). ``kind``: ``"max"`` (fails when value > limit)
    or ``"min"`` (fails when value < limit). ``decimals``: digits printed for the
    value. ``scale``/``offset``: the checked value is
    ``(metric + offset) * scale`` (used for the PPL increase in percent).
    ``unit``: appended to the printed value. ``upper``: largest allowed limit.
    ``slot``: keys with the same slot are one limit (override each other).
    """

    key: str
    metric: str
    err: str | None
    label: str
    kind: str
    decimals: int
    scale: float = 1.0
    offset: float = 0.0
    unit: str = ""
    upper: float | None = None
    slot: str = ""

    def slot_name(self) -> str:
        return self.slot or self.key


def _kld_pct(key: str, metric: str, label: str) -> LimitSpec:
    return LimitSpec(key, metric, None, label, "max", 6)


#: Every limit key a thresholds file may use, in the order violations are
#: reported.
LIMIT_SPECS: Mapping[str, LimitSpec] = {
    spec.key: spec
    for spec in (
        LimitSpec("max_kld", "mean_kld", "mean_kld_err", "mean KLD", "max", 6),
        _kld_pct("max_kld_p99_9", "kld_p99_9", "99.9% KLD"),
        _kld_pct("max_kld_p99", "kld_p99", "99.0% KLD"),
        _kld_pct("max_kld_p95", "kld_p95", "95.0% KLD"),
        _kld_pct("max_kld_p90", "kld_p90", "90.0% KLD"),
        _kld_pct("max_median_kld", "median_kld", "median KLD"),
        LimitSpec(
            "max_ppl_ratio",
            "ppl_ratio",
            "ppl_ratio_err",
            "PPL(Q)/PPL(base)",
            "max",
            4,
            slot="ppl_ratio",
        ),
        LimitSpec(
            "max_ppl_increase_pct",
            "ppl_ratio",
            "ppl_ratio_err",
            "PPL increase",
            "max",
            2,
            scale=100.0,
            offset=-1.0,
            unit="%",
            slot="ppl_ratio",
        ),
        LimitSpec("max_rms_dp", "rms_dp", "rms_dp_err", "RMS Δp", "max", 3, unit="%"),
        LimitSpec(
            "min_same_top_p",
            "same_top_p",
            "same_top_p_err",
            "same top p",
            "min",
            3,
            unit="%",
            upper=100.0,
        ),
    )
}

_RULE_SELECTORS = ("tensor", "qtype")
_TOP_LEVEL_KEYS = ("defaults", "rules")


@dataclass(frozen=True)
class Limit:
    """One limit as it applies to an item: ``key``, ``value`` and ``source``.

    ``source`` names the rule that set it, e.g.
    ``"rule 2 (tensor='attn_v', qtype=q4_0) in thresholds.yaml"`` or
    ``"defaults in thresholds.yaml"``.
    """

    key: str
    value: float
    source: str

    @property
    def spec(self) -> LimitSpec:
        return LIMIT_SPECS[self.key]


@dataclass(frozen=True)
class Violation:
    """A limit the item does not meet.

    ``measured`` is ``False`` when the metric is absent or not finite: the
    limit could not be checked (the caller may treat that as an error rather
    than a regression). ``value``/``err`` are the compared value and its ±
    (after the spec's scale, e.g. percent), ``None`` when not available.
    """

    limit: Limit
    value: float | None
    err: float | None
    measured: bool
    message: str


@dataclass(frozen=True)
class ThresholdRule:
    """One parsed rule: selectors, the limits it sets, and its description.

    ``limits`` maps a limit key to its value, or to ``None`` for "remove the
    inherited limit". ``qtypes`` is ``None`` for "any qtype", else the
    qtypes' labels (:func:`~pytest_quantbench.qtypes.qtype_label`: ``q4_K``,
    ``q4_k_m``). ``describe`` is how messages name the rule.
    """

    index: int | None  # 1-based; None for "defaults"
    tensor: str | None
    pattern: re.Pattern[str] | None = field(compare=False, repr=False)
    qtypes: tuple[str, ...] | None = None
    limits: Mapping[str, float | None] = field(default_factory=dict)
    describe: str = ""

    def matches(self, tensor: str, qtype: str) -> bool:
        if self.pattern is not None and not self.pattern.search(tensor):
            return False
        if self.qtypes is not None and _label(qtype) not in self.qtypes:
            return False
        return True


def _label(qtype: str) -> str:
    """``qtype``'s label (``Q4_K`` → ``q4_K``), or ``qtype`` itself when it is no qtype name."""
    from .qtypes import UnknownQTypeError, qtype_label, resolve_qtype

    try:
        return qtype_label(resolve_qtype(qtype))
    except UnknownQTypeError:
        return qtype


def _fmt_limit(value: float) -> str:
    return format(value, ".15g")


class Thresholds:
    """Parsed thresholds: ``defaults`` then ``rules``, applied in order.

    Build with :func:`load_thresholds` or :meth:`Thresholds.empty`.
    """

    def __init__(
        self, rules: Sequence[ThresholdRule], path: str | None = None, notes: Sequence[str] = ()
    ) -> None:
        self.rules: tuple[ThresholdRule, ...] = tuple(rules)
        self.path = path
        #: One line per rule qtype that is not in this run (ignored), for ``-v``.
        self.notes: tuple[str, ...] = tuple(notes)

    @classmethod
    def empty(cls) -> Thresholds:
        """Thresholds with no limit: :meth:`check` always returns ``[]``."""
        return cls(())

    def __bool__(self) -> bool:
        return any(rule.limits for rule in self.rules)

    def __repr__(self) -> str:
        return f"Thresholds(path={self.path!r}, rules={len(self.rules)})"

    def limits_for(self, tensor: str, qtype: str) -> dict[str, Limit]:
        """The limits that apply to one item.

        Inputs: the tensor (or group) name and the requested qtype (compared
        case-insensitively). Output: limit key → :class:`Limit`, in
        :data:`LIMIT_SPECS` order; defaults first, then every matching rule in
        file order, a later rule overriding an earlier one per limit (the two
        PPL-ratio spellings count as one limit; ``null`` removes a limit).
        Raises nothing.
        """
        by_slot: dict[str, Limit] = {}
        for rule in self.rules:
            if not rule.matches(tensor, qtype):
                continue
            for key, value in rule.limits.items():
                slot = LIMIT_SPECS[key].slot_name()
                if value is None:
                    by_slot.pop(slot, None)
                else:
                    by_slot[slot] = Limit(key, value, rule.describe)
        chosen = {lim.key: lim for lim in by_slot.values()}
        return {key: chosen[key] for key in LIMIT_SPECS if key in chosen}

    def check(self, tensor: str, qtype: str, row_metrics: Mapping[str, Any]) -> list[Violation]:
        """Check one item's metrics against its limits.

        Inputs: tensor name, requested qtype, and the item's metrics (a row:
        metric key → number; absent keys were not measured). Output: one
        :class:`Violation` per limit not met, in :data:`LIMIT_SPECS` order; an
        empty list when all limits hold or there are none. A limit whose
        metric is absent or not finite yields a violation with
        ``measured=False``. Messages read, e.g.::

            mean KLD 0.012345 ± 0.000456 > max_kld 0.01 (rule 2 (tensor='attn_v', qtype=q4_0) in thresholds.yaml)
            (the ± is ``<err>_chunks``, the chunk-level one, where the row has it: then the
            message ends in "(± from chunk means)")
            PPL(Q)/PPL(base) 1.0312 ± 0.0041 > max_ppl_ratio 1.02 (defaults in thresholds.yaml)

        Raises nothing.
        """
        violations: list[Violation] = []
        for key, limit in self.limits_for(tensor, qtype).items():
            spec = limit.spec
            where = f"({limit.source})"
            raw = row_metrics.get(spec.metric)
            value = _as_float(raw)
            if value is None or not math.isfinite(value):
                shown = "not measured" if raw is None else f"not a finite number ({raw!r})"
                violations.append(
                    Violation(
                        limit,
                        None,
                        None,
                        False,
                        f"{spec.label} is {shown}, so {key} {_fmt_limit(limit.value)} "
                        f"cannot be checked {where}",
                    )
                )
                continue
            value = (value + spec.offset) * spec.scale
            failed = value > limit.value if spec.kind == "max" else value < limit.value
            if not failed:
                continue
            # the chunk-level (batch-means) ± where the row has it: tokens of a chunk are
            # correlated, so llama-perplexity's ± understates the uncertainty of a verdict
            chunk_err = _as_float(row_metrics.get(f"{spec.err}_chunks")) if spec.err else None
            chunk_level = chunk_err is not None and math.isfinite(chunk_err)
            err = (
                chunk_err
                if chunk_level
                else (_as_float(row_metrics.get(spec.err)) if spec.err else None)
            )
            if err is not None and math.isfinite(err):
                err = err * abs(spec.scale)
            else:
                err = None
            d = spec.decimals
            text = f"{value:.{d}f}{spec.unit}"
            if err is not None:
                text += f" ± {err:.{d}f}{spec.unit}"
            op = ">" if spec.kind == "max" else "<"
            violations.append(
                Violation(
                    limit,
                    value,
                    err,
                    True,
                    f"{spec.label} {text} {op} {key} {_fmt_limit(limit.value)} {where}"
                    + (" (± from chunk means)" if chunk_level and err is not None else ""),
                )
            )
        return violations


def _as_float(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _type_name(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing (null)"
    return f"{value!r} ({type(value).__name__})"


def _describe_rule(index: int, raw: Mapping[str, Any], path: str) -> str:
    parts = []
    if "tensor" in raw:
        parts.append(f"tensor='{raw['tensor']}'")
    if "qtype" in raw:
        q = raw["qtype"]
        if isinstance(q, list):
            parts.append("qtype=[" + ", ".join(str(x) for x in q) + "]")
        else:
            parts.append(f"qtype={q}")
    inner = ", ".join(parts) if parts else "every item"
    return f"rule {index} ({inner}) in {path}"


def _make_loader() -> type:
    import yaml

    class _UniqueKeyLoader(yaml.SafeLoader):
        """SafeLoader that refuses duplicate keys (safe_load keeps the last)."""

    def construct_mapping(loader: Any, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r}",
                    key_node.start_mark,
                )
            seen.add(key)
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    _UniqueKeyLoader.add_constructor(
        yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping
    )
    return _UniqueKeyLoader


def _parse_limit(key: str, value: Any, where: str) -> float | None:
    spec = LIMIT_SPECS[key]
    if value is None:
        return None
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        # PyYAML reads "1e-3" (no dot) as a string: accept numeric text.
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if number is None:
        raise ThresholdsError(
            f"{where}: {key} must be a number, got {_type_name(value)}; "
            f"write e.g. '{key}: 0.05', or '{key}: null' to remove an inherited limit"
        )
    if not math.isfinite(number):
        raise ThresholdsError(
            f"{where}: {key} must be a finite number, got {value!r}; "
            f"use '{key}: null' to remove an inherited limit"
        )
    if number < 0:
        raise ThresholdsError(f"{where}: {key} must be >= 0, got {_fmt_limit(number)}")
    if spec.upper is not None and number > spec.upper:
        raise ThresholdsError(
            f"{where}: {key} is a percentage and must be <= {_fmt_limit(spec.upper)}, "
            f"got {_fmt_limit(number)}"
        )
    return number


def _parse_limits(
    raw: Mapping[str, Any], where: str, allowed: Sequence[str]
) -> dict[str, float | None]:
    limits: dict[str, float | None] = {}
    for key, value in raw.items():
        if key in _RULE_SELECTORS and key not in allowed:
            raise ThresholdsError(
                f"{where}: '{key}' selects items and belongs in a rule under 'rules', "
                "not in 'defaults'"
            )
        if not isinstance(key, str) or key not in allowed:
            raise ThresholdsError(
                f"{where}: unknown key '{key}'{_suggest(str(key), allowed)} "
                f"(allowed: {', '.join(allowed)})"
            )
        if key in _RULE_SELECTORS:
            continue
        limits[key] = _parse_limit(key, value, where)
    if "max_ppl_ratio" in limits and "max_ppl_increase_pct" in limits:
        raise ThresholdsError(
            f"{where}: max_ppl_ratio and max_ppl_increase_pct are the same limit "
            "written two ways (max_ppl_increase_pct = (max_ppl_ratio - 1)·100); set only one"
        )
    return limits


def load_thresholds(
    path: str | os.PathLike[str], *, run_qtypes: Collection[str] | None = None
) -> Thresholds:
    """Read and validate a thresholds YAML file.

    Inputs: ``path`` (shown in messages as given); ``run_qtypes``, the qtypes
    of this run as given (names, or comma/space separated lists of names):
    when given, a rule's qtype that is a valid name but not among them is
    ignored, so one file serves runs with different qtypes, and noted in
    :attr:`Thresholds.notes`. Rule qtypes are compared by label
    (:func:`~pytest_quantbench.qtypes.qtype_label`: ``q4_k`` is ``q4_K``;
    ``q8_kv_r8``, a preset, is not ``q8_KV_r8``, a type).

    Output: :class:`Thresholds` (format: this module's docstring; metrics:
    docs/llama-perplexity.md#statistics).

    Raises :class:`ThresholdsError` (a ``ValueError``) whose message names
    the file, the rule and the fix, for: a missing or unreadable file; text
    that is not YAML (with line and column) or has a duplicate key; a top
    level that is not a mapping, or has keys other than ``defaults`` and
    ``rules``; unknown keys (with the closest known key); ``rules`` not a
    list, a rule not a mapping, a rule with no limit; a limit that is not a
    number, not finite, negative, or a percentage above 100; a ``tensor``
    that is not a string or not a valid regex; a ``qtype`` that is not a
    string or list of strings, or not a qtype name (with the closest names); both
    ``max_ppl_ratio`` and ``max_ppl_increase_pct`` in one rule.
    """
    import yaml

    from .selection import compile_regex

    shown = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise ThresholdsError(
            f"thresholds file not found: {shown}; fix the path or create the file"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ThresholdsError(f"cannot read thresholds file {shown}: {exc}") from None

    try:
        data = yaml.load(text, Loader=_make_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ThresholdsError(
            f"thresholds file {shown} is not valid YAML: {problem}{at}; fix the syntax"
        ) from None

    if not isinstance(data, Mapping):
        raise ThresholdsError(
            f"thresholds file {shown} must be a YAML mapping with 'defaults' and/or "
            f"'rules', got {_type_name(data)}"
        )
    for key in data:
        if key not in _TOP_LEVEL_KEYS:
            raise ThresholdsError(
                f"thresholds file {shown}: unknown top-level key '{key}'"
                f"{_suggest(str(key), _TOP_LEVEL_KEYS)} (allowed: defaults, rules)"
            )

    limit_keys = tuple(LIMIT_SPECS)
    parsed: list[ThresholdRule] = []

    defaults = data.get("defaults")
    if defaults is not None:
        where = f"defaults in {shown}"
        if not isinstance(defaults, Mapping):
            raise ThresholdsError(
                f"{where}: 'defaults' must be a mapping of limits (e.g. max_kld: 0.05), "
                f"got {_type_name(defaults)}"
            )
        limits = _parse_limits(defaults, where, limit_keys)
        parsed.append(ThresholdRule(None, None, None, None, limits, where))

    rules = data.get("rules")
    if rules is not None and not isinstance(rules, list):
        raise ThresholdsError(
            f"thresholds file {shown}: 'rules' must be a list of mappings "
            f"(each item starting with '- '), got {_type_name(rules)}"
        )
    from .qtypes import UnknownQTypeError, parse_qtype_list, qtype_label, resolve_qtype

    run_labels: list[str] | None = None  # a run of whole files only has no qtypes
    if run_qtypes is not None:
        run_labels = (
            [qtype_label(q) for q in parse_qtype_list(list(run_qtypes))] if run_qtypes else []
        )
    notes: list[str] = []
    for index, raw in enumerate(rules or (), start=1):
        if not isinstance(raw, Mapping):
            raise ThresholdsError(
                f"rule {index} in {shown} must be a mapping of 'tensor', 'qtype' and "
                f"limits, got {_type_name(raw)}"
            )
        where = _describe_rule(index, raw, shown)
        limits = _parse_limits(raw, where, _RULE_SELECTORS + limit_keys)
        if not limits:
            raise ThresholdsError(f"{where} sets no limit; add one of {', '.join(limit_keys)}")

        tensor = raw.get("tensor")
        pattern = None
        if "tensor" in raw:
            if not isinstance(tensor, str) or not tensor:
                raise ThresholdsError(
                    f"{where}: tensor must be a non-empty regex string, got {_type_name(tensor)}"
                )
            try:
                pattern = compile_regex(tensor)
            except re.error as exc:
                raise ThresholdsError(
                    f"{where}: tensor regex '{tensor}' is invalid: {exc}"
                ) from None

        qtypes: tuple[str, ...] | None = None
        if "qtype" in raw:
            q = raw["qtype"]
            items = q if isinstance(q, list) else [q]
            if not items or not all(isinstance(x, str) and x for x in items):
                raise ThresholdsError(
                    f"{where}: qtype must be a qtype name or a list of names, got {_type_name(q)}"
                )
            labels = []
            for name in items:
                try:
                    labels.append(qtype_label(resolve_qtype(name)))
                except UnknownQTypeError as exc:
                    raise ThresholdsError(
                        f"{where}: {exc}; fix the qtype or remove the rule"
                    ) from None
                if run_labels is not None and labels[-1] not in run_labels:
                    notes.append(
                        f"{where}: qtype '{name}' is not among this run's qtypes "
                        f"({', '.join(run_labels)}): ignored for this run"
                    )
            qtypes = tuple(labels)

        parsed.append(ThresholdRule(index, tensor, pattern, qtypes, limits, where))

    return Thresholds(parsed, shown, notes)
