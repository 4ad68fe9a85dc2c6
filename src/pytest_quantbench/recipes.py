"""Recipes in the GGUF tool suite's format: parse, apply to a model's tensors, write.

A recipe is text, one rule per line, ``<regex>=<qtype>``; lines are trimmed, empty lines and
lines starting with ``#`` are ignored; the regex is an unanchored bash ERE; the first matching
line decides a tensor's qtype (docs/suite-formats.md#recipe). The qtype is spelled as
users spell it (``q4_k`` → ``q4_K``) and resolved with
:func:`pytest_quantbench.qtypes.resolve_qtype`;
it must be a ggml type (a recipe names one type per tensor, never a preset mixture).

Pure module: no engine, no pytest.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .qtypes import (
    GGMLType,
    UnknownQTypeError,
    UnsupportedShapeError,
    predict_written_type,
    resolve_qtype,
)
from .selection import compile_regex, natural_key

__all__ = [
    "Recipe",
    "RecipeError",
    "RecipeRule",
    "apply_recipe",
    "format_recipe",
    "parse_recipe",
    "read_recipe",
    "written_type",
    "written_types",
]


class RecipeError(ValueError):
    """A recipe that cannot be used: bad line, bad regex, unknown or preset qtype. The message
    names the file and line."""


@dataclass(frozen=True)
class RecipeRule:
    """One recipe line ``regex=qtype``.

    Attributes:
        regex: the regex text as written; pattern: its compiled form (``search``, unanchored);
        qtype: the resolved ggml type; where: ``"line 3 of x.recipe"`` for messages.
    """

    regex: str
    pattern: re.Pattern[str] = field(compare=False, repr=False)
    qtype: GGMLType = field(compare=True)
    where: str = ""

    @property
    def text(self) -> str:
        """The rule as recipe text (``regex=qtype`` with the exact ggml spelling)."""
        return f"{self.regex}={self.qtype.name}"


@dataclass(frozen=True)
class Recipe:
    """A parsed recipe: its rules in file order and the name it is known by (file stem)."""

    name: str
    rules: tuple[RecipeRule, ...]

    def qtype_of(self, tensor: str) -> RecipeRule | None:
        """The first rule whose regex matches ``tensor`` (unanchored search), or None."""
        for rule in self.rules:
            if rule.pattern.search(tensor):
                return rule
        return None


def parse_recipe(lines: Iterable[str], source: str, *, name: str | None = None) -> Recipe:
    """Parse recipe lines (docs/suite-formats.md#recipe).

    Args:
        lines: the recipe's lines; source: the file name used in messages; name: the recipe's
            name (default: ``source``'s stem, without ``.recipe`` / ``.recipe.txt``).
    Returns: the :class:`Recipe`.
    Raises: RecipeError naming the line for a line without ``=``, an empty regex or qtype, a
        regex that does not compile, an unknown qtype (with the closest valid names) or a preset
        name (a recipe gives each tensor one ggml type).
    """
    rules = []
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"line {number} of {source}"
        regex, sep, qtext = line.rpartition("=")
        regex, qtext = regex.strip(), qtext.strip()
        if not sep or not regex or not qtext:
            raise RecipeError(
                f"{where}: {line!r} is not 'regex=qtype' (e.g. "
                r"'^blk\.0\.attn_q\.weight$=q4_K')"
            )
        try:
            pattern = compile_regex(regex)
        except re.error as exc:
            raise RecipeError(f"{where}: invalid regex {regex!r}: {exc}") from None
        try:
            qtype = resolve_qtype(qtext)
        except UnknownQTypeError as exc:
            raise RecipeError(f"{where}: {exc}") from None
        if qtype.kind != "type":
            raise RecipeError(
                f"{where}: {qtext!r} is a llama-quantize preset (a mixture of "
                f"types); a recipe line needs one ggml type, e.g. "
                f"{qtype.ggml_type.name!r}"
            )
        rules.append(RecipeRule(regex, pattern, qtype.ggml_type, where))
    return Recipe(name or _stem(source), tuple(rules))


def _stem(source: str) -> str:
    base = os.path.basename(source)
    for suffix in (".recipe.txt", ".recipe", ".txt"):
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


def read_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Read and parse a recipe file. Raises RecipeError naming the file when it is missing, not
    UTF-8, or has a bad line (see :func:`parse_recipe`)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"recipe {p} cannot be read as UTF-8 text: {exc}") from None
    return parse_recipe(text.splitlines(), p.name)


def apply_recipe(
    recipe: Recipe, tensors: Iterable[str], warn: Callable[[str], None] | None = None
) -> dict[str, GGMLType]:
    """Tensor → requested ggml type: the first matching rule for each tensor.

    Args:
        recipe: the parsed recipe; tensors: the model's tensor names; warn: called once per
            rule that matches no tensor (first-match-wins: a rule shadowed by earlier rules for
            every tensor counts as matching nothing).
    Returns: a dict with one entry per tensor that some rule matches (others are absent: they
        keep their type).
    """
    out: dict[str, GGMLType] = {}
    used: set[int] = set()
    for tensor in tensors:
        for i, rule in enumerate(recipe.rules):
            if rule.pattern.search(tensor):
                out[tensor] = rule.qtype
                used.add(i)
                break
    if warn is not None:
        for i, rule in enumerate(recipe.rules):
            if i not in used:
                warn(f"recipe {recipe.name}: rule {rule.text!r} ({rule.where}) matches no tensor")
    return out


def written_type(want: GGMLType, info) -> GGMLType:
    """The type llama-quantize writes for tensor ``info`` (a gguf.TensorInfo) asked for ``want``:
    a float type as is, else after the fallbacks of
    :func:`pytest_quantbench.qtypes.predict_written_type`. Raises UnsupportedShapeError where the
    shape cannot hold the type, ValueError for a type with no quantize path."""
    if want.is_float:
        return want
    return predict_written_type(want, info.ne0, info.n_rows, tensor_name=info.name)[0]


def written_types(requested: Mapping[str, GGMLType], header) -> dict[str, GGMLType]:
    """The ggml type llama-quantize writes for each tensor of ``header`` under ``requested``.

    Tensors llama-quantize never quantizes (1-D, norms: selection.is_quantizable_tensor) keep
    their type; a requested type goes through the row-length / row-count fallbacks of
    :func:`pytest_quantbench.qtypes.predict_written_type` (docs/llama-quantize.md).
    Args: requested: tensor → requested type (from :func:`apply_recipe`); header: a GGUFHeader.
    Returns: tensor → written GGMLType for every tensor of the header.
    Raises: RecipeError naming the tensor when the shape cannot hold the type at all.
    """
    from .selection import is_quantizable_tensor

    out = {}
    for info in header.tensors:
        want = requested.get(info.name)
        if (
            want is None
            or not is_quantizable_tensor(info.name, info.n_dims)
            or want.name == info.type_name
        ):
            out[info.name] = info.type
            continue
        try:
            out[info.name] = written_type(want, info)
        except UnsupportedShapeError as exc:
            raise RecipeError(f"{info.name}: {exc}") from None
    return out


def format_recipe(assignment: Mapping[str, str], comments: Iterable[str] = ()) -> str:
    """Recipe text: ``comments`` as ``#`` lines, then one ``^<escaped name>$=<qtype>`` line per
    tensor in natural order, with ``## <kind>`` section lines between tensor kinds.

    Args: assignment: tensor → exact ggml type name; comments: header lines (without ``#``).
    Returns: the text, LF line endings, ending with a newline.
    """
    from .selection import tensor_kind

    lines = [f"# {c}".rstrip() for c in comments]
    by_kind: dict[str, list[str]] = {}
    for tensor in sorted(assignment, key=natural_key):
        by_kind.setdefault(tensor_kind(tensor), []).append(tensor)
    for kind in sorted(by_kind):
        lines.append(f"## {kind}")
        lines += [f"^{re.escape(t)}$={assignment[t]}" for t in by_kind[kind]]
    return "\n".join(lines) + "\n"
