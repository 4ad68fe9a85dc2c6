"""Importance matrices in runs: items of types that need one run with ``auto`` (or a file) and are
skipped with the reason without; both engines apply it identically; a wrong file is a usage
error before any item."""

from __future__ import annotations

import struct

from runhelpers import results, usage_error

FIX = (
    "pass a file written by llama-imatrix (-o imatrix.dat or imatrix.gguf) for this model, or "
    "--quantbench-imatrix=auto to compute one"
)
LOW_BIT = [
    "--quantbench-qtypes=iq2_xxs,iq1_kt",
    "--quantbench-tensors",
    r"^blk\.0\.(attn_q|ffn_down)\.weight$",
]


def test_low_bit_types_are_skipped_with_imatrix_none(pytester, qb_args):
    result = pytester.runpytest_subprocess(*qb_args, *LOW_BIT, "--quantbench-imatrix=none", "-rs")
    result.assert_outcomes(skipped=4)
    result.stdout.fnmatch_lines(
        [
            "*iq1_kt needs an importance matrix (blk.0.attn_q.weight): pass --quantbench-imatrix "
            "FILE, or --quantbench-imatrix=auto to compute one from the corpus"
        ]
    )
    assert "quantbench imatrix:" not in result.stdout.str()  # =none: none computed


def test_auto_imatrix_measures_them_identically_in_both_engines(pytester, qb_args):
    stats = {}
    for engine in ("inplace", "file"):
        result = pytester.runpytest_subprocess(
            *qb_args,
            *LOW_BIT,
            "--quantbench-imatrix=auto",
            f"--quantbench-engine={engine}",
            "--quantbench-rerun",
        )
        result.assert_outcomes(passed=4)
        rows = results(pytester).set_index(["tensor", "qtype"])
        assert (rows["engine_mode"] == engine).all()
        stats[engine] = rows[["mean_kld", "ppl_q", "same_top_p"]]
    assert stats["inplace"].equals(stats["file"])
    cached = list((qb_args_cache(qb_args) / "imatrix").glob("*.imatrix.dat"))
    assert len(cached) == 1  # computed once, reused by the second run


def qb_args_cache(args):
    from runhelpers import cache_of

    return cache_of(args)


def test_an_imatrix_changes_the_result_key(pytester, qb_args):
    """Results with and without an imatrix are different results: nothing is reused across."""
    args = [
        *qb_args,
        "--quantbench-qtypes=q4_0",
        "--quantbench-tensors",
        r"^blk\.0\.attn_v\.weight$",
    ]
    pytester.runpytest_subprocess(*args).assert_outcomes(passed=1)
    again = pytester.runpytest_subprocess(*args, "--quantbench-imatrix=auto")
    again.assert_outcomes(passed=1)
    assert "reused" not in again.stdout.str()


def test_an_imatrix_for_another_model_is_a_usage_error(pytester, qb_args, tmp_path):
    wrong = tmp_path / "other.imatrix.dat"
    name = b"blk.0.attn_q.weight"
    wrong.write_bytes(
        struct.pack("<i", 1)
        + struct.pack("<i", len(name))
        + name
        + struct.pack("<ii", 1, 100)
        + struct.pack("<100f", *([1.0] * 100))
    )
    result = pytester.runpytest_subprocess(*qb_args, *LOW_BIT, f"--quantbench-imatrix={wrong}")
    message = usage_error(result)
    assert message == (
        f"{wrong}: the importance matrix holds 100 values for blk.0.attn_q.weight but that "
        f"tensor of {qb_args[0].split('=', 1)[1]} needs ne0·ne2 = 256·1 = 256 (shape [256, 256]):"
        " the imatrix is likely for another model; " + FIX
    )


def test_a_file_that_is_not_an_imatrix_is_a_usage_error(pytester, qb_args, tmp_path):
    junk = tmp_path / "junk.dat"
    junk.write_bytes(b"hello")
    message = usage_error(
        pytester.runpytest_subprocess(*qb_args, *LOW_BIT, f"--quantbench-imatrix={junk}")
    )
    assert message == (
        f"{junk}: not an importance matrix: expected the legacy llama-imatrix "
        ".dat layout or a GGUF imatrix (it starts with n_entries = 1819043176, "
        "impossible for a 5-byte file); " + FIX
    )
