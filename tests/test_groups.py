"""Grouped tensors, presets applied per tensor, and types this engine build cannot evaluate.

Suite semantics: docs/suite-formats.md#groups (groups); presets:
docs/llama-quantize.md#presets-and-types, #type-names.
"""

from __future__ import annotations

import re

import pytest

from pytest_quantbench.selection import SelectionError, select_groups
from runhelpers import read_wide, results

NAMES = [
    "blk.0.attn_q.weight",
    "blk.0.attn_k.weight",
    "blk.1.attn_q.weight",
    "blk.1.ffn_down.weight",
    "token_embd.weight",
]


def test_groups_are_named_by_position_and_list_members_in_natural_order():
    groups = select_groups([r"^blk\.1\.", r"attn_q,attn_k"], NAMES)
    assert [(g.name, g.members) for g in groups] == [
        ("group0", ("blk.1.attn_q.weight", "blk.1.ffn_down.weight")),
        ("group1", ("blk.0.attn_k.weight", "blk.0.attn_q.weight", "blk.1.attn_q.weight")),
    ]
    assert groups[1].spec == "attn_q,attn_k"


def test_identical_member_sets_are_measured_once_and_empty_groups_are_named():
    warnings: list[str] = []
    groups = select_groups(
        [r"ffn_down", r"^blk\.1\.ffn", r"^nothing$"], NAMES, warn=warnings.append
    )
    assert [g.name for g in groups] == ["group0"]
    assert warnings == [
        r"quantbench: group group1 (^blk\.1\.ffn) has the same members as group0: measured "
        "once, as group0",
        r"quantbench: group group2 (^nothing$) matches no tensor",
    ]


def test_a_bad_group_regex_names_the_group():
    with pytest.raises(
        SelectionError,
        match=re.escape("--quantbench-group-tensors group1: invalid regex 'attn_(q'"),
    ):
        select_groups(["ffn", "attn_(q"], NAMES)
    with pytest.raises(SelectionError, match="group0 'ffn,': an empty regex"):
        select_groups(["ffn,"], NAMES)


def _group_run(pytester, qb_args, *extra):
    args = [
        *qb_args,
        "--quantbench-qtypes=q4_0",
        "--quantbench-tensors",
        r"^blk\.0\.attn_(q|v)\.weight$",
        "--quantbench-group-tensors",
        r"^blk\.0\.attn_(q|k)",
        r"^blk\.1\.attn_v",
        *extra,
    ]
    return pytester.runpytest_subprocess(*args)


def test_a_group_is_one_item_and_its_members_are_not_measured_alone(pytester, qb_args):
    result = _group_run(pytester, qb_args, "-v")
    result.assert_outcomes(passed=3)
    for item in ("group0", "group1", "blk.0.attn_v.weight"):  # in any order: prefix reuse
        result.stdout.fnmatch_lines([f"*quantbench::{item}[[]q4_0[]] PASSED*"])  # runs layer-major
    out = pytester.path / "quantbench-results"
    assert list(read_wide(out / "kld_results.csv").columns) == [
        "blk.0.attn_v.weight",
        "group0",
        "group1",
    ]
    assert (out / "bench_ppl_kld_group_mapping.bf16.2.txt").read_text() == (
        "group0:^blk\\.0\\.attn_(q|k)\ngroup1:^blk\\.1\\.attn_v\n"
    )
    groups = (out / "groups.csv").read_text().splitlines()
    assert groups[1] == "group0,^blk\\.0\\.attn_(q|k),2,blk.0.attn_k.weight blk.0.attn_q.weight"
    row = results(pytester).set_index("tensor").loc["group0"]
    assert row["members"] == "blk.0.attn_k.weight,blk.0.attn_q.weight"
    assert row["written_type"] == "q4_0"


