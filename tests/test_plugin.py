"""End-to-end runs of the plugin through pytester, on the tiny synthetic model (seconds each).

Each run is a real pytest subprocess: the plugin is loaded from its ``pytest11`` entry point, items
quantize a tensor with the wheel's llama-quantize and evaluate it with the wheel's engine.
"""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pandas as pd
import pytest


@pytest.fixture
def qb_args(synth_model, synth_corpus, tmp_path_factory):
    """Common options: synthetic model and corpus, n_ctx 64, 2 chunks, a shared cache dir."""
    cache = tmp_path_factory.getbasetemp() / "qb-cache"
    return [
        f"--quantbench-model={synth_model}",
        f"--quantbench-corpus={synth_corpus}",
        "--quantbench-ctx=64",
        "--quantbench-chunks=2",
        f"--quantbench-cache-dir={cache}",
        "-p", "no:randomly",
    ]


def without(args: list[str], *prefixes: str) -> list[str]:
    """``args`` minus the options starting with any of ``prefixes``."""
    return [a for a in args if not a.startswith(prefixes)]


def results(pytester) -> pd.DataFrame:
    """The tidy results.csv of the last run in ``pytester``'s folder."""
    return pd.read_csv(pytester.path / "quantbench-results" / "results.csv")


def read_wide(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str).set_index("QTYPE")


def test_plugin_stays_out_of_an_ordinary_suite(pytester):
    pytester.makepyfile(test_ok="def test_ok():\n    assert True\n")
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1)
    assert "quantbench model" not in result.stdout.str()
    assert not (pytester.path / "quantbench-results").exists()


