"""Reruns and selection on quantbench items through pytester (issue 11, items 1 and 11): pytest's
``--lf``, ``--ff``, ``--sw``, ``--deselect NODEID``, ``-m`` on the ``quantbench`` marker and ``-k``
keywords that do not collide (``layer1`` must not select layer 10)."""

from __future__ import annotations

import pytest

ATTN_V_FAILS = "rules:\n  - tensor: attn_v\n    max_kld: 1.0e-12\n"
Q = "quantbench::blk.0.attn_{}.weight[q8_0]"


@pytest.fixture
def one_failure(pytester, qb_args):
    """Run q8_0 on blk.0.attn_{k,q,v} with a threshold that fails attn_v only; return the args."""
    pytester.makefile(".yaml", thresholds=ATTN_V_FAILS)
    args = [
        *qb_args,
        "--quantbench-qtypes=q8_0",
        "--quantbench-tensors",
        r"blk\.0\.attn_(k|q|v)",
        "--quantbench-thresholds=thresholds.yaml",
    ]
    pytester.runpytest_subprocess(*args).assert_outcomes(passed=2, failed=1)
    return args


def _run_order(result) -> list[str]:
    return [
        line.split()[0]
        for line in result.stdout.lines
        if line.startswith("quantbench::") and (" PASSED" in line or " FAILED" in line)
    ]


def test_last_failed_reruns_only_the_failed_item(pytester, one_failure):
    result = pytester.runpytest_subprocess(*one_failure, "--lf", "-v")
    result.assert_outcomes(failed=1, deselected=2)
    assert _run_order(result) == [Q.format("v")]
    result.stdout.fnmatch_lines(["run-last-failure: rerun previous 1 failure*"])


def test_failed_first_runs_the_failed_item_first(pytester, one_failure):
    result = pytester.runpytest_subprocess(*one_failure, "--ff", "-v")
    result.assert_outcomes(passed=2, failed=1)
    assert _run_order(result) == [Q.format("v"), Q.format("k"), Q.format("q")]


def test_stepwise_resumes_at_the_failed_item(pytester, qb_args):
    pytester.makefile(
        ".yaml", thresholds="rules:\n  - tensor: 'blk\\.0\\.attn_v'\n    max_kld: 1.0e-12\n"
    )
    args = [
        *qb_args,
        "--quantbench-qtypes=q8_0",
        "--quantbench-tensors",
        r"blk\.0\.attn_(k|v)|blk\.1\.attn_k",
        "--quantbench-thresholds=thresholds.yaml",
        "--sw",
        "-v",
    ]
    first = pytester.runpytest_subprocess(*args)
    first.assert_outcomes(passed=1, failed=1)  # stops at blk.0.attn_v, before blk.1.attn_k
    second = pytester.runpytest_subprocess(*args)
    assert _run_order(second) == [Q.format("v")]  # resumes at blk.0.attn_v, skips blk.0.attn_k
    second.stdout.fnmatch_lines(["*stepwise: skipping 1 already passed items*"])


def test_deselect_a_node_id(pytester, qb_args):
    result = pytester.runpytest_subprocess(
        *qb_args,
        "--collect-only",
        "-q",
        "--quantbench-qtypes=q8_0",
        "--quantbench-tensors",
        r"blk\.0\.attn_(k|q)",
        "--deselect",
        Q.format("k"),
    )
    assert Q.format("q") in result.stdout.lines
    assert Q.format("k") not in result.stdout.str()
    result.stdout.fnmatch_lines(["1/2 tests collected (1 deselected)*"])


def test_the_quantbench_marker_is_registered_without_quantbench_options(pytester):
    result = pytester.runpytest_subprocess("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.quantbench(tensor, qtype, layer, kind):*"])


def test_marker_selects_benchmark_items_and_one_layer_exactly(pytester, tmp_path, synth_corpus):
    """-m quantbench leaves out ordinary tests; -m "quantbench(layer=1)" does not take layers
    10 and 11, and no -k keyword makes "layer1" a prefix of "layer10"."""
    from synthmodel import build_synthetic_model

    model = build_synthetic_model(
        tmp_path / "twelve-layers.gguf", n_layer=12, n_embd=64, n_ff=128, n_head=2, n_head_kv=1
    )
    pytester.makepyfile(test_ok="def test_ok():\n    assert True\n")
    args = [
        f"--quantbench-model={model}",
        f"--quantbench-corpus={synth_corpus}",
        "--quantbench-ctx=64",
        "--quantbench-chunks=1",
        "--quantbench-qtypes=q8_0,q4_0",
        f"--quantbench-cache-dir={tmp_path / 'cache'}",
        "-p",
        "no:randomly",
        "--collect-only",
        "-q",
    ]
    all_items = pytester.runpytest_subprocess(*args, "-m", "quantbench")
    all_items.stdout.fnmatch_lines(["96/97 tests collected (1 deselected)*"])  # 12 × 4 × 2
    layer1 = pytester.runpytest_subprocess(
        *args, "-m", "quantbench(layer=1) and quantbench(qtype='q4_0')"
    )
    selected = [line for line in layer1.stdout.lines if line.startswith("quantbench::")]
    assert selected == [
        f"quantbench::blk.1.attn_{k}.weight[q4_0]" for k in ("k", "output", "q", "v")
    ]
    keyword = pytester.runpytest_subprocess(*args, "-k", "layer1")
    assert not [line for line in keyword.stdout.lines if line.startswith("quantbench::")]


def test_pytest_help_lists_every_option_and_survives_percent_signs(pytester):
    """``pytest --help`` runs wherever the plugin is installed (argparse %-formats help texts;
    --quantbench-gpus' help has a literal percent sign)."""
    from pytest_quantbench.config import OPTIONS

    result = pytester.runpytest_subprocess("--help")
    assert result.ret == 0, result.stderr.str()
    text = result.stdout.str()
    assert "N % len(LIST)" in text
    assert all(opt.flag in text for opt in OPTIONS)
