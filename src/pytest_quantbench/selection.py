"""Tensor selection: ``regex=qtype[=locked]`` rules and the natural tensor order.

Pure module (no numpy, no engine, no pytest). It decides *which* tensors of a
model become benchmark items; the caller supplies the candidate names (only
weights a quantizer can change, see :func:`is_quantizable_tensor`) and the
rules (from a file, the CLI or the defaults).

Formats implemented here and where they are specified:

* the rule syntax ``'<regex>=<qtype>'`` / ``'<regex>=<qtype>=locked'``, its
  split on ``=``, "first matching rule decides" and unanchored matching as
  bash's ``=~``: ``docs/suite-formats.md#selection`` (and docs/suite-formats.md#recipe for the
  recipe-style comment / blank-line handling);
* the column order of the suite's CSVs, ``sort -Vu`` (GNU ``filevercmp``):
  ``docs/suite-formats.md#column-order``;
* the set of tensors ``llama-quantize`` can change:
  ``docs/llama-quantize.md#custom-q-eligible``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "DEFAULT_REGEX",
    "DEFAULT_RULES",
    "Group",
    "Rule",
    "Selection",
    "SelectionError",
    "compile_regex",
    "is_quantizable_tensor",
    "layer_of",
    "natural_key",
    "parse_rules",
    "select_groups",
    "select_tensors",
    "tensor_kind",
]


class SelectionError(ValueError):
    """A selection rule is malformed, or the rules select no tensor."""


# --------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------

#: Default selection when no rule is given: the four attention projections of
#: every layer (``attn_q``, ``attn_k``, ``attn_v``, ``attn_output``).
DEFAULT_REGEX = r"^blk\.[0-9]+\.attn_(q|k|v|output)\.weight$"

# POSIX bracket classes that bash's ERE understands and Python's ``re`` does
# not (``re`` would silently read ``[[:digit:]]`` as a set of the characters
# ``[:digt``). They are only meaningful inside a bracket expression.
_POSIX_CLASSES = {
    "[:alnum:]": "a-zA-Z0-9",
    "[:alpha:]": "a-zA-Z",
    "[:blank:]": r" \t",
    "[:digit:]": "0-9",
    "[:lower:]": "a-z",
    "[:space:]": r" \t\n\r\f\v",
    "[:upper:]": "A-Z",
    "[:xdigit:]": "0-9A-Fa-f",
    "[:punct:]": r"!-/:-@\[-`{-~",
}
_UNKNOWN_POSIX_CLASS = re.compile(r"\[:[A-Za-z]+:\]")


def compile_regex(regex: str) -> re.Pattern[str]:
    """Compile a suite regex (a bash ERE) with Python's :mod:`re`.

    Input: the regex text as written in a rule. Output: the compiled pattern,
    to be used with ``pattern.search(name)`` (unanchored, like bash ``=~``;
    docs/suite-formats.md#selection). POSIX classes such as ``[[:digit:]]`` are translated to
    their ASCII ranges first; every other construct is passed to :mod:`re`
    unchanged (ERE is, for what tensor rules use, a subset of it).

    Raises :class:`re.error` when the regex does not compile, or when it
    uses a POSIX class that is not known (``[[:foo:]]``).
    """
    text = regex
    for posix, ranges in _POSIX_CLASSES.items():
        text = text.replace(posix, ranges)
    unknown = _UNKNOWN_POSIX_CLASS.search(text)
    if unknown:
        raise re.error(f"unknown POSIX character class {unknown.group(0)}")
    with warnings.catch_warnings():
        # "Possible nested set" etc.: the construct still means what it
        # means in an ERE (e.g. "[[]"), so don't let it leak to the user.
        warnings.simplefilter("ignore", FutureWarning)
        return re.compile(text)


@dataclass(frozen=True)
class Rule:
    """One selection rule, ``regex[=qtype[=locked]]``.

    ``regex`` is the text as written, ``pattern`` its compiled form (search,
    unanchored), ``qtype`` the qtype field as written (``None`` for a bare
    regex), ``locked`` whether a non-empty third field was given, and
    ``source`` where the rule came from (``"line 3 of rules.txt"``,
    ``"--quantbench-tensors (entry 1)"`` or ``"default"``).
    """

    regex: str
    pattern: re.Pattern[str] = field(compare=False, repr=False)
    qtype: str | None
    locked: bool
    source: str

    @property
    def text(self) -> str:
        """The rule in suite syntax (``regex=qtype[=locked]``)."""
        out = self.regex
        if self.qtype is not None:
            out += "=" + self.qtype
        if self.locked:
            out += "=locked"
        return out

    def describe(self) -> str:
        """``'<rule text>' (<source>)``, the way messages name a rule."""
        return f"'{self.text}' ({self.source})"


DEFAULT_RULES: tuple[Rule, ...] = (
    Rule(DEFAULT_REGEX, compile_regex(DEFAULT_REGEX), None, False, "default"),
)


def _rule_source(source: str, index: int) -> str:
    if source.startswith("-"):  # a command-line option: entries, not lines
        return f"{source} (entry {index})"
    return f"line {index} of {source}"


def parse_rules(lines: Iterable[str], source: str) -> tuple[Rule, ...]:
    """Parse selection rules in the suite's ``USER_REGEX`` syntax.

    Inputs: ``lines``, one rule per item (the lines of a rules file, or the
    values of a repeatable CLI option), and ``source``, a name for messages
    (a file name, or an option name starting with ``-``).

    Each non-blank line not starting with ``#`` (after trimming) is split on
    ``=`` (docs/suite-formats.md#selection, so a regex cannot contain ``=``):

    * ``regex=qtype`` and ``regex=qtype=locked`` (any non-empty third field
      means locked: never benchmarked);
    * a bare ``regex`` (no ``=``) is accepted with ``qtype=None``.

    Output: the rules in input order (order matters: the first matching rule
    decides).

    Raises :class:`SelectionError` naming the rule and its source for: more
    than two ``=``, an empty regex, an empty qtype after ``=``, or a regex
    that does not compile (the :mod:`re` message is included).
    """
    rules: list[Rule] = []
    for index, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = _rule_source(source, index)
        parts = line.split("=")
        if len(parts) > 3:
            raise SelectionError(
                f"invalid selection rule '{line}' ({where}): expected "
                "'regex=qtype' or 'regex=qtype=locked'; a regex cannot contain '='"
            )
        regex = parts[0]
        qtype: str | None = parts[1].strip() if len(parts) >= 2 else None
        locked = len(parts) == 3 and parts[2].strip() != ""
        if not regex:
            raise SelectionError(
                f"invalid selection rule '{line}' ({where}): the regex before '=' is empty"
            )
        if qtype == "":
            raise SelectionError(
                f"invalid selection rule '{line}' ({where}): the qtype after '=' is empty"
            )
        try:
            pattern = compile_regex(regex)
        except re.error as exc:
            raise SelectionError(
                f"invalid regex in selection rule '{line}' ({where}): {exc}"
            ) from None
        rules.append(Rule(regex, pattern, qtype, locked, where))
    return tuple(rules)


# --------------------------------------------------------------------------
# Natural order (GNU sort -V)
# --------------------------------------------------------------------------

_DIGITS = frozenset("0123456789")


def _order(c: str) -> int:
    # gnulib filevercmp.c order(): letters by code, '~' first, others after
    # all letters; digits never reach here.
    if c.isascii() and c.isalpha():
        return ord(c)
    if c == "~":
        return -2
    return ord(c) + 256


def _verkey(s: str) -> tuple[int, ...]:
    """Flat key whose tuple order equals gnulib ``verrevcmp`` on ``s``.

    Non-digit runs contribute ``order(c)`` per character; a digit run
    contributes a ``0`` marker (a digit sorts before any non-digit character)
    followed by its integer value (leading zeros ignored, longer number
    larger); the end of the string contributes ``-1`` (sorts before
    everything but ``~``).
    """
    key: list[int] = []
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c in _DIGITS:
            j = i
            while j < n and s[j] in _DIGITS:
                j += 1
            value = int(s[i:j])
            if value or j < n:
                # A run of zeros at the very end compares equal to nothing
                # (verrevcmp skips leading zeros, then finds both ends).
                key.append(0)
                key.append(value)
            i = j
        else:
            key.append(_order(c))
            i += 1
    key.append(-1)
    return tuple(key)


def _file_prefix(s: str) -> str:
    """``s`` without its file suffix, as gnulib ``file_prefixlen``.

    The suffix is the longest tail matching ``(\\.[A-Za-z~][A-Za-z0-9~]*)*``;
    the first character always belongs to the prefix.
    """
    n = len(s)
    prefixlen = 0
    i = 0
    while True:
        if i == n:
            return s[:prefixlen]
        i += 1
        prefixlen = i
        while (
            i + 1 < n
            and s[i] == "."
            and ((s[i + 1].isascii() and s[i + 1].isalpha()) or s[i + 1] == "~")
        ):
            i += 2
            while i < n and ((s[i].isascii() and s[i].isalnum()) or s[i] == "~"):
                i += 1


def natural_key(name: str) -> tuple[object, ...]:
    """Sort key that orders names as GNU ``sort -V`` (``filevercmp``) does.

    Input: a tensor (or group) name. Output: a tuple usable as
    ``sorted(names, key=natural_key)``; ties that ``filevercmp`` leaves open
    are broken by plain string order, as ``sort``'s last-resort comparison.

    Consequences for tensor names: ``blk.2.*`` < ``blk.10.*``; every
    ``blk.*`` before ``output.weight`` before ``token_embd.weight``; letters
    sort before punctuation (``attn_kv_b`` < ``attn_k_b``). This is the column
    order of the suite's CSVs (docs/suite-formats.md#column-order: ``sort -Vu``).
    """
    if not name:
        return (0, (), (), name)
    leading_dot = 0 if name.startswith(".") else 1  # "." names first, as sort -V
    return (leading_dot, _verkey(_file_prefix(name)), _verkey(name), name)


# --------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """The outcome of :func:`select_tensors`.

    ``tensors``: the selected names in natural order. ``rule_for``: for each
    selected tensor, the rule that decided it (its ``qtype`` field travels
    with it). ``locked``: tensors decided by a locked rule (never benchmarked),
    natural order. ``unmatched_rules``: rules that match no tensor at all
    (worth a warning: probably a typo). ``shadowed_rules``: rules that match
    some tensor but decide none, because earlier rules took every tensor
    they match. ``rules``: the rules that were applied (the defaults when
    none were given).
    """

    tensors: tuple[str, ...]
    rule_for: Mapping[str, Rule]
    locked: tuple[str, ...]
    unmatched_rules: tuple[Rule, ...]
    shadowed_rules: tuple[Rule, ...]
    rules: tuple[Rule, ...]


def select_tensors(
    tensor_names: Iterable[str],
    rules: Sequence[Rule],
    *,
    default_regex: str = DEFAULT_REGEX,
) -> Selection:
    """Apply selection rules to the candidate tensor names.

    Inputs: ``tensor_names``, the eligible tensors of the model (duplicates
    are ignored); ``rules``, from :func:`parse_rules` (possibly several
    sources concatenated); ``default_regex``, used as the only rule when
    ``rules`` is empty (default :data:`DEFAULT_REGEX`: attention weights of
    every layer).

    Semantics (docs/suite-formats.md#selection): for each tensor the *first* rule whose
    regex matches (``pattern.search``, unanchored) decides; a locked rule
    means "never benchmark"; a tensor matched by no rule is not selected.

    Output: a :class:`Selection` (selected names in :func:`natural_key`
    order, the deciding rule of each, locked tensors, unmatched and shadowed
    rules).

    Raises :class:`SelectionError` when nothing is selected; the message
    lists the rules and a few of the tensor names, or says that no candidate
    tensor was given at all. Also raised when ``default_regex`` is invalid.
    """
    names = sorted(set(tensor_names), key=natural_key)
    if rules:
        applied = tuple(rules)
    elif default_regex == DEFAULT_REGEX:
        applied = DEFAULT_RULES
    else:
        try:
            pattern = compile_regex(default_regex)
        except re.error as exc:
            raise SelectionError(
                f"invalid default selection regex '{default_regex}': {exc}"
            ) from None
        applied = (Rule(default_regex, pattern, None, False, "default"),)

    matched_any = [False] * len(applied)
    decided_any = [False] * len(applied)
    selected: list[str] = []
    locked: list[str] = []
    rule_for: dict[str, Rule] = {}
    for name in names:
        decider: int | None = None
        for idx, rule in enumerate(applied):
            if rule.pattern.search(name):
                matched_any[idx] = True
                if decider is None:
                    decider = idx
        if decider is None:
            continue
        decided_any[decider] = True
        rule = applied[decider]
        if rule.locked:
            locked.append(name)
        else:
            selected.append(name)
            rule_for[name] = rule

    unmatched = tuple(r for r, m in zip(applied, matched_any, strict=True) if not m)
    shadowed = tuple(
        r for r, m, d in zip(applied, matched_any, decided_any, strict=True) if m and not d
    )
    if not selected:
        if not names:
            raise SelectionError(
                "no tensor selected: the model has no eligible (quantizable) tensor to select from"
            )
        shown = ", ".join(names[:5]) + (", …" if len(names) > 5 else "")
        rule_list = "; ".join(r.describe() for r in applied)
        locked_note = f" ({len(locked)} matched a locked rule)" if locked else ""
        raise SelectionError(
            f"no tensor selected{locked_note}: the rules {rule_list} select none of the "
            f"{len(names)} eligible tensors (e.g. {shown}); rules are regexes searched "
            "in the full tensor name, such as '^blk\\.[0-9]+\\.ffn_down\\.weight$=q4_K'"
        )
    return Selection(
        tensors=tuple(selected),
        rule_for=rule_for,
        locked=tuple(locked),
        unmatched_rules=unmatched,
        shadowed_rules=shadowed,
        rules=applied,
    )


@dataclass(frozen=True)
class Group:
    """One tensor group of ``--quantbench-group-tensors``: measured as a single unit.

    ``name``: ``group<N>``, N the position of its argument (0-based), as the suite names its
    CSV columns and log files; ``regexes``: the argument split on ``,``; ``members``: the matched
    tensors in natural order.
    """

    name: str
    regexes: tuple[str, ...]
    members: tuple[str, ...]

    @property
    def spec(self) -> str:
        """The group as the suite's mapping file writes it: ``regex[,regex…]``."""
        return ",".join(self.regexes)


def select_groups(
    group_args: Sequence[str], tensor_names: Iterable[str], *, warn=lambda msg: None
) -> tuple[Group, ...]:
    """The tensor groups of the run (docs/suite-formats.md#groups).

    Inputs: ``group_args``, one string per group, each a comma-separated list of regexes
    (a group regex cannot contain ``,``); ``tensor_names``, the eligible tensors; ``warn`` is
    called with a message for a group that matches no tensor or repeats an earlier group's
    members (identical member sets are measured once, under the first group's name).

    Output: the groups with at least one member, in argument order.
    Raises :class:`SelectionError` for an empty group argument or a regex that does not compile
    (the message names the group and the regex).
    """
    names = sorted(set(tensor_names), key=natural_key)
    groups: list[Group] = []
    seen: dict[tuple[str, ...], str] = {}
    for index, arg in enumerate(group_args):
        name = f"group{index}"
        regexes = tuple(part.strip() for part in arg.split(","))
        if not arg.strip() or not all(regexes):
            raise SelectionError(
                f"--quantbench-group-tensors {name} {arg!r}: an empty regex; "
                "give comma-separated regexes such as '^blk\\.0\\.attn_.*'"
            )
        patterns = []
        for regex in regexes:
            try:
                patterns.append(compile_regex(regex))
            except re.error as exc:
                raise SelectionError(
                    f"--quantbench-group-tensors {name}: invalid regex '{regex}': {exc}"
                ) from None
        members = tuple(n for n in names if any(p.search(n) for p in patterns))
        if not members:
            warn(f"quantbench: group {name} ({arg}) matches no tensor")
            continue
        if members in seen:
            warn(
                f"quantbench: group {name} ({arg}) has the same members as {seen[members]}: "
                "measured once, as " + seen[members]
            )
            continue
        seen[members] = name
        groups.append(Group(name, regexes, members))
    return tuple(groups)


# --------------------------------------------------------------------------
# Tensor facts
# --------------------------------------------------------------------------

_NEVER_QUANTIZED_SUBSTRINGS = (
    "_norm.weight",
    "ssm_conv1d.weight",
    "ssm_x.weight",
    "ssm_dt.weight",
    "attn_rel_b.weight",
)
_NEVER_QUANTIZED_NAMES = ("position_embd.weight", "token_types.weight")


def is_quantizable_tensor(
    name: str,
    n_dims: int,
    *,
    quantize_ffn_gate_inp: bool = False,
    leave_output_tensor: bool = False,
) -> bool:
    """Whether ``llama-quantize`` would quantize this tensor at all.

    Inputs: the tensor name and its number of dimensions (``ggml_n_dims``:
    trailing dimensions of size 1 do not count). The keyword flags mirror
    ``--ffn-gate-inp-type`` (ik) and ``--leave-output-tensor``.

    Output: ``True`` when the name ends in ``weight``, the tensor is at least
    2-D, and it is none of: ``*_norm.weight``, ``ffn_gate_inp.weight``
    (unless ``quantize_ffn_gate_inp``), ``position_embd.weight``,
    ``token_types.weight``, ``ssm_conv1d``/``ssm_x``/``ssm_dt`` weights,
    ``attn_rel_b.weight``, or ``output.weight`` when
    ``leave_output_tensor``. Source: docs/llama-quantize.md#custom-q-eligible. Raises nothing.
    """
    if not name.endswith("weight") or n_dims < 2:
        return False
    if any(s in name for s in _NEVER_QUANTIZED_SUBSTRINGS):
        return False
    if name in _NEVER_QUANTIZED_NAMES:
        return False
    if not quantize_ffn_gate_inp and "ffn_gate_inp.weight" in name:
        return False
    if leave_output_tensor and name == "output.weight":
        return False
    return True


_LAYER_RE = re.compile(r"(?:^|\.)blk\.([0-9]+)\.")


def layer_of(name: str) -> int | None:
    """The layer number of a ``blk.N.…`` tensor name, else ``None``.

    ``layer_of("blk.12.ffn_down.weight") == 12``;
    ``layer_of("token_embd.weight") is None``. Raises nothing.
    """
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def tensor_kind(name: str) -> str:
    """The tensor's kind, its name without layer prefix and ``.weight``.

    ``"blk.3.attn_q.weight"`` → ``"attn_q"``; ``"blk.3.ffn_down_exps.weight"``
    → ``"ffn_down_exps"``; ``"token_embd.weight"`` → ``"token_embd"``;
    ``"output.weight"`` → ``"output"``. Other suffixes are kept
    (``"blk.0.attn_q.bias"`` → ``"attn_q.bias"``); a group name is returned
    unchanged. Used for markers and per-kind summaries. Raises nothing.
    """
    m = _LAYER_RE.search(name)
    rest = name[m.end() :] if m else name
    if rest.endswith(".weight"):
        rest = rest[: -len(".weight")]
    return rest
