"""What real runs tripped over (issue 11): the kernel probe is a fact of the type (item 8), a
failing baseline is computed once and stops the run (item 2), a GPU layer count on a CPU-only
build is said (item 14), a quantized baseline through the file engine (item 5), progress of long
steps (item 17)."""

from __future__ import annotations

from runhelpers import results

PROBED = ["--quantbench-qtypes=q4_0", "--quantbench-tensors",
          r"^blk\.(0|1)\.attn_(k|v)\.weight$", "--quantbench-threads=1", "--quantbench-rerun"]


def test_kernel_probe_is_the_same_for_a_type_under_any_xdist_layout(pytester, qb_args):
    """Item 8: every item of a type reports the probe of one fixed tensor, whichever worker ran
    it and whichever tensor that worker measured first."""
    values = {}
    for n in ("1", "2"):
        pytester.runpytest_subprocess(*qb_args, *PROBED, "-n", n).assert_outcomes(passed=4)
        column = results(pytester)["kernel_probe_kld"]
        assert column.notna().all() and column.nunique() == 1, column.tolist()
        values[n] = column.iloc[0]
    assert values["1"] == values["2"]
