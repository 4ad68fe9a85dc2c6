"""Tests for pytest_quantbench.report (docs/suite-formats.md#csv-layout;
docs/llama-perplexity.md#kld-output)."""

from __future__ import annotations

import csv
import io
import os
import stat

import pytest

from pytest_quantbench import report
from pytest_quantbench.report import (
    METRIC_KEYS,
    atomic_write_text,
    check_csv_metrics,
    comparison_columns,
    format_summary,
    tidy_columns,
    wide_table,
    worst_items,
    write_suite_tables,
    write_wide_csv,
)


def row(tensor, qtype, status="passed", written=None, **metrics):
    written_type = qtype if written is None else written
    return {
        "tensor": tensor,
        "qtype": qtype,
        "written_type": written_type,
        "status": status,
        **metrics,
    }


ROWS = [
    row(
        "blk.10.attn_q.weight",
        "q4_0",
        mean_kld=0.0123456789,
        mean_kld_err=0.000456,
        ppl_q=7.3125,
        ppl_ratio=1.0312,
        ppl_ratio_err=0.0041,
        same_top_p=93.4567,
        same_top_p_err=0.1234,
    ),
    row(
        "blk.2.attn_q.weight",
        "q4_0",
        status="failed",
        mean_kld=0.2,
        ppl_q=8.0,
        ppl_ratio=1.1,
        same_top_p=88.0,
    ),
    row("blk.0.attn_q.weight", "iq2_k", mean_kld=0.5, ppl_q=9.25, ppl_ratio=1.28, same_top_p=80.0),
    row("token_embd.weight", "iq2_k", status="error", written="", reason="engine crashed, rc=-11"),
]

KLD_CSV = (
    b"QTYPE,blk.0.attn_q.weight,blk.2.attn_q.weight,blk.10.attn_q.weight,token_embd.weight\n"
    b"iq2_k,0.500000,404,404,404\n"
    b"q4_0,404,0.200000,0.012346,404\n"
)


# ------------------------------------------------------------------ wide CSV


def test_wide_table_layout():
    df = wide_table(ROWS, "mean_kld")
    assert list(df.columns) == [
        "QTYPE",
        "blk.0.attn_q.weight",
        "blk.2.attn_q.weight",
        "blk.10.attn_q.weight",
        "token_embd.weight",
    ]
    assert df.values.tolist() == [
        ["iq2_k", "0.500000", "404", "404", "404"],
        ["q4_0", "404", "0.200000", "0.012346", "404"],
    ]


def test_write_wide_csv_exact_bytes(tmp_path):
    path = tmp_path / "kld_results.csv"
    assert write_wide_csv(wide_table(ROWS, "mean_kld"), path) == path
    assert path.read_bytes() == KLD_CSV


def test_wide_table_extra_tensors_and_qtypes_become_404_columns_and_rows():
    df = wide_table(
        ROWS[:1], "ppl_q", tensors=["output.weight", "blk.1.attn_q.weight"], qtypes=["q8_0"]
    )
    text = df.to_csv(index=False, lineterminator="\n")
    assert text == (
        "QTYPE,blk.1.attn_q.weight,blk.10.attn_q.weight,output.weight\n"
        "q4_0,404,7.312500,404\n"
        "q8_0,404,404,404\n"
    )


def test_wide_table_printed_precision_and_non_finite():
    rows = [row("a", "q", same_top_p=93.4567, mean_kld=float("nan"), ppl_q=float("inf"))]
    assert wide_table(rows, "same_top_p").values.tolist() == [["q", "93.457"]]
    assert wide_table(rows, "same_top_p", decimals=6).values.tolist() == [["q", "93.456700"]]
    assert wide_table(rows, "mean_kld").values.tolist() == [["q", "404"]]
    assert wide_table(rows, "ppl_q").values.tolist() == [["q", "404"]]


def test_later_row_replaces_earlier_for_same_item():
    rows = [row("a", "q", mean_kld=1.0), row("a", "q", mean_kld=2.0)]
    assert wide_table(rows, "mean_kld").values.tolist() == [["q", "2.000000"]]


def test_wide_table_row_without_tensor():
    with pytest.raises(ValueError, match="result row without 'tensor'"):
        wide_table([{"qtype": "q4_0"}], "mean_kld")


