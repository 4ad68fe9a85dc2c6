"""Tests of pytest_quantbench.kldbase: row encoding/decoding
(docs/llama-perplexity.md#base-file, #bit-exactness), the base file layout, the atomic writer, the
validating reader, and fidelity against the llama-perplexity reference base file in ../shared
(skipped when it is absent)."""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from pytest_quantbench.kldbase import (
    LOG_PROB_RANGE,
    KLDBaseFile,
    KLDBaseFormatError,
    KLDBaseWriter,
    base_nll,
    decode_rows,
    encode_logits,
    expected_file_size,
    n_scored,
    record_words,
)
from pytest_quantbench.metrics import KLDAccumulator, PPLAccumulator, mean_and_uncertainty

F32 = np.float32
SHARED = Path(__file__).resolve().parents[2] / "shared"
FIXTURE = SHARED / "fixtures" / "llama-perplexity" / "smollm2-bf16.c128.chunks4.kld"


def ref_encode_row(l: np.ndarray, fma: bool = False, R: float = 24.0):
    """Scalar transcription of the C writer's log_softmax (docs/llama-perplexity.md#base-file)."""
    mx = l[0]
    mn = l[0]
    for v in l[1:]:
        mx = max(mx, v)
        mn = min(mn, v)
    mn = max(mn, F32(mx - F32(R)))
    s = 0.0
    for v in l:
        s += float(F32(math.exp(float(F32(v - mx)))))
    lse = F32(math.log(s))
    mlp = F32(F32(mn - mx) - lse)
    scale = F32(F32(mx - mn) / F32(65535))
    q = []
    inv = F32(F32(1) / scale) if scale else F32(0)
    for v in l:
        if scale and v > mn:
            d = F32(v - mn)
            q.append(int(np.rint(float(inv) * float(d))) if fma else int(np.rint(F32(inv * d))))
        else:
            q.append(0)
    return scale, mlp, np.array(q, dtype=np.uint16), F32(F32(mx + lse))


def test_sizes():
    assert n_scored(512) == 255 and n_scored(128) == 63 and n_scored(7) == 3
    assert record_words(49152) == 49156 and record_words(7) == 12
    assert expected_file_size(128, 49152, 4) == 24776692
    assert LOG_PROB_RANGE == 24.0


# ---------------------------------------------------------------------------
# encoding / decoding
# ---------------------------------------------------------------------------


def test_encode_hand_case_and_clamp():
    l = np.array([[0.0, -1.0, -30.0]], F32)
    enc = encode_logits(l)
    scale = F32(F32(24) / F32(65535))
    assert enc.scale.dtype == F32 and enc.scale[0] == scale
    s = 1.0 + float(F32(math.exp(-1.0))) + float(F32(math.exp(-30.0)))
    lse = F32(math.log(s))
    assert enc.min_log_prob[0] == F32(F32(-24) - lse)
    inv = F32(F32(1) / scale)
    assert enc.q.dtype == np.uint16
    assert enc.q[0].tolist() == [
        int(np.rint(F32(inv * F32(24)))),
        int(np.rint(F32(inv * F32(23)))),
        0,
    ]
    assert enc.q[0, 0] == 65535
    # R = 16 (mainline) changes the window
    assert encode_logits(l, log_prob_range=16).scale[0] == F32(F32(16) / F32(65535))


def test_encode_rounds_half_to_even():
    # mx - mn = 65535 * 2^-12 gives scale = 2^-12, inv = 4096: products are exact.
    mn = F32(-65535 * 2.0**-12)
    l = np.array([[0.0, mn, mn + F32(2.5 * 2**-12), mn + F32(3.5 * 2**-12)]], F32)
    enc = encode_logits(l)
    assert enc.scale[0] == F32(2.0**-12)
    assert enc.q[0].tolist() == [65535, 0, 2, 4]  # floor(x + 0.5) would give 3 and 4


def test_encode_constant_row_has_zero_scale():
    enc = encode_logits(np.full((2, 5), 3.25, F32))
    assert np.all(enc.scale == 0) and np.all(enc.q == 0)
    assert enc.min_log_prob[0] == F32(F32(0) - F32(math.log(5.0)))
    assert np.all(decode_rows(enc.scale, enc.min_log_prob, enc.q) == enc.min_log_prob[0])


