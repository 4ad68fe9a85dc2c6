"""Faults: a run survives what goes wrong while it works, reports it clearly, and never leaves a
half-written file that looks complete.

* a worker dying in native code costs only its item, whose report shows the engine's last words;
* NaN logits error their item; the others complete;
* a baseline cache that is truncated, or whose model or corpus content changed, is recomputed;
  two runs at once compute one baseline;
* a full disk while writing the baseline cache or the CSV tables: a clear error, the old files
  intact, no temporary file left.

The pytester runs are real pytest subprocesses on the tiny synthetic model.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pandas as pd
import pytest

from runhelpers import cache_of, leftovers, measure_with_own_cache, read_wide, results, without

HAVE_DEV_FULL = os.path.exists("/dev/full")
needs_dev_full = pytest.mark.skipif(not HAVE_DEV_FULL, reason="/dev/full simulates a full disk")


# ---- a worker dying in native code ----------------------------------------------------------

CRASHING_CONFTEST = """
import ctypes
import os
from pytest_quantbench import session
from pytest_quantbench.engine.bindings import mapped_library

_orig = session.QuantbenchSession.measure

def measure(self, unit, row):
    if unit.name == "blk.0.attn_v.weight":
        {crash}
    if unit.name == "blk.0.attn_q.weight":
        os.write(2, b"native warning from blk.0.attn_q\\n")
    return _orig(self, unit, row)

session.QuantbenchSession.measure = measure
"""

# What ggml does on a failed GGML_ASSERT: fprintf(stderr, "file:line: msg"), gdb backtrace, abort().
GGML_ASSERT = """self.swap_model  # the engine is loaded and has logged
        ggml = ctypes.CDLL(mapped_library(r"^libggml"))
        ggml.ggml_abort(b"ggml.c", 1234, b"GGML_ASSERT(%s) failed", b"deliberate crash")"""
SEGFAULT = "ctypes.string_at(0)  # a segfault that prints nothing"


@pytest.mark.parametrize("crash", [GGML_ASSERT, SEGFAULT], ids=["ggml-assert", "segfault"])
def test_a_worker_dying_in_native_code_costs_only_its_item(pytester, qb_args, crash):
    """xdist replaces the dead worker; its item is an error whose report ends with what the engine
    wrote to stderr (and its log) just before; every other item completes, and what the engine
    wrote to stderr during them is still in their captured output (-rP shows it); the tables list
    the crashed item with the reason; no fault file is left in the cache."""
    pytester.makeconftest(CRASHING_CONFTEST.format(crash=crash))
    cache = cache_of(qb_args)
    result = pytester.runpytest_subprocess(
        *qb_args,
        "--quantbench-qtypes=q4_0",
        "-n",
        "2",
        "--quantbench-rerun",
        "-rP",
        "--quantbench-tensors",
        r"blk\.[01]\.attn_(q|v)",
    )
    result.assert_outcomes(passed=3, errors=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    out = result.stdout.str()
    crash_report = out[out.index("ERROR at setup of") : out.index("= PASSES =")]
    assert "native warning" not in crash_report  # another item's stderr
    result.stdout.fnmatch_lines(
        [
            "*_ quantbench blk.0.attn_q.weight[[]q4_0[]] _*",
            "*Captured stderr setup*",
            "native warning from blk.0.attn_q",
        ]
    )
    header = "worker 'gw?' crashed while running 'quantbench::blk.0.attn_v.weight[[]q4_0[]]'"
    if crash == GGML_ASSERT:
        result.stdout.fnmatch_lines(
            [
                "*ERROR at setup of quantbench blk.0.attn_v.weight[[]q4_0[]]*",
                header,
                "last lines the engine wrote to stderr:",
                "    ggml.c:1234: GGML_ASSERT(deliberate crash) failed",
                "last engine log lines:",
                "    llama_*",
            ]
        )
        reason_tail = "; engine stderr: ggml.c:1234: GGML_ASSERT(deliberate crash) failed"
    else:
        result.stdout.fnmatch_lines(
            [
                "*ERROR at setup of quantbench blk.0.attn_v.weight[[]q4_0[]]*",
                header,
                "the engine wrote nothing to stderr during this item",
            ]
        )
        reason_tail = None
    tidy = results(pytester).set_index("tensor")
    assert sorted(tidy["status"]) == ["error", "passed", "passed", "passed"]
    reason = tidy.loc["blk.0.attn_v.weight", "reason"]
    assert (
        reason.startswith("worker 'gw")
        and "crashed while running 'quantbench::blk.0.attn_v.weight[q4_0]'" in reason
    )
    if reason_tail:
        assert reason.endswith(reason_tail)
    kld = read_wide(pytester.path / "quantbench-results" / "kld_results.csv")
    assert kld.loc["q4_0", "blk.0.attn_v.weight"] == "404"
    assert "404" not in kld.drop(columns="blk.0.attn_v.weight").loc["q4_0"].tolist()
    assert leftovers(cache) == []


# ---- bad numbers -----------------------------------------------------------------------------


def test_non_finite_logits_error_the_item_and_the_run_continues(pytester, qb_args):
    """A tensor whose weights are NaN gives NaN logits: that item errors with the finding."""
    pytester.makeconftest("""
