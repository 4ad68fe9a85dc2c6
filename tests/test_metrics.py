"""Tests of pytest_quantbench.metrics against hand-computed cases, a literal
transcription of llama-perplexity's C loops, and the reference output's format."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from pytest_quantbench import metrics as m
from pytest_quantbench.metrics import (
    FIELDS,
    TABLE_HEADER,
    KLDAccumulator,
    KLDStats,
    PPLAccumulator,
    covariance,
    expf,
    format_kld_output,
    kld_token_stats,
    mean_and_uncertainty,
    median,
    percentile,
    row_max_lse,
)

F32 = np.float32


# ---------------------------------------------------------------------------
# reference: literal per-token transcription of perplexity.cpp's KLD log_softmax
# ---------------------------------------------------------------------------


def c_expf(x) -> F32:
    return F32(math.exp(float(x)))


def ref_token(l: np.ndarray, lp: np.ndarray, t: int):
    """One token, scalar loops, exactly as the C code (docs/llama-perplexity.md#kld-token)."""
    mx = l[0]
    imax = 0
    for i in range(1, len(l)):
        if l[i] > mx:
            mx = l[i]
            imax = i
    s = 0.0
    for i in range(len(l)):
        s += float(c_expf(F32(l[i] - mx)))
    lse = F32(math.log(s))
    nll = F32(F32(mx + lse) - l[t])
    a = F32(mx + lse)
    nll_base = F32(-lp[t])
    kld = 0.0
    imax_b, best = -1, F32(0)
    for i in range(len(l)):
        if i == 0 or lp[i] > best:
            best, imax_b = lp[i], i
        if lp[i] > F32(-16):
            kld += float(F32(c_expf(lp[i]) * F32(F32(lp[i] - l[i]) + a)))
    dp = F32(c_expf(-nll) - c_expf(-nll_base))
    return nll, nll_base, kld, imax == imax_b, dp


def log_softmax_f32(l: np.ndarray) -> np.ndarray:
    _, mx, lse = row_max_lse(l)
    return (l - (mx + lse)[:, None]).astype(F32)


# ---------------------------------------------------------------------------
# primitives
# ---------------------------------------------------------------------------


def test_expf_is_float64_exp_rounded_to_float32():
    x = np.array([-30.5, -1.0, 0.0, 0.25, 3.0], dtype=F32)
    got = expf(x)
    assert got.dtype == F32
    assert [float(v) for v in got] == [float(F32(math.exp(float(v)))) for v in x]


def test_row_max_lse_first_index_of_ties_and_ordered_sum():
    l = np.array([[1.0, 3.0, 3.0, -2.0]], dtype=F32)
    imax, mx, lse = row_max_lse(l)
    assert int(imax[0]) == 1 and mx.dtype == F32 and float(mx[0]) == 3.0
    s = 0.0
    for v in l[0]:
        s += float(c_expf(F32(v - F32(3.0))))
    assert lse.dtype == F32 and lse[0] == F32(math.log(s))


# ---------------------------------------------------------------------------
# MU / COV / PCT / MED (docs/llama-perplexity.md#stat-functions)
# ---------------------------------------------------------------------------


def test_mu_empty_is_zero():
    assert mean_and_uncertainty(5.0, 7.0, 0) == (0.0, 0.0)


@pytest.mark.parametrize("n", [1, 2, 10])
def test_mu_sigma_zero_up_to_ten(n):
    vals = np.arange(n, dtype=float)
    mu, sigma = mean_and_uncertainty(vals.sum(), (vals**2).sum(), n)
    assert mu == pytest.approx(vals.mean()) and sigma == 0.0


def test_mu_sigma_is_standard_error_above_ten():
    vals = np.arange(11, dtype=float)  # mean 5, population variance 10
    mu, sigma = mean_and_uncertainty(vals.sum(), (vals**2).sum(), 11)
    assert mu == 5.0
    assert sigma == pytest.approx(math.sqrt(10.0 / 10.0))


def test_mu_non_positive_variance_gives_zero_sigma():
    assert mean_and_uncertainty(22.0, 44.0, 11) == (2.0, 0.0)  # v = 4 - 4 = 0


def test_cov_needs_ten():
    assert covariance(1.0, 2.0, 3.0, 9) == 0.0
    a = np.arange(10, dtype=float)
    b = 2 * a + 1
    got = covariance(a.sum(), b.sum(), (a * b).sum(), 10)
    assert got == pytest.approx((np.mean(a * b) - a.mean() * b.mean()) / 9)


def test_pct_bounds():
    x = np.array([1, 2, 3], dtype=F32)
    assert percentile(x, 0.0) == 1 and percentile(x, -1) == 1
    assert percentile(x, 1.0) == 3 and percentile(x, 2) == 3
    with pytest.raises(ValueError):
        percentile(np.zeros(0, F32), 0.5)


def test_pct_index_is_computed_in_float32():
    # n-1 = 20: 0.95f*20 = 18.9999998 in exact arithmetic, but rounds to 19.0 in float32,
    # so k = 19, r = 0 -> exactly x[19]; a float64 computation gives k = 18, r ~ 0.99999976.
    x = np.zeros(21, dtype=F32)
    x[19], x[20] = 1.0, 2.0
    got = percentile(x, 0.95)
    assert got.dtype == F32 and float(got) == 1.0
    p64 = 0.949999988079071 * 20
    k = int(p64)
    naive = (1 - (p64 - k)) * x[k] + (p64 - k) * x[k + 1]
    assert k == 18 and naive != 1.0


def test_pct_interpolation_float32():
    x = np.array([0.0, 10.0], dtype=F32)
    # p = f32(0.9f * 1) = 0.9f, r = 0.9f: f32(f32(0.1f..)*0) + f32(0.9f*10)
    assert percentile(x, 0.9) == F32(F32(0.9) * F32(10))


def test_pct_fma_is_single_rounding():
    rng = np.random.default_rng(1)
    for _ in range(200):
        x = np.sort(rng.standard_normal(rng.integers(2, 50)).astype(F32))
        f = F32(rng.choice([0.999, 0.99, 0.95, 0.9, 0.75, 0.25, 0.1, 0.05, 0.01, 0.001]))
        got = percentile(x, f, fma=True)
        plain = percentile(x, f)
        p = F32(f * F32(len(x) - 1))
        k = int(p)
        r = F32(p - F32(k))
        exact = Fraction(float(F32(1) - r)) * Fraction(float(x[k])) + Fraction(
            float(F32(r * x[min(k + 1, len(x) - 1)]))
        )
        err = abs(Fraction(float(got)) - exact)
        for nb in (np.nextafter(got, F32(np.inf)), np.nextafter(got, F32(-np.inf))):
            assert err <= abs(Fraction(float(nb)) - exact)
        assert abs(float(got) - float(plain)) <= 2 * float(np.spacing(abs(plain)) or 1e-45)


def test_med_even_and_odd():
    assert median(np.array([1, 2, 4], F32)) == 2
    got = median(np.array([1, 2, 4, 8], F32))
    assert got.dtype == F32 and got == 3.0


def test_med_is_not_pct_half():
    big = F32(3e38)
    x = np.array([big, big], F32)
    with np.errstate(over="ignore"):
        assert np.isinf(median(x))  # f32(x0 + x1) overflows first, as in C
    assert percentile(x, 0.5) == big


# ---------------------------------------------------------------------------
# PPLAccumulator (docs/llama-perplexity.md#ppl, #ppl-output)
# ---------------------------------------------------------------------------


def test_ppl_accumulator_values_and_lines():
    acc = PPLAccumulator()
    acc.add(np.array([1.0, 2.0], F32))
    assert acc.progress_entry() == "[1]%.4f," % math.exp(1.5)
    acc.add(np.array([3.0, 4.0, 5.0], F32))
    ppl, err = acc.ppl()
    vals = np.arange(1.0, 6.0)
    assert ppl == pytest.approx(math.exp(3.0))
    assert err == pytest.approx(ppl * math.sqrt(vals.var() / 4))
    assert acc.final_line(128) == (
        "Final estimate: PPL over 2 chunks for n_ctx=128 = %.4f +/- %.5f" % (ppl, err)
    )
    assert acc.final_line(128, style="ml") == "Final estimate: PPL = %.4f +/- %.5f" % (ppl, err)


def test_ppl_accumulator_zero_variance_and_errors():
    acc = PPLAccumulator()
    with pytest.raises(ValueError):
        acc.ppl()
    acc.add(np.full(4, 2.0))
    assert math.isnan(acc.ppl()[1])
    assert acc.final_line(8) == "Unexpected negative standard deviation of log(prob)"
    with pytest.raises(ValueError, match="chunk 2: 1 of 3"):
        acc.add(np.array([1.0, np.nan, 2.0]))


# ---------------------------------------------------------------------------
# per-token quantities (docs/llama-perplexity.md#kld-token)
# ---------------------------------------------------------------------------


def test_two_token_vocab_by_hand():
    base = np.log(np.array([[0.75, 0.25]])).astype(F32)
    q = np.zeros((1, 2), F32)  # Q: uniform
    ts = kld_token_stats(q, base, np.array([1]))
    # KLD = 0.75 ln(0.75/0.5) + 0.25 ln(0.25/0.5)
    assert ts.kld[0] == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), abs=1e-6)
    assert ts.nll[0] == pytest.approx(math.log(2), abs=1e-6)
    assert ts.nll_base[0] == pytest.approx(math.log(4), abs=1e-6)
    assert ts.dp[0] == pytest.approx(0.25, abs=1e-6)  # p_Q(t) - p_base(t)
    assert bool(ts.same_top[0])  # both argmax 0 (first of ties)
    assert ts.nll.dtype == F32 and ts.dp.dtype == F32 and ts.kld.dtype == np.float64


