"""What a run reports, through pytester on the synthetic model (issue 11, items 6, 7, 9, 10):
results.csv's fixed columns, a failure's own reason under xdist, numpy scalars in the report
properties, and the summary's FAIL and impure marks."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from pytest_quantbench.report import RESULT_COLUMNS
from runhelpers import results

ATTN_V_FAILS = "rules:\n  - tensor: attn_v\n    max_kld: 1.0e-12\n"

# Puts a numpy.float64 (a float subclass, which execnet cannot serialize) into every row.
NUMPY_ROW_CONFTEST = """
import numpy
import pytest
from pytest_quantbench.plugin import SESSION_KEY

def pytest_sessionstart(session):
    qb = session.config.stash[SESSION_KEY]
    identity_row = qb.identity_row
    qb.identity_row = lambda unit: {**identity_row(unit), "zz_numpy": numpy.float64(0.25)}
"""


def _header(pytester) -> list[str]:
    return (
        (pytester.path / "quantbench-results" / "results.csv")
        .read_text()
        .splitlines()[0]
        .split(",")
    )


def test_results_csv_has_the_same_documented_columns_in_every_run(pytester, qb_args):
    args = [
        *qb_args,
        "--quantbench-qtypes=q8_0",
        "--quantbench-tensors",
        r"blk\.0\.attn_q",
        "--junitxml=report.xml",
    ]
    pytester.runpytest_subprocess(*args).assert_outcomes(passed=1)
    first = _header(pytester)
    pytester.runpytest_subprocess(*args).assert_outcomes(passed=1)  # reused: adds "reused"
    assert first == _header(pytester) == list(RESULT_COLUMNS)
    assert results(pytester)["reused"].tolist() == [True]
    # every key an item reports is a column (a new key needs its line in RESULT_COLUMNS)
    xml = ET.parse(pytester.path / "report.xml").getroot()
    props = {p.get("name") for p in xml.iter("property")}
    assert props and props <= set(RESULT_COLUMNS), props - set(RESULT_COLUMNS)


def test_under_xdist_a_failure_keeps_its_own_reason_and_numpy_values_travel(pytester, qb_args):
    pytest.importorskip("xdist")
    pytester.makeconftest(NUMPY_ROW_CONFTEST)
    pytester.makefile(".yaml", thresholds=ATTN_V_FAILS)
    result = pytester.runpytest_subprocess(
        *qb_args,
        "--quantbench-qtypes=q8_0",
        "--quantbench-tensors",
        r"blk\.0\.attn_(q|v)",
        "--quantbench-thresholds=thresholds.yaml",
        "-n",
        "2",
        "--junitxml=report.xml",
    )
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    result.assert_outcomes(passed=1, failed=1)
    tidy = results(pytester).set_index("tensor")
    reason = tidy.loc["blk.0.attn_v.weight", "reason"]
    assert reason.startswith("mean KLD ") and "> max_kld 1e-12 (rule 1 (tensor='attn_v')" in reason
    assert "[gw" not in reason and "thresholds.yaml)" in reason  # whole: the rule's file too
    values = [
        p.get("value")
        for p in ET.parse(pytester.path / "report.xml").getroot().iter("property")
        if p.get("name") == "zz_numpy"
    ]
    assert values == ["0.25", "0.25"]


def test_summary_marks_a_regressed_item_fail(pytester, qb_args):
    pytester.makefile(".yaml", thresholds=ATTN_V_FAILS)
    result = pytester.runpytest_subprocess(
        *qb_args,
        "--quantbench-qtypes=q8_0",
        "--quantbench-tensors",
        r"blk\.0\.attn_(q|v)",
        "--quantbench-thresholds=thresholds.yaml",
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.re_match_lines(
        [
            r"^ +1  blk\.0\.attn_v\.weight  q8_0 .* %  FAIL$",
            r"^ +2  blk\.0\.attn_q\.weight  q8_0 .* %$",
        ]
    )


def test_fallback_items_are_flagged_impure(pytester, tmp_path, synth_corpus):
    """With --quantbench-allow-fallback a q4_K item measured as q5_0 (ne0 = 64) is marked
    impure in the summary and has fallback True in results.csv."""
    from synthmodel import build_synthetic_model

    model = build_synthetic_model(
        tmp_path / "narrow.gguf", n_layer=1, n_embd=64, n_ff=128, n_head=2, n_head_kv=1
    )
    result = pytester.runpytest_subprocess(
        f"--quantbench-model={model}",
        f"--quantbench-corpus={synth_corpus}",
        "--quantbench-ctx=64",
        "--quantbench-chunks=1",
        f"--quantbench-cache-dir={tmp_path}",
        "--quantbench-qtypes=q4_K",
        "--quantbench-tensors",
        r"blk\.0\.attn_q",
        "--quantbench-allow-fallback",
        "-p",
        "no:randomly",
    )
    result.assert_outcomes(passed=1)
    result.stdout.re_match_lines(
        [
            r"^ +1  blk\.0\.attn_q\.weight  q4_K +q5_0 \(impure\) .*",
            r".*1 item\(s\) measured under a fallback type \(impure.*",
        ]
    )
    assert results(pytester)["fallback"].tolist() == [True]


# Records, after each item, how many lines results.csv has at that moment (0: not written yet).
# A registered plugin, not a conftest hook: the items live at the model file, outside this folder.
LINES_SEEN_CONFTEST = """
from pathlib import Path