def test_write_wide_csv_refuses_what_needs_quoting(tmp_path):
    df = wide_table([row("a,b", "q4_0", mean_kld=1.0)], "mean_kld")
    with pytest.raises(ValueError) as exc:
        write_wide_csv(df, tmp_path / "x.csv")
    assert str(exc.value) == (
        f"cannot write {tmp_path / 'x.csv'}: column name 'a,b' contains a comma, quote or "
        "line break, which the suite's unquoted CSV cannot hold"
    )
    assert not (tmp_path / "x.csv").exists()


def test_suite_tables(tmp_path):
    out = tmp_path / "reports" / "run1"
    paths = write_suite_tables(ROWS, out, qtypes=["q8_0"])
    assert [p.name for p in paths] == [
        "kld_results.csv",
        "ppl_results.csv",
        "topp_results.csv",
        "results.csv",
    ]
    header = KLD_CSV.split(b"\n")[0] + b"\n"
    assert (out / "kld_results.csv").read_bytes() == KLD_CSV + b"q8_0,404,404,404,404\n"
    assert (out / "ppl_results.csv").read_bytes() == header + (
        b"iq2_k,9.250000,404,404,404\nq4_0,404,8.000000,7.312500,404\nq8_0,404,404,404,404\n"
    )
    assert (out / "topp_results.csv").read_bytes() == header + (
        b"iq2_k,80.000,404,404,404\nq4_0,404,88.000,93.457,404\nq8_0,404,404,404,404\n"
    )
    assert sorted(os.listdir(out)) == sorted(p.name for p in paths)  # no temp files


def test_suite_tables_read_back_with_pandas_as_quant_assign_does(tmp_path):
    import pandas as pd

    write_suite_tables(ROWS, tmp_path)
    df = pd.read_csv(tmp_path / "kld_results.csv")
    assert df.columns[0] == "QTYPE"
    assert df.set_index("QTYPE").loc["q4_0", "blk.10.attn_q.weight"] == pytest.approx(0.012346)
    assert df.set_index("QTYPE").loc["q4_0", "token_embd.weight"] == 404


# ------------------------------------------- extra metrics, percent mode
# (docs/suite-formats.md#percent-mode)


def test_metric_keys_are_the_kldstats_fields():
    import dataclasses

    from pytest_quantbench.metrics import KLDStats

    assert METRIC_KEYS == tuple(f.name for f in dataclasses.fields(KLDStats))


def test_check_csv_metrics_keeps_order_drops_duplicates_and_suite_tables():
    assert check_csv_metrics(["kld_p99", "rms_dp", "mean_kld", "kld_p99", "ppl_q_err"]) == (
        "kld_p99",
        "rms_dp",
        "ppl_q_err",
    )
    assert check_csv_metrics([]) == ()
    every = check_csv_metrics(["n_tokens", "all"])
    assert every[0] == "n_tokens" and len(every) == len(METRIC_KEYS) - 3
    assert not {"mean_kld", "ppl_q", "same_top_p"} & set(every)


def test_check_csv_metrics_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError) as exc:
        check_csv_metrics(["rms_dp", "kld_99"])
    assert str(exc.value).startswith(
        "--quantbench-csv-metrics: unknown metric 'kld_99'; valid: all, ppl_q, ppl_q_err, "
    )
    assert str(exc.value).endswith(", same_top_p, same_top_p_err, n_tokens")


def test_extra_metric_tables_use_llama_perplexity_decimals(tmp_path):
    rows = [
        row(
            "blk.10.attn_q.weight",
            "q4_0",
            mean_kld=0.1,
            kld_p99=0.0338074,
            cor_ln_ppl=99.8449,
            n_tokens=252,
            rms_dp_err=0.17549,
        ),
        row("blk.2.attn_q.weight", "q4_0", kld_p99=float("nan")),
    ]
    paths = write_suite_tables(
        rows,
        tmp_path,
        qtypes=["q8_0"],
        metrics=["kld_p99", "cor_ln_ppl", "mean_kld", "n_tokens", "rms_dp_err"],
    )
    assert [p.name for p in paths] == [
        "kld_results.csv",
        "ppl_results.csv",
        "topp_results.csv",
        "kld_p99_results.csv",
        "cor_ln_ppl_results.csv",
        "n_tokens_results.csv",
        "rms_dp_err_results.csv",
        "results.csv",
    ]
    header = b"QTYPE,blk.2.attn_q.weight,blk.10.attn_q.weight\n"
    assert (tmp_path / "kld_p99_results.csv").read_bytes() == header + (
        b"q4_0,404,0.033807\nq8_0,404,404\n"
    )
    assert (tmp_path / "cor_ln_ppl_results.csv").read_bytes() == header + (
        b"q4_0,404,99.84\nq8_0,404,404\n"
    )
    assert (tmp_path / "n_tokens_results.csv").read_bytes() == header + (
        b"q4_0,404,252\nq8_0,404,404\n"
    )
    assert (tmp_path / "rms_dp_err_results.csv").read_bytes() == header + (
        b"q4_0,404,0.175\nq8_0,404,404\n"
    )
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in paths)


