"""End-to-end runs of the plugin through pytester, on the tiny synthetic model (seconds each).

Each run is a real pytest subprocess: the plugin is loaded from its ``pytest11`` entry point, items
quantize a tensor with the wheel's llama-quantize and evaluate it with the wheel's engine.
Bad input, faults and security hygiene have their own modules (test_bad_input, test_faults,
test_security); the common options are the ``qb_args`` fixture of conftest.py.
"""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET

import pandas as pd
import pytest

from runhelpers import measure_with_own_cache, read_wide, results, without


def test_plugin_stays_out_of_an_ordinary_suite(pytester):
    pytester.makepyfile(test_ok="def test_ok():\n    assert True\n")
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1)
    assert "quantbench model" not in result.stdout.str()
    assert not (pytester.path / "quantbench-results").exists()


def test_plugin_module_imports_no_heavy_dependency():
    code = (
        "import sys, pytest_quantbench.plugin, pytest_quantbench.fixture; "  # fixture: always
        "print(sorted(m for m in ('numpy', 'pandas', 'yaml', 'ctypes', 'filelock') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_items_measure_and_write_suite_tables(pytester, qb_args):
    result = pytester.runpytest_subprocess(
        *qb_args,
        "--quantbench-qtypes=q8_0,q4_0",
        "--quantbench-tensors",
        r"blk\.0\.attn_(q|v)\.weight",
        "--junitxml=report.xml",
        "-v",
    )
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(
        [
            "quantbench model: *synth-bf16.gguf (sha256 *",
            "quantbench corpus: *corpus.txt (* tokens, sha256 *)",
            "quantbench n_ctx=64, chunks=2, *",
            "quantbench engine: ik-llama-cpp-python *",
            "*blk.0.attn_q.weight?q4_0? PASSED*",
            "*= quantbench =*",
        ]
    )
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
    args = [
        f"--quantbench-model={synth_model}",
        f"--quantbench-corpus={synth_corpus}",
        "--quantbench-ctx=64",
        "--quantbench-chunks=3",
        f"--quantbench-cache-dir={cache}",
        "--quantbench-qtypes=q8_0 q4_0",
        "--quantbench-tensors",
        r"blk\.[01]\.attn_v",
        "-n",
        "2",
        "-p",
        "no:randomly",
    ]
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
        *qb_args,
        "--quantbench-qtypes=q4_0",
        "--quantbench-tensors",
        r"blk\.1\.attn_(q|v)",
        "--quantbench-thresholds=thresholds.yaml",
        "--junitxml=report.xml",
    )
    result.assert_outcomes(passed=1, failed=1)
    assert result.ret == 1
    result.stdout.re_match_lines([r".*mean KLD [0-9.e-]+ ± [0-9.e-]+ > max_kld 1e-09 .*attn_v.*"])
    failures = list(ET.parse(pytester.path / "report.xml").getroot().iter("failure"))
    assert len(failures) == 1
    tidy = results(pytester)
    assert sorted(tidy["status"]) == ["failed", "passed"]


def test_cli_beats_yaml_beats_ini(pytester, qb_args):
    pytester.makeini("[pytest]\nquantbench_qtypes = q8_0\nquantbench_ctx = 32\n")
    pytester.makefile(".yaml", quantbench="qtypes: q5_0\ntensors: ['blk\\.0\\.attn_k']\n")
    no_ctx = without(qb_args, "--quantbench-ctx")
    ids = pytester.runpytest_subprocess("--collect-only", *no_ctx)
    # qtypes: YAML beats ini; n_ctx: ini used where neither CLI nor YAML set it
    ids.stdout.fnmatch_lines(
        ["quantbench n_ctx=32, *", "*<QuantbenchItem blk.0.attn_k.weight[[]q5_0[]]>"]
    )
    cli = pytester.runpytest_subprocess("--collect-only", *qb_args, "--quantbench-qtypes=q4_1")
    cli.stdout.fnmatch_lines(
        ["quantbench n_ctx=64, *", "*<QuantbenchItem blk.0.attn_k.weight[[]q4_1[]]>"]
    )


def test_items_are_filterable_and_sorted(pytester, qb_args):
    result = pytester.runpytest_subprocess(
        "--collect-only",
        "-q",
        *qb_args,
        "--quantbench-qtypes=q8_0,q4_0",
        "-m",
        "quantbench(layer=1) and quantbench(qtype='q4_0')",
    )
    result.stdout.fnmatch_lines(
        [
            "quantbench::blk.1.attn_k.weight[[]q4_0[]]",
            "quantbench::blk.1.attn_output.weight[[]q4_0[]]",
            "quantbench::blk.1.attn_q.weight[[]q4_0[]]",
            "quantbench::blk.1.attn_v.weight[[]q4_0[]]",
            "4/16 tests collected (12 deselected)*",
        ]
    )