class Recorder:
    def pytest_runtest_logfinish(self, nodeid, location):
        table = Path("quantbench-results/results.csv")
        seen = len(table.read_text().splitlines()) if table.exists() else 0
        with open("seen.txt", "a") as fh:
            fh.write(f"{seen}\\n")

def pytest_configure(config):
    config.pluginmanager.register(Recorder(), "lines-seen")
"""


def test_tables_are_rewritten_while_results_arrive(pytester, qb_args):
    """Issue 11 item 18: --quantbench-flush-minutes (YAML flush_minutes: 0 = after every item)
    gives current tables mid-run; the default (10 minutes) writes them at the end only."""
    import shutil

    pytester.makeconftest(LINES_SEEN_CONFTEST)
    pytester.makefile(".yaml", quantbench="flush_minutes: 0\n")
    args = [*qb_args, "--quantbench-qtypes=q8_0", "--quantbench-tensors", r"blk\.0\.attn_(k|q)"]
    pytester.runpytest_subprocess(*args).assert_outcomes(passed=2)
    seen = pytester.path / "seen.txt"
    assert seen.read_text().split() == ["2", "3"]  # the header and one row, then two rows
    assert [p.name for p in (pytester.path / "quantbench-results").glob("*.tmp")] == []
    shutil.rmtree(pytester.path / "quantbench-results")
    seen.unlink()
    pytester.runpytest_subprocess(*args, "--quantbench-flush-minutes=10").assert_outcomes(passed=2)
    assert seen.read_text().split() == ["0", "0"]
    assert len(results(pytester)) == 2  # written at the end


@pytest.mark.parametrize("family", ["xunit1", "xunit2"])
def test_junit_testcases_carry_the_row_as_properties_in_both_families(pytester, qb_args, family):
    """README: the properties are there with pytest's default junit_family (xunit2) too."""
    pytester.runpytest_subprocess(
        *qb_args,
        "--quantbench-qtypes=q8_0",
        "--quantbench-tensors",
        r"blk\.0\.attn_q",
        "-o",
        f"junit_family={family}",
        "--junitxml=report.xml",
    ).assert_outcomes(passed=1)
    (case,) = ET.parse(pytester.path / "report.xml").getroot().iter("testcase")
    props = {p.get("name"): p.get("value") for p in case.iter("property")}
    assert props["qtype"] == "q8_0" and float(props["mean_kld"]) < 1e-3


def test_builtin_turns_every_numpy_scalar_into_its_builtin():
    import enum

    import numpy as np

    from pytest_quantbench.plugin import _builtin

    class Kind(enum.IntEnum):
        A = 3

    cases = [
        (np.float64(0.25), 0.25),
        (np.float32(0.5), 0.5),
        (np.int64(7), 7),
        (np.bool_(True), True),
        (np.array(1.5), 1.5),
        (Kind.A, 3),
        (None, None),
        ("s", "s"),
        (np.str_("t"), "t"),
        (np.zeros(2), "[0. 0.]"),
    ]
    for value, want in cases:
        got = _builtin(value)
        assert got == want and type(got) is type(want), (value, got)
