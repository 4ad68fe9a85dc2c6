"""Inputs that must not change the numbers silently (issue 19) and the cache's disk and temporary
files (issue 11, items 3 and 4): end-to-end runs on the synthetic model."""

from __future__ import annotations

import hashlib
import os
import shutil

import pandas as pd
import pytest

from runhelpers import results, usage_error, without

STATS = ("mean_kld", "ppl_q", "ppl_base", "same_top_p", "rms_dp", "kld_p99")


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _one_item(qb_args, cache, *extra):
    return [
        *without(qb_args, "--quantbench-cache-dir"),
        f"--quantbench-cache-dir={cache}",
        "--quantbench-qtypes=q4_0",
        "--quantbench-tensors",
        r"^blk\.0\.attn_v\.weight$",
        *extra,
    ]


# ---- issue 19.1: a replaced model with the same size and mtime ------------------------------


def test_model_copied_over_with_the_same_size_and_mtime_gets_its_own_hash_and_baseline(
    pytester, synth_corpus, tmp_path
):
    """`cp` B over A, then restore A's mtime (as cp -p, rsync -a, tar x do): B's hash, B's
    baseline, nothing reused from A."""
    from synthmodel import build_synthetic_model

    a = build_synthetic_model(tmp_path / "a.gguf", seed=0)
    b = build_synthetic_model(tmp_path / "b.gguf", seed=1)
    assert a.stat().st_size == b.stat().st_size and _sha(a) != _sha(b)
    model, cache = tmp_path / "model.gguf", tmp_path / "cache"
    shutil.copyfile(a, model)
    args = [
        f"--quantbench-model={model}",
        f"--quantbench-corpus={synth_corpus}",
        "--quantbench-ctx=64",
        "--quantbench-chunks=2",
        f"--quantbench-cache-dir={cache}",
        "-p",
        "no:randomly",
        "--quantbench-qtypes=q4_0",
        "--quantbench-tensors",
        r"^blk\.0\.attn_v\.weight$",
    ]
    pytester.runpytest_subprocess(*args).assert_outcomes(passed=1)
    first = results(pytester).iloc[0]
    assert first["model_sha256"] == _sha(a)
    before = model.stat()
    shutil.copyfile(b, model)  # in place: the same inode, as cp does
    os.utime(model, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (model.stat().st_size, model.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"quantbench model: {model} (sha256 {_sha(b)[:12]}, *"])
    second = results(pytester).iloc[0]
    assert second["model_sha256"] == _sha(b)
    assert second.get("reused", False) is not True and second["ppl_base"] != first["ppl_base"]
    assert len(list((cache / "baselines").glob("*.kld"))) == 2


# ---- issue 19.2: a user base file decides n_ctx, chunks and tokens --------------------------


@pytest.fixture
def base_files(pytester, qb_args, tmp_path):
    """Base files written by our runs with 2 and 4 chunks (n_ctx 64), and the 2-chunk run's row."""
    rows, files = {}, {}
    for chunks in (2, 4):
        cache = tmp_path / f"cache{chunks}"
        args = _one_item(
            without(qb_args, "--quantbench-chunks"), cache, f"--quantbench-chunks={chunks}"
        )
        pytester.runpytest_subprocess(*args).assert_outcomes(passed=1)
        rows[chunks] = results(pytester).iloc[0]
        (files[chunks],) = (cache / "baselines").glob("*.kld")
    return files, rows


def _with_base(qb_args, tmp_path, base, *extra):
    args = without(qb_args, "--quantbench-corpus", "--quantbench-ctx", "--quantbench-chunks")
    return _one_item(args, tmp_path / "other-cache", f"--quantbench-kld-base={base}", *extra)


def test_kld_base_with_fewer_chunks_equals_a_file_written_with_that_many(
    pytester, qb_args, tmp_path, base_files
):
    files, rows = base_files
    result = pytester.runpytest_subprocess(
        *_with_base(qb_args, tmp_path, files[4], "--quantbench-chunks=2")
    )
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            (
                f"quantbench corpus: kld-base {files[4]} (n_ctx, chunks and tokens come from the base "
                "file; its first 2 of 4 chunks)"
            ),
            "quantbench n_ctx=64, chunks=2, *",
        ]
    )
    row = results(pytester).iloc[0]
    assert row["chunks"] == 2
    for key in STATS:
        assert row[key] == rows[2][key], key


def test_kld_base_conflicting_settings_are_usage_errors(
    pytester, qb_args, tmp_path, base_files, synth_corpus
):
    files, _ = base_files
    base = files[4]

    def message(*extra):
        return usage_error(
            pytester.runpytest_subprocess(
                "--collect-only", *_with_base(qb_args, tmp_path, base, *extra)
            )
        )

    assert message("--quantbench-chunks=5") == (
        f"--quantbench-chunks 5 but --quantbench-kld-base {base} holds 4 chunks: pass "
        "--quantbench-chunks 4 or less, or a base file with more chunks"
    )
    assert message("--quantbench-ctx=128") == (
        f"--quantbench-ctx 128 (from CLI) but --quantbench-kld-base {base} was computed with "
        "n_ctx=64: n_ctx comes from the base file; drop --quantbench-ctx or set it to 64"
    )
    other = tmp_path / "other.txt"
    other.write_text(synth_corpus.read_text().replace("Paragraph", "Section"))
    assert message(f"--quantbench-corpus={other}").startswith(
        f"--quantbench-corpus {other} does not match --quantbench-kld-base {base} (its tokens "
        "differ from the file's, first at chunk 1 position "
    )
    # the same n_ctx, and the corpus the file was computed from: accepted
    same = pytester.runpytest_subprocess(
        "--collect-only",
        *_with_base(
            qb_args, tmp_path, base, "--quantbench-ctx=64", f"--quantbench-corpus={synth_corpus}"
        ),
    )
    assert same.ret == 0, same.stderr.str()
    same.stdout.fnmatch_lines(["quantbench n_ctx=64, chunks=4, *"])