def test_kld_base_file_from_a_previous_run_gives_the_same_numbers(pytester, qb_args, tmp_path):
    """Our cached baseline is a llama-perplexity base file: given back as --quantbench-kld-base
    (no corpus needed), it reproduces the statistics of the run that wrote it."""
    args, first, base_file = measure_with_own_cache(
        pytester, qb_args, tmp_path / "cache", r"blk\.1\.attn_q"
    )
    reuse = without(
        args, "--quantbench-corpus", "--quantbench-ctx", "--quantbench-chunks", "--quantbench-cache"
    )
    result = pytester.runpytest_subprocess(
        *reuse, f"--quantbench-kld-base={base_file}", f"--quantbench-cache-dir={tmp_path / 'other'}"
    )
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            f"quantbench corpus: kld-base {base_file} (n_ctx, chunks and "
            "tokens come from the base file; all 2 chunks)",
            "quantbench n_ctx=64, chunks=2, *",
        ]
    )
    second = results(pytester).iloc[0]
    for key in ("mean_kld", "ppl_q", "ppl_base", "same_top_p", "rms_dp"):
        assert second[key] == first[key], key


def test_split_model_is_measured_by_both_engines_and_a_missing_shard_is_named(
    pytester, synth_corpus, tmp_path
):
    pytest.importorskip("gguf")
    from synthmodel import build_synthetic_model

    (tmp_path / "split").mkdir()
    first = build_synthetic_model(tmp_path / "split" / "synth.gguf", split_max_tensors=8)
    assert first.name == "synth-00001-of-00003.gguf"
    args = [
        f"--quantbench-model={first}",
        f"--quantbench-corpus={synth_corpus}",
        "--quantbench-ctx=64",
        "--quantbench-chunks=2",
        "--quantbench-qtypes=q4_0",
        f"--quantbench-cache-dir={tmp_path / 'cache'}",
        "-p",
        "no:randomly",
        "--quantbench-tensors",
        r"blk\.1\.attn_v",
    ]
    kld = []
    for engine in ("inplace", "file"):
        pytester.runpytest_subprocess(
            *args, f"--quantbench-engine={engine}", "--quantbench-rerun"
        ).assert_outcomes(passed=1)
        row = results(pytester).iloc[0]
        assert row["engine_mode"] == engine
        kld.append(row["mean_kld"])
    assert kld[0] == kld[1] > 0
    (tmp_path / "split" / "synth-00003-of-00003.gguf").unlink()
    result = pytester.runpytest_subprocess(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*synth-00003-of-00003.gguf*"])


def test_a_threshold_on_an_unmeasured_metric_is_an_item_error(pytester, qb_args):
    """A limit that cannot be checked means a broken setup: an error, not a pass or a failure."""
    pytester.makeconftest("""
from pytest_quantbench.session import QuantbenchSession

_measure = QuantbenchSession.measure

def without_kld(self, unit, row):
    stats = dict(_measure(self, unit, row))
    stats["mean_kld"] = float("nan")
    return stats

QuantbenchSession.measure = without_kld
""")
    limits = pytester.path / "limits.yaml"
    limits.write_text("defaults:\n  max_kld: 0.01\n")
    result = pytester.runpytest_subprocess(
        *qb_args,
        "--quantbench-qtypes=q8_0",
        "--quantbench-tensors",
        r"^blk\.0\.attn_v\.weight$",
        f"--quantbench-thresholds={limits}",
    )
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ValueError: mean KLD is not a finite number (nan), so max_kld "
            "0.01 cannot be checked (defaults in *limits.yaml)"
        ]
    )


def test_collect_step_outputs_through_a_run(pytester, qb_args):
    """--quantbench-logs, --quantbench-ppl-percent and --quantbench-csv-metrics in a real run: the
    log's block gives the collector's regexes the item's numbers, PPL cells are percentages of the
    run's baseline PPL, and each extra metric has its own table."""
    import re

    args = [
        *qb_args,
        "--quantbench-qtypes=q4_0,bf16",
        "--quantbench-tensors",
        r"^blk\.0\.attn_v\.weight$",
        "--quantbench-logs=logs",
        "--quantbench-ppl-percent",
        "--quantbench-csv-metrics=kld_p99,rms_dp",
    ]
    pytester.runpytest_subprocess(*args).assert_outcomes(passed=2)
    row = results(pytester).set_index("qtype").loc["q4_0"]
    log = pytester.path / "logs" / "bench_ppl_kld_result.blk.0.attn_v.weight.q4_0.2.txt"
    text = log.read_text(encoding="utf-8")
    top_p = re.search(r".*Same top p\s*:\s*([0-9]+(\.[0-9]+)?).*", text).group(1)
    assert top_p == f"{row['same_top_p']:.3f}"
    assert re.search(r"Mean    KLD:\s*([0-9.]+)", text).group(1) == f"{row['mean_kld']:.6f}"
    out = pytester.path / "quantbench-results"
    ppl = read_wide(out / "ppl_results.csv")
    expected = (float(f"{row['ppl_q']:.6f}") - row["ppl_base"]) / row["ppl_base"] * 100
    assert ppl.loc["q4_0", "blk.0.attn_v.weight"] == f"{expected:+.2f}%"
    assert ppl.loc["bf16", "blk.0.attn_v.weight"] == "+0.00%"  # the baseline row, as collected
    assert read_wide(out / "kld_results.csv").loc["bf16", "blk.0.attn_v.weight"] == "0"
    assert (
        read_wide(out / "kld_p99_results.csv").loc["q4_0", "blk.0.attn_v.weight"]
        == f"{row['kld_p99']:.6f}"
    )
    assert (
        read_wide(out / "rms_dp_results.csv").loc["q4_0", "blk.0.attn_v.weight"]
        == f"{row['rms_dp']:.3f}"
    )
