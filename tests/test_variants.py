"""Whole quantized files (--quantbench-variant) and recipes (--quantbench-recipe) as items.

A Q4_K_M file written by llama-quantize measures the same statistics as the recipe that
reproduces its per-tensor types (from --dry-run) and as the q4_k_m preset group item; a file of
another vocabulary or architecture is a usage error naming it."""

from __future__ import annotations

import pytest

from pytest_quantbench.variants import VariantError, check_compatible, type_summary
from runhelpers import read_wide, results, usage_error

STATS = ("mean_kld", "ppl_q", "same_top_p", "max_kld", "rms_dp")


def test_type_summary_per_class():
    assert (
        type_summary(
            {
                "blk.0.attn_v.weight": "q6_K",
                "blk.1.attn_v.weight": "q4_K",
                "blk.2.attn_v.weight": "q4_K",
                "blk.0.attn_q.weight": "q4_K",
                "token_embd.weight": "q8_0",
            }
        )
        == "attn_q=q4_K,attn_v=q4_K/q6_K,token_embd=q8_0"
    )


def test_compatibility_names_first_difference(synth_model, tmp_path):
    from pytest_quantbench.gguf import read_model_header
    from synthmodel import build_synthetic_model

    base = read_model_header(synth_model)
    check_compatible(base, base, "same")
    other = read_model_header(build_synthetic_model(tmp_path / "v.gguf", n_vocab=320))
    with pytest.raises(VariantError, match="vocabulary of 320 tokens, the baseline has 384"):
        check_compatible(base, other, "variant v.gguf")
    wide = read_model_header(build_synthetic_model(tmp_path / "w.gguf", n_ff=768))
    with pytest.raises(VariantError, match=r"blk\.0\.ffn_down\.weight has shape \[768, 256\]"):
        check_compatible(base, wide, "variant w.gguf")
    tied = read_model_header(build_synthetic_model(tmp_path / "t.gguf", tied=True))
    with pytest.raises(VariantError, match="has no tensor 'output.weight'"):
        check_compatible(base, tied, "variant t.gguf")


def test_other_vocabulary_is_exit_4_naming_the_file(pytester, qb_args, tmp_path):
    from synthmodel import build_synthetic_model

    other = build_synthetic_model(tmp_path / "other-vocab.gguf", n_vocab=320)
    result = pytester.runpytest_subprocess(*qb_args, f"--quantbench-variant={other}")
    message = usage_error(result)
    assert "variant other-vocab.gguf" in message and "320" in message


def test_preset_file_recipe_and_preset_item_agree(pytester, qb_args, synth_model, tmp_path):
    from pytest_quantbench.engine.quantize import (
        _run,
        find_quantize_binary,
        preset_tensor_types,
    )
    from pytest_quantbench.gguf import read_model_header
    from pytest_quantbench.recipes import format_recipe

    exe = find_quantize_binary()
    variant = tmp_path / "synth-Q4_K_M.gguf"
    _run([str(exe), str(synth_model), str(variant), "Q4_K_M", "1"], "Q4_K_M")
    types = preset_tensor_types(synth_model, "Q4_K_M", threads=1)
    base = read_model_header(synth_model)
    recipe = tmp_path / "q4km-like.recipe"
    recipe.write_text(
        format_recipe(
            {t.name: types[t.name] for t in base.tensors},
            ["the per-tensor types of llama-quantize Q4_K_M --dry-run"],
        )
    )
    result = pytester.runpytest_subprocess(
        *qb_args,
        "--quantbench-qtypes=q4_k_m",
        "--quantbench-group-tensors",
        ".*",
        "--quantbench-groups-only",
        f"--quantbench-variant={variant}",
        f"--quantbench-recipe={recipe}",
        "-v",
    )
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(
        [
            "*quantbench::variant[[]synth-Q4_K_M[]] PASSED*",
            "*quantbench::recipe[[]q4km-like[]] PASSED*",
        ]
    )
    df = results(pytester).set_index("tensor")
    file_row, recipe_row, preset_row = df.loc["variant"], df.loc["recipe"], df.loc["group0"]
    for stat in STATS:
        assert file_row[stat] == recipe_row[stat] == preset_row[stat], stat
    assert file_row["qtype"] == "synth-Q4_K_M" and recipe_row["qtype"] == "q4km-like"
    assert file_row["file_size"] == variant.stat().st_size
    header = read_model_header(variant)
    n = sum(t.n_elements for t in header.tensors)
    assert file_row["bpw"] == pytest.approx(8 * header.n_bytes / n, rel=1e-6)
    assert "attn_v=" in file_row["types"] and "q6_K" in file_row["types"]
    assert recipe_row["types"] == file_row["types"]
    # the recipe ran in process (its tensors swapped in), the file as written: same numbers
    assert file_row["engine_mode"] == "file" and recipe_row["engine_mode"] == "inplace"
    assert recipe_row["bpw"] == file_row["bpw"]
    kld = read_wide(pytester.path / "quantbench-results" / "kld_results.csv")
    assert kld.loc["synth-Q4_K_M", "variant"] == f"{file_row['mean_kld']:.6f}"
    assert kld.loc["q4km-like", "recipe"] == kld.loc["synth-Q4_K_M", "variant"]
    out = pytester.path / "quantbench-results"
    assert (out / "summary.md").is_file()
    # a rerun reuses the stored results, facts included
    again = pytester.runpytest_subprocess(
        *qb_args, f"--quantbench-variant={variant}", "--quantbench-plots=off"
    )
    again.assert_outcomes(passed=1)
    row = results(pytester).set_index("tensor").loc["variant"]
    assert row["reused"] and row["file_size"] == variant.stat().st_size
    # a CI gate: thresholds judge the file like any item
    limits = tmp_path / "limits.yaml"
    limits.write_text("rules:\n  - tensor: '^variant$'\n    max_kld: 0.001\n")
    gate = pytester.runpytest_subprocess(
        *qb_args, f"--quantbench-variant={variant}", f"--quantbench-thresholds={limits}"
    )
    gate.assert_outcomes(failed=1)
    gate.stdout.fnmatch_lines(
        ["*quantbench variant[[]synth-Q4_K_M[]]*", "mean KLD 0.00* > max_kld 0.001 *"]
    )