def test_identical_uniform_is_exactly_zero():
    l = np.zeros((3, 4), F32)
    base = log_softmax_f32(l)
    ts = kld_token_stats(l, base, np.array([0, 1, 3]))
    assert np.all(ts.kld == 0.0) and np.all(ts.dp == 0) and ts.same_top.all()
    assert np.array_equal(ts.nll, ts.nll_base)


def test_base_logprobs_at_or_below_minus_16_are_dropped():
    base = np.array([[0.0, -16.0, -17.0]], F32)
    q = np.array([[0.0, -5.0, 3.0]], F32)
    ts = kld_token_stats(q, base, np.array([0]))
    r = ref_token(q[0], base[0], 0)
    assert ts.kld[0] == r[2]
    _, mx, lse = row_max_lse(q)
    a = F32(mx[0] + lse[0])
    only_first = float(F32(c_expf(base[0, 0]) * F32(F32(base[0, 0] - q[0, 0]) + a)))
    assert ts.kld[0] == only_first


def test_vectorised_matches_scalar_c_transcription_bit_for_bit():
    rng = np.random.default_rng(0)
    S, V = 6, 37
    l = (rng.standard_normal((S, V)) * 4).astype(F32)
    l[2, 5] = l[2, 9] = l[2].max() + 1  # tie for the max: first index wins
    base = log_softmax_f32((l + rng.standard_normal((S, V)).astype(F32) * 0.5).astype(F32))
    base[1, :10] = -20  # some below the cutoff
    base[3, :] = -20  # every term dropped: the sum is +0.0
    base[4, ::2] = -17  # every other term dropped (only the kept ones are computed)
    t = rng.integers(0, V, S)
    ts = kld_token_stats(l, base, t)
    assert ts.kld[3] == 0.0 and math.copysign(1.0, ts.kld[3]) == 1.0
    for j in range(S):
        nll, nb, kld, same, dp = ref_token(l[j], base[j], int(t[j]))
        assert ts.nll[j] == nll and ts.nll_base[j] == nb
        assert ts.kld[j] == kld and bool(ts.same_top[j]) == same and ts.dp[j] == dp