@pytest.mark.parametrize("fma", [False, True])
def test_encode_matches_scalar_c_transcription(fma):
    rng = np.random.default_rng(0)
    l = (rng.standard_normal((5, 41)) * 6).astype(F32)
    l[3] *= 0.01  # narrow row: mn is the true min
    enc = encode_logits(l, fma=fma)
    t = rng.integers(0, 41, 5)
    nll = base_nll(l, t, encoded=enc)
    assert nll.dtype == F32 and np.array_equal(nll, base_nll(l, t))
    for j in range(5):
        scale, mlp, q, a = ref_encode_row(l[j], fma=fma)
        assert enc.scale[j] == scale and enc.min_log_prob[j] == mlp
        assert np.array_equal(enc.q[j], q)
        assert nll[j] == F32(a - l[j, t[j]])


def test_fma_variant_differs_by_at_most_one():
    rng = np.random.default_rng(1)
    l = (rng.standard_normal((20, 500)) * 5).astype(F32)
    a = encode_logits(l).q.astype(int)
    b = encode_logits(l, fma=True).q.astype(int)
    assert np.abs(a - b).max() <= 1


def test_decode_formula_and_fma():
    scale = np.array([F32(24 / 65535), F32(1e-3)], F32)
    mlp = np.array([-25.5, -3.0], F32)
    q = np.array([[0, 1, 65535], [7, 12345, 3]], np.uint16)
    lp = decode_rows(scale, mlp, q)
    assert lp.dtype == F32 and lp.shape == (2, 3)
    for j in range(2):
        for i in range(3):
            assert lp[j, i] == F32(F32(scale[j] * F32(q[j, i])) + mlp[j])
    lpf = decode_rows(scale, mlp, q, fma=True)
    for j in range(2):
        for i in range(3):
            assert lpf[j, i] == F32(float(scale[j]) * int(q[j, i]) + float(mlp[j]))
    with pytest.raises(ValueError):
        decode_rows(scale, mlp, q[:1])
    for fma in (False, True):
        kept = np.full((2, 3), np.nan, F32)
        assert decode_rows(scale, mlp, q, fma=fma, out=kept) is kept
        assert np.array_equal(kept, decode_rows(scale, mlp, q, fma=fma))
    with pytest.raises(ValueError, match=r"out must be float32 \(2, 3\)"):
        decode_rows(scale, mlp, q, out=np.empty((2, 3), np.float64))


def test_round_trip_close_to_log_softmax():
    rng = np.random.default_rng(2)
    l = (rng.standard_normal((4, 300)) * 3).astype(F32)
    enc = encode_logits(l)
    lp = decode_rows(enc.scale, enc.min_log_prob, enc.q)
    exact = l - (
        l.max(1, keepdims=True) + np.log(np.exp(l - l.max(1, keepdims=True)).sum(1, keepdims=True))
    )
    above = l > (l.max(1, keepdims=True) - 24)
    step = 24 / 65535
    assert np.all(np.abs(lp - exact)[above] <= step / 2 + 1e-5)


def test_encode_rejects_non_finite():
    l = np.zeros((3, 4), F32)
    l[2, 1] = -np.inf
    with pytest.raises(ValueError, match="chunk 5: 1 of 3 scored positions"):
        encode_logits(l, chunk=5)


# ---------------------------------------------------------------------------
# file layout, writer, reader
# ---------------------------------------------------------------------------

C, V, NCH = 8, 7, 2  # odd vocabulary: one padding word per record
S = n_scored(C)


def _write(path, rng, fma=False, c=C, v=V, nch=NCH):
    tokens = rng.integers(0, v, (nch, c)).astype(np.int32)
    logits = [(rng.standard_normal((n_scored(c), v)) * 4).astype(F32) for _ in range(nch)]
    nlls = []
    with KLDBaseWriter(path, c, v, tokens, fma=fma) as w:
        for lg in logits:
            nlls.append(w.write_chunk(lg))
    return tokens, logits, nlls


def test_file_layout_with_odd_vocab(tmp_path):
    rng = np.random.default_rng(3)
    p = tmp_path / "base.kld"
    tokens, logits, _ = _write(p, rng)
    raw = p.read_bytes()
    assert len(raw) == expected_file_size(C, V, NCH) == 20 + 4 * NCH * C + NCH * S * 2 * 12
    assert raw[:8] == b"_logits_" and struct.unpack("<iii", raw[8:20]) == (C, V, NCH)
    assert np.array_equal(np.frombuffer(raw[20 : 20 + 4 * NCH * C], "<i4").reshape(NCH, C), tokens)
    recs = np.frombuffer(raw[20 + 4 * NCH * C :], "<u2").reshape(NCH, S, 12)
    assert np.all(recs[:, :, 11] == 0)  # padding word
    enc = encode_logits(logits[1])
    assert np.array_equal(recs[1, :, 0:2].copy().view("<f4")[:, 0], enc.scale)
    assert np.array_equal(recs[1, :, 2:4].copy().view("<f4")[:, 0], enc.min_log_prob)
    assert np.array_equal(recs[1, :, 4:11], enc.q)
    assert sorted(os.listdir(tmp_path)) == ["base.kld"]  # no temp file left


