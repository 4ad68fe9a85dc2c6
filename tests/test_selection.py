"""Tests for pytest_quantbench.selection (docs/suite-formats.md#selection, #csv-layout;
docs/llama-quantize.md#custom-q)."""

from __future__ import annotations

import random
import re
import shutil
import subprocess

import pytest

from pytest_quantbench.selection import (
    DEFAULT_REGEX,
    DEFAULT_RULES,
    Rule,
    SelectionError,
    is_quantizable_tensor,
    layer_of,
    natural_key,
    parse_rules,
    select_tensors,
    tensor_kind,
)

KINDS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def qwen3_like(n_layers: int = 12) -> list[str]:
    """Eligible tensors of a small Qwen3-like model (docs/suite-formats.md#reference-model)."""
    names = ["token_embd.weight"]
    for layer in range(n_layers):
        names += [f"blk.{layer}.{kind}.weight" for kind in KINDS]
    return names


# ----------------------------------------------------------------- parse_rules


def test_parse_rules_suite_syntax_comments_and_blank_lines():
    lines = [
        "# attention first",
        "",
        r"^blk\.[0-9]+\.attn_v\.weight$=q8_0=locked",
        "   ",
        r"^blk\.([0-9]|1[01])\.attn_q\.weight$=iq3_xxs",
        "  # indented comment",
        r"ffn_down=q4_K=",
        r"^token_embd\.weight$",
    ]
    rules = parse_rules(lines, "rules.txt")
    assert [(r.regex, r.qtype, r.locked, r.source) for r in rules] == [
        (r"^blk\.[0-9]+\.attn_v\.weight$", "q8_0", True, "line 3 of rules.txt"),
        (r"^blk\.([0-9]|1[01])\.attn_q\.weight$", "iq3_xxs", False, "line 5 of rules.txt"),
        # an empty third field is not "locked" (any *non-empty* field is)
        ("ffn_down", "q4_K", False, "line 7 of rules.txt"),
        # a bare regex is accepted, with no qtype
        (r"^token_embd\.weight$", None, False, "line 8 of rules.txt"),
    ]
    assert rules[0].pattern.search("blk.3.attn_v.weight")
    assert rules[0].text == r"^blk\.[0-9]+\.attn_v\.weight$=q8_0=locked"


def test_parse_rules_any_nonempty_third_field_locks():
    (rule,) = parse_rules(["attn_k_b=q8_0=yes"], "rules.txt")
    assert rule.locked and rule.qtype == "q8_0"


def test_parse_rules_cli_source_names_the_entry():
    rules = parse_rules(["attn_q=q4_0", "attn_k"], "--quantbench-tensors")
    assert [r.source for r in rules] == [
        "--quantbench-tensors (entry 1)",
        "--quantbench-tensors (entry 2)",
    ]
    assert rules[1].describe() == "'attn_k' (--quantbench-tensors (entry 2))"


def test_parse_rules_splits_on_every_equals_sign():
    with pytest.raises(SelectionError) as exc:
        parse_rules(["a=b=c=d"], "rules.txt")
    assert str(exc.value) == (
        "invalid selection rule 'a=b=c=d' (line 1 of rules.txt): expected "
        "'regex=qtype' or 'regex=qtype=locked'; a regex cannot contain '='"
    )


def test_parse_rules_bad_regex_names_rule_source_and_re_error():
    with pytest.raises(SelectionError) as exc:
        parse_rules(["# header", r"^blk\.(0|1\.attn_q=q4_0"], "rules.txt")
    assert str(exc.value) == (
        r"invalid regex in selection rule '^blk\.(0|1\.attn_q=q4_0' (line 2 of rules.txt): "
        "missing ), unterminated subpattern at position 6"
    )
    assert isinstance(exc.value, ValueError)


def test_parse_rules_empty_fields_are_errors():
    with pytest.raises(SelectionError) as exc:
        parse_rules(["=q4_0"], "rules.txt")
    assert str(exc.value) == (
        "invalid selection rule '=q4_0' (line 1 of rules.txt): the regex before '=' is empty"
    )
    with pytest.raises(SelectionError) as exc:
        parse_rules(["attn_q="], "rules.txt")
    assert str(exc.value) == (
        "invalid selection rule 'attn_q=' (line 1 of rules.txt): the qtype after '=' is empty"
    )


def test_posix_classes_work_as_in_bash():
    (rule,) = parse_rules([r"^blk\.[[:digit:]]+\.attn_q\.weight$=q4_0"], "rules.txt")
    assert rule.pattern.search("blk.12.attn_q.weight")
    assert not rule.pattern.search("blk.x.attn_q.weight")
    with pytest.raises(SelectionError, match=r"unknown POSIX character class \[:digits:\]"):
        parse_rules(["[[:digits:]]=q4_0"], "rules.txt")