def test_unknown_metric_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="unknown metric 'bogus'"):
        write_suite_tables(ROWS, tmp_path, metrics=["bogus"])
    assert os.listdir(tmp_path) == []


PPL_HEADER = KLD_CSV.split(b"\n")[0] + b"\n"


def test_ppl_percent_against_given_baseline(tmp_path):
    write_suite_tables(ROWS, tmp_path, qtypes=["q8_0"], ppl_percent=True, baseline_ppl=8.0)
    # (7.3125-8)/8 = -8.59375 %; 9.25 gives exactly +15.625 %, printed as C does (+15.62).
    assert (tmp_path / "ppl_results.csv").read_bytes() == PPL_HEADER + (
        b"iq2_k,+15.62%,404%,404%,404%\nq4_0,404%,+0.00%,-8.59%,404%\nq8_0,404%,404%,404%,404%\n"
    )
    # KLD is never converted.
    assert (tmp_path / "kld_results.csv").read_bytes() == KLD_CSV + b"q8_0,404,404,404,404\n"


def test_ppl_percent_uses_printed_value_and_rows_baseline_by_default(tmp_path):
    rows = [
        row("a", "q4_0", ppl_q=0.0010004999, ppl_base=0.001),
        row("b", "q4_0", ppl_q=0.0009, ppl_base=0.001),
    ]
    write_suite_tables(rows, tmp_path, ppl_percent=True)
    # a is read as printed, 0.001000 (+0.00 %), as the collector reads the log; the
    # unrounded value would give +0.05 %.
    assert (tmp_path / "ppl_results.csv").read_bytes() == b"QTYPE,a,b\nq4_0,+0.00%,-10.00%\n"


@pytest.mark.parametrize("baseline, rows", [(0.0, ROWS), (None, ROWS)])
def test_ppl_percent_without_usable_baseline_is_404_percent(tmp_path, baseline, rows):
    write_suite_tables(rows, tmp_path, ppl_percent=True, baseline_ppl=baseline)
    assert (tmp_path / "ppl_results.csv").read_bytes() == PPL_HEADER + (
        b"iq2_k,404%,404%,404%,404%\nq4_0,404%,404%,404%,404%\n"
    )


@pytest.mark.parametrize("baseline", [-1.0, float("nan"), float("inf"), "x"])
def test_bad_baseline_ppl(tmp_path, baseline):
    with pytest.raises(ValueError, match=r"baseline_ppl=.*: give a finite perplexity >= 0"):
        write_suite_tables(ROWS, tmp_path, baseline_ppl=baseline)
    assert os.listdir(tmp_path) == []


def test_baseline_row_gets_baseline_ppl_and_zero_kld(tmp_path):
    rows = [*ROWS, row("blk.0.attn_q.weight", "bf16", mean_kld=0.0000004, ppl_q=8.0000001)]
    write_suite_tables(
        rows, tmp_path, qtypes=["bf16", "q8_0"], baseline_qtype="bf16", baseline_ppl=8.0
    )
    assert (tmp_path / "kld_results.csv").read_bytes() == PPL_HEADER + (
        b"bf16,0,0,0,0\n"
        b"iq2_k,0.500000,404,404,404\n"
        b"q4_0,404,0.200000,0.012346,404\n"
        b"q8_0,404,404,404,404\n"
    )
    assert (tmp_path / "ppl_results.csv").read_bytes().split(b"\n")[1] == (
        b"bf16,8.000000,8.000000,8.000000,8.000000"
    )
    write_suite_tables(rows, tmp_path, baseline_qtype="bf16", baseline_ppl=8.0, ppl_percent=True)
    assert (tmp_path / "ppl_results.csv").read_bytes().split(b"\n")[1] == (
        b"bf16,+0.00%,+0.00%,+0.00%,+0.00%"
    )
    # Not among the rows: nothing is added.
    write_suite_tables(ROWS, tmp_path, baseline_qtype="bf16", baseline_ppl=8.0)
    assert (tmp_path / "kld_results.csv").read_bytes() == KLD_CSV


