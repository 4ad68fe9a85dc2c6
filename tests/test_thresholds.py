"""Tests for pytest_quantbench.thresholds (metrics: docs/llama-perplexity.md#statistics)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from pytest_quantbench.thresholds import (
    LIMIT_SPECS,
    Limit,
    Thresholds,
    ThresholdsError,
    load_thresholds,
)

EXAMPLE = """\
defaults:
  max_kld: 0.05
  min_same_top_p: 90
rules:
  - tensor: 'attn_v'
    qtype: q4_0
    max_kld: 0.01
    max_ppl_ratio: 1.02
    min_same_top_p: 95
    max_kld_p99: 0.1
  - tensor: '^token_embd\\.weight$'
    max_kld: 0.5
    min_same_top_p: null
  - qtype: [Q4_0, q8_0]
    max_ppl_increase_pct: 3
"""


@pytest.fixture
def write(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def _write(text: str, name: str = "thresholds.yaml") -> str:
        Path(name).write_text(textwrap.dedent(text), encoding="utf-8")
        return name

    return _write


def error_of(path, **kwargs) -> str:
    with pytest.raises(ThresholdsError) as exc:
        load_thresholds(path, **kwargs)
    assert isinstance(exc.value, ValueError)
    return str(exc.value)


# ------------------------------------------------------------ merge / override


def test_defaults_apply_to_every_item(write):
    th = load_thresholds(write(EXAMPLE))
    assert th.limits_for("blk.0.ffn_up.weight", "iq2_k") == {
        "max_kld": Limit("max_kld", 0.05, "defaults in thresholds.yaml"),
        "min_same_top_p": Limit("min_same_top_p", 90.0, "defaults in thresholds.yaml"),
    }


def test_later_rules_override_per_key_and_record_their_source(write):
    th = load_thresholds(write(EXAMPLE))
    rule1 = "rule 1 (tensor='attn_v', qtype=q4_0) in thresholds.yaml"
    rule3 = "rule 3 (qtype=[Q4_0, q8_0]) in thresholds.yaml"
    limits = th.limits_for("blk.3.attn_v.weight", "Q4_0")  # qtype compare ignores case
    assert limits == {
        "max_kld": Limit("max_kld", 0.01, rule1),
        "max_kld_p99": Limit("max_kld_p99", 0.1, rule1),
        # rule 3 sets the same limit in its other spelling: it replaces rule 1's
        "max_ppl_increase_pct": Limit("max_ppl_increase_pct", 3.0, rule3),
        "min_same_top_p": Limit("min_same_top_p", 95.0, rule1),
    }
    assert list(limits) == [k for k in LIMIT_SPECS if k in limits]


def test_null_removes_an_inherited_limit(write):
    th = load_thresholds(write(EXAMPLE))
    assert th.limits_for("token_embd.weight", "iq2_k") == {
        "max_kld": Limit(
            "max_kld", 0.5, "rule 2 (tensor='^token_embd\\.weight$') in thresholds.yaml"
        ),
    }


def test_qtype_rule_does_not_match_other_qtypes(write):
    th = load_thresholds(write(EXAMPLE))
    assert "max_kld_p99" not in th.limits_for("blk.3.attn_v.weight", "q8_0")
    assert th.limits_for("blk.3.attn_v.weight", "q8_0")["max_kld"].value == 0.05


def test_empty_thresholds():
    th = Thresholds.empty()
    assert not th
    assert th.limits_for("blk.0.attn_q.weight", "q4_0") == {}
    assert th.check("blk.0.attn_q.weight", "q4_0", {"mean_kld": 99.0}) == []


def test_file_with_only_empty_rules_has_no_limits(write):
    th = load_thresholds(write("rules: []\n"))
    assert not th
    assert th.check("x", "q4_0", {}) == []


# ------------------------------------------------------------------- messages


def test_kld_violation_message(write):
    th = load_thresholds(write(EXAMPLE))
    (v,) = th.check(
        "blk.3.attn_v.weight",
        "q4_0",
        {
            "mean_kld": 0.0123451,
            "mean_kld_err": 0.000456,
            "kld_p99": 0.05,
            "ppl_ratio": 1.0,
            "same_top_p": 99.0,
        },
    )
    assert v.message == (
        "mean KLD 0.012345 ± 0.000456 > max_kld 0.01 "
        "(rule 1 (tensor='attn_v', qtype=q4_0) in thresholds.yaml)"
    )
    assert v.measured and v.value == pytest.approx(0.0123451) and v.err == 0.000456
    assert v.limit.key == "max_kld"


def test_ratio_pct_top_p_and_percentile_messages(write):
    path = write(
        """\
        rules:
          - max_ppl_ratio: 1.02
            min_same_top_p: 95
            max_kld_p99: 0.1
          - tensor: attn_q
            max_ppl_increase_pct: 2.5
        """
    )
    th = load_thresholds(path)
    row = {
        "ppl_ratio": 1.0312,
        "ppl_ratio_err": 0.0041,
        "same_top_p": 93.4567,
        "same_top_p_err": 0.1234,
        "kld_p99": 0.1234567,
    }
    assert [v.message for v in th.check("blk.0.ffn_up.weight", "q4_0", row)] == [
        "99.0% KLD 0.123457 > max_kld_p99 0.1 (rule 1 (every item) in thresholds.yaml)",
        "PPL(Q)/PPL(base) 1.0312 ± 0.0041 > max_ppl_ratio 1.02 "
        "(rule 1 (every item) in thresholds.yaml)",
        "same top p 93.457% ± 0.123% < min_same_top_p 95 (rule 1 (every item) in thresholds.yaml)",
    ]
    pct = [v.message for v in th.check("blk.0.attn_q.weight", "q4_0", row)][1]
    assert pct == (
        "PPL increase 3.12% ± 0.41% > max_ppl_increase_pct 2.5 "
        "(rule 2 (tensor='attn_q') in thresholds.yaml)"
    )


def test_limits_hold_at_equality_and_below(write):
    th = load_thresholds(write("defaults: {max_kld: 0.01, min_same_top_p: 95}\n"))
    assert th.check("t", "q", {"mean_kld": 0.01, "same_top_p": 95.0}) == []
    assert th.check("t", "q", {"mean_kld": 0.001, "same_top_p": 99.0}) == []


def test_unmeasured_metric_is_reported_not_passed(write):
    th = load_thresholds(write("defaults: {max_kld: 0.01, max_ppl_ratio: 1.1}\n"))
    violations = th.check("t", "q", {"ppl_ratio": float("nan")})
    assert [(v.measured, v.message) for v in violations] == [
        (
            False,
            "mean KLD is not measured, so max_kld 0.01 cannot be checked "
            "(defaults in thresholds.yaml)",
        ),
        (
            False,
            "PPL(Q)/PPL(base) is not a finite number (nan), so max_ppl_ratio 1.1 "
            "cannot be checked (defaults in thresholds.yaml)",
        ),
    ]


def test_yaml_exponent_without_dot_is_accepted(write):
    # PyYAML reads 1e-3 as a string; it is still a number to the user.
    th = load_thresholds(write("defaults:\n  max_kld: 1e-3\n"))
    assert th.limits_for("t", "q")["max_kld"].value == 0.001


# ------------------------------------------------------------------ errors


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert error_of(missing) == (
        f"thresholds file not found: {missing}; fix the path or create the file"
    )


def test_not_yaml(write):
    path = write("defaults:\n  max_kld: [0.1\n")
    assert error_of(path) == (
        "thresholds file thresholds.yaml is not valid YAML: expected ',' or ']', but got "
        "'<stream end>' at line 3, column 1; fix the syntax"
    )


def test_duplicate_key(write):
    path = write("defaults:\n  max_kld: 0.1\n  max_kld: 0.2\n")
    assert error_of(path) == (
        "thresholds file thresholds.yaml is not valid YAML: duplicate key 'max_kld' "
        "at line 3, column 3; fix the syntax"
    )


@pytest.mark.parametrize(
    ("text", "got"),
    [("", "nothing (null)"), ("- max_kld: 1\n", "a list"), ("0.5\n", "0.5 (float)")],
)
def test_not_a_mapping(write, text, got):
    assert error_of(write(text)) == (
        "thresholds file thresholds.yaml must be a YAML mapping with 'defaults' and/or "
        f"'rules', got {got}"
    )


def test_unknown_top_level_key(write):
    assert error_of(write("rule:\n  - max_kld: 1\n")) == (
        "thresholds file thresholds.yaml: unknown top-level key 'rule'; did you mean "
        "'rules'? (allowed: defaults, rules)"
    )


def test_unknown_key_in_rule_suggests_closest(write):
    path = write("rules:\n  - tensor: attn_v\n    qtype: q4_0\n    max_kdl: 0.1\n")
    allowed = ", ".join(("tensor", "qtype", *LIMIT_SPECS))
    assert error_of(path) == (
        "rule 1 (tensor='attn_v', qtype=q4_0) in thresholds.yaml: unknown key 'max_kdl'; "
        f"did you mean 'max_kld'? (allowed: {allowed})"
    )


def test_unknown_key_without_close_match(write):
    path = write("defaults:\n  zzz: 1\n")
    assert error_of(path) == (
        "defaults in thresholds.yaml: unknown key 'zzz' (allowed: " + ", ".join(LIMIT_SPECS) + ")"
    )


def test_selector_in_defaults(write):
    assert error_of(write("defaults:\n  tensor: attn_v\n  max_kld: 1\n")) == (
        "defaults in thresholds.yaml: 'tensor' selects items and belongs in a rule "
        "under 'rules', not in 'defaults'"
    )


def test_defaults_not_a_mapping(write):
    assert error_of(write("defaults: [1]\n")) == (
        "defaults in thresholds.yaml: 'defaults' must be a mapping of limits "
        "(e.g. max_kld: 0.05), got a list"
    )


def test_rules_not_a_list(write):
    assert error_of(write("rules:\n  max_kld: 1\n")) == (
        "thresholds file thresholds.yaml: 'rules' must be a list of mappings "
        "(each item starting with '- '), got a mapping"
    )


def test_rule_not_a_mapping(write):
    assert error_of(write("rules:\n  - max_kld: 1\n  - attn_v\n")) == (
        "rule 2 in thresholds.yaml must be a mapping of 'tensor', 'qtype' and limits, "
        "got 'attn_v' (str)"
    )


def test_rule_without_limit(write):
    assert error_of(write("rules:\n  - tensor: attn_v\n")) == (
        "rule 1 (tensor='attn_v') in thresholds.yaml sets no limit; add one of "
        + ", ".join(LIMIT_SPECS)
    )


def test_non_numeric_limit(write):
    assert error_of(write("rules:\n  - qtype: q4_0\n    max_kld: small\n")) == (
        "rule 1 (qtype=q4_0) in thresholds.yaml: max_kld must be a number, got 'small' "
        "(str); write e.g. 'max_kld: 0.05', or 'max_kld: null' to remove an inherited limit"
    )


def test_boolean_limit(write):
    assert error_of(write("defaults:\n  max_kld: yes\n")) == (
        "defaults in thresholds.yaml: max_kld must be a number, got True (bool); "
        "write e.g. 'max_kld: 0.05', or 'max_kld: null' to remove an inherited limit"
    )


def test_negative_limit(write):
    assert error_of(write("defaults:\n  max_kld: -0.1\n")) == (
        "defaults in thresholds.yaml: max_kld must be >= 0, got -0.1"
    )


def test_non_finite_limit(write):
    assert error_of(write("defaults:\n  max_kld: .inf\n")) == (
        "defaults in thresholds.yaml: max_kld must be a finite number, got inf; "
        "use 'max_kld: null' to remove an inherited limit"
    )


def test_percentage_above_100(write):
    assert error_of(write("defaults:\n  min_same_top_p: 150\n")) == (
        "defaults in thresholds.yaml: min_same_top_p is a percentage and must be <= 100, got 150"
    )


def test_bad_regex(write):
    assert error_of(write("rules:\n  - tensor: 'attn_[v'\n    max_kld: 1\n")) == (
        "rule 1 (tensor='attn_[v') in thresholds.yaml: tensor regex 'attn_[v' is invalid: "
        "unterminated character set at position 5"
    )


def test_tensor_not_a_string(write):
    assert error_of(write("rules:\n  - tensor: 3\n    max_kld: 1\n")) == (
        "rule 1 (tensor='3') in thresholds.yaml: tensor must be a non-empty regex string, "
        "got 3 (int)"
    )


def test_qtype_wrong_type(write):
    assert error_of(write("rules:\n  - qtype: {a: 1}\n    max_kld: 1\n")) == (
        "rule 1 (qtype={'a': 1}) in thresholds.yaml: qtype must be a qtype name or a list "
        "of names, got a mapping"
    )


def test_both_ppl_limits_in_one_rule(write):
    path = write("rules:\n  - max_ppl_ratio: 1.02\n    max_ppl_increase_pct: 2\n")
    assert error_of(path) == (
        "rule 1 (every item) in thresholds.yaml: max_ppl_ratio and max_ppl_increase_pct "
        "are the same limit written two ways (max_ppl_increase_pct = (max_ppl_ratio - 1)·100); "
        "set only one"
    )


def test_qtype_not_in_run_is_ignored_and_noted(write):
    """Issue 11 item 12: one thresholds file serves runs with different qtypes."""
    path = write("rules:\n  - tensor: attn_v\n    qtype: [q4_0, q4_k]\n    max_kld: 1\n")
    both = load_thresholds(path, run_qtypes=["Q4_0", "q4_K", "iq2_k"])  # case as users type it
    assert both.notes == ()
    one = load_thresholds(path, run_qtypes=["q4_0,q5_K"])
    assert one.notes == (
        (
            "rule 1 (tensor='attn_v', qtype=[q4_0, q4_k]) in thresholds.yaml: "
            "qtype 'q4_k' is not among this run's qtypes (q4_0, q5_K): ignored "
            "for this run"
        ),
    )
    assert one.limits_for("blk.0.attn_v.weight", "q4_0")["max_kld"].value == 1
    assert one.limits_for("blk.0.attn_v.weight", "q5_K") == {}
    # without run_qtypes, the rule is accepted as is
    assert load_thresholds(path).limits_for("blk.0.attn_v.weight", "Q4_K")["max_kld"].value == 1


def test_unknown_qtype_in_a_rule_is_an_error_naming_close_names(write):
    path = write("rules:\n  - qtype: iq2-kt\n    max_kld: 1\n")
    message = error_of(path, run_qtypes=["q4_0"])
    assert message.startswith("rule 1 (qtype=iq2-kt) in thresholds.yaml: ")
    assert "iq2_kt" in message and message.endswith("; fix the qtype or remove the rule")


def test_qtypes_differing_only_in_case_are_told_apart(write):
    """q8_KV_r8 is a ggml type, q8_kv_r8 a preset: a rule for one does not apply to the other."""
    path = write("rules:\n  - qtype: q8_KV_r8\n    max_kld: 1\n")
    rules = load_thresholds(path)
    assert rules.limits_for("blk.0.attn_v.weight", "q8_KV_r8")["max_kld"].value == 1
    assert rules.limits_for("blk.0.attn_v.weight", "q8_kv_r8") == {}