def test_plugin_module_imports_no_heavy_dependency():
    code = ("import sys, pytest_quantbench.plugin; "
            "print(sorted(m for m in ('numpy', 'pandas', 'yaml', 'ctypes', 'filelock') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_items_measure_and_write_suite_tables(pytester, qb_args):
    result = pytester.runpytest_subprocess(
        *qb_args, "--quantbench-qtypes=q8_0,q4_0",
        "--quantbench-tensors", r"blk\.0\.attn_(q|v)\.weight", "--junitxml=report.xml", "-v")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines([
        "quantbench model: *synth-bf16.gguf (sha256 *",
        "quantbench corpus: *corpus.txt (* tokens, sha256 *)",
        "quantbench n_ctx=64, chunks=2, *",
        "quantbench engine: ik-llama-cpp-python *",
        "*blk.0.attn_q.weight?q4_0? PASSED*",
        "*= quantbench =*",
    ])
    out = pytester.path / "quantbench-results"
    kld = read_wide(out / "kld_results.csv")
    assert list(kld.columns) == ["blk.0.attn_q.weight", "blk.0.attn_v.weight"]
    assert list(kld.index) == ["q4_0", "q8_0"]
    values = kld.astype(float)
    # q8_0 keeps far more of the tensor than q4_0: its KLD is much lower on every tensor
    assert (values.loc["q8_0"] * 10 < values.loc["q4_0"]).all()
    assert (values.loc["q8_0"] >= 0).all()
    assert (out / "ppl_results.csv").read_text().startswith("QTYPE,blk.0.attn_q.weight,")
    assert (out / "topp_results.csv").exists()
    tidy = pd.read_csv(out / "results.csv")
    assert len(tidy) == 4 and set(tidy["written_type"]) == {"q8_0", "q4_0"}
    assert (tidy["n_ctx"] == 64).all() and (tidy["chunks"] == 2).all()
    assert tidy["ppl_base"].nunique() == 1  # one baseline for all items
    cases = ET.parse(pytester.path / "report.xml").getroot().iter("testcase")
    props = [{p.get("name"): p.get("value") for p in case.iter("property")} for case in cases]
    assert len(props) == 4 and all("mean_kld" in p and "same_top_p" in p for p in props)


def test_xdist_two_workers_share_one_baseline(pytester, synth_model, synth_corpus, tmp_path):
    cache = tmp_path / "cache"
    args = [f"--quantbench-model={synth_model}", f"--quantbench-corpus={synth_corpus}",
            "--quantbench-ctx=64", "--quantbench-chunks=3", f"--quantbench-cache-dir={cache}",
            "--quantbench-qtypes=q8_0 q4_0", "--quantbench-tensors", r"blk\.[01]\.attn_v",
            "-n", "2", "-p", "no:randomly"]
    result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(passed=4)
    baselines = list((cache / "baselines").glob("*.kld"))
    assert len(baselines) == 1
    first_mtime = baselines[0].stat().st_mtime_ns
    tidy = results(pytester)
    assert len(tidy) == 4 and tidy["ppl_base"].nunique() == 1
    # a second run reuses the cached baseline instead of recomputing it
    pytester.runpytest_subprocess(*args).assert_outcomes(passed=4)
    assert baselines[0].stat().st_mtime_ns == first_mtime


def test_failing_threshold_is_a_failure_with_value_limit_and_rule(pytester, qb_args):
    pytester.makefile(".yaml", thresholds="rules:\n  - tensor: attn_v\n    max_kld: 1.0e-9\n")
    result = pytester.runpytest_subprocess(
        *qb_args, "--quantbench-qtypes=q4_0", "--quantbench-tensors", r"blk\.1\.attn_(q|v)",
        "--quantbench-thresholds=thresholds.yaml", "--junitxml=report.xml")
    result.assert_outcomes(passed=1, failed=1)
    assert result.ret == 1
    result.stdout.re_match_lines([r".*mean KLD [0-9.e-]+ ± [0-9.e-]+ > max_kld 1e-09 .*attn_v.*"])
    failures = list(ET.parse(pytester.path / "report.xml").getroot().iter("failure"))
    assert len(failures) == 1
    tidy = results(pytester)
    assert sorted(tidy["status"]) == ["failed", "passed"]


def test_unknown_qtype_is_a_usage_error_naming_the_closest(pytester, qb_args):
    result = pytester.runpytest_subprocess(*qb_args, "--quantbench-qtypes=iq2-kt")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*iq2-kt*iq2_kt*"])


def test_cli_beats_yaml_beats_ini(pytester, qb_args):
    pytester.makeini("[pytest]\nquantbench_qtypes = q8_0\nquantbench_ctx = 32\n")
    pytester.makefile(".yaml", quantbench="qtypes: q5_0\ntensors: ['blk\\.0\\.attn_k']\n")
    no_ctx = without(qb_args, "--quantbench-ctx")
    ids = pytester.runpytest_subprocess("--collect-only", *no_ctx)
    # qtypes: YAML beats ini; n_ctx: ini used where neither CLI nor YAML set it
    ids.stdout.fnmatch_lines(["quantbench n_ctx=32, *", "*<QuantbenchItem blk.0.attn_k.weight[[]q5_0[]]>"])
    cli = pytester.runpytest_subprocess("--collect-only", *qb_args, "--quantbench-qtypes=q4_1")
    cli.stdout.fnmatch_lines(["quantbench n_ctx=64, *", "*<QuantbenchItem blk.0.attn_k.weight[[]q4_1[]]>"])


def test_items_are_filterable_and_sorted(pytester, qb_args):
    result = pytester.runpytest_subprocess("--collect-only", "-q", *qb_args,
                                           "--quantbench-qtypes=q8_0,q4_0", "-k", "layer1 and q4_0")
    result.stdout.fnmatch_lines([
        "quantbench::blk.1.attn_k.weight[[]q4_0[]]",
        "quantbench::blk.1.attn_output.weight[[]q4_0[]]",
        "quantbench::blk.1.attn_q.weight[[]q4_0[]]",
        "quantbench::blk.1.attn_v.weight[[]q4_0[]]",
        "4/16 tests collected (12 deselected)*",
    ])


@pytest.mark.parametrize("words, chunks, message", [
    (300, 50, "*--quantbench-chunks 50: corpus *short.txt has * tokens, which allows at most "
              "* chunks of n_ctx=64*"),
    (20, 1, "*corpus *short.txt has * tokens; llama-perplexity needs at least 128 for n_ctx=64*"),
])
def test_corpus_too_short_names_tokens_and_chunk_limit(pytester, qb_args, tmp_path, words,
                                                       chunks, message):
    short = tmp_path / "short.txt"
    short.write_text("the " * words, encoding="utf-8")
    args = without(qb_args, "--quantbench-corpus", "--quantbench-chunks")
    result = pytester.runpytest_subprocess(*args, f"--quantbench-corpus={short}",
                                           "--quantbench-qtypes=q4_0",
                                           f"--quantbench-chunks={chunks}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_kld_base_file_from_a_previous_run_gives_the_same_numbers(pytester, qb_args, tmp_path):
    """Our cached baseline is a llama-perplexity base file: given back as --quantbench-kld-base
    (no corpus needed), it reproduces the statistics of the run that wrote it."""
    cache = tmp_path / "cache"
    args = without(qb_args, "--quantbench-cache-dir")
    args += [f"--quantbench-cache-dir={cache}", "--quantbench-qtypes=q4_0",
             "--quantbench-tensors", r"blk\.1\.attn_q"]
    pytester.runpytest_subprocess(*args).assert_outcomes(passed=1)
    first = results(pytester).iloc[0]
    base_file = next((cache / "baselines").glob("*.kld"))
    reuse = without(args, "--quantbench-corpus", "--quantbench-ctx", "--quantbench-chunks",
                    "--quantbench-cache")
    result = pytester.runpytest_subprocess(*reuse, f"--quantbench-kld-base={base_file}",
                                           f"--quantbench-cache-dir={tmp_path / 'other'}")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"quantbench corpus: kld-base {base_file}",
                                 "quantbench n_ctx=64, chunks=2, *"])
    second = results(pytester).iloc[0]
    for key in ("mean_kld", "ppl_q", "ppl_base", "same_top_p", "rms_dp"):
        assert second[key] == first[key], key