def test_baseline_ppl_option_is_a_finite_float():
    from pathlib import Path

    from pytest_quantbench.config import BY_DEST, ConfigError, _convert

    opt = BY_DEST["quantbench_baseline_ppl"]
    assert _convert(opt, "8.125", "CLI", Path(".")) == 8.125
    assert _convert(opt, 8, "ini", Path(".")) == 8.0
    for bad in ("nan", "x", "-1", True):
        with pytest.raises(
            ConfigError,
            match=r"--quantbench-baseline-ppl \(from CLI\): .* is "
            r"not a finite number >= 0",
        ):
            _convert(opt, bad, "CLI", Path("."))
    metrics = BY_DEST["quantbench_csv_metrics"]
    assert _convert(metrics, ["kld_p99,rms_dp", "n_tokens"], "CLI", Path(".")) == (
        "kld_p99",
        "rms_dp",
        "n_tokens",
    )


# ---------------------------------------------------------------- tidy CSV


def test_results_csv_columns_and_full_precision(tmp_path):
    rows = [
        {
            **ROWS[0],
            "model_sha256": "ab" * 32,
            "n_ctx": 512,
            "chunks": 4,
            "engine": "ik@abc",
            "nodeid": "tests/q.py::x[blk.10.attn_q.weight-q4_0]",
            "zz_extra": "e",
        },
        ROWS[3],
        ROWS[1],
    ]
    write_suite_tables(rows, tmp_path)
    text = (tmp_path / "results.csv").read_bytes().decode("utf-8")
    assert "\r" not in text
    records = list(csv.DictReader(io.StringIO(text)))
    assert list(records[0]) == list(report.RESULT_COLUMNS)  # zz_extra is not a column
    assert records[0]["fallback"] == "False" and records[0]["reused"] == "False"
    assert [r["tensor"] for r in records] == [
        "blk.2.attn_q.weight",
        "blk.10.attn_q.weight",
        "token_embd.weight",
    ]
    r10 = records[1]
    assert r10["mean_kld"] == "0.0123456789"
    assert float(r10["mean_kld"]) == 0.0123456789
    assert r10["n_ctx"] == "512" and r10["chunks"] == "4"
    assert r10["corpus_sha256"] == "" and r10["max_kld"] == ""
    assert records[2]["reason"] == "engine crashed, rc=-11"
    assert records[2]["status"] == "error"


def test_comparison_columns_fixed_then_a_fail_rules_metric():
    assert comparison_columns(["mean_kld", "kld_p99", "mean_kld"]) == (
        "ref_mean_kld",
        "delta_mean_kld",
        "ref_kld_p99",
        "delta_kld_p99",
    )
    row = {"tensor": "t", "ref_kld_p99": 1.0, "delta_kld_p99": 0.5, "ref_mean_kld": 0.1}
    columns = tidy_columns([row])
    fixed = list(comparison_columns())
    assert columns[columns.index(fixed[0]) :][: len(fixed) + 2] == [
        *fixed,
        "ref_kld_p99",
        "delta_kld_p99",
    ]
    assert "ref_kld_p99" not in tidy_columns([])


def test_tidy_columns_are_stable_without_extra_keys():
    assert tidy_columns([]) == tidy_columns([ROWS[3], {"fallback": True, "zz": 1}])
    assert tidy_columns([])[:4] == ["tensor", "qtype", "written_type", "status"]
    assert tidy_columns([])[-2:] == ["nodeid", "reason"]


def test_results_csv_header_is_the_fixed_list_whatever_the_rows_hold(tmp_path):
    """Issue 11 item 6: keys that only some runs have (fallback, reused) do not move columns."""
    report.write_tidy_csv([ROWS[3]], tmp_path / "a.csv")
    report.write_tidy_csv(
        [{**ROWS[0], "fallback": True, "reused": True, "zz": 1}], tmp_path / "b.csv"
    )
    headers = [(tmp_path / n).read_text().splitlines()[0] for n in ("a.csv", "b.csv")]
    assert headers[0] == headers[1] == ",".join(report.RESULT_COLUMNS)
    assert len(set(report.RESULT_COLUMNS)) == len(report.RESULT_COLUMNS)
    assert set(METRIC_KEYS) <= set(report.RESULT_COLUMNS)


def test_tidy_numpy_values_are_plain_numbers(tmp_path):
    np = pytest.importorskip("numpy")
    rows = [
        row("a", "q", mean_kld=np.float64(0.1), n_tokens=np.int64(2048), max_kld=np.float32(0.1))
    ]
    report.write_tidy_csv(rows, tmp_path / "r.csv")
    (record,) = csv.DictReader(io.StringIO((tmp_path / "r.csv").read_text()))
    assert record["mean_kld"] == "0.1"
    assert record["n_tokens"] == "2048"
    assert record["max_kld"] == "0.10000000149011612"