import numpy as np
from pytest_quantbench.engine import swap

_orig = swap.SwapModel.baseline_f32

def nan_weights(self, name, type_name):
    w = _orig(self, name, type_name)
    return np.full_like(w, np.nan) if name == "blk.1.attn_v.weight" else w

swap.SwapModel.baseline_f32 = nan_weights
""")
    result = pytester.runpytest_subprocess(
        *qb_args,
        "--quantbench-qtypes=q8_0",
        "--quantbench-rerun",
        "--quantbench-tensors",
        r"blk\.1\.attn_(q|v)",
    )
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at setup of quantbench blk.1.attn_v.weight?q8_0?*",
            "ValueError: chunk 1: 31 of 31 scored positions have non-finite "
            "logits (NaN or inf); first at position 0",
        ]
    )
    assert "Traceback" not in result.stdout.str() and "metrics.py" not in result.stdout.str()
    tidy = results(pytester)
    assert sorted(tidy["status"]) == ["error", "passed"]


# ---- the baseline cache ---------------------------------------------------------------------


def test_corrupted_baseline_cache_is_recomputed(pytester, qb_args, tmp_path):
    args, first, base_file = measure_with_own_cache(
        pytester, qb_args, tmp_path / "cache", r"blk\.0\.attn_v"
    )
    size = base_file.stat().st_size
    with open(base_file, "r+b") as fh:
        fh.truncate(size // 2)
    pytester.runpytest_subprocess(*args, "--quantbench-rerun").assert_outcomes(passed=1)
    assert base_file.stat().st_size == size
    again = results(pytester).iloc[0]
    assert again["mean_kld"] == first["mean_kld"] and again["ppl_base"] == first["ppl_base"]


def test_baseline_cache_follows_the_content_of_model_and_corpus(
    pytester, synth_model, synth_corpus, tmp_path
):
    """The cache key is the content hash: the same text rewritten (new mtime) reuses the cached
    baseline; a changed corpus, then a changed model, each get a baseline of their own."""
    from synthmodel import build_synthetic_model

    model, corpus, cache = tmp_path / "model.gguf", tmp_path / "corpus.txt", tmp_path / "cache"
    shutil.copyfile(synth_model, model)
    shutil.copyfile(synth_corpus, corpus)
    args = [
        f"--quantbench-model={model}",
        f"--quantbench-corpus={corpus}",
        "--quantbench-ctx=64",
        "--quantbench-chunks=2",
        f"--quantbench-cache-dir={cache}",
        "-p",
        "no:randomly",
        "--quantbench-qtypes=q4_0",
        "--quantbench-tensors",
        r"blk\.0\.attn_v",
        "--quantbench-rerun",
    ]

    def run():
        pytester.runpytest_subprocess(*args).assert_outcomes(passed=1)
        return results(pytester).iloc[0], sorted((cache / "baselines").glob("*.kld"))

    first, bases = run()
    assert len(bases) == 1
    mtime = bases[0].stat().st_mtime_ns
    text = corpus.read_text(encoding="utf-8")
    corpus.write_text(text, encoding="utf-8")  # same content, new mtime
    same, bases = run()
    assert len(bases) == 1 and bases[0].stat().st_mtime_ns == mtime
    assert same["corpus_sha256"] == first["corpus_sha256"]
    corpus.write_text(text.replace("Paragraph", "Section"), encoding="utf-8")
    other_corpus, bases = run()
    assert len(bases) == 2
    assert other_corpus["corpus_sha256"] != first["corpus_sha256"]
    assert other_corpus["ppl_base"] != first["ppl_base"]
    build_synthetic_model(model, seed=1)
    other_model, bases = run()
    assert len(bases) == 3
    assert other_model["model_sha256"] != first["model_sha256"]
    assert other_model["ppl_base"] != other_corpus["ppl_base"]


def test_two_runs_at_once_share_one_baseline(pytester, synth_model, synth_corpus, tmp_path):
    cache = tmp_path / "cache"
    procs = []
    for name in ("a", "b"):
        workdir = tmp_path / name
        workdir.mkdir()
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pytest",
                    "-q",
                    "-p",
                    "no:randomly",
                    "-p",
                    "no:cacheprovider",
                    f"--quantbench-model={synth_model}",
                    f"--quantbench-corpus={synth_corpus}",
                    "--quantbench-ctx=64",
                    "--quantbench-chunks=4",
                    f"--quantbench-cache-dir={cache}",
                    "--quantbench-qtypes=q4_0",
                    "--quantbench-tensors",
                    r"blk\.0\.attn_v",
                ],
                cwd=workdir,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert len(list((cache / "baselines").glob("*.kld"))) == 1
    assert leftovers(cache) == []
    rows = [
        pd.read_csv(tmp_path / n / "quantbench-results" / "results.csv").iloc[0] for n in ("a", "b")
    ]
    assert rows[0]["mean_kld"] == rows[1]["mean_kld"]


# ---- a full disk ------------------------------------------------------------------------------


def _full_fd() -> int:
    """A file descriptor on which every write fails with ENOSPC, as on a full disk."""
    return os.open("/dev/full", os.O_WRONLY)


@needs_dev_full
def test_disk_full_while_writing_a_kld_base_file_keeps_the_old_one(monkeypatch, tmp_path):
    from pytest_quantbench.kldbase import KLDBaseWriter

    path = tmp_path / "base.kld"
    path.write_bytes(b"old content")
    real_mkstemp = tempfile.mkstemp

    def full_mkstemp(*args, **kwargs):
        fd, name = real_mkstemp(*args, **kwargs)
        os.close(fd)
        return _full_fd(), name

    monkeypatch.setattr(tempfile, "mkstemp", full_mkstemp)
    tokens = np.zeros((2, 64), dtype=np.int32)
    with pytest.raises(OSError) as info:
        with KLDBaseWriter(path, 64, 384, tokens) as writer:
            for _ in range(2):
                writer.write_chunk(np.zeros((31, 384), dtype=np.float32))
    assert info.value.errno == errno.ENOSPC
    assert str(info.value) == (
        f"[Errno 28] could not write KLD base file {path} (an existing "
        "file is left unchanged): No space left on device"
    )
    assert path.read_bytes() == b"old content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.kld"]


@needs_dev_full
def test_disk_full_while_writing_the_baseline_cache_errors_the_items(pytester, qb_args, tmp_path):
    """Every item errors with the file, the errno text and the fix; no baseline file, complete
    or partial, is left; the tables still list the items."""
    pytester.makeconftest("""