def test_blocking_does_not_change_results(monkeypatch):
    rng = np.random.default_rng(3)
    l = rng.standard_normal((9, 50)).astype(F32)
    base = log_softmax_f32(rng.standard_normal((9, 50)).astype(F32))
    t = rng.integers(0, 50, 9)
    whole = kld_token_stats(l, base, t)
    monkeypatch.setattr(m, "_BLOCK_ELEMS", 60)  # force 1-row blocks
    blocked = kld_token_stats(l, base, t)
    for a, b in zip(whole, blocked, strict=True):
        assert np.array_equal(a, b)


def test_non_finite_logits_raise_with_chunk_and_count():
    l = np.zeros((5, 4), F32)
    l[1, 2] = np.nan
    l[3, 0] = np.inf
    acc = KLDAccumulator()
    acc.add_chunk(np.zeros((5, 4), F32), log_softmax_f32(np.zeros((5, 4), F32)), np.zeros(5, int))
    with pytest.raises(
        ValueError, match=r"chunk 2: 2 of 5 scored positions have non-finite logits"
    ):
        acc.add_chunk(l, log_softmax_f32(np.zeros((5, 4), F32)), np.zeros(5, int))
    assert acc.n_tokens == 5 and acc.n_chunks == 1  # nothing accumulated on error


