"""The results store: durable per-item results, reuse across runs, exactly-once under concurrency,
and tables built from every stored result of the current settings."""

from __future__ import annotations

import math
import multiprocessing
import sqlite3
import subprocess
import sys

import pytest

from pytest_quantbench.store import STORE_FILE, ResultsStore, StoreError, item_key, run_key
from runhelpers import read_wide, results

# A conftest that makes every measurement fail: a run that passes under it measured nothing.
NO_MEASURING = """
from pytest_quantbench.session import QuantbenchSession

def refuse(self, unit, row):
    raise RuntimeError("measured " + unit.id)

QuantbenchSession._measure = refuse
"""


def test_store_round_trip_keeps_non_finite_numbers(tmp_path):
    store = ResultsStore(tmp_path / "out" / STORE_FILE)
    run = run_key({"model_sha256": "m", "n_ctx": 512}, None)
    key = item_key(run, ["b", "a"], "q4_0")
    assert key == item_key(run, ["a", "b"], "q4_0") != item_key(run, ["a"], "q4_0")
    assert run != run_key({"model_sha256": "m", "n_ctx": 512}, "imatrix-sha")
    row = {"tensor": "t", "qtype": "q4_0", "stats": {"rms_dp_err": math.nan, "x": 1.5}}
    store.put(key, run, row)
    got = store.get(key)
    assert got["stats"]["x"] == 1.5 and math.isnan(got["stats"]["rms_dp_err"])
    assert store.rows(run) == [got] and store.rows("other") == []
    store.close()


def _put_one(path, i, barrier, failures):
    barrier.wait()  # every process opens the fresh store at the same moment
    try:
        ResultsStore(path).put(f"key{i}", "run", {"tensor": "t", "qtype": str(i)})
    except StoreError as exc:
        failures.put(str(exc))


