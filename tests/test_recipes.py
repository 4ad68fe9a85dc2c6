"""Recipes (suite format) and the budget solver: parsing, application, the knapsack optimum,
the budget bound, and the predicted size against the file llama-quantize writes."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest

from pytest_quantbench.budget import (
    Infeasible,
    load_results,
    parse_budget,
    plan_budget,
    solve,
)
from pytest_quantbench.recipes import (
    RecipeError,
    apply_recipe,
    format_recipe,
    parse_recipe,
    read_recipe,
    written_types,
)

RECIPE = r"""
# a comment
## attention
^blk\.0\.attn_q\.weight$=q8_0
attn_=Q4_K
   # indented comment
ffn_down=iq4_ks
ffn_=q6_k
never_matches=q5_0
.*=bf16
"""

TENSORS = [
    "blk.0.attn_q.weight",
    "blk.0.attn_k.weight",
    "blk.1.attn_q.weight",
    "blk.0.ffn_down.weight",
    "blk.0.ffn_up.weight",
    "token_embd.weight",
]


def test_first_match_wins_comments_and_user_spelling():
    recipe = parse_recipe(RECIPE.splitlines(), "mix.recipe")
    warnings: list[str] = []
    got = {t: q.name for t, q in apply_recipe(recipe, TENSORS, warn=warnings.append).items()}
    assert got == {
        "blk.0.attn_q.weight": "q8_0",
        "blk.0.attn_k.weight": "q4_K",
        "blk.1.attn_q.weight": "q4_K",
        "blk.0.ffn_down.weight": "iq4_ks",
        "blk.0.ffn_up.weight": "q6_K",
        "token_embd.weight": "bf16",
    }
    assert recipe.name == "mix"
    assert len(warnings) == 1 and "never_matches=q5_0" in warnings[0] and "line 9" in warnings[0]


@pytest.mark.parametrize(
    "line, says",
    [
        ("attn_q=iq2-kt", "iq2_kt"),  # unknown qtype: the closest valid name
        ("attn_q=q4_k_m", "preset"),  # a preset is not one type
        ("attn_q", "not 'regex=qtype'"),
        ("(attn=q4_0", "invalid regex"),
    ],
)
def test_bad_lines_name_the_line(line, says):
    with pytest.raises(RecipeError) as err:
        parse_recipe(["# header", line], "bad.recipe")
    assert "line 2 of bad.recipe" in str(err.value) and says in str(err.value)


def test_read_recipe_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        read_recipe(tmp_path / "none.recipe")


def test_format_recipe_reads_back():
    assignment = {
        "blk.10.attn_q.weight": "q4_0",
        "blk.2.attn_q.weight": "q8_0",
        "output_norm.weight": "f32",
    }
    text = format_recipe(assignment, ["budget: 1GiB"])
    assert text.startswith("# budget: 1GiB\n")
    back = apply_recipe(parse_recipe(text.splitlines(), "x.recipe"), list(assignment))
    assert {t: q.name for t, q in back.items()} == assignment
    # anchored: blk.1 does not take blk.10's line
    assert apply_recipe(parse_recipe(text.splitlines(), "x"), ["blk.1.attn_q.weight"]) == {}


@pytest.mark.parametrize(
    "text, expected",
    [("4bpw", 500), ("1000", 1000), ("1KiB", 1024), ("2.5kb", 2500), ("1GiB", 2**30)],
)
def test_parse_budget(text, expected):
    assert parse_budget(text, 1000) == expected


def test_parse_budget_rejects_nonsense():
    with pytest.raises(ValueError, match="bits per weight"):
        parse_budget("4.5 bananas", 10)


def _brute(choices, capacity):
    best = None
    for combo in itertools.product(*[range(len(c)) for c in choices]):
        size = sum(choices[i][q][0] for i, q in enumerate(combo))
        cost = sum(choices[i][q][1] for i, q in enumerate(combo))
        if size <= capacity and (best is None or cost < best[0] - 1e-12):
            best = (cost, combo)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_solver_finds_enumerated_optimum_and_stays_within_budget(seed):
    rng = random.Random(seed)
    choices = []
    for _ in range(6):
        sizes = sorted(rng.sample(range(8, 200, 2), 4))
        klds = sorted((rng.random() for _ in sizes), reverse=True)  # bigger: better
        choices.append([(s * 18, k) for s, k in zip(sizes, klds, strict=True)])
    lo = sum(c[0][0] for c in choices)
    hi = sum(c[-1][0] for c in choices)
    capacity = rng.randint(lo, hi)
    best_cost, _ = _brute(choices, capacity)
    picked = solve(choices, capacity)
    assert sum(choices[i][q][0] for i, q in enumerate(picked)) <= capacity
    assert sum(choices[i][q][1] for i, q in enumerate(picked)) == pytest.approx(best_cost)
    # a coarse grid (sizes rounded up) never exceeds the budget either
    coarse = solve(choices, capacity, max_cells=7)
    assert sum(choices[i][q][0] for i, q in enumerate(coarse)) <= capacity


def test_solver_infeasible_names_the_smallest_size():
    with pytest.raises(Infeasible) as err:
        solve([[(10, 1.0), (20, 0.5)], [(5, 1.0)]], 14)
    assert err.value.min_bytes == 15


# --------------------------------------------------------------------------
# on the synthetic model: the plan, the recipe, the file llama-quantize writes
# --------------------------------------------------------------------------

QTYPES = ("q4_0", "q5_0", "q8_0")


def _fake_results(header, path: Path) -> Path:
    """A results.csv as the plugin writes it, every quantizable tensor at every qtype, with
    made-up KLDs that fall with the bits (tensor i is i+1 times as sensitive)."""
    import pandas as pd

    from pytest_quantbench.selection import is_quantizable_tensor

    rows = []
    names = [t.name for t in header.tensors if is_quantizable_tensor(t.name, t.n_dims)]
    for i, name in enumerate(names):
        for q, k in zip(QTYPES, (0.02, 0.006, 0.0002), strict=True):
            rows.append(
                {
                    "tensor": name,
                    "qtype": q,
                    "written_type": q,
                    "status": "passed",
                    "model_sha256": "ab" * 32,
                    "mean_kld": k * (i + 1),
                    "members": name,
                }
            )
    rows.append(
        {
            "tensor": "group0",
            "qtype": "q4_0",
            "status": "passed",
            "mean_kld": 1.0,
            "members": ",".join(names),
            "model_sha256": "ab" * 32,
        }
    )
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_plan_keeps_fixed_rules_and_f32_vectors(synth_model, tmp_path):
    from pytest_quantbench.gguf import read_model_header

    header = read_model_header(synth_model)
    table, hashes = load_results([_fake_results(header, tmp_path / "results.csv")])
    assert "group0" not in set(table["tensor"]) and list(hashes) == ["results.csv"]
    plan = plan_budget(header, table, "6bpw", fixed=[r"ffn_down=q8_0"])
    assert plan.predicted_bytes <= plan.budget_bytes
    assert {plan.assignment[t] for t in plan.fixed} == {"q8_0"}
    assert sorted(plan.fixed) == ["blk.0.ffn_down.weight", "blk.1.ffn_down.weight"]
    assert plan.assignment["blk.0.attn_norm.weight"] == "f32"
    # a looser budget never predicts more KLD
    loose = plan_budget(header, table, "8bpw")
    tight = plan_budget(header, table, "5bpw")
    assert loose.predicted_kld <= tight.predicted_kld
    assert set(loose.assignment.values()) - {"f32"} != {"q4_0"}


def test_infeasible_budget_is_exit_4_naming_smallest_size(synth_model, tmp_path, capsys):
    from pytest_quantbench.__main__ import main
    from pytest_quantbench.gguf import read_model_header

    results = _fake_results(read_model_header(synth_model), tmp_path / "results.csv")
    out = tmp_path / "x.recipe"
    rc = main(
        ["recipe", str(results), "--model", str(synth_model), "--budget", "1bpw", "-o", str(out)]
    )
    err = capsys.readouterr().err
    assert rc == 4 and "smallest feasible size" in err and "bpw" in err
    assert not out.exists()


def test_predicted_size_equals_llama_quantize_file(synth_model, tmp_path):
    """The recipe the CLI writes, applied by llama-quantize, gives a file whose tensor data is
    the predicted size to the byte, with the recipe's types read back."""
    from pytest_quantbench.__main__ import main
    from pytest_quantbench.engine.llama import EngineError
    from pytest_quantbench.engine.quantize import run_llama_quantize
    from pytest_quantbench.gguf import read_model_header

    header = read_model_header(synth_model)
    results = _fake_results(header, tmp_path / "results.csv")
    out = tmp_path / "mix.recipe"
    assert (
        main(
            [
                "recipe",
                str(results),
                "--model",
                str(synth_model),
                "--budget",
                "5.5bpw",
                "--fixed",
                "token_embd=q8_0",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    text = out.read_text()
    predicted = int(text.split("predicted size: ")[1].split(" bytes")[0])
    assert "budget: 5.5bpw" in text and "input sha256" in text
    assert "predicted summed mean KLD" in text
    assert "sum over the 15 measured tensors" in text  # 16 matrices, token_embd fixed
    recipe = read_recipe(out)
    planned = written_types(apply_recipe(recipe, [t.name for t in header.tensors]), header)
    changes = {n: t.name for n, t in planned.items() if t.name != header.tensor(n).type_name}
    assert len({t for t in changes.values()}) >= 2  # a real mixture
    dest = tmp_path / "mix.gguf"
    try:
        run_llama_quantize(synth_model, dest, changes, baseline_type="bf16", threads=1)
    except EngineError as exc:
        pytest.skip(f"llama-quantize unavailable: {exc}")
    written = read_model_header(dest)
    assert {t.name: t.type_name for t in written.tensors} == {n: t.name for n, t in planned.items()}
    assert sum(t.n_bytes for t in written.tensors) == predicted
    assert predicted <= parse_budget("5.5bpw", sum(t.n_elements for t in header.tensors))


def test_qtypes_limit_the_choice_and_coarse_grid_stays_within_budget(synth_model, tmp_path):
    from pytest_quantbench.gguf import read_model_header

    header = read_model_header(synth_model)
    table, _ = load_results([_fake_results(header, tmp_path / "results.csv")])
    plan = plan_budget(header, table, "7bpw", qtypes=["Q4_0", "q8_0"])
    assert set(plan.assignment.values()) == {"q4_0", "q8_0", "f32"}
    exact = plan_budget(header, table, "7bpw")
    coarse = plan_budget(header, table, "7bpw", max_cells=5)
    assert coarse.predicted_bytes <= coarse.budget_bytes
    assert exact.predicted_kld <= coarse.predicted_kld


def test_cli_usage_errors_are_exit_4(capsys):
    from pytest_quantbench.__main__ import main

    assert main([]) == 4 and "commands: merge, cache, recipe" in capsys.readouterr().err
    assert main(["nonsense"]) == 4 and "unknown command 'nonsense'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["recipe", "results.csv"])  # no --budget, --model, -o
    assert exc.value.code == 4 and "required" in capsys.readouterr().err