def test_bad_shapes_and_targets():
    z = np.zeros((2, 3), F32)
    with pytest.raises(ValueError):
        kld_token_stats(z, np.zeros((2, 4), F32), np.zeros(2, int))
    with pytest.raises(ValueError):
        kld_token_stats(z, z, np.zeros(3, int))
    with pytest.raises(ValueError, match="target"):
        kld_token_stats(z, z, np.array([0, 3]))


# ---------------------------------------------------------------------------
# KLDAccumulator / KLDStats (docs/llama-perplexity.md#statistics, #kld-output)
# ---------------------------------------------------------------------------


def _random_chunk(rng, S=40, V=30):
    lb = (rng.standard_normal((S, V)) * 3).astype(F32)
    lq = (lb + rng.standard_normal((S, V)).astype(F32) * 0.3).astype(F32)
    return lq, log_softmax_f32(lb), rng.integers(0, V, S)


def test_identical_logits_stats():
    rng = np.random.default_rng(5)
    acc = KLDAccumulator()
    for _ in range(3):
        l = np.zeros((40, 8), F32)
        l[:, 0] = 1.0  # exact-arithmetic friendly: every l_i - A is exact
        acc.add_chunk(l, log_softmax_f32(l), rng.integers(0, 8, 40))
    st = acc.stats()
    assert st.n_tokens == 120
    assert st.mean_kld == 0.0 and st.max_kld == 0.0 and st.min_kld == 0.0 and st.median_kld == 0.0
    assert st.same_top_p == 100.0 and st.same_top_p_err == 0.0
    assert st.mean_dp == 0.0 and st.max_dp == 0.0 and st.min_dp == 0.0 and st.rms_dp == 0.0
    assert math.isnan(st.rms_dp_err)  # 0.5/0 * 0 in C: -nan
    assert st.ppl_q == st.ppl_base and st.ln_ratio == 0.0 and st.ppl_ratio == 1.0
    assert "RMS \u0394p    :  0.000 ±  -nan %" in st.format_block()