def test_kld_base_for_another_vocabulary_is_an_error(pytester, qb_args, tmp_path):
    from pytest_quantbench.kldbase import KLDBaseWriter
    import numpy as np

    wrong = tmp_path / "other-vocab.kld"
    tokens = np.zeros((1, 32), dtype=np.int32)
    with KLDBaseWriter(wrong, 32, 50, tokens) as writer:
        writer.write_chunk(np.zeros((15, 50), dtype=np.float32))
    args = without(qb_args, "--quantbench-corpus", "--quantbench-ctx", "--quantbench-chunks")
    result = pytester.runpytest_subprocess(*args, f"--quantbench-kld-base={wrong}",
                                           "--quantbench-qtypes=q4_0",
                                           "--quantbench-tensors", r"blk\.1\.attn_q")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--quantbench-kld-base *other-vocab.kld was computed for "
                                 "n_vocab=50 but the model has n_vocab=384*"])


def test_model_of_an_unknown_architecture_is_a_usage_error(pytester, qb_args, tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "alien.gguf"
    writer = gguf.GGUFWriter(path, "notanarch")
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((256, 256), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    args = without(qb_args, "--quantbench-model")
    result = pytester.runpytest_subprocess(*args, f"--quantbench-model={path}",
                                           "--quantbench-qtypes=q4_0")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*the engine could not load model *alien.gguf*",
                                 "*unknown model architecture: 'notanarch'*"])


def test_missing_engine_library_is_a_usage_error(pytester, qb_args):
    result = pytester.runpytest_subprocess(*qb_args, "--quantbench-qtypes=q4_0",
                                           "--quantbench-engine-lib=/nonexistent/libllama.so")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--quantbench-engine-lib /nonexistent/libllama.so does not "
                                 "exist: give the libllama.so of an ik_llama.cpp build*"])


def test_bad_thresholds_file_is_a_usage_error_before_any_item(pytester, qb_args):
    pytester.makefile(".yaml", thresholds="rules:\n  - tensor: attn_v\n    max_kdl: 0.1\n")
    result = pytester.runpytest_subprocess(*qb_args, "--quantbench-qtypes=q4_0",
                                           "--quantbench-thresholds=thresholds.yaml")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*thresholds.yaml*max_kdl*max_kld*"])


@pytest.mark.parametrize("content, message", [
    (b"", "*empty.gguf*"),
    (b"NOTAGGUF" + bytes(64), "*empty.gguf*not a GGUF*"),
])
def test_model_that_is_not_a_gguf_is_a_usage_error(pytester, qb_args, tmp_path, content, message):
    bad = tmp_path / "empty.gguf"
    bad.write_bytes(content)
    args = without(qb_args, "--quantbench-model")
    result = pytester.runpytest_subprocess(*args, f"--quantbench-model={bad}",
                                           "--quantbench-qtypes=q4_0")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])
    assert "Traceback" not in result.stderr.str()


def test_corrupted_baseline_cache_is_recomputed(pytester, qb_args, tmp_path):
    cache = tmp_path / "cache"
    args = without(qb_args, "--quantbench-cache-dir")
    args += [f"--quantbench-cache-dir={cache}", "--quantbench-qtypes=q4_0",
             "--quantbench-tensors", r"blk\.0\.attn_v"]
    pytester.runpytest_subprocess(*args).assert_outcomes(passed=1)
    first = results(pytester).iloc[0]
    base_file = next((cache / "baselines").glob("*.kld"))
    size = base_file.stat().st_size
    with open(base_file, "r+b") as fh:
        fh.truncate(size // 2)
    pytester.runpytest_subprocess(*args).assert_outcomes(passed=1)
    assert base_file.stat().st_size == size
    again = results(pytester).iloc[0]
    assert again["mean_kld"] == first["mean_kld"] and again["ppl_base"] == first["ppl_base"]


def test_non_finite_logits_error_the_item_and_the_run_continues(pytester, qb_args):
    """A tensor whose weights are NaN gives NaN logits: that item errors with the finding."""
    pytester.makeconftest('''
import numpy as np
from pytest_quantbench.engine import swap

_orig = swap.SwapModel.baseline_f32

def nan_weights(self, name, type_name):
    w = _orig(self, name, type_name)
    return np.full_like(w, np.nan) if name == "blk.1.attn_v.weight" else w

swap.SwapModel.baseline_f32 = nan_weights
''')
    result = pytester.runpytest_subprocess(*qb_args, "--quantbench-qtypes=q8_0",
                                           "--quantbench-tensors", r"blk\.1\.attn_(q|v)")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at setup of quantbench blk.1.attn_v.weight?q8_0?*",
                                "ValueError: chunk 1: 31 of 31 scored positions have non-finite "
                                "logits (NaN or inf); first at position 0"])
    assert "Traceback" not in result.stdout.str() and "metrics.py" not in result.stdout.str()
    tidy = results(pytester)
    assert sorted(tidy["status"]) == ["error", "passed"]


