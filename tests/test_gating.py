"""CI gating (issue 14): chunk-level errors, early verdicts, comparison with a reference run.

Pure parts are tested directly; the plugin runs use the synthetic model (n_ctx 64).
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
import pytest

from pytest_quantbench.compare import CompareError, Reference, load_reference, parse_fail_rules
from pytest_quantbench.earlystop import (
    EarlyStop,
    EarlyStopAccumulator,
    EarlyVerdict,
    planned_looks,
    t_quantile,
)
from pytest_quantbench.metrics import KLDAccumulator, TokenStats, chunk_mean_errors
from pytest_quantbench.report import GATING_KEYS, comparable_metrics, comparison_columns
from runhelpers import results, usage_error, without

# ---------------------------------------------------------------------------
# chunk-level (batch-means) standard errors
# ---------------------------------------------------------------------------


def _random_chunks(rng, n_chunks: int, n_tok: int, kld_scale: float = 0.01):
    """Token quantities of ``n_chunks`` chunks with a per-chunk level (correlated tokens)."""
    out = []
    for _ in range(n_chunks):
        level = rng.gamma(2.0, kld_scale)
        kld = rng.exponential(level, n_tok)
        nll_base = rng.uniform(0.5, 4.0, n_tok).astype(np.float32)
        nll = (nll_base + rng.normal(level, 0.05, n_tok)).astype(np.float32)
        dp = rng.normal(-level, 0.02, n_tok).astype(np.float32)
        same = rng.random(n_tok) < 0.9 - 5 * level
        out.append(TokenStats(nll=nll, nll_base=nll_base, kld=kld, same_top=same, dp=dp))
    return out


def test_chunk_errors_equal_an_independent_numpy_computation():
    rng = np.random.default_rng(7)
    chunks = _random_chunks(rng, 9, 63)
    acc = KLDAccumulator()
    for ts in chunks:
        acc.add_token_stats(ts)
    kld = np.array([c.kld for c in chunks])  # (9, 63)
    dp = np.array([c.dp for c in chunks], dtype=np.float64)
    same = np.array([c.same_top for c in chunks], dtype=np.float64)

    def se(x):  # batch means: the spread of the chunk means over sqrt(k)
        means = x.mean(axis=1)
        return math.sqrt(((means - means.mean()) ** 2).sum() / (len(means) - 1) / len(means))

    got = acc.chunk_errors()
    assert got["mean_kld_err_chunks"] == pytest.approx(se(kld), rel=1e-12)
    assert got["mean_dp_err_chunks"] == pytest.approx(100 * se(dp), rel=1e-9)
    assert got["same_top_p_err_chunks"] == pytest.approx(100 * se(same), rel=1e-12)
    # llama-perplexity's own ± are untouched by the new columns
    stats = acc.stats()
    assert stats.mean_kld == pytest.approx(kld.mean(), rel=1e-12)
    assert stats.mean_kld_err != pytest.approx(got["mean_kld_err_chunks"])


def test_chunk_errors_need_two_chunks():
    assert math.isnan(chunk_mean_errors(np.array([0.5])))
    assert chunk_mean_errors(np.array([1.0, 3.0])) == pytest.approx(1.0)


# ---------------------------------------------------------------------------
# early verdicts: the pure decision class
# ---------------------------------------------------------------------------


def test_t_quantile_matches_the_table():
    assert t_quantile(0.05, 1) == pytest.approx(12.7062, abs=1e-4)
    assert t_quantile(0.05, 10) == pytest.approx(2.2281, abs=1e-4)
    assert t_quantile(0.01, 3) == pytest.approx(5.8409, abs=1e-4)
    assert t_quantile(0.05, 4000) == pytest.approx(1.9606, abs=1e-3)
    with pytest.raises(ValueError):
        t_quantile(0.0, 3)


def test_planned_looks_and_bonferroni_level():
    assert planned_looks(32) == (4, 8, 16)
    assert planned_looks(33) == (4, 8, 16, 32)
    assert planned_looks(4) == ()
    rule = EarlyStop({"max_kld": 1.0}, 32, confidence=0.99)
    assert rule.level == pytest.approx(1 - 0.01 / 3)
    assert EarlyStop({}, 32).looks == ()


def _means(kld, same=None):
    kld = np.asarray(kld, dtype=np.float64)
    same = np.full_like(kld, 0.9) if same is None else np.asarray(same, dtype=np.float64)
    zeros = np.zeros_like(kld)
    return {"kld": kld, "dp": zeros, "same_top": same, "ln_ratio": zeros, "dp2": zeros}


def test_early_stop_decides_only_when_the_interval_is_clear():
    kld = [0.010, 0.012, 0.009, 0.011]
    assert EarlyStop({"max_kld": 1.0}, 32).decide(_means(kld)).verdict == "pass"
    fail = EarlyStop({"max_kld": 1e-4}, 32).decide(_means(kld))
    assert fail.verdict == "fail" and fail.limit == "max_kld" and fail.chunks == 4
    assert EarlyStop({"max_kld": 0.0105}, 32).decide(_means(kld)) is None  # at its own value
    assert EarlyStop({"max_kld": 1.0}, 32).decide(_means(kld[:3])) is None  # not a look
    # a limit the chunk means cannot bound (a percentile) forbids an early pass, not a fail
    assert EarlyStop({"max_kld": 1.0, "max_kld_p99": 5.0}, 32).decide(_means(kld)) is None
    assert (
        EarlyStop({"max_kld": 1e-4, "max_kld_p99": 5.0}, 32).decide(_means(kld)).verdict == "fail"
    )


def test_early_stop_min_limit_direction():
    same = [0.90, 0.91, 0.89, 0.90]  # same top p about 90 %
    kld = [0.01] * 4
    assert EarlyStop({"min_same_top_p": 50}, 32).decide(_means(kld, same)).verdict == "pass"
    fail = EarlyStop({"min_same_top_p": 99}, 32).decide(_means(kld, same))
    assert fail.verdict == "fail" and fail.intervals["min_same_top_p"][1] < 99
    assert EarlyStop({"min_same_top_p": 90}, 32).decide(_means(kld, same)) is None


def test_early_stop_accumulator_raises_at_the_look_with_exactly_its_chunks():
    rng = np.random.default_rng(1)
    acc = EarlyStopAccumulator(EarlyStop({"max_kld": 10.0}, 32))
    chunks = _random_chunks(rng, 8, 32)
    for ts in chunks[:3]:
        acc.add_token_stats(ts)
    with pytest.raises(EarlyVerdict, match="early pass after 4 of 32 chunks"):
        acc.add_token_stats(chunks[3])
    assert acc.n_chunks == 4 and acc.decision.verdict == "pass"


class _FakeBase:
    """A baseline file of ``n_chunk`` chunks: uniform base log-probs, target token 0."""

    n_scored, n_vocab = 8, 16

    def __init__(self, n_chunk: int) -> None:
        self.n_chunk = n_chunk
        self.tokens = np.zeros((n_chunk, 2 * self.n_scored), dtype=np.int32)

    def chunk_logprobs(self, i, out):
        out[:] = -math.log(self.n_vocab)
        return out

    def targets(self, i):
        return np.zeros(self.n_scored, dtype=np.int32)


class _FakeModel:
    """Counts the chunks it decodes; its logits put nearly all mass on one token (KLD ≈ 2.7)."""

    def __init__(self, n_seq: int) -> None:
        self.settings = type("Settings", (), {"n_seq": n_seq})()
        self.decoded = 0

    def eval_chunks(self, tokens, out):
        self.decoded += len(tokens)
        rng = np.random.default_rng(self.decoded)
        out[:] = rng.normal(0.0, 0.1, out.shape)
        out[..., 3] += 20.0
        return out


@pytest.mark.parametrize("n_seq", [1, 3])
def test_evaluate_decodes_no_chunk_past_an_early_verdict(n_seq):
    from pytest_quantbench.measure import evaluate

    model, acc = _FakeModel(n_seq), EarlyStopAccumulator(EarlyStop({"max_kld": 0.01}, 32))
    with pytest.raises(EarlyVerdict, match="early fail after 4 of 32"):
        evaluate(model, _FakeBase(32), acc)
    assert acc.n_chunks == 4
    assert model.decoded == -(-4 // n_seq) * n_seq  # the decodes holding chunks 0..3, no more
    plain = _FakeModel(n_seq)
    evaluate(plain, _FakeBase(32), KLDAccumulator())  # no looks: every chunk, overlapped
    assert plain.decoded == 32


# ---------------------------------------------------------------------------
# comparison: the pure parts
# ---------------------------------------------------------------------------


def test_fail_rules_parse_and_direction():
    rules = parse_fail_rules(["mean_kld:5%", "same_top_p:-0.5"], comparable_metrics())
    kld, top = rules
    assert kld.relative and kld.tolerance == 5 and not top.relative
    assert kld.violated(0.010, 0.0106) and not kld.violated(0.010, 0.0104)
    assert not kld.violated(0.010, 0.005)  # an improvement never fails
    assert top.violated(90.0, 89.4) and not top.violated(90.0, 89.6)
    assert not top.violated(90.0, 95.0)
    for bad in ("mean_kld", "mean_kld:x%", "mean_kdl:5%", "mean_kld_err:5%"):
        with pytest.raises(CompareError, match="quantbench-compare-fail"):
            parse_fail_rules([bad], comparable_metrics())


# ---------------------------------------------------------------------------
# the plugin on the synthetic model
# ---------------------------------------------------------------------------

TWO_ITEMS = ["--quantbench-qtypes=q4_0", "--quantbench-tensors", r"blk\.[01]\.attn_v"]


def _chunks(args: list[str], n: int) -> list[str]:
    return without(args, "--quantbench-chunks") + [f"--quantbench-chunks={n}"]


@pytest.fixture
def reference_run(pytester, qb_args):
    """Two items measured once; returns (options, a copy of results.csv as a DataFrame)."""
    args = [*qb_args, *TWO_ITEMS]
    pytester.runpytest_subprocess(*args).assert_outcomes(passed=2)
    return args, results(pytester)


def _write_ref(pytester, df: pd.DataFrame):
    path = pytester.path / "ref.csv"
    df.to_csv(path, index=False)
    return path


def test_compare_same_numbers_pass_and_carry_properties(pytester, reference_run):
    args, ref = reference_run
    path = _write_ref(pytester, ref)
    result = pytester.runpytest_subprocess(
        *args,
        f"--quantbench-compare={path}",
        "--quantbench-compare-fail=mean_kld:5%",
        "-o",
        "junit_family=xunit1",
        "--junitxml=report.xml",
    )
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [f"quantbench compare: {path} (2 measured items)", "compared with *: 2 item(s)"]
    )
    assert {*GATING_KEYS, *comparison_columns()} <= set(ref.columns)  # what a reference needs
    rows = results(pytester)
    assert (rows["delta_mean_kld"] == 0).all()
    assert list(rows["ref_mean_kld"]) == list(ref["mean_kld"])
    props = {
        p.get("name"): p.get("value")
        for p in ET.parse(pytester.path / "report.xml").iter("property")
    }
    assert {"ref_mean_kld", "delta_mean_kld", "ref_same_top_p", "delta_same_top_p"} <= set(props)


def test_compare_fails_only_the_item_whose_reference_is_smaller(pytester, reference_run):
    args, ref = reference_run
    worse = ref.copy()
    worse.loc[0, "mean_kld"] = ref.loc[0, "mean_kld"] * 0.9  # this run is 11 % worse for it
    path = _write_ref(pytester, worse)
    result = pytester.runpytest_subprocess(
        *args, f"--quantbench-compare={path}", "--quantbench-compare-fail=mean_kld:5%"
    )
    result.assert_outcomes(passed=1, failed=1)
    name = ref.loc[0, "tensor"]
    result.stdout.fnmatch_lines(
        [
            f"*Mean KLD {ref.loc[0, 'mean_kld']:.6f} ± * vs reference "
            f"{worse.loc[0, 'mean_kld']:.6f} ± * (chunk-level ±): change +11.11% > mean_kld:5%*",
            "largest regressions (mean KLD up):",
            f"  {name}[[]q4_0]: mean KLD *(+11.11%)",
            f"FAILED *{name}*q4_0*",
        ]
    )
    # reported, not judged, without a fail rule
    pytester.runpytest_subprocess(*args, f"--quantbench-compare={path}").assert_outcomes(passed=2)


def test_compare_same_top_p_direction(pytester, reference_run):
    args, ref = reference_run
    changed = ref.copy()
    changed.loc[0, "same_top_p"] = ref.loc[0, "same_top_p"] + 1.0  # this run dropped 1 point
    changed.loc[1, "same_top_p"] = ref.loc[1, "same_top_p"] - 1.0  # this run gained 1 point
    path = _write_ref(pytester, changed)
    result = pytester.runpytest_subprocess(
        *args, f"--quantbench-compare={path}", "--quantbench-compare-fail=same_top_p:-0.5"
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*Same top p * vs reference *: change -1 < same_top_p:-0.5*",
            f"FAILED *{ref.loc[0, 'tensor']}*",
        ]
    )


def test_compare_lists_missing_items(pytester, reference_run):
    args, ref = reference_run
    extra = ref.iloc[[1]].copy()
    extra["tensor"] = extra["members"] = "blk.1.attn_k.weight"
    path = _write_ref(pytester, pd.concat([ref.iloc[[0]], extra]))
    result = pytester.runpytest_subprocess(
        *args, f"--quantbench-compare={path}", "--quantbench-compare-fail=mean_kld:5%"
    )
    result.assert_outcomes(passed=2)  # missing items are listed, not failed
    result.stdout.fnmatch_lines(
        [
            f"1 item(s) not in the reference: {ref.loc[1, 'tensor']}[[]q4_0]",
            "1 item(s) in the reference only: blk.1.attn_k.weight[[]q4_0]",
        ]
    )


@pytest.mark.parametrize(
    "column,value",
    [("n_ctx", 128), ("corpus_sha256", "ab" * 32), ("chunks", 3), ("imatrix", "ab" * 32)],
)
def test_compare_with_other_settings_is_a_usage_error(pytester, reference_run, column, value):
    args, ref = reference_run
    other = ref.copy()
    other[column] = value
    path = _write_ref(pytester, other)
    error = usage_error(pytester.runpytest_subprocess(*args, f"--quantbench-compare={path}"))
    assert f"--quantbench-compare {path} was measured with other settings: {column}" in error


def test_compare_engine_difference_is_listed(pytester, reference_run):
    args, ref = reference_run
    other = ref.copy()
    other["engine"] = "another-build"
    path = _write_ref(pytester, other)
    result = pytester.runpytest_subprocess(*args, f"--quantbench-compare={path}")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        ["quantbench compare: engine differs: reference another-build, this run *"]
    )


def test_compare_fail_without_reference_and_missing_file(pytester, qb_args):
    error = usage_error(
        pytester.runpytest_subprocess(*qb_args, *TWO_ITEMS, "--quantbench-compare-fail=mean_kld:5%")
    )
    assert "needs a reference: pass --quantbench-compare" in error
    error = usage_error(
        pytester.runpytest_subprocess(*qb_args, *TWO_ITEMS, "--quantbench-compare=nothere")
    )
    assert "no such file" in error


def test_load_reference_from_an_output_directory(tmp_path):
    row = {
        "tensor": "t",
        "members": "t",
        "qtype": "q4_0",
        "mean_kld": 0.1,
        "model_sha256": "m",
        "corpus_sha256": "c",
        "n_ctx": 64,
        "chunks": 2,
        "imatrix": "",
    }
    pd.DataFrame([row, {**row, "tensor": "u", "members": "u", "stopped_early": True}]).to_csv(
        tmp_path / "results.csv", index=False
    )
    ref = load_reference(tmp_path, {**row, "imatrix": ""})
    assert isinstance(ref, Reference) and len(ref.rows) == 1
    assert "early-stopped" in ref.skipped["u[q4_0]"]
    with pytest.raises(CompareError, match=r"imatrix none \(reference\) vs abc \(this run\)"):
        load_reference(tmp_path, {**row, "imatrix": "abc"})


def test_auto_imatrix_of_another_engine_is_allowed_and_listed(tmp_path):
    row = {
        "tensor": "t",
        "members": "t",
        "qtype": "q4_0",
        "mean_kld": 0.1,
        "engine": "e1",
        "model_sha256": "m",
        "corpus_sha256": "c",
        "n_ctx": 64,
        "chunks": 2,
        "imatrix": "auto:k1",
    }
    pd.DataFrame([row]).to_csv(tmp_path / "results.csv", index=False)
    current = {**row, "imatrix": "auto:k2", "engine": "e2"}
    lines = load_reference(tmp_path, current).header_lines(current)
    assert any("engine differs: reference e1, this run e2" in line for line in lines)
    assert any("imatrix differs: reference auto:k1, this run auto:k2" in line for line in lines)


# ---------------------------------------------------------------------------
# early verdicts in the plugin
# ---------------------------------------------------------------------------


def _thresholds(pytester, max_kld: float):
    path = pytester.path / "limits.yaml"
    path.write_text(f"defaults:\n  max_kld: {float(max_kld)!r}\n", encoding="utf-8")
    return f"--quantbench-thresholds={path}"


# blk.1.attn_output: the synthetic item whose chunk means vary least (about 8 % at n_ctx 64)
def _row(pytester, tensor: str):
    """The results.csv row of ``tensor`` (the table also lists stored rows of other items)."""
    rows = results(pytester)
    return rows[rows["tensor"] == tensor].iloc[0]


def _reused(row) -> bool:
    return str(row.get("reused")) == "True"


ONE_ITEM = ["--quantbench-qtypes=q4_0", "--quantbench-tensors", r"blk\.1\.attn_output"]


def test_early_stop_verdicts_keys_and_a_later_full_run(pytester, qb_args):
    args = [*_chunks(qb_args, 16), *ONE_ITEM]
    pytester.runpytest_subprocess(*args).assert_outcomes(passed=1)  # the full run's value
    full = results(pytester).iloc[0]
    assert full["chunks_used"] == 16 and not full["stopped_early"]
    early = [*args, "--quantbench-early-stop"]

    # far above the item's KLD: pass at the first look
    pytester.runpytest_subprocess(
        *early, _thresholds(pytester, 100 * full["mean_kld"]), "--quantbench-rerun"
    ).assert_outcomes(passed=1)
    row = results(pytester).iloc[0]
    assert (row["chunks_used"], row["stopped_early"], row["early_verdict"]) == (4, True, "pass")
    assert row["n_tokens"] == 4 * full["n_tokens"] / 16

    # far below: fail at the first look, saying so
    result = pytester.runpytest_subprocess(
        *early, _thresholds(pytester, full["mean_kld"] / 100), "--quantbench-rerun"
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*(early verdict after 4 of 16 chunks, --quantbench-early-stop)"])
    row = results(pytester).iloc[0]
    assert (row["chunks_used"], row["early_verdict"], _reused(row)) == (4, "fail", False)

    # at the item's own value: all chunks, the ordinary verdict
    pytester.runpytest_subprocess(
        *early, _thresholds(pytester, float(full["mean_kld"])), "--quantbench-rerun"
    ).assert_outcomes(passed=1)
    row = results(pytester).iloc[0]
    assert row["chunks_used"] == 16 and not row["stopped_early"]
    assert row["mean_kld"] == full["mean_kld"]

    # an early-stopped result is reused by the same early-stop run, never by a full run (an
    # item not measured in full before: a stored full result is what an early run reuses first)
    other = [
        *_chunks(qb_args, 16),
        "--quantbench-qtypes=q4_0",
        "--quantbench-tensors",
        r"blk\.1\.attn_v",
    ]
    limit = _thresholds(pytester, full["mean_kld"] / 100)
    for reused in (False, True):
        pytester.runpytest_subprocess(*other, limit, "--quantbench-early-stop").assert_outcomes(
            failed=1
        )
        row = _row(pytester, "blk.1.attn_v.weight")
        assert (row["chunks_used"], _reused(row)) == (4, reused)
    pytester.runpytest_subprocess(*other, limit).assert_outcomes(failed=1)
    row = _row(pytester, "blk.1.attn_v.weight")
    assert row["chunks_used"] == 16 and not row["stopped_early"] and not _reused(row)


def test_early_stop_without_limits_runs_all_chunks(pytester, qb_args):
    pytester.runpytest_subprocess(
        *_chunks(qb_args, 16), *ONE_ITEM, "--quantbench-early-stop"
    ).assert_outcomes(passed=1)
    assert results(pytester).iloc[0]["chunks_used"] == 16


def test_early_stop_in_yaml_and_bad_confidence(pytester, qb_args):
    (pytester.path / "quantbench.yaml").write_text("early_stop: true\nearly_stop_confidence: 1.5\n")
    error = usage_error(pytester.runpytest_subprocess(*qb_args, *ONE_ITEM))
    assert "early-stop-confidence" in error and "between 0 and 1" in error


def test_threshold_messages_use_the_chunk_level_error():
    from pytest_quantbench.thresholds import ThresholdRule, Thresholds

    limits = Thresholds([ThresholdRule(None, None, None, None, {"max_kld": 0.01}, "defaults")])
    row = {"mean_kld": 0.02, "mean_kld_err": 0.0001}
    (plain,) = limits.check("t", "q4_0", row)
    assert plain.err == pytest.approx(0.0001) and "chunk" not in plain.message
    (v,) = limits.check("t", "q4_0", {**row, "mean_kld_err_chunks": 0.003})
    assert v.message == (
        "mean KLD 0.020000 ± 0.003000 > max_kld 0.01 (defaults) (± from chunk means)"
    )