# ---- issue 11.3: disk space ----------------------------------------------------------------

FREE_BYTES_CONFTEST = """
import pytest_quantbench.diskspace as diskspace

diskspace.free_bytes = lambda directory: {free}  # the cache's disk (patched probe)
"""


def test_a_baseline_that_does_not_fit_stops_the_run_with_both_sizes(pytester, qb_args, tmp_path):
    from pytest_quantbench.kldbase import expected_file_size

    pytester.makeconftest(FREE_BYTES_CONFTEST.format(free=5000))
    cache = tmp_path / "cache"
    need = expected_file_size(64, 384, 2)
    result = pytester.runpytest_subprocess(*_one_item(qb_args, cache))
    assert usage_error(result) == (
        f"the baseline logits file (2 chunks, n_ctx=64, n_vocab=384) needs {need / 1e3:.1f} kB "
        f"({need} bytes) in {cache / 'baselines'}, but only 5.0 kB (5000 bytes) are free there: "
        "set --quantbench-cache-dir to a directory on a disk with more free space, pass fewer "
        "--quantbench-chunks (the baseline grows with the chunks), or free space there"
    )
    assert not list(cache.rglob("*.kld"))


def test_the_run_header_shows_the_expected_cache_size(pytester, qb_args, tmp_path):
    from pytest_quantbench.kldbase import expected_file_size

    pytester.makeconftest(FREE_BYTES_CONFTEST.format(free=12_300_000_000))
    cache = tmp_path / "cache"
    kb = expected_file_size(64, 384, 2) / 1e3
    first = pytester.runpytest_subprocess(*_one_item(qb_args, cache))
    first.assert_outcomes(passed=1)
    first.stdout.fnmatch_lines(
        [(f"quantbench cache: {cache} (baseline logits file {kb:.1f} kB to compute, 12.3 GB free)")]
    )
    again = pytester.runpytest_subprocess(*_one_item(qb_args, cache, "--quantbench-imatrix=auto"))
    again.stdout.fnmatch_lines(
        [
            (
                f"quantbench cache: {cache} (baseline logits file {kb:.1f} kB "
                "cached, auto imatrix * kB to compute, 12.3 GB free)"
            )
        ]
    )


# ---- issue 11.4: a write killed by SIGKILL; the "not usable" notice ---------------------------

KILL_CONFTEST = """
import os
import signal

from pytest_quantbench.kldbase import KLDBaseWriter

_write_chunk = KLDBaseWriter.write_chunk

def write_chunk_then_die(self, logits):  # SIGKILL after the first chunk is on disk
    nll = _write_chunk(self, logits)
    self._fh.flush()
    os.kill(os.getpid(), signal.SIGKILL)
    return nll

KLDBaseWriter.write_chunk = write_chunk_then_die
"""


def test_a_baseline_write_killed_by_sigkill_leaves_no_temp_file_for_good(
    pytester, qb_args, tmp_path
):
    cache = tmp_path / "cache"
    args = _one_item(qb_args, cache)
    conftest = pytester.makeconftest(KILL_CONFTEST)
    killed = pytester.runpytest_subprocess(*args)
    assert killed.ret != 0
    (left,) = (cache / "baselines").glob(".*.tmp")
    conftest.unlink()
    result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            (
                f"quantbench cache: removed 1 temporary file(s) (* MB) left by "
                f"killed runs, e.g. {left.name}"
            )
        ]
    )
    assert not left.exists()
    assert [p.name for p in (cache / "baselines").iterdir() if p.name.endswith(".tmp")] == []


def test_an_unusable_cached_baseline_is_announced_in_a_default_run(pytester, qb_args, tmp_path):
    cache = tmp_path / "cache"
    args = _one_item(qb_args, cache)
    pytester.runpytest_subprocess(*args).assert_outcomes(passed=1)
    (base,) = (cache / "baselines").glob("*.kld")
    with open(base, "r+b") as fh:
        fh.truncate(base.stat().st_size // 2)
    for extra in ((), ("-n", "2", "-W", "error")):
        result = pytester.runpytest_subprocess(*args, "--quantbench-rerun", *extra)
        result.assert_outcomes(passed=1, warnings=1)
        result.stdout.fnmatch_lines(
            [
                (
                    f"*CacheNotice: baseline cache {base} is not usable "
                    f"({base}: truncated KLD base file*): recomputing"
                )
            ]
        )
        with open(base, "r+b") as fh:
            fh.truncate(base.stat().st_size // 2)
    assert pd.notna(results(pytester).iloc[0]["mean_kld"])