import os
import tempfile

_mkstemp = tempfile.mkstemp

def full_mkstemp(*args, **kwargs):  # the baseline cache's disk is full
    fd, name = _mkstemp(*args, **kwargs)
    if os.path.basename(os.path.dirname(name)) == "baselines":
        os.close(fd)
        fd = os.open("/dev/full", os.O_WRONLY)
    return fd, name

tempfile.mkstemp = full_mkstemp
""")
    cache = tmp_path / "cache"
    args = without(qb_args, "--quantbench-cache-dir") + [f"--quantbench-cache-dir={cache}"]
    result = pytester.runpytest_subprocess(
        *args,
        "--quantbench-qtypes=q4_0",
        "--quantbench-rerun",
        "--quantbench-tensors",
        r"blk\.0\.attn_(q|v)",
    )
    result.assert_outcomes(errors=2)
    base = next(iter(cache.glob("baselines/*.kld.lock"))).with_suffix("")
    message = (
        f"BaselineError: the baseline failed ({base}): baseline cache: could not write "
        f"KLD base file {base} (an existing file is left unchanged): No space left on "
        "device; the disk of the quantbench cache is full: free space there, or set "
        "--quantbench-cache-dir to a directory on another disk, and run again (the "
        "baseline file needs 0.0 MB, * MB free there); every item needs it, so no item of "
        "this run is measured"
    )
    result.stdout.fnmatch_lines(
        ["*ERROR at setup of quantbench blk.0.attn_q.weight?q4_0?*", message]
    )
    assert not base.exists()
    assert list(cache.glob("baselines/*.kld")) == [] and leftovers(cache) == []
    tidy = results(pytester)
    assert list(tidy["status"]) == ["error", "error"]
    assert tidy["reason"].nunique() == 1
    assert fnmatch.fnmatchcase(tidy["reason"].iloc[0], message)


@needs_dev_full
def test_disk_full_while_writing_the_tables_keeps_the_old_ones(pytester, qb_args):
    """The run says which file could not be written and why, exits with an error, and the
    tables of the previous run are left as they were, with no temporary file beside them."""
    out = pytester.path / "quantbench-results"
    out.mkdir()
    old = {
        name: f"QTYPE,old {name}\n"
        for name in ("kld_results.csv", "ppl_results.csv", "topp_results.csv", "results.csv")
    }
    for name, text in old.items():
        (out / name).write_text(text)
    pytester.makeconftest("""
import os

def pytest_configure(config):
    if hasattr(config, "workerinput"):
        return
    real_open = os.open

    def full_open(path, flags, mode=0o777, **kwargs):  # the tables' disk is full
        fd = real_open(path, flags, mode, **kwargs)
        name = os.path.basename(os.fspath(path))
        if flags & os.O_EXCL and name.endswith(".tmp") and "results.csv" in name:
            os.close(fd)
            fd = real_open("/dev/full", os.O_WRONLY)
        return fd

    os.open = full_open
""")
    result = pytester.runpytest_subprocess(
        *qb_args, "--quantbench-qtypes=q4_0", "--quantbench-tensors", r"blk\.0\.attn_q"
    )
    result.assert_outcomes(passed=1)
    assert result.ret == pytest.ExitCode.INTERNAL_ERROR
    result.stdout.fnmatch_lines(
        [
            f"could not write the result tables: [[]Errno 28[]] could not write {out}/kld_results.csv "
            "(an existing file is left unchanged): No space left on device: the disk is full; free "
            "space there (or write elsewhere) and run again"
        ]
    )
    for name, text in old.items():
        assert (out / name).read_text() == text
    assert leftovers(out) == []