def test_workers_opening_a_new_store_at_once_all_write(tmp_path):
    """xdist workers open a fresh store at the same moment; SQLite answers a concurrent switch to
    WAL with "database is locked" at once (no busy wait), so opening is serialized. Without that,
    several of these rounds failed every time."""
    ctx = multiprocessing.get_context("fork")
    failures = ctx.Queue()
    for round_ in range(20):
        path = tmp_path / f"round{round_}" / STORE_FILE
        barrier = ctx.Barrier(8)
        procs = [ctx.Process(target=_put_one, args=(path, i, barrier, failures)) for i in range(8)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(60)
        assert failures.empty(), failures.get()
        assert len(ResultsStore(path).rows("run")) == 8


def test_an_unwritable_store_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(
        StoreError,
        match="results store .*: cannot open it .*check that the output directory is writable",
    ):
        ResultsStore(blocker / STORE_FILE).get("k")


def _args(qb_args, qtypes="q4_0,q8_0"):
    return [
        *qb_args,
        f"--quantbench-qtypes={qtypes}",
        "--quantbench-tensors",
        r"^blk\.0\.attn_(q|v)\.weight$",
    ]


def test_a_second_run_measures_nothing_and_rerun_measures_again(pytester, qb_args):
    pytester.runpytest_subprocess(*_args(qb_args)).assert_outcomes(passed=4)
    first = results(pytester).set_index(["tensor", "qtype"])
    pytester.makeconftest(NO_MEASURING)
    again = pytester.runpytest_subprocess(*_args(qb_args))
    again.assert_outcomes(passed=4)
    again.stdout.fnmatch_lines(["4 item(s) reused from the results store *"])
    second = results(pytester).set_index(["tensor", "qtype"])
    assert second["reused"].all()
    assert second["mean_kld"].equals(first["mean_kld"])
    forced = pytester.runpytest_subprocess(*_args(qb_args), "--quantbench-rerun")
    forced.assert_outcomes(errors=4)
    forced.stdout.fnmatch_lines(["*RuntimeError: measured blk.0.attn_q.weight[[]q4_0[]]*"])


def test_reused_items_are_judged_by_the_current_thresholds(pytester, qb_args):
    args = [
        *qb_args,
        "--quantbench-qtypes=q4_0",
        "--quantbench-tensors",
        r"^blk\.0\.attn_v\.weight$",
    ]
    pytester.runpytest_subprocess(*args).assert_outcomes(passed=1)
    assert results(pytester).iloc[0]["mean_kld"] > 1e-4
    pytester.makeconftest(NO_MEASURING)
    limits = pytester.path / "limits.yaml"
    limits.write_text("defaults:\n  max_kld: 0.0001\n")
    result = pytester.runpytest_subprocess(*args, f"--quantbench-thresholds={limits}")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*mean KLD 0.000* > max_kld 0.0001*"])


def test_tables_hold_every_stored_result_of_the_same_settings(pytester, qb_args):
    pytester.runpytest_subprocess(*_args(qb_args, "q8_0")).assert_outcomes(passed=2)
    pytester.runpytest_subprocess(*_args(qb_args, "q4_0")).assert_outcomes(passed=2)
    kld = read_wide(pytester.path / "quantbench-results" / "kld_results.csv")
    assert list(kld.index) == ["q4_0", "q8_0"]
    assert "404" not in kld.values
    status = results(pytester).set_index("qtype")["status"]
    assert set(status["q8_0"]) == {"stored"} and set(status["q4_0"]) == {"passed"}
    # other settings (3 chunks) share nothing: both items are measured, q8_0 is not shown
    args = [a for a in _args(qb_args, "q4_0") if a != "--quantbench-chunks=2"]
    pytester.makeconftest(NO_MEASURING)
    pytester.runpytest_subprocess(*args, "--quantbench-chunks=3").assert_outcomes(errors=2)


def test_a_stored_fallback_result_is_skipped_without_allow_fallback(pytester, qb_args, tmp_path):
    from synthmodel import build_synthetic_model

    model = build_synthetic_model(tmp_path / "synth-192.gguf", n_embd=192, n_ff=384)
    args = [
        *[a for a in qb_args if not a.startswith("--quantbench-model=")],
        f"--quantbench-model={model}",
        "--quantbench-qtypes=q4_K",
        "--quantbench-tensors",
        r"^blk\.0\.attn_q\.weight$",
    ]
    pytester.runpytest_subprocess(*args, "--quantbench-allow-fallback").assert_outcomes(passed=1)
    assert results(pytester).iloc[0]["written_type"] == "q5_0"
    pytester.makeconftest(NO_MEASURING)
    result = pytester.runpytest_subprocess(*args, "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(
        ["*llama-quantize writes q5_0 instead of q4_K for blk.0.attn_q.weight*"]
    )


def test_two_runs_at_once_store_every_result_exactly_once(pytester, qb_args):
    out = pytester.path / "shared-out"
    args = [*_args(qb_args), f"--quantbench-output={out}"]
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args]
    procs = [
        subprocess.Popen(
            cmd, cwd=pytester.path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    with sqlite3.connect(out / STORE_FILE) as conn:
        keys = conn.execute("SELECT tensor, qtype FROM results").fetchall()
    assert sorted(keys) == sorted(
        {(t, q) for t in ("blk.0.attn_q.weight", "blk.0.attn_v.weight") for q in ("q4_0", "q8_0")}
    )


def test_an_interrupted_run_keeps_what_it_measured(pytester, qb_args):
    """Ctrl-C during the third item: the first two are in the store and in complete CSVs; the
    next run measures only the rest."""
    pytester.makeconftest("""
from pytest_quantbench.session import QuantbenchSession

_measure = QuantbenchSession._measure

def interrupted(self, unit, row):
    if unit.id == "blk.0.attn_v.weight[q4_0]":
        raise KeyboardInterrupt  # Ctrl-C while the third item is measured
    return _measure(self, unit, row)

QuantbenchSession._measure = interrupted
""")
    result = pytester.runpytest_subprocess(*_args(qb_args))
    assert result.ret == pytest.ExitCode.INTERRUPTED
    kld = read_wide(pytester.path / "quantbench-results" / "kld_results.csv")
    measured = {(q, t) for q in kld.index for t in kld.columns if kld.loc[q, t] != "404"}
    assert measured == {("q4_0", "blk.0.attn_q.weight"), ("q8_0", "blk.0.attn_q.weight")}
    pytester.makeconftest(NO_MEASURING)
    rest = pytester.runpytest_subprocess(*_args(qb_args))
    rest.assert_outcomes(passed=2, errors=2)


def test_sigterm_keeps_what_was_measured_and_rewrites_complete_tables(pytester, qb_args):
    import os
    import signal
    import time

    started = pytester.path / "third-item-started"
    pytester.makeconftest(f"""
import time
from pytest_quantbench.session import QuantbenchSession

_measure = QuantbenchSession._measure

def slow(self, unit, row):
    if unit.id == "blk.0.attn_v.weight[q4_0]":
        open({str(started)!r}, "w").close()
        time.sleep(120)
    return _measure(self, unit, row)

QuantbenchSession._measure = slow
""")
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *_args(qb_args)]
    proc = subprocess.Popen(
        cmd, cwd=pytester.path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 120
    while not started.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert started.exists(), proc.communicate()[0]
    os.kill(proc.pid, signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, out
    kld = read_wide(pytester.path / "quantbench-results" / "kld_results.csv")
    measured = {(q, t) for q in kld.index for t in kld.columns if kld.loc[q, t] != "404"}
    assert measured == {("q4_0", "blk.0.attn_q.weight"), ("q8_0", "blk.0.attn_q.weight")}
    with sqlite3.connect(pytester.path / "quantbench-results" / STORE_FILE) as conn:
        assert conn.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 2