def test_accumulation_is_sequential_in_token_order():
    rng = np.random.default_rng(7)
    lq, lb, t = _random_chunk(rng, S=50)
    one = KLDAccumulator()
    one.add_chunk(lq, lb, t)
    two = KLDAccumulator()
    two.add_chunk(lq[:17], lb[:17], t[:17])
    two.add_chunk(lq[17:], lb[17:], t[17:])
    assert one.stats() == two.stats()
    # the accumulators equal a plain Python-float loop in token order
    ts = kld_token_stats(lq, lb, t)
    s_k = s_p4 = s_nb = 0.0
    for j in range(50):
        s_k += float(ts.kld[j])
        d2 = float(F32(ts.dp[j] * ts.dp[j]))
        s_p4 += d2 * d2
        s_nb += float(F32(ts.nll[j] * ts.nll_base[j]))
    assert (one.s_k, one.s_p4, one.s_nb) == (s_k, s_p4, s_nb)


def test_stats_formulas():
    rng = np.random.default_rng(11)
    acc = KLDAccumulator()
    for _ in range(3):
        acc.add_chunk(*_random_chunk(rng))
    st = acc.stats()
    n = 120
    kld = np.sort(acc.kld_values)
    dp = np.sort(acc.dp_values)
    mq, sq = mean_and_uncertainty(acc.s_n, acc.s_n2, n)
    mb, sb = mean_and_uncertainty(acc.s_b, acc.s_b2, n)
    c = covariance(acc.s_n, acc.s_b, acc.s_nb, n)
    assert st.ppl_q == math.exp(mq) and st.ppl_q_err == math.exp(mq) * sq
    assert st.cor_ln_ppl == 100 * c / (sq * sb)
    assert st.ln_ratio_err == math.sqrt(sq * sq + sb * sb - 2 * c)
    assert st.max_kld == float(kld[-1]) and st.min_kld == float(kld[0])
    assert st.kld_p99 == float(percentile(kld, 0.99))
    assert st.median_dp == 100.0 * float(median(dp))
    assert st.dp_p75 == 100.0 * float(percentile(dp, 0.75))
    p = acc.n_top / n
    assert st.same_top_p == 100 * p
    assert st.same_top_p_err == pytest.approx(100 * math.sqrt(p * (1 - p) / (n - 1)))
    m2, s2 = mean_and_uncertainty(acc.s_p2, acc.s_p4, n)
    assert st.rms_dp == 100 * math.sqrt(m2) and st.rms_dp_err == pytest.approx(
        100 * 0.5 * s2 / math.sqrt(m2)
    )
    d = st.as_dict()
    assert list(d) == [f.name for f in FIELDS]
    assert all(type(v) in (float, int) for v in d.values()) and type(d["n_tokens"]) is int


def test_stats_empty_raises():
    with pytest.raises(ValueError):
        KLDAccumulator().stats()


def test_fields_metadata():
    import dataclasses

    assert [f.name for f in FIELDS] == [f.name for f in dataclasses.fields(KLDStats)]
    labels = {f.name: f.label for f in FIELDS}
    assert labels["ppl_q"] == "Mean PPL(Q)" and labels["kld_p5"] == "5.0% KLD"
    assert labels["mean_dp_err"] == "Mean \u0394p \u00b1"
    assert len(set(labels.values())) == len(labels)
    assert all(f.error_of == f.name[:-4] for f in FIELDS if f.name.endswith("_err"))