def test_a_worker_dying_in_native_code_costs_only_its_item(pytester, qb_args):
    """os.abort() stands in for a segfault in the engine: xdist replaces the worker, the item is
    reported as crashed, every other item completes and the tables are written."""
    pytester.makeconftest('''
import os
from pytest_quantbench import session

_orig = session.QuantbenchSession.measure

def measure(self, unit, row):
    if unit.name == "blk.0.attn_v.weight":
        os.abort()
    return _orig(self, unit, row)

session.QuantbenchSession.measure = measure
''')
    result = pytester.runpytest_subprocess(*qb_args, "--quantbench-qtypes=q4_0", "-n", "2",
                                           "--quantbench-tensors", r"blk\.[01]\.attn_(q|v)")
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["*worker 'gw*' crashed while running "
                                 "'quantbench::blk.0.attn_v.weight[[]q4_0[]]'*"])
    kld = read_wide(pytester.path / "quantbench-results" / "kld_results.csv")
    assert kld.loc["q4_0", "blk.0.attn_v.weight"] == "404"
    assert "404" not in kld.drop(columns="blk.0.attn_v.weight").loc["q4_0"].tolist()


def test_two_runs_at_once_share_one_baseline(pytester, synth_model, synth_corpus, tmp_path):
    import subprocess
    import sys

    cache = tmp_path / "cache"
    procs = []
    for name in ("a", "b"):
        workdir = tmp_path / name
        workdir.mkdir()
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
             f"--quantbench-model={synth_model}", f"--quantbench-corpus={synth_corpus}",
             "--quantbench-ctx=64", "--quantbench-chunks=4", f"--quantbench-cache-dir={cache}",
             "--quantbench-qtypes=q4_0", "--quantbench-tensors", r"blk\.0\.attn_v"],
            cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert len(list((cache / "baselines").glob("*.kld"))) == 1
    rows = [pd.read_csv(tmp_path / n / "quantbench-results" / "results.csv").iloc[0]
            for n in ("a", "b")]
    assert rows[0]["mean_kld"] == rows[1]["mean_kld"]


@pytest.mark.parametrize("make, message", [
    (lambda p: p.mkdir(), "*--quantbench-corpus * is a directory: give a text file*"),
    (lambda p: p.write_bytes(b"\xff\xfe bad"), "*--quantbench-corpus * is not UTF-8 text (byte 0)*"),
    (lambda p: p.write_text("\n"), "*--quantbench-corpus * is empty*"),
    (lambda p: None, "*--quantbench-corpus * does not exist*"),
])
def test_bad_corpus_is_a_usage_error(pytester, qb_args, tmp_path, make, message):
    corpus = tmp_path / "corpus-input"
    make(corpus)
    args = without(qb_args, "--quantbench-corpus")
    result = pytester.runpytest_subprocess(*args, f"--quantbench-corpus={corpus}",
                                           "--quantbench-qtypes=q4_0")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_split_model_is_measured_by_both_engines_and_a_missing_shard_is_named(
        pytester, synth_corpus, tmp_path):
    pytest.importorskip("gguf")
    from synthmodel import build_synthetic_model

    (tmp_path / "split").mkdir()
    first = build_synthetic_model(tmp_path / "split" / "synth.gguf", split_max_tensors=8)
    assert first.name == "synth-00001-of-00003.gguf"
    args = [f"--quantbench-model={first}", f"--quantbench-corpus={synth_corpus}",
            "--quantbench-ctx=64", "--quantbench-chunks=2", "--quantbench-qtypes=q4_0",
            f"--quantbench-cache-dir={tmp_path / 'cache'}", "-p", "no:randomly",
            "--quantbench-tensors", r"blk\.1\.attn_v"]
    kld = []
    for engine in ("inplace", "file"):
        pytester.runpytest_subprocess(*args, f"--quantbench-engine={engine}").assert_outcomes(
            passed=1)
        row = results(pytester).iloc[0]
        assert row["engine"] == engine
        kld.append(row["mean_kld"])
    assert kld[0] == kld[1] > 0
    (tmp_path / "split" / "synth-00003-of-00003.gguf").unlink()
    result = pytester.runpytest_subprocess(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*synth-00003-of-00003.gguf*"])