def test_rule_matching_is_an_unanchored_search():
    (rule,) = parse_rules(["attn_v=q4_0"], "x")
    assert rule.pattern.search("blk.7.attn_v.weight")


# ----------------------------------------------------------------- natural_key


def test_natural_key_numbers_compare_by_value():
    names = ["blk.10.attn_q.weight", "blk.2.attn_q.weight", "blk.1.attn_q.weight"]
    assert sorted(names, key=natural_key) == [
        "blk.1.attn_q.weight",
        "blk.2.attn_q.weight",
        "blk.10.attn_q.weight",
    ]
    assert natural_key("blk.2.ffn_down.weight") < natural_key("blk.10.attn_k.weight")


def test_natural_key_blk_before_output_and_token_embd():
    names = ["token_embd.weight", "output.weight", "blk.35.ffn_up.weight", "blk.0.attn_q.weight"]
    assert sorted(names, key=natural_key) == [
        "blk.0.attn_q.weight",
        "blk.35.ffn_up.weight",
        "output.weight",
        "token_embd.weight",
    ]


def test_natural_key_letters_before_punctuation_as_sort_V():
    names = [
        "blk.0.attn_k_b.weight",
        "blk.0.attn_k.weight",
        "blk.0.attn_kv_b.weight",
        "blk.0.ffn_down_exps.weight",
        "blk.0.ffn_down.weight",
        "group10",
        "group2",
    ]
    assert sorted(names, key=natural_key) == [
        "blk.0.attn_k.weight",
        "blk.0.attn_kv_b.weight",
        "blk.0.attn_k_b.weight",
        "blk.0.ffn_down.weight",
        "blk.0.ffn_down_exps.weight",
        "group2",
        "group10",
    ]