# The reference block (fixture variant-blk3-attn_output-q4_1.stdout.txt), as literal text.
REFERENCE_BLOCK = """\
====== Perplexity statistics ======
Mean PPL(Q)                   :  13.439586 ±   2.411612
Mean PPL(base)                :  13.332524 ±   2.380710
Cor(ln(PPL(Q)), ln(PPL(base))):  99.84%
Mean ln(PPL(Q)/PPL(base))     :   0.007998 ±   0.010316
Mean PPL(Q)/PPL(base)         :   1.008030 ±   0.010399
Mean PPL(Q)-PPL(base)         :   0.107062 ±   0.141018

====== KL divergence statistics ======
Mean    KLD:   0.006878 ±   0.000459
Maximum KLD:   0.038623
99.9%   KLD:   0.038373
99.0%   KLD:   0.033807
95.0%   KLD:   0.021033
90.0%   KLD:   0.015436
Median  KLD:   0.004661
10.0%   KLD:   0.000564
 5.0%   KLD:   0.000337
 1.0%   KLD:   0.000031
 0.1%   KLD:   0.000019
Minimum KLD:   0.000019

====== Token probability statistics ======
Mean    Δp: -0.179 ± 0.120 %
Maximum Δp: 10.764%
99.9%   Δp:  9.423%
99.0%   Δp:  5.096%
95.0%   Δp:  2.654%
90.0%   Δp:  1.521%
75.0%   Δp:  0.172%
Median  Δp: -0.018%
25.0%   Δp: -0.524%
10.0%   Δp: -2.016%
 5.0%   Δp: -3.357%
 1.0%   Δp: -6.199%
 0.1%   Δp: -7.244%
Minimum Δp: -7.303%
RMS Δp    :  1.915 ± 0.175 %
Same top p: 94.444 ± 1.446 %
"""
REFERENCE_ROW = (
    "   4      13.4396 ±    2.4116       0.00800 ±    0.01032"
    "       0.00688 ±    0.00046     1.915 ±  0.175 %    94.444 ±  1.446 %"
)


def test_format_block_reproduces_reference_bytes():
    vals = [
        13.439586,
        2.411612,
        13.332524,
        2.380710,
        99.84,
        0.007998,
        0.010316,
        1.008030,
        0.010399,
        0.107062,
        0.141018,
        0.006878,
        0.000459,
        0.038623,
        0.038373,
        0.033807,
        0.021033,
        0.015436,
        0.004661,
        0.000564,
        0.000337,
        0.000031,
        0.000019,
        0.000019,
        -0.179,
        0.120,
        10.764,
        9.423,
        5.096,
        2.654,
        1.521,
        0.172,
        -0.018,
        -0.524,
        -2.016,
        -3.357,
        -6.199,
        -7.244,
        -7.303,
        1.915,
        0.175,
        94.444,
        1.446,
        252,
    ]
    st = KLDStats(*vals)
    block = st.format_block()
    assert block.encode("utf-8") == REFERENCE_BLOCK.encode("utf-8")
    assert b"\xc2\xb1" in block.encode() and b"\xce\x94" in block.encode()


def test_chunk_row_layout_matches_reference():
    rng = np.random.default_rng(2)
    acc = KLDAccumulator()
    for _ in range(4):
        acc.add_chunk(*_random_chunk(rng, S=63))
    row = acc.chunk_row()
    assert row.startswith("   4 ")
    assert len(row) == len(REFERENCE_ROW)
    pos = lambda s, ch: [i for i, c in enumerate(s) if c == ch]  # noqa: E731
    assert pos(row, "\u00b1") == pos(REFERENCE_ROW, "\u00b1")
    assert pos(row, "%") == pos(REFERENCE_ROW, "%")
    assert acc.chunk_row(7).startswith("   7 ")


def test_format_kld_output_layout():
    rng = np.random.default_rng(4)
    acc = KLDAccumulator()
    rows = []
    for _ in range(2):
        acc.add_chunk(*_random_chunk(rng, S=30))
        rows.append(acc.chunk_row())
    small = format_kld_output(rows, acc.stats())  # n = 60 < 100: no block
    assert small == "\n" + TABLE_HEADER + "\n" + rows[0] + "\n" + rows[1] + "\n\n"
    acc.add_chunk(*_random_chunk(rng, S=40))
    rows.append(acc.chunk_row())
    full = format_kld_output(rows, acc.stats())
    assert full.endswith("\n\n" + acc.stats().format_block())
    assert TABLE_HEADER.startswith("chunk             PPL ")
