"""Recipes for a size budget, predicted against measured, and against uniform quants of that size.

Steps (all in one work folder; each step a plain plugin run or the recipe subcommand):
1. per-tensor sweep: every ``blk.*`` weight alone at q4_0, q5_0, q6_0, q8_0 (--chunks chunks);
2. three recipes (``python -m pytest_quantbench recipe``) for budgets at 1/4, 1/2 and 3/4 of the
   way from the all-q4_0 to the all-q8_0 size of the ``blk.*`` weights (other tensors stay at
   the baseline type: ``--default`` = the baseline type);
3. one run measuring the three recipes (``--quantbench-recipe``) and the uniform quants of the
   same tensor set (group ``^blk\\.`` at each qtype, as group0).
Prints, per recipe: budget, predicted size/bpw, predicted summed KLD, measured mean KLD, the
uniform quants around it and the uniform KLD interpolated (log-linear in bpw) at the recipe's
bpw; the recipe should beat it. The pictures (heatmaps, kld_vs_bpw.png) stay in the folder.

    python benchmarks/bench_recipes.py [--workdir DIR] [--chunks 4] [-n 2]   # default model
    python benchmarks/bench_recipes.py --small                               # synthetic, seconds
"""

from __future__ import annotations

import argparse
import itertools
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QTYPES = ("q4_0", "q5_0", "q6_0", "q8_0")
FRACTIONS = (0.25, 0.5, 0.75)


def run(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(
            f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}\n"
            f"{proc.stderr[-2000:]}"
        )
    return time.perf_counter() - start


def pytest_cmd(common: list[str], out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:randomly",
        "-p",
        "no:cacheprovider",
        *common,
        f"--quantbench-output={out}",
        *extra,
    ]


def interpolated(points: list[tuple[float, float]], bpw: float) -> float | None:
    """KLD of the uniform curve at ``bpw`` (log-linear between neighbouring points)."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 <= bpw <= x1:
            t = (bpw - x0) / (x1 - x0)
            return math.exp(math.log(y0) + t * (math.log(y1) - math.log(y0)))
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--small",
        action="store_true",
        help="the synthetic test model, n_ctx 64, 2 chunks (proves the script)",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="keep everything here")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="the plugin's cache dir (reuse a converted default model)",
    )
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("-n", "--workers", type=int, default=1, help="pytest-xdist workers")
    args = parser.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench-recipes-"))
    root.mkdir(parents=True, exist_ok=True)
    cache = args.cache_dir or root / "cache"
    common = [f"--quantbench-cache-dir={cache}"]
    if args.small:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from conftest import CORPUS_TEXT
        from synthmodel import build_synthetic_model

        model = build_synthetic_model(root / "synth-bf16.gguf")
        corpus = root / "corpus.txt"
        corpus.write_text(CORPUS_TEXT + "\n", encoding="utf-8")
        common += [
            f"--quantbench-model={model}",
            f"--quantbench-corpus={corpus}",
            "--quantbench-ctx=64",
            "--quantbench-chunks=2",
        ]
    else:
        from pytest_quantbench.inputs import ensure_default_model

        model = ensure_default_model(cache, "bf16", 2)
        common += [f"--quantbench-model={model}", f"--quantbench-chunks={args.chunks}"]
    if args.workers > 1:
        common += ["-n", str(args.workers)]
    qtypes = ",".join(QTYPES)

    sweep = root / "sweep"
    t_sweep = run(
        pytest_cmd(
            common, sweep, f"--quantbench-qtypes={qtypes}", "--quantbench-tensors", r"^blk\."
        ),
        root,
    )

    from pytest_quantbench.budget import group_bpw, load_results, plan_budget
    from pytest_quantbench.gguf import read_model_header
    from pytest_quantbench.selection import is_quantizable_tensor

    header = read_model_header(model)
    table, _ = load_results([sweep])
    members = ",".join(
        t.name
        for t in header.tensors
        if t.name.startswith("blk.") and is_quantizable_tensor(t.name, t.n_dims)
    )
    n = sum(t.n_elements for t in header.tensors)
    lo = group_bpw(header, {"members": members, "qtype": "q4_0"})
    hi = group_bpw(header, {"members": members, "qtype": "q8_0"})
    recipes = []
    for f in FRACTIONS:
        bpw = lo + f * (hi - lo)
        path = root / f"budget-{bpw:.3f}bpw.recipe"
        run(
            [
                sys.executable,
                "-m",
                "pytest_quantbench",
                "recipe",
                str(sweep),
                "--model",
                str(model),
                "--budget",
                f"{bpw:.4f}bpw",
                "--default",
                "bf16",
                "-o",
                str(path),
            ],
            root,
        )
        plan = plan_budget(header, table, f"{bpw:.4f}bpw", default="bf16")
        recipes.append((path, plan))

    measured = root / "measured"
    t_measure = run(
        pytest_cmd(
            common,
            measured,
            f"--quantbench-qtypes={qtypes}",
            "--quantbench-group-tensors",
            r"^blk\.",
            "--quantbench-groups-only",
            *[f"--quantbench-recipe={p}" for p, _ in recipes],
        ),
        root,
    )
    import pandas as pd

    rows = pd.read_csv(measured / "results.csv")
    uniform = {
        r.qtype: (group_bpw(header, {"members": members, "qtype": r.qtype}), r.mean_kld)
        for r in rows[rows.tensor == "group0"].itertuples()
    }
    print(
        f"model {model.name}: {n} weights; sweep of {len(table)} (tensor, qtype) items in "
        f"{t_sweep:.0f} s; recipes + uniform measured in {t_measure:.0f} s"
    )
    print("uniform (blk.* at one qtype, other tensors bf16):")
    for q in QTYPES:
        bpw, kld = uniform[q]
        print(f"  {q:5s} {bpw:7.4f} bpw  mean KLD {kld:.6f}")
    print(
        "recipe                       budget bpw  predicted bpw  predicted ΣKLD  measured KLD"
        "  uniform KLD at that bpw  beats uniform"
    )
    for path, plan in recipes:
        stem = path.name[: -len(".recipe")]
        got = rows[(rows.tensor == "recipe") & (rows.qtype == stem)].iloc[0]
        ref = interpolated(list(uniform.values()), plan.predicted_bpw)
        ref_text = f"{ref:.6f}" if ref is not None else "n/a"
        beats = "yes" if ref is not None and got.mean_kld < ref else "no"
        print(
            f"  {stem:26s} {8 * plan.budget_bytes / n:10.4f}  {plan.predicted_bpw:13.4f}  "
            f"{plan.predicted_kld:14.6f}  {got.mean_kld:12.6f}  {ref_text:>22s}  {beats}"
        )
        assert abs(got.bpw - plan.predicted_bpw) < 1e-4, (got.bpw, plan.predicted_bpw)
    print(
        f"pictures: {sorted(p.name for p in sweep.glob('*.png'))} in {sweep}, "
        f"{sorted(p.name for p in measured.glob('*.png'))} in {measured}"
    )


if __name__ == "__main__":
    main()