@pytest.mark.skipif(shutil.which("sort") is None, reason="needs GNU sort")
def test_natural_key_agrees_with_gnu_sort_V():
    sort = shutil.which("sort")
    version = subprocess.run([sort, "--version"], capture_output=True, text=True).stdout
    if "GNU coreutils" not in version:
        pytest.skip("needs GNU sort")
    rng = random.Random(7)
    names = set(qwen3_like(40))
    extra_kinds = ("attn_k_b", "attn_kv_b", "ffn_down_exps", "ffn_gate_inp", "attn_norm")
    names |= {f"blk.{i}.{k}.weight" for i in range(0, 62, 3) for k in extra_kinds}
    names |= {"output.weight", "output_norm.weight", "group0", "group1", "group10"}
    names |= {"a0", "a", "a00b", "a0b", "ab"}
    alphabet = "ab._-0123456789Z"
    names |= {"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 7))) for _ in range(3000)}
    names = sorted(n for n in names if not n.startswith("."))
    out = subprocess.run(
        [sort, "-V"],
        input="\n".join(names) + "\n",
        capture_output=True,
        text=True,
        env={"LC_ALL": "C"},
        check=True,
    ).stdout.splitlines()
    assert sorted(names, key=natural_key) == out


# -------------------------------------------------------------- select_tensors


def test_default_selection_is_attention_weights_of_every_layer():
    sel = select_tensors(qwen3_like(3), ())
    assert sel.tensors == tuple(
        f"blk.{layer}.{kind}.weight"
        for layer in range(3)
        for kind in ("attn_k", "attn_output", "attn_q", "attn_v")
    )
    assert sel.rules == DEFAULT_RULES
    assert DEFAULT_RULES[0].regex == DEFAULT_REGEX == r"^blk\.[0-9]+\.attn_(q|k|v|output)\.weight$"
    assert sel.unmatched_rules == ()


def test_default_regex_can_be_replaced():
    sel = select_tensors(qwen3_like(2), (), default_regex=r"ffn_down")
    assert sel.tensors == ("blk.0.ffn_down.weight", "blk.1.ffn_down.weight")


def test_first_matching_rule_decides_and_locked_is_never_selected():
    rules = parse_rules(
        [
            r"^blk\.1\.attn_v\.weight$=q8_0=locked",
            r"attn_v=q4_0",
            r"^blk\.1\.=iq2_k",  # decides blk.1.* except attn_v (taken above)
        ],
        "rules.txt",
    )
    sel = select_tensors(qwen3_like(2), rules)
    assert "blk.1.attn_v.weight" not in sel.tensors
    assert sel.locked == ("blk.1.attn_v.weight",)
    assert sel.rule_for["blk.0.attn_v.weight"].qtype == "q4_0"
    assert sel.rule_for["blk.1.ffn_up.weight"].qtype == "iq2_k"
    # tensors matched by no rule are not selected
    assert "token_embd.weight" not in sel.tensors
    assert "blk.0.ffn_up.weight" not in sel.tensors
    assert sel.tensors == (
        "blk.0.attn_v.weight",
        "blk.1.attn_k.weight",
        "blk.1.attn_output.weight",
        "blk.1.attn_q.weight",
        "blk.1.ffn_down.weight",
        "blk.1.ffn_gate.weight",
        "blk.1.ffn_up.weight",
    )


def test_selection_is_sorted_naturally_and_deduplicated():
    names = [
        "blk.10.attn_q.weight",
        "token_embd.weight",
        "blk.2.attn_q.weight",
        "blk.2.attn_q.weight",
    ]
    sel = select_tensors(names, parse_rules([".*=q4_0"], "x"))
    assert sel.tensors == ("blk.2.attn_q.weight", "blk.10.attn_q.weight", "token_embd.weight")


def test_unmatched_and_shadowed_rules_are_reported():
    rules = parse_rules(
        [r"attn_q=q4_0", r"attn_qq=q4_0", r"^blk\.0\.attn_q=q8_0", r"ffn_up=q4_0"],
        "rules.txt",
    )
    sel = select_tensors(qwen3_like(2), rules)
    assert [r.source for r in sel.unmatched_rules] == ["line 2 of rules.txt"]
    assert sel.unmatched_rules[0].describe() == "'attn_qq=q4_0' (line 2 of rules.txt)"
    assert [r.source for r in sel.shadowed_rules] == ["line 3 of rules.txt"]


def test_nothing_selected_error_lists_rules_and_some_tensors():
    rules = parse_rules([r"attn_qq=q4_0", r"^blk\.0\.=q8_0=locked"], "rules.txt")
    with pytest.raises(SelectionError) as exc:
        select_tensors(qwen3_like(1), rules)
    assert str(exc.value) == (
        "no tensor selected (7 matched a locked rule): the rules "
        "'attn_qq=q4_0' (line 1 of rules.txt); "
        r"'^blk\.0\.=q8_0=locked' (line 2 of rules.txt) select none of the 8 eligible "
        "tensors (e.g. blk.0.attn_k.weight, blk.0.attn_output.weight, blk.0.attn_q.weight, "
        "blk.0.attn_v.weight, blk.0.ffn_down.weight, …); rules are regexes searched "
        r"in the full tensor name, such as '^blk\.[0-9]+\.ffn_down\.weight$=q4_K'"
    )


def test_nothing_to_select_from():
    with pytest.raises(SelectionError) as exc:
        select_tensors([], ())
    assert str(exc.value) == (
        "no tensor selected: the model has no eligible (quantizable) tensor to select from"
    )


def test_rule_is_frozen_and_hashable():
    (rule,) = parse_rules(["attn_q=q4_0"], "x")
    with pytest.raises(AttributeError):
        rule.qtype = "q8_0"  # type: ignore[misc]
    assert rule == Rule("attn_q", re.compile("attn_q"), "q4_0", False, "line 1 of x")
    assert len({rule, rule}) == 1


# --------------------------------------------------------------- tensor facts


@pytest.mark.parametrize(
    ("name", "n_dims", "expected"),
    [
        ("blk.0.attn_q.weight", 2, True),
        ("blk.3.ffn_down_exps.weight", 3, True),
        ("token_embd.weight", 2, True),
        ("output.weight", 2, True),
        ("blk.0.attn_q.bias", 1, False),
        ("blk.0.attn_q.weight", 1, False),
        ("blk.0.attn_norm.weight", 1, False),
        ("blk.0.attn_q_norm.weight", 2, False),
        ("output_norm.weight", 1, False),
        ("blk.0.ffn_gate_inp.weight", 2, False),
        ("position_embd.weight", 2, False),
        ("token_types.weight", 2, False),
        ("blk.0.ssm_conv1d.weight", 2, False),
        ("blk.0.ssm_x.weight", 2, False),
        ("blk.0.ssm_dt.weight", 2, False),
        ("enc.blk.0.attn_rel_b.weight", 2, False),
        ("rope_freqs.weight", 1, False),
    ],
)
def test_is_quantizable_tensor(name, n_dims, expected):
    assert is_quantizable_tensor(name, n_dims) is expected


def test_is_quantizable_tensor_flags():
    assert is_quantizable_tensor("blk.0.ffn_gate_inp.weight", 2, quantize_ffn_gate_inp=True)
    assert not is_quantizable_tensor("output.weight", 2, leave_output_tensor=True)


def test_tensor_kind_and_layer():
    assert tensor_kind("blk.12.attn_q.weight") == "attn_q"
    assert tensor_kind("blk.3.ffn_down_exps.weight") == "ffn_down_exps"
    assert tensor_kind("token_embd.weight") == "token_embd"
    assert tensor_kind("output.weight") == "output"
    assert tensor_kind("blk.0.attn_q.bias") == "attn_q.bias"
    assert tensor_kind("group3") == "group3"
    assert layer_of("blk.12.attn_q.weight") == 12
    assert layer_of("enc.blk.4.attn_q.weight") == 4
    assert layer_of("token_embd.weight") is None
    assert layer_of("group3") is None