def test_a_group_quantizes_all_members_together_in_both_engines(pytester, qb_args):
    """The in-process group (all members swapped at once) equals llama-quantize's variant with
    every member quantized; and a group of two damages more than either member alone."""
    kld = {}
    for engine in ("inplace", "file"):
        _group_run(
            pytester, qb_args, f"--quantbench-engine={engine}", "--quantbench-rerun"
        ).assert_outcomes(passed=3)
        rows = results(pytester).set_index("tensor")
        assert (rows["engine_mode"] == engine).all()
        kld[engine] = rows["mean_kld"].to_dict()
    assert kld["inplace"] == kld["file"]
    single = pytester.runpytest_subprocess(
        *qb_args,
        "--quantbench-qtypes=q4_0",
        "--quantbench-tensors",
        r"^blk\.0\.attn_(q|k)\.weight$",
    )
    single.assert_outcomes(passed=2)
    alone = results(pytester).set_index("tensor")["mean_kld"]
    assert kld["inplace"]["group0"] > max(
        alone["blk.0.attn_q.weight"], alone["blk.0.attn_k.weight"]
    )


def test_groups_only_runs_no_single_tensor_item(pytester, qb_args):
    _group_run(pytester, qb_args, "--quantbench-groups-only").assert_outcomes(passed=2)
    assert set(results(pytester)["tensor"]) == {"group0", "group1"}


def test_the_whole_model_group_with_fallback_types(pytester, qb_args):
    """``'.*'`` is the whole-model sweep; token_embd is un-interleaved and output keeps its own
    rules, exactly as llama-quantize decides (the file engine reads the types back)."""
    args = [
        *qb_args,
        "--quantbench-qtypes=q4_0_r8",
        "--quantbench-group-tensors",
        ".*",
        "--quantbench-engine=file",
        "--quantbench-allow-fallback",
    ]
    pytester.runpytest_subprocess(*args).assert_outcomes(passed=1)
    row = results(pytester).iloc[0]
    assert row["tensor"] == "group0"
    assert len(row["members"].split(",")) == 16
    assert row["written_type"] == "q4_0,q4_0_r8"
    assert "token_embd.weight" in row["reason"]


def test_preset_types_are_llama_quantizes_own(synth_model, tmp_path):
    """--dry-run's per-tensor types equal those of a real Q4_K_M quantization, read back."""
    from pytest_quantbench.engine.quantize import preset_tensor_types, run_llama_quantize
    from pytest_quantbench.gguf import read_model_header

    planned = preset_tensor_types(synth_model, "Q4_K_M", threads=2)
    real = tmp_path / "q4_k_m.gguf"
    run_llama_quantize(synth_model, real, {}, baseline_type="bf16", threads=2, preset="Q4_K_M")
    written = {t.name: t.type_name for t in read_model_header(real).tensors}
    assert planned == written
    assert {"q4_K", "q6_K"} <= set(planned.values())  # a mix, not one type


def test_a_preset_applies_its_per_tensor_rules(pytester, qb_args):
    args = [
        *qb_args,
        "--quantbench-qtypes=q4_k_m,q2_k_s",
        "--quantbench-tensors",
        r"^blk\.(0\.attn_q|1\.attn_v)\.weight$",
        "-rs",
        "--quantbench-imatrix=none",
    ]  # without it one is computed for q2_k_s
    result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(passed=2, skipped=2)
    rows = results(pytester).set_index(["tensor", "qtype"])
    assert rows.loc[("blk.0.attn_q.weight", "q4_k_m"), "written_type"] == "q4_K"
    assert rows.loc[("blk.1.attn_v.weight", "q4_k_m"), "written_type"] == "q6_K"  # bumped
    assert rows.loc[("blk.1.attn_v.weight", "q4_k_m"), "requested_type"] == "preset Q4_K_M"
    result.stdout.fnmatch_lines(["*preset q2_k_s needs an importance matrix*"])


def test_types_without_a_working_kernel_are_skipped_not_measured(pytester, qb_args):
    args = [
        *qb_args,
        "--quantbench-qtypes=q4_0_4_4,q4_0",
        "--quantbench-tensors",
        r"^blk\.0\.attn_q\.weight$",
        "-rs",
    ]
    result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(
        [
            "*this engine build has no CPU kernel for q4_0_4x4 (its "
            "vec_dot is missing; the type needs another build, e.g. ARM)"
        ]
    )
