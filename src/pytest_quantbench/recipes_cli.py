"""``python -m pytest_quantbench recipe``: a recipe for a size budget from measured results.

Reads per-tensor results (``results.csv`` files or output directories), the baseline model's
header (shapes: sizes are real row sizes per type), chooses one type per tensor with
:func:`pytest_quantbench.budget.plan_budget` and writes the recipe in the GGUF tool suite's
format (docs/suite-formats.md#recipe), atomically.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

USAGE_ERROR = 4


class _Parser(argparse.ArgumentParser):
    """argparse with the plugin's usage-error exit status (4) instead of 2."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m pytest_quantbench recipe",
        description="Choose one qtype per tensor that minimises the summed mean KLD of the "
        "measured per-tensor results within a size budget; write a recipe.",
    )
    p.add_argument(
        "results",
        nargs="+",
        metavar="RESULTS",
        help="results.csv files or --quantbench-output directories",
    )
    p.add_argument(
        "--model",
        required=True,
        help="the baseline GGUF the results were measured on "
        "(tensor shapes and names; split models too)",
    )
    p.add_argument(
        "--budget",
        required=True,
        help="bits per weight ('4.5bpw') or tensor-data size ('12GiB', '800MB')",
    )
    p.add_argument(
        "--qtypes",
        default=None,
        help="qtypes a tensor may get, comma or space separated (default: all measured)",
    )
    p.add_argument(
        "--fixed",
        action="append",
        default=[],
        metavar="REGEX=QTYPE",
        help="tensors matching REGEX keep QTYPE (repeatable; first match wins)",
    )
    p.add_argument(
        "--default",
        default=None,
        metavar="QTYPE",
        help="type of unmeasured tensors (default: the measured qtype of most bpw)",
    )
    p.add_argument("-o", "--output", required=True, help="the recipe file to write")
    return p


def main(argv: list[str]) -> int:
    """Run the subcommand. Returns 0, or 4 with a message on stderr for bad input (budget,
    files, qtypes, rules, an infeasible budget naming the smallest feasible size)."""
    from .budget import BudgetError, load_results, plan_budget, recipe_comments
    from .gguf import GGUFError, read_model_header
    from .recipes import RecipeError, format_recipe
    from .report import atomic_write_text

    args = build_parser().parse_args(argv)
    try:
        header = read_model_header(args.model)
        table, hashes = load_results(args.results)
        if table.empty:
            raise BudgetError(f"no measured single-tensor result in {args.results}")
        qtypes = args.qtypes.replace(",", " ").split() if args.qtypes else None
        plan = plan_budget(
            header, table, args.budget, qtypes=qtypes, fixed=args.fixed, default=args.default
        )
    except (BudgetError, RecipeError, GGUFError) as exc:
        print(f"python -m pytest_quantbench recipe: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    shas = sorted({m for m in table["model_sha256"].fillna("") if m})
    command = "python -m pytest_quantbench recipe " + shlex.join(argv)
    comments = recipe_comments(
        plan, args.budget, hashes, Path(args.model).name, shas[0] if shas else None, command
    )
    atomic_write_text(args.output, format_recipe(plan.assignment, comments))
    print(
        f"{args.output}: {plan.predicted_bytes} bytes, {plan.predicted_bpw:.4f} bpw, "
        f"predicted summed mean KLD {plan.predicted_kld:.6f}"
    )
    return 0