# ------------------------------------------------------------ atomic write


def test_atomic_write_creates_and_replaces(tmp_path):
    path = tmp_path / "sub" / "f.csv"
    atomic_write_text(path, "a\nb\n")
    assert path.read_bytes() == b"a\nb\n"
    atomic_write_text(path, "c\n")
    assert path.read_bytes() == b"c\n"
    assert os.listdir(path.parent) == ["f.csv"]


def test_atomic_write_keeps_mode_of_existing_file(tmp_path):
    path = tmp_path / "f.csv"
    path.write_text("old")
    os.chmod(path, 0o640)
    atomic_write_text(path, "new")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


@pytest.mark.parametrize("fail", ["replace", "fsync", "write"])
def test_atomic_write_failure_leaves_old_file_and_no_temp(tmp_path, monkeypatch, fail):
    path = tmp_path / "kld_results.csv"
    path.write_bytes(b"old contents\n")

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report.os, fail, boom)
    with pytest.raises(OSError) as exc:
        atomic_write_text(path, "new contents\n")
    monkeypatch.undo()
    assert str(exc.value) == (
        f"[Errno 28] could not write {path} (an existing file is left unchanged): "
        "No space left on device: the disk is full; free space there (or write elsewhere) and "
        "run again"
    )
    assert exc.value.errno == 28
    assert path.read_bytes() == b"old contents\n"
    assert os.listdir(tmp_path) == ["kld_results.csv"]


def test_atomic_write_interrupt_cleans_up(tmp_path, monkeypatch):
    path = tmp_path / "f.csv"

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report.os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(path, "x")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


def test_suite_tables_failure_names_the_file(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    with pytest.raises(OSError, match="could not write .*not_a_dir/kld_results.csv"):
        write_suite_tables(ROWS, blocker)


# --------------------------------------------------------------- summary


def test_worst_items_by_kld_skips_unmeasured():
    assert [r["tensor"] for r in worst_items(ROWS, 10)] == [
        "blk.0.attn_q.weight",
        "blk.2.attn_q.weight",
        "blk.10.attn_q.weight",
    ]
    assert [r["tensor"] for r in worst_items(ROWS, 1)] == ["blk.0.attn_q.weight"]
    assert worst_items(ROWS, 0) == []


def test_worst_items_lower_is_worse_for_same_top_p():
    assert [r["same_top_p"] for r in worst_items(ROWS, 2, "same_top_p")] == [80.0, 88.0]


def test_worst_items_ties_in_natural_order():
    rows = [row("blk.10.x", "q", mean_kld=1.0), row("blk.9.x", "q", mean_kld=1.0)]
    assert [r["tensor"] for r in worst_items(rows)] == ["blk.9.x", "blk.10.x"]


def test_format_summary_lines():
    assert format_summary(ROWS, 2) == [
        "rank  tensor               qtype  written  mean KLD  PPL ratio  same top p  result",
        "   1  blk.0.attn_q.weight  iq2_k  iq2_k    0.500000  1.2800     80.000 %",
        "   2  blk.2.attn_q.weight  q4_0   q4_0     0.200000  1.1000     88.000 %    FAIL",
    ]
    lines = format_summary(ROWS, 10)
    assert lines[3] == (
        "   3  blk.10.attn_q.weight  q4_0   q4_0     0.012346 ± 0.000456  "
        "1.0312 ± 0.0041  93.457 ± 0.123 %"
    )
    assert len(lines) == 4  # the errored item has no KLD


def test_format_summary_marks_failed_errored_and_impure_rows():
    rows = [
        row("blk.0.attn_q.weight", "q4_0", "failed", mean_kld=0.3),
        row("blk.1.attn_q.weight", "q4_K", "passed", written="q5_0", mean_kld=0.2, fallback=True),
        row("blk.2.attn_q.weight", "q4_0", "error", mean_kld=0.1),
        row("blk.3.attn_q.weight", "q4_0", "passed", mean_kld=0.05),
    ]
    lines = format_summary(rows, 10)
    assert lines[1].endswith("FAIL") and "blk.0" in lines[1]
    assert "q5_0 (impure)" in lines[2] and not lines[2].endswith(("FAIL", "ERROR"))
    assert lines[3].endswith("ERROR")
    assert lines[4].endswith("n/a")  # a passed row has no mark


def test_format_summary_nothing_measured():
    assert format_summary([ROWS[3]], 5) == []