def test_recipe_with_unknown_qtype_is_exit_4(pytester, qb_args, tmp_path):
    recipe = tmp_path / "bad.recipe"
    recipe.write_text("# mix\nattn_=q4_0\nffn_=iq2-kt\n")
    message = usage_error(pytester.runpytest_subprocess(*qb_args, f"--quantbench-recipe={recipe}"))
    assert "line 3 of bad.recipe" in message and "iq2_kt" in message


def test_other_architecture_is_named(synth_model):
    import dataclasses

    from pytest_quantbench.gguf import read_model_header

    base = read_model_header(synth_model)
    qwen = dataclasses.replace(base, metadata={**base.metadata, "general.architecture": "qwen2"})
    with pytest.raises(
        VariantError,
        match="variant q.gguf: architecture 'qwen2' differs from the baseline's 'llama'",
    ):
        check_compatible(base, qwen, "variant q.gguf")


def test_split_variant_is_one_item(pytester, qb_args, tmp_path):
    """A split copy of the baseline (same weights) is one item, KLD 0, size of all shards."""
    from synthmodel import build_synthetic_model

    first = build_synthetic_model(tmp_path / "copy.gguf", split_max_tensors=6)
    shards = sorted(tmp_path.glob("copy-*-of-*.gguf"))
    assert len(shards) > 1 and first == shards[0]
    result = pytester.runpytest_subprocess(*qb_args, f"--quantbench-variant={first}", "-v")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*quantbench::variant[[]copy[]] PASSED*"])
    row = results(pytester).set_index("tensor").loc["variant"]
    assert abs(row["mean_kld"]) < 1e-5 and row["same_top_p"] == 100.0
    assert row["written_type"] == "bf16"
    assert row["file_size"] == sum(p.stat().st_size for p in shards)


def test_recipe_fallback_is_skipped_unless_allowed(pytester, qb_args, tmp_path):
    recipe = tmp_path / "interleaved.recipe"
    recipe.write_text("token_embd=q4_0_r8\n")
    result = pytester.runpytest_subprocess(*qb_args, f"--quantbench-recipe={recipe}", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(
        [
            (
                "*recipe interleaved.recipe: llama-quantize writes q4_0 instead "
                "of q4_0_r8 for token_embd.weight*"
            )
        ]
    )
    # with the file engine the recipe is written by llama-quantize: its size is known
    allowed = pytester.runpytest_subprocess(
        *qb_args,
        f"--quantbench-recipe={recipe}",
        "--quantbench-allow-fallback",
        "--quantbench-engine=file",
    )
    allowed.assert_outcomes(passed=1)
    row = results(pytester).set_index("tensor").loc["recipe"]
    assert row["engine_mode"] == "file" and row["file_size"] > 0
    assert row["fallback"] and row["types"].startswith("attn_k=bf16")
    assert "token_embd=q4_0" in row["types"]
