"""Input handling and messages (issue 11, items 12, 15, 16): a thresholds rule for a qtype outside
the run, an unknown ggml type id in a GGUF, and the qtype listing's wording."""

from __future__ import annotations


def test_thresholds_rule_for_another_qtype_is_ignored_and_listed_with_v(pytester, qb_args):
    pytester.makefile(".yaml", thresholds="rules:\n  - qtype: [q8_0, iq2_k]\n    max_kld: 1\n")
    args = [
        *qb_args,
        "--quantbench-qtypes=q8_0",
        "--quantbench-tensors",
        r"blk\.0\.attn_q",
        "--quantbench-thresholds=thresholds.yaml",
        "--collect-only",
    ]
    quiet = pytester.runpytest_subprocess(*args)
    assert quiet.ret == 0 and "ignored for this run" not in quiet.stdout.str()
    verbose = pytester.runpytest_subprocess(*args, "-v")
    assert verbose.ret == 0
    notes = [line for line in verbose.stdout.lines if "ignored for this run" in line]
    assert notes == [
        (
            f"quantbench thresholds: rule 1 (qtype=[q8_0, iq2_k]) in {pytester.path}"
            "/thresholds.yaml: qtype 'iq2_k' is not among this run's qtypes (q8_0): "
            "ignored for this run"
        )
    ]
