"""The headline command works as written (issue 17): a type that needs an importance matrix gets
one computed from the corpus when none is given (once, cached, named in the header, timed in the
summary; ``=none`` keeps the skip), and a qtype that falls back on the selected tensors is said
once before the items run."""

from __future__ import annotations

from runhelpers import results

TRELLIS = [
    "--quantbench-qtypes=iq1_kt,iq2_kt",
    "--quantbench-tensors",
    r"^blk\.0\.(attn_q|ffn_down)\.weight$",
]
HEADER = (
    "quantbench imatrix: computed from the corpus because iq1_kt, iq2_kt need one; pass "
    "--quantbench-imatrix FILE to use yours, or =none to skip such items (once, cached in *"
)


def test_trellis_types_are_measured_without_an_imatrix_option(pytester, qb_args, tmp_path):
    args = [
        *[a for a in qb_args if not a.startswith("--quantbench-cache-dir=")],
        f"--quantbench-cache-dir={tmp_path / 'cache'}",
        *TRELLIS,
    ]
    first = pytester.runpytest_subprocess(*args)
    first.assert_outcomes(passed=4)
    first.stdout.fnmatch_lines([HEADER, "imatrix: computed in this run in * s (cached: *"])
    rows = results(pytester)
    assert set(rows["written_type"]) == {"iq1_kt", "iq2_kt"}
    cached = list((tmp_path / "cache" / "imatrix").glob("*.imatrix.dat"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns

    again = pytester.runpytest_subprocess(*args, "--quantbench-rerun")
    again.assert_outcomes(passed=4)
    again.stdout.fnmatch_lines([HEADER, "imatrix: taken from the cache; computed earlier in * s *"])
    assert cached[0].stat().st_mtime_ns == stamp  # no second computation
    assert results(pytester)["mean_kld"].tolist() == rows["mean_kld"].tolist()


def test_no_imatrix_is_computed_when_no_planned_type_needs_one(pytester, qb_args):
    result = pytester.runpytest_subprocess(
        *qb_args, "--quantbench-qtypes=q8_0", "--quantbench-tensors", r"^blk\.0\.attn_v\.weight$"
    )
    result.assert_outcomes(passed=1)
    assert "quantbench imatrix:" not in result.stdout.str()


# ---- planning facts without the engine -------------------------------------------------------
def _header(synth_model):
    from pytest_quantbench.gguf import read_model_header

    return read_model_header(synth_model)


def test_types_needing_imatrix_follow_the_plan(synth_model):
    from pytest_quantbench.measure import WorkUnit
    from pytest_quantbench.planfacts import types_needing_imatrix

    header = _header(synth_model)
    units = [
        WorkUnit("blk.0.attn_q.weight", ("blk.0.attn_q.weight",), q)
        for q in ("iq1_kt", "q4_0", "iq2_xxs")
    ]
    assert types_needing_imatrix(units, header, False) == ("iq1_kt", "iq2_xxs")
    assert types_needing_imatrix(units[1:2], header, False) == ()