def test_reader_round_trip(tmp_path):
    rng = np.random.default_rng(4)
    p = tmp_path / "base.kld"
    tokens, logits, nlls = _write(p, rng)
    with KLDBaseFile(p) as f:
        assert (f.n_ctx, f.n_vocab, f.n_chunk, f.first, f.n_scored) == (C, V, NCH, C // 2, S)
        assert f.tokens.dtype == np.int32 and np.array_equal(f.tokens, tokens)
        for i in range(NCH):
            enc = encode_logits(logits[i])
            scale, mlp, q = f.chunk(i)
            assert np.array_equal(scale, enc.scale) and np.array_equal(mlp, enc.min_log_prob)
            assert q.dtype == np.uint16 and np.array_equal(q, enc.q)
            lp = f.chunk_logprobs(i)
            assert lp.dtype == F32 and np.array_equal(
                lp, decode_rows(enc.scale, enc.min_log_prob, enc.q)
            )
            assert np.array_equal(f.targets(i), tokens[i, C // 2 + 1 :])
            assert np.array_equal(nlls[i], base_nll(logits[i], tokens[i, C // 2 + 1 :]))
        with pytest.raises(IndexError):
            f.chunk(NCH)


def test_writer_accepts_full_chunk_logits(tmp_path):
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, V, (1, C)).astype(np.int32)
    full = rng.standard_normal((C, V)).astype(F32)
    with KLDBaseWriter(tmp_path / "a.kld", C, V, tokens) as w:
        n1 = w.write_chunk(full)
    with KLDBaseWriter(tmp_path / "b.kld", C, V, tokens) as w:
        n2 = w.write_chunk(full[C // 2 : C - 1])
    assert (tmp_path / "a.kld").read_bytes() == (tmp_path / "b.kld").read_bytes()
    assert np.array_equal(n1, n2)


@pytest.mark.parametrize("fma", [False, True])
def test_write_read_gives_identical_statistics(tmp_path, fma):
    rng = np.random.default_rng(6)
    p = tmp_path / "base.kld"
    c, v, nch = 64, 33, 3
    s = n_scored(c)
    tokens, logits, nlls = _write(p, rng, fma=fma, c=c, v=v, nch=nch)
    mem, disk = KLDAccumulator(), KLDAccumulator()
    ppl = PPLAccumulator()
    with KLDBaseFile(p, fma=fma) as f:
        for i in range(nch):
            q_logits = (logits[i] + rng.standard_normal((s, v)).astype(F32) * 0.2).astype(F32)
            enc = encode_logits(logits[i], fma=fma)
            t = tokens[i, c // 2 + 1 :]
            mem.add_chunk(q_logits, decode_rows(enc.scale, enc.min_log_prob, enc.q, fma=fma), t)
            disk.add_chunk(q_logits, f.chunk_logprobs(i), f.targets(i))
            ppl.add(nlls[i])
    a, b = mem.stats(), disk.stats()
    assert a == b and a.n_tokens == nch * s == 93
    assert a.format_block() == b.format_block()
    assert ppl.count == nch * s and ppl.n_chunks == nch
    assert ppl.ppl()[0] == pytest.approx(a.ppl_base, rel=1e-3)  # 16-bit vs exact base PPL


def test_truncated_and_oversized_files_are_rejected(tmp_path):
    rng = np.random.default_rng(7)
    p = tmp_path / "base.kld"
    _write(p, rng)
    raw = p.read_bytes()
    expected = len(raw)
    bad = tmp_path / "trunc.kld"
    bad.write_bytes(raw[:-1])
    with pytest.raises(KLDBaseFormatError) as ei:
        KLDBaseFile(bad)
    msg = str(ei.value)
    assert str(bad) in msg and str(expected) in msg and str(expected - 1) in msg
    assert "truncated" in msg and "recompute the baseline / pass a complete file" in msg
    bad.write_bytes(raw + b"\0\0")
    with pytest.raises(KLDBaseFormatError, match="oversized"):
        KLDBaseFile(bad)
    bad.write_bytes(raw[:12])  # the stub a failed llama-perplexity run leaves
    with pytest.raises(KLDBaseFormatError, match="recompute the baseline"):
        KLDBaseFile(bad)
    bad.write_bytes(b"_LOGITS_" + raw[8:])
    with pytest.raises(KLDBaseFormatError, match="magic"):
        KLDBaseFile(bad)
    bad.write_bytes(raw[:8] + struct.pack("<iii", C, V, 0) + raw[20:])
    with pytest.raises(KLDBaseFormatError):
        KLDBaseFile(bad)


def test_atomic_writer_leaves_nothing_on_exception(tmp_path):
    rng = np.random.default_rng(8)
    p = tmp_path / "base.kld"
    tokens = rng.integers(0, V, (NCH, C)).astype(np.int32)
    with pytest.raises(RuntimeError, match="boom"):
        with KLDBaseWriter(p, C, V, tokens) as w:
            w.write_chunk(rng.standard_normal((S, V)).astype(F32))
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    bad = np.zeros((S, V), F32)
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        with KLDBaseWriter(p, C, V, tokens) as w:
            w.write_chunk(bad)
    assert os.listdir(tmp_path) == []


def test_atomic_writer_incomplete_keeps_existing_file(tmp_path):
    rng = np.random.default_rng(9)
    p = tmp_path / "base.kld"
    p.write_bytes(b"previous")
    tokens = rng.integers(0, V, (NCH, C)).astype(np.int32)
    with pytest.raises(KLDBaseFormatError, match="only 1 of 2 chunks"):
        with KLDBaseWriter(p, C, V, tokens) as w:
            w.write_chunk(rng.standard_normal((S, V)).astype(F32))
    assert os.listdir(tmp_path) == ["base.kld"] and p.read_bytes() == b"previous"


def test_writer_rejects_bad_input(tmp_path):
    tokens = np.zeros((1, C), np.int32)
    with pytest.raises(ValueError):
        KLDBaseWriter(tmp_path / "x", C, V, np.zeros((1, C + 1), np.int32))
    with pytest.raises(ValueError, match="shape"):
        with KLDBaseWriter(tmp_path / "x", C, V, tokens) as w:
            w.write_chunk(np.zeros((S + 1, V), F32))
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------
# fidelity: the llama-perplexity (ik) reference base file
# ---------------------------------------------------------------------------

needs_fixture = pytest.mark.skipif(
    not FIXTURE.is_file(), reason=f"reference fixture {FIXTURE} not present"
)


@needs_fixture
def test_fixture_header():
    with KLDBaseFile(FIXTURE) as f:
        assert (f.n_ctx, f.n_vocab, f.n_chunk, f.n_scored) == (128, 49152, 4, 63)
        assert f.tokens[:, 0].tolist() == [504, 351, 28269, 3246]  # no BOS patching
        scale, mlp, q = f.chunk(0)
        assert np.all(np.abs(scale - F32(24 / 65535)) < 1e-9)  # every row spans R = 24
        assert np.all(mlp < -24)


@needs_fixture
def test_fixture_ppl_base_matches_llama_perplexity():
    # Expected, from variant-blk3-attn_output-q4_1.stdout.txt:
    #   Mean PPL(base)                :  13.332524 ±   2.380710
    s_b = s_b2 = 0.0
    n = 0
    with KLDBaseFile(FIXTURE) as f:
        for i in range(f.n_chunk):
            lp = f.chunk_logprobs(i)
            t = f.targets(i)
            nll_base = -lp[np.arange(f.n_scored), t]
            for v in nll_base:
                s_b += float(v)
                s_b2 += float(F32(v * v))
                n += 1
    mu, sigma = mean_and_uncertainty(s_b, s_b2, n)
    ppl = math.exp(mu)
    assert "%10.6f ± %10.6f" % (ppl, ppl * sigma) == " 13.332524 ±   2.380710"
    # the base run itself printed "13.3326 +/- 2.38072" from the unquantised logits
    assert abs(ppl - 13.3326) < 1e-4


@needs_fixture
def test_fixture_self_kld_is_zero():
    acc = KLDAccumulator()
    with KLDBaseFile(FIXTURE) as f:
        for i in range(f.n_chunk):
            lp = f.chunk_logprobs(i)
            acc.add_chunk(lp, lp, f.targets(i))
    st = acc.stats()
    assert st.n_tokens == 252
    assert "Mean PPL(base)                :  13.332524 ±   2.380710\n" in st.format_block()
    assert st.same_top_p == 100.0
    for name in (
        "mean_kld",
        "max_kld",
        "kld_p99_9",
        "kld_p99",
        "kld_p95",
        "kld_p90",
        "median_kld",
        "kld_p10",
        "kld_p5",
        "kld_p1",
        "kld_p0_1",
        "min_kld",
    ):
        assert abs(getattr(st, name)) < 1e-4, name
    for name in ("mean_dp", "max_dp", "min_dp", "median_dp", "rms_dp"):
        assert abs(getattr(st, name)) < 0.01, name  # percent
    assert abs(st.ln_ratio) < 1e-5 and abs(st.ppl_ratio - 1) < 1e-5
