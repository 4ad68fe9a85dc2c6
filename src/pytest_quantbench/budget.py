"""Choose one qtype per tensor for a size budget from measured per-tensor KLD (a recipe).

The problem is a multiple-choice knapsack: for each tensor pick one of its measured qtypes so
that the summed mean KLD is smallest while the summed tensor bytes stay within the budget.
:func:`solve` solves it exactly by dynamic programming over a size grid (the gcd of the size
steps; a coarser grid, with sizes rounded up, only when the exact one would exceed
``max_cells``, followed by a greedy fill of the bytes the rounding left), so the result never
exceeds the budget. Sizes are the real tensor bytes of the type llama-quantize writes for each
tensor shape (:func:`pytest_quantbench.qtypes.predict_written_type`, row sizes of
:func:`pytest_quantbench.qtypes.row_size`), never a bits-per-weight table.

Pure module: numpy and pandas, no engine, no pytest.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .qtypes import (
    TYPES_BY_NAME,
    GGMLType,
    UnknownQTypeError,
    UnsupportedShapeError,
    resolve_qtype,
)
from .recipes import written_type

__all__ = [
    "BudgetError",
    "BudgetPlan",
    "Infeasible",
    "load_results",
    "parse_budget",
    "plan_budget",
    "solve",
]

#: Grid cells of the dynamic programme above which sizes are rounded up to a coarser grid.
MAX_CELLS = 100_000


class BudgetError(ValueError):
    """Bad input to the budget solver (budget text, results files, qtypes, rules)."""


class Infeasible(BudgetError):
    """No choice fits the budget. ``min_bytes`` is the smallest size any choice reaches."""

    def __init__(self, message: str, min_bytes: int) -> None:
        super().__init__(message)
        self.min_bytes = min_bytes


_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_BUDGET_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_budget(text: str, n_elements: int) -> int:
    """The budget in bytes of tensor data.

    Args: text: ``4.5bpw`` (bits per weight over all ``n_elements`` weights of the model),
        ``12GiB``, ``12.5GB``, ``800MiB``, or a plain byte count; n_elements: the model's weights.
    Returns: bytes (rounded down).
    Raises: BudgetError naming the text and the accepted forms.
    """
    m = _BUDGET_RE.match(str(text))
    unit = m.group(2).lower() if m else None
    if m is None or (unit != "bpw" and unit not in _UNITS):
        raise BudgetError(
            f"--budget {text!r}: give bits per weight ('4.5bpw') or a size "
            "('12GiB', '12GB', '800MiB', a byte count)"
        )
    value = float(m.group(1))
    if value <= 0:
        raise BudgetError(f"--budget {text!r} must be positive")
    if unit == "bpw":
        return int(value * n_elements / 8)
    return int(value * _UNITS[unit])


def solve(
    choices: Sequence[Sequence[tuple[int, float]]], capacity: int, *, max_cells: int = MAX_CELLS
) -> list[int]:
    """Multiple-choice knapsack: one option per item, least summed cost, summed size ≤ capacity.

    Args:
        choices: per item, its options as (size in bytes, cost) pairs (cost: mean KLD, nats);
        capacity: bytes available; max_cells: the largest DP grid (cells) before sizes are
            rounded up to a coarser grid (then a greedy fill uses the bytes the rounding left).
    Returns: the chosen option index per item. With the exact grid (the gcd of the size steps
        fits in ``max_cells`` cells) the summed cost is the optimum; always within capacity.
    Raises: Infeasible (with ``min_bytes``, the sum of each item's smallest size) when even the
        smallest options exceed capacity; BudgetError for an item with no option.
    Source: the textbook DP for the multiple-choice knapsack (Kellerer, Pferschy, Pisinger,
        *Knapsack Problems*, ch. 11), on sizes above each item's smallest option.
    """
    import numpy as np

    if any(len(opts) == 0 for opts in choices):
        raise BudgetError("an item has no option to choose from")
    floor = [min(s for s, _ in opts) for opts in choices]
    base = sum(floor)
    if base > capacity:
        raise Infeasible(
            f"the smallest choice is {base} bytes, above the budget of {capacity}", base
        )
    steps = [[s - f for s, _ in opts] for opts, f in zip(choices, floor, strict=True)]
    room = capacity - base
    g = 0
    for row in steps:
        for e in row:
            g = math.gcd(g, e)
    if g == 0:  # every option of every item has the item's smallest size
        return [min(range(len(o)), key=lambda q: (o[q][1], o[q][0])) for o in choices]
    if room // g > max_cells:
        g = -(-room // max_cells)
    cells = room // g
    width = [[-(-e // g) for e in row] for row in steps]
    cost = np.zeros(cells + 1)
    picks = np.zeros((len(choices), cells + 1), dtype=np.int16)
    for i, opts in enumerate(choices):
        new = np.full(cells + 1, np.inf)
        pick = picks[i]
        for q, (w, (_, k)) in enumerate(zip(width[i], opts, strict=True)):
            if w > cells:
                continue
            cand = cost[: cells + 1 - w] + k
            better = cand < new[w:]
            new[w:][better] = cand[better]
            pick[w:][better] = q
        cost = new
    chosen = [0] * len(choices)
    c = cells
    for i in range(len(choices) - 1, -1, -1):
        q = int(picks[i, c])
        chosen[i] = q
        c -= width[i][q]
    return _greedy_fill(choices, chosen, capacity)


def _greedy_fill(choices, chosen: list[int], capacity: int) -> list[int]:
    """Spend bytes left under ``capacity`` on the upgrades with the best cost drop per byte."""
    used = sum(choices[i][q][0] for i, q in enumerate(chosen))
    while True:
        best = None
        for i, opts in enumerate(choices):
            s0, k0 = opts[chosen[i]]
            for q, (s, k) in enumerate(opts):
                if k < k0 and used - s0 + s <= capacity:
                    gain = (k0 - k) / max(s - s0, 1)
                    if best is None or gain > best[0]:
                        best = (gain, i, q)
        if best is None:
            return chosen
        _, i, q = best
        used += choices[i][q][0] - choices[i][chosen[i]][0]
        chosen[i] = q


# --------------------------------------------------------------------------
# results files → the measured table
# --------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    from .inputs import content_sha256

    return content_sha256(path)


def load_results(paths: Iterable[str | os.PathLike[str]]):
    """The measured single-tensor results of ``results.csv`` files (or output directories that
    hold one).

    Returns: (DataFrame with columns tensor, qtype, mean_kld (float, nats) and model_sha256 —
        one row per (tensor, qtype), the last input winning; group and unmeasured rows dropped —,
        {file name: sha256 of the file}).
    Raises: BudgetError naming the file when it is missing, lacks the columns, or the files are
        of different models.
    """
    import pandas as pd

    frames, hashes = [], {}
    for given in paths:
        p = Path(given)
        if p.is_dir():
            p = p / "results.csv"
        if not p.is_file():
            raise BudgetError(
                f"results {p} does not exist: give a results.csv or the "
                "--quantbench-output directory that holds one"
            )
        try:
            df = pd.read_csv(p, dtype={"tensor": str, "qtype": str, "members": str})
        except (ValueError, OSError) as exc:
            raise BudgetError(f"results {p} cannot be read as CSV: {exc}") from None
        missing = {"tensor", "qtype", "mean_kld"} - set(df.columns)
        if missing:
            raise BudgetError(
                f"results {p} lacks the column(s) {sorted(missing)}: is it a "
                "quantbench results.csv?"
            )
        if "members" in df.columns:
            df = df[df["members"].isna() | (df["members"] == df["tensor"])]
        df = df.assign(mean_kld=pd.to_numeric(df["mean_kld"], errors="coerce"))
        df = df[df["mean_kld"].map(lambda v: math.isfinite(v))]
        if "model_sha256" not in df.columns:
            df = df.assign(model_sha256="")
        frames.append(df[["tensor", "qtype", "mean_kld", "model_sha256"]])
        hashes[p.name if p.name not in hashes else str(p)] = _sha256(p)
    table = (
        pd.concat(frames, ignore_index=True)
        if frames
        else pd.DataFrame(columns=["tensor", "qtype", "mean_kld", "model_sha256"])
    )
    models = sorted({m for m in table["model_sha256"].fillna("") if m})
    if len(models) > 1:
        raise BudgetError(
            f"the results are of {len(models)} different models "
            f"({', '.join(m[:12] for m in models)}): give results of one model"
        )
    table = table.drop_duplicates(["tensor", "qtype"], keep="last").reset_index(drop=True)
    return table, hashes


# --------------------------------------------------------------------------
# a model + a table → a plan
# --------------------------------------------------------------------------


@dataclass
class BudgetPlan:
    """The chosen types and what they predict.

    Attributes:
        assignment: tensor → exact ggml type name written, for every tensor of the model that
            the recipe names (quantizable tensors and 1-D tensors, which stay f32).
        predicted_bytes: tensor data of the whole model under the assignment (bytes);
        n_elements: weights of the whole model; budget_bytes: the budget;
        predicted_kld: summed mean KLD (nats) of the measured tensors at their chosen types;
        fixed / unmeasured: tensors set by --fixed rules / by --default (no KLD known);
        default: the default type name; n_measured: tensors chosen from measurements.
    """

    assignment: dict[str, str]
    predicted_bytes: int
    n_elements: int
    budget_bytes: int
    predicted_kld: float
    fixed: list[str] = field(default_factory=list)
    unmeasured: list[str] = field(default_factory=list)
    default: str = ""
    n_measured: int = 0

    @property
    def predicted_bpw(self) -> float:
        """Bits per weight of the whole model's tensor data."""
        return 8.0 * self.predicted_bytes / self.n_elements


def _nbytes(t: GGMLType, info) -> int:
    from .gguf import tensor_nbytes

    return tensor_nbytes(t, info.shape)


def _written(qtype: GGMLType, info) -> GGMLType | None:
    """recipes.written_type, None where the shape cannot hold the type."""
    try:
        return written_type(qtype, info)
    except (UnsupportedShapeError, ValueError):
        return None


def plan_budget(
    header,
    table,
    budget: str,
    *,
    qtypes: Sequence[str] | None = None,
    fixed: Sequence[str] = (),
    default: str | None = None,
    max_cells: int = MAX_CELLS,
) -> BudgetPlan:
    """Choose a written type for every quantizable tensor of ``header`` within ``budget``.

    Args:
        header: the baseline's GGUFHeader (shapes, names, types);
        table: :func:`load_results`'s DataFrame (tensor, qtype, mean_kld);
        budget: ``4.5bpw`` or a size (:func:`parse_budget`);
        qtypes: the qtypes a tensor may get (default: every ggml type measured); presets are
            skipped (a recipe line holds one type);
        fixed: ``regex=qtype`` rules (first match wins) whose tensors keep that qtype;
        default: the type of quantizable tensors with no measurement (default: the measured
            qtype of the most bits per weight).
    Returns: the :class:`BudgetPlan`. 1-D tensors stay f32; other tensors llama-quantize never
        quantizes keep their baseline type (and their bytes count).
    Raises: Infeasible (message names the smallest feasible size in bytes, GiB and bpw),
        BudgetError / RecipeError for bad budget, qtypes, rules or a measured tensor that the
        model lacks.
    """
    from .recipes import parse_recipe
    from .selection import is_quantizable_tensor

    infos = {t.name: t for t in header.tensors}
    n_elements = sum(t.n_elements for t in header.tensors)
    budget_bytes = parse_budget(budget, n_elements)
    unknown = sorted(set(table["tensor"]) - set(infos))
    if unknown:
        raise BudgetError(
            f"the results hold tensor {unknown[0]!r} (and {len(unknown) - 1} more) "
            "that the model lacks: give the model the results were measured on"
        )
    measured_types = {}
    for label in sorted(set(table["qtype"])):
        try:
            q = resolve_qtype(label)
        except UnknownQTypeError:
            continue
        if q.kind == "type":
            measured_types[label] = q.ggml_type
    if qtypes:
        allowed = {}
        for label in qtypes:
            try:
                q = resolve_qtype(label)
            except UnknownQTypeError as exc:
                raise BudgetError(f"--qtypes: {exc}") from None
            if q.kind != "type":
                raise BudgetError(f"--qtypes: {label!r} is a preset; give ggml types")
            allowed.update({k: v for k, v in measured_types.items() if v.name == q.ggml_type.name})
    else:
        allowed = measured_types
    if not allowed:
        raise BudgetError(
            "no measured ggml type to choose from: the results hold "
            f"{sorted(set(table['qtype']))}; --qtypes {list(qtypes or [])}"
        )
    if default is None:
        default_type = max(allowed.values(), key=lambda t: (t.bpw, t.name))
    else:
        try:
            default_type = resolve_qtype(default).ggml_type
        except UnknownQTypeError as exc:
            raise BudgetError(f"--default: {exc}") from None
    rules = parse_recipe(list(fixed), "--fixed")
    kld = {(r.tensor, r.qtype): float(r.mean_kld) for r in table.itertuples()}
    by_tensor: dict[str, list[str]] = {}
    for tensor, label in kld:
        if label in allowed:
            by_tensor.setdefault(tensor, []).append(label)

    assignment: dict[str, str] = {}
    constant = 0
    plan_fixed: list[str] = []
    unmeasured: list[str] = []
    options: list[list[tuple[int, float, str]]] = []
    names: list[str] = []
    for info in header.tensors:
        name = info.name
        if info.n_dims < 2:
            assignment[name] = "f32"
            constant += _nbytes(TYPES_BY_NAME["f32"], info)
            continue
        if not is_quantizable_tensor(name, info.n_dims):
            constant += info.n_bytes
            continue
        rule = rules.qtype_of(name)
        if rule is not None or name not in by_tensor:
            want = rule.qtype if rule is not None else default_type
            wtype = _written(want, info)
            if wtype is None:
                how = f"--fixed {rule.where}" if rule else "--default"
                raise BudgetError(
                    f"{name} ({info.ne0} x {info.n_rows}) cannot be written as {want.name} ({how})"
                )
            assignment[name] = wtype.name
            constant += _nbytes(wtype, info)
            (plan_fixed if rule is not None else unmeasured).append(name)
            continue
        opts: dict[str, tuple[int, float, str]] = {}
        for label in by_tensor[name]:
            wtype = _written(allowed[label], info)
            if wtype is None:
                continue
            k = kld[(name, label)]
            if wtype.name not in opts or k < opts[wtype.name][1]:
                opts[wtype.name] = (_nbytes(wtype, info), k, wtype.name)
        if not opts:
            raise BudgetError(
                f"{name}: none of its measured qtypes {by_tensor[name]} can be "
                "written for its shape"
            )
        names.append(name)
        options.append(sorted(opts.values()))
    try:
        chosen = solve(
            [[(s, k) for s, k, _ in o] for o in options],
            budget_bytes - constant,
            max_cells=max_cells,
        )
    except Infeasible as exc:
        least = exc.min_bytes + constant
        raise Infeasible(
            f"the budget {budget} ({budget_bytes} bytes) is below the smallest feasible size "
            f"{least} bytes = {least / 2**30:.4f} GiB = {8 * least / n_elements:.4f} bpw "
            f"(every measured tensor at its smallest qtype, the others as fixed/default)",
            least,
        ) from None
    total = constant
    summed = 0.0
    for name, sized, pick in zip(names, options, chosen, strict=True):
        size, k, wname = sized[pick]
        assignment[name] = wname
        total += size
        summed += k
    return BudgetPlan(
        assignment,
        total,
        n_elements,
        budget_bytes,
        summed,
        plan_fixed,
        unmeasured,
        default_type.name,
        len(names),
    )


def recipe_comments(
    plan: BudgetPlan,
    budget: str,
    hashes: dict[str, str],
    model: str,
    model_sha256: str | None,
    command: str,
) -> list[str]:
    """The header comment lines of a budget recipe: budget, predicted size and bpw, predicted
    summed KLD, the inputs' hashes and the command."""
    from collections import Counter

    counts = Counter(plan.assignment.values())
    lines = [
        "recipe written by pytest-quantbench (python -m pytest_quantbench recipe)",
        f"budget: {budget} = {plan.budget_bytes} bytes of tensor data",
        (
            f"predicted size: {plan.predicted_bytes} bytes = {plan.predicted_bytes / 2**30:.4f} "
            f"GiB = {plan.predicted_bpw:.4f} bpw ({plan.n_elements} weights)"
        ),
        (
            f"predicted summed mean KLD: {plan.predicted_kld:.6f} "
            f"(sum over the {plan.n_measured} measured tensors of their single-tensor mean KLD)"
        ),
        f"types: {', '.join(f'{t}={n}' for t, n in sorted(counts.items()))}",
    ]
    if plan.fixed:
        lines.append(f"fixed by --fixed: {len(plan.fixed)} tensors")
    if plan.unmeasured:
        lines.append(
            f"unmeasured, set to --default {plan.default}: {len(plan.unmeasured)} "
            f"tensors (e.g. {plan.unmeasured[0]})"
        )
    lines.append(f"model: {model}" + (f" sha256 {model_sha256}" if model_sha256 else ""))
    lines += [f"input sha256 {h} {name}" for name, h in hashes.items()]
    lines.append(f"command: {command}")
    return lines


def group_bpw(header, row) -> float | None:
    """Bits per weight of the whole model when the tensors of a group row (``members``, comma
    separated) are quantized to its ggml type ``qtype`` and the others keep their baseline type:
    8 × tensor-data bytes / weights, sizes from the written types' real row sizes. None for a
    preset or a row without members."""
    from .selection import is_quantizable_tensor

    members = set(str(row.get("members") or "").split(","))
    try:
        q = resolve_qtype(str(row.get("qtype")))
    except UnknownQTypeError:
        return None
    if q.kind != "type" or members == {""}:
        return None
    total = n = 0
    for info in header.tensors:
        n += info.n_elements
        wtype = None
        if info.name in members and is_quantizable_tensor(info.name, info.n_dims):
            wtype = _written(q.ggml_type, info)
        total += _nbytes(wtype, info) if wtype is not None else info.n_bytes
    return 8.0 * total / n if n else None
