"""llama-perplexity's statistics, reimplemented in pure numpy.

Everything here follows ``docs/llama-perplexity.md``:

* docs/llama-perplexity.md#ppl -- the per-token NLL and the PPL of a plain (or base-writing) run
  (:class:`PPLAccumulator`);
* docs/llama-perplexity.md#kld-token -- the per-token quantities of a ``--kl-divergence`` run
  (:func:`kld_token_stats`) and their float64 accumulators
  (:class:`KLDAccumulator`);
* docs/llama-perplexity.md#stat-functions -- the statistical helpers MU, COV, PCT and MED
  (:func:`mean_and_uncertainty`, :func:`covariance`, :func:`percentile`,
  :func:`median`);
* docs/llama-perplexity.md#statistics, #kld-output -- every statistic of the final block, its ± and
  the exact printed text (:class:`KLDStats`, :data:`FIELDS`, :data:`TABLE_HEADER`).

Bit-exactness (docs/llama-perplexity.md#bit-exactness): values are kept in float32 wherever the C
code uses ``float``; C ``expf`` is emulated as ``f32(exp(float64(x)))``; every sum the C code
does sequentially in float64 (sum of exp terms, KLD terms, the accumulators) is
done sequentially in index/token order here too, with ``np.cumsum`` (never the
pairwise ``np.sum``).  The only Python loops are over row *blocks* (to bound
memory), never over tokens or vocabulary entries.

This module imports nothing from ``engine/``; :mod:`pytest_quantbench.kldbase`
reuses its float32 primitives (:func:`expf`, :func:`row_max_lse`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from typing import NamedTuple

import numpy as np

__all__ = [
    "KLD_LOG_PROB_CUTOFF",
    "PERCENTILE_FRACTIONS",
    "TABLE_HEADER",
    "FieldInfo",
    "FIELDS",
    "FIELD_LABELS",
    "TokenStats",
    "KLDStats",
    "PPLAccumulator",
    "KLDAccumulator",
    "expf",
    "row_blocks",
    "row_max_lse",
    "check_finite",
    "kld_token_stats",
    "CHUNK_MEAN_KEYS",
    "CHUNK_ERROR_OF",
    "chunk_mean_errors",
    "mean_and_uncertainty",
    "covariance",
    "percentile",
    "median",
    "format_kld_output",
    "MU",
    "COV",
    "PCT",
    "MED",
]

#: Base log-probs at or below this value are left out of the KLD sum
#: (docs/llama-perplexity.md#kld-token).
KLD_LOG_PROB_CUTOFF = np.float32(-16.0)

#: The float32 percentile fractions llama-perplexity uses (docs/llama-perplexity.md#stat-functions).
PERCENTILE_FRACTIONS = {
    "p99_9": np.float32(0.999),
    "p99": np.float32(0.99),
    "p95": np.float32(0.95),
    "p90": np.float32(0.90),
    "p75": np.float32(0.75),
    "p25": np.float32(0.25),
    "p10": np.float32(0.10),
    "p5": np.float32(0.05),
    "p1": np.float32(0.01),
    "p0_1": np.float32(0.001),
}

#: The per-chunk table header of a KLD run (docs/llama-perplexity.md#kld-output), without its
#: newline.
TABLE_HEADER = (
    "chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence"
    "              \u0394p RMS            Same top p"
)

# Largest number of float64 temporaries (rows x vocab) materialised at once.
_BLOCK_ELEMS = 1 << 20

_F32 = np.float32
_F64 = np.float64


# ---------------------------------------------------------------------------
# float32 / C emulation primitives (docs/llama-perplexity.md#bit-exactness)
# ---------------------------------------------------------------------------


def expf(x: np.ndarray) -> np.ndarray:
    """C ``expf`` emulated as ``f32(exp(float64(x)))`` (docs/llama-perplexity.md#bit-exactness).

    ``x``: any float array (float32 expected).  Returns float32 of the same shape.
    Matches glibc ``expf`` except for rare 1-ulp cases that never reach printed
    digits; numpy's own float32 ``exp`` is *not* used because it differs more often.
    """
    return np.exp(np.asarray(x, dtype=_F64)).astype(_F32)


def row_blocks(n_rows: int, n_cols: int, max_elems: int | None = None) -> Iterator[slice]:
    """Yield row slices covering ``range(n_rows)`` with at most ~``max_elems`` elements each.

    ``max_elems`` defaults to the module's ``_BLOCK_ELEMS`` (2**20); a single row is
    never split.

    Used to bound the float64 temporaries of the vectorised per-row computations;
    blocking by rows never changes any result (rows are independent).
    """
    if max_elems is None:
        max_elems = _BLOCK_ELEMS
    step = max(1, max_elems // max(1, n_cols))
    for start in range(0, n_rows, step):
        yield slice(start, min(n_rows, start + step))


_POOL: ThreadPoolExecutor | None = None


def for_row_blocks(n_rows: int, n_cols: int, fn: Callable[[slice], None]) -> None:
    """Call ``fn(rows)`` for every block of :func:`row_blocks`, on a thread pool.

    Rows are independent and each block writes only its own rows, so the results are identical
    to a sequential loop; numpy releases the GIL in the large ufunc calls, so blocks run on
    several cores (the statistics must not dominate a chunk when decoding runs on a GPU).
    Exceptions of ``fn`` propagate.
    """
    global _POOL
    blocks = list(row_blocks(n_rows, n_cols))
    if len(blocks) <= 1:
        for blk in blocks:
            fn(blk)
        return
    if _POOL is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        _POOL = ThreadPoolExecutor(
            max_workers=max(1, min(8, workers)), thread_name_prefix="quantbench-metrics"
        )
    for _ in _POOL.map(fn, blocks):
        pass


def _ordered_row_sum(terms: np.ndarray) -> np.ndarray:
    """Sequential float64 sum of each row of ``terms`` (S, V) in index order → float64 (S,).

    Equivalent to C's ``double s = 0; for (i...) s += (double)terms[i]``:
    ``np.cumsum`` is a strict left-to-right accumulation; the final ``+ 0.0`` turns
    a ``-0.0`` (only possible if every term is a signed zero) into C's ``+0.0``.
    """
    if terms.shape[1] == 0:
        return np.zeros(terms.shape[0], dtype=_F64)
    return np.cumsum(terms, axis=1, dtype=_F64)[:, -1] + 0.0


def _packed_rows(values: np.ndarray, rows: np.ndarray, n_rows: int) -> np.ndarray:
    """The ``values`` of each row left-aligned in a dense (n_rows, K) array padded with +0.0.

    ``values``: (N,) in row-major order; ``rows``: int (N,) non-decreasing row of each value.
    Only the terms a sum keeps are computed (for llama-perplexity's KLD about a fifth of the
    vocabulary), and the padding adds +0.0 to the sequential sum, which changes nothing but the
    sign of an all-zero sum (which :func:`_ordered_row_sum` makes +0.0 anyway).
    """
    counts = np.bincount(rows, minlength=n_rows)
    starts = np.cumsum(counts) - counts
    packed = np.zeros((n_rows, int(counts.max(initial=0))), dtype=values.dtype)
    packed[rows, np.arange(rows.size) - starts[rows]] = values
    return packed


def _seq_add(acc: float, values: np.ndarray) -> float:
    """``acc`` plus ``values`` added one by one in order in float64 (a C ``double +=`` loop)."""
    if values.size == 0:
        return acc
    v = np.concatenate((np.array([acc], dtype=_F64), np.asarray(values, dtype=_F64).ravel()))
    return float(np.cumsum(v)[-1])


def check_finite(x: np.ndarray, what: str, chunk: int | None = None) -> None:
    """Raise ``ValueError`` if the 2-D array ``x`` (rows = positions) holds NaN or ±inf.

    The message names ``what`` (e.g. ``"logits"``), the chunk (if given, as the
    1-based chunk number) and how many of the positions (rows) are affected, plus
    the first bad position, so callers can turn it into an item *error*.
    """
    x = np.atleast_1d(np.asarray(x))
    bad_rows = ~np.isfinite(x).reshape(x.shape[0], -1).all(axis=1)
    n_bad = int(np.count_nonzero(bad_rows))
    if n_bad:
        where = f"chunk {chunk}: " if chunk is not None else ""
        first = int(np.flatnonzero(bad_rows)[0])
        raise ValueError(
            f"{where}{n_bad} of {x.shape[0]} scored positions have non-finite {what} "
            f"(NaN or inf); first at position {first}"
        )


def row_max_lse(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-row argmax, max and log-sum-exp of float32 logits, as llama-perplexity computes them.

    ``logits``: float32 (S, V), finite.  Returns ``(imax, mx, lse)``:

    * ``imax`` int64 (S,) -- first index of the maximum (C's strict ``>`` scan);
    * ``mx`` float32 (S,) -- ``l[imax]``;
    * ``lse`` float32 (S,) -- ``f32(ln Σ_i float64(expf(f32(l_i − mx))))`` with the
      sum sequential in index order (docs/llama-perplexity.md#ppl, #base-file, #kld-token).
    """
    logits = np.asarray(logits)
    n_rows, n_vocab = logits.shape
    imax = np.argmax(logits, axis=1)
    mx = logits[np.arange(n_rows), imax].astype(_F32)
    lse = np.empty(n_rows, dtype=_F32)

    def block(blk: slice) -> None:
        shifted = (logits[blk] - mx[blk, None]).astype(_F32, copy=False)
        z = _ordered_row_sum(expf(shifted))
        lse[blk] = np.log(z).astype(_F32)

    for_row_blocks(n_rows, n_vocab, block)
    return imax, mx, lse


# ---------------------------------------------------------------------------
# statistical functions (docs/llama-perplexity.md#stat-functions)
# ---------------------------------------------------------------------------

_NEG_NAN = -math.nan  # x86's "default NaN" (sign bit set) prints as "-nan" in C


def _cdiv(a: float, b: float) -> float:
    """IEEE double division as C does it (x/0 → ±inf, 0/0 → -nan), no exception."""
    if b != 0.0:
        return a / b
    if a == 0.0 or math.isnan(a):
        return _NEG_NAN
    return math.copysign(math.inf, a) * math.copysign(1.0, b)


def _csqrt(x: float) -> float:
    """C ``sqrt``: negative → -nan (as glibc on x86 prints it), no exception."""
    if x < 0.0:
        return _NEG_NAN
    return math.sqrt(x)


def _cexp(x: float) -> float:
    """C ``exp``: overflow → inf instead of ``OverflowError``."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _cmul(a: float, b: float) -> float:
    """IEEE double multiply (inf·0 → -nan like x86); Python already does this, kept for clarity."""
    if (math.isinf(a) and b == 0.0) or (math.isinf(b) and a == 0.0):
        return _NEG_NAN
    return a * b


def mean_and_uncertainty(s: float, s2: float, n: int) -> tuple[float, float]:
    """MU(s, s2, n) → (μ, σ) of docs/llama-perplexity.md#stat-functions (llama-perplexity's
    ``mean_and_uncertainty``).

    ``s``/``s2``: float64 sums of the values and of their squares; ``n``: count.
    n < 1 → (0, 0).  Otherwise μ = s/n, v = s2/n − μ², and σ = sqrt(v/(n−1)) — the
    standard error of the mean — if v > 0 **and** n > 10, else 0.
    Returns plain Python floats.
    """
    if n < 1:
        return 0.0, 0.0
    f = float(s) / n
    v = float(s2) / n - f * f
    sigma = math.sqrt(v / (n - 1)) if (v > 0 and n > 10) else 0.0
    return f, sigma


def covariance(a: float, b: float, ab: float, n: int) -> float:
    """COV(a, b, ab, n) of docs/llama-perplexity.md#stat-functions: 0 if n < 10, else
    ``(ab/n − (a/n)(b/n))/(n−1)``.

    ``a``, ``b``, ``ab``: float64 sums of x, y and x·y; ``n``: count.  Python float.
    """
    if n < 10:
        return 0.0
    return (float(ab) / n - (float(a) / n) * (float(b) / n)) / (n - 1)


def _round_f32_exact(x: Fraction) -> np.float32:
    """Correctly round an exact rational to float32 (single rounding, RNE)."""
    d = float(x)  # correctly rounded double
    f = np.float32(d)
    if float(f) == d or math.isinf(d) or d == 0.0:
        return f
    # d may sit exactly on a float32 midpoint because of the double rounding step:
    lo = np.nextafter(f, np.float32(-np.inf)) if float(f) > d else f
    hi = f if float(f) > d else np.nextafter(f, np.float32(np.inf))
    mid = (Fraction(float(lo)) + Fraction(float(hi))) / 2
    if x < mid:
        return lo
    if x > mid:
        return hi
    return lo if (int(lo.view(np.uint32)) & 1) == 0 else hi


def percentile(x_sorted: np.ndarray, fraction: float, *, fma: bool = False) -> np.float32:
    """PCT(x, f) of docs/llama-perplexity.md#stat-functions, float32 throughout, on ``x_sorted``
    (float32, ascending).

    ``fraction`` is converted to a float32 literal first (llama uses ``0.999f`` …).
    f ≤ 0 → x[0]; f ≥ 1 → x[last]; otherwise ``p = f32(f·f32(len−1))``, ``k = floor(p)``,
    ``r = f32(p − k)`` and the result is ``f32(f32((1−r)·x[k]) + f32(r·x[min(k+1, last)]))``.

    ``fma=True`` emulates a build that contracts the interpolation (docs/llama-perplexity.md#fma
    "possibly in PCT's interpolation") the way GCC does for ``a*b + c*d``: the first product is
    fused, i.e. ``fma(f32(1−r), x[k], f32(r·x[k+1]))`` with a single rounding.

    Raises ``ValueError`` on an empty array.  Returns a numpy float32.
    """
    x = np.asarray(x_sorted, dtype=_F32)
    n = x.shape[0]
    if n == 0:
        raise ValueError("percentile of an empty list")
    f = _F32(fraction)
    if f <= 0:
        return x[0]
    if f >= 1:
        return x[-1]
    p = _F32(f * _F32(n - 1))
    k = int(math.floor(float(p)))
    r = _F32(p - _F32(k))
    one_minus_r = _F32(_F32(1) - r)
    x0 = x[k]
    x1 = x[min(k + 1, n - 1)]
    b = _F32(r * x1)
    if fma:
        return _round_f32_exact(
            Fraction(float(one_minus_r)) * Fraction(float(x0)) + Fraction(float(b))
        )
    a = _F32(one_minus_r * x0)
    return _F32(a + b)


def median(x_sorted: np.ndarray) -> np.float32:
    """MED(x) of docs/llama-perplexity.md#stat-functions on ``x_sorted`` (float32, ascending) —
    *not* PCT(0.5).

    Even length: ``f32(0.5·f32(x[n/2] + x[n/2−1]))``; odd length: ``x[n/2]``.
    Raises ``ValueError`` on an empty array.  Returns a numpy float32.
    """
    x = np.asarray(x_sorted, dtype=_F32)
    n = x.shape[0]
    if n == 0:
        raise ValueError("median of an empty list")
    if n % 2 == 0:
        return _F32(_F32(0.5) * _F32(x[n // 2] + x[n // 2 - 1]))
    return x[n // 2]


MU = mean_and_uncertainty
COV = covariance
PCT = percentile
MED = median


# ---------------------------------------------------------------------------
# plain / base run PPL (docs/llama-perplexity.md#ppl)
# ---------------------------------------------------------------------------


class PPLAccumulator:
    """PPL of a plain or base-writing llama-perplexity run
    (docs/llama-perplexity.md#ppl, #ppl-output).

    Feed one chunk's per-token NLL values (natural-log units, any float dtype,
    shape (S,)) per :meth:`add` call.  For a run that writes a base file the
    values are ``f32(f32(mx + lse) − l_t)`` (see
    :func:`pytest_quantbench.kldbase.base_nll`).  Sums are float64, sequential in
    token order: ``nll += v``, ``nll2 += v·v`` (v as float64).
    """

    def __init__(self) -> None:
        self.nll = 0.0
        self.nll2 = 0.0
        self.count = 0
        self.n_chunks = 0

    def add(self, nll: np.ndarray) -> None:
        """Add one chunk's per-token NLL values (1-D array, nats).

        Raises ``ValueError`` if any value is NaN/inf (naming the chunk number).
        """
        v = np.asarray(nll, dtype=_F64).ravel()
        if not np.isfinite(v).all():
            n_bad = int(np.count_nonzero(~np.isfinite(v)))
            raise ValueError(
                f"chunk {self.n_chunks + 1}: {n_bad} of {v.size} scored positions have "
                "a non-finite NLL (NaN or inf)"
            )
        self.nll = _seq_add(self.nll, v)
        self.nll2 = _seq_add(self.nll2, v * v)
        self.count += int(v.size)
        self.n_chunks += 1

    def ppl(self) -> tuple[float, float]:
        """(PPL, ±) with PPL = exp(m), ± = PPL·sqrt(var/(count−1)) (docs/llama-perplexity.md#ppl).

        m = nll/count, var = nll2/count − m².  ± is ``nan`` when var ≤ 0 (the tool
        then prints ``Unexpected negative standard deviation of log(prob)``) or
        count < 2.  Raises ``ValueError`` if nothing was added.
        """
        if self.count == 0:
            raise ValueError("no tokens accumulated")
        m = self.nll / self.count
        var = self.nll2 / self.count - m * m
        ppl = _cexp(m)
        if var > 0 and self.count > 1:
            return ppl, ppl * math.sqrt(var / (self.count - 1))
        return ppl, math.nan

    def progress_entry(self) -> str:
        """The cumulative progress entry ``[%d]%.4lf,`` after the last added chunk
        (docs/llama-perplexity.md#ppl-output)."""
        return "[%d]%.4f," % (self.n_chunks, _cexp(self.nll / self.count))

    def final_line(self, n_ctx: int, *, style: str = "ik") -> str:
        """The ``Final estimate`` line (no newline), docs/llama-perplexity.md#ppl-output.

        ``style="ik"``: ``Final estimate: PPL over %d chunks for n_ctx=%d = %.4lf +/- %.5lf``;
        ``style="ml"``: ``Final estimate: PPL = %.4lf +/- %.5lf``.  With var ≤ 0 it is
        ``Unexpected negative standard deviation of log(prob)`` instead.
        """
        ppl, err = self.ppl()
        if math.isnan(err):
            return "Unexpected negative standard deviation of log(prob)"
        if style == "ik":
            return "Final estimate: PPL over %d chunks for n_ctx=%d = %.4f +/- %.5f" % (
                self.n_chunks,
                n_ctx,
                ppl,
                err,
            )
        if style == "ml":
            return "Final estimate: PPL = %.4f +/- %.5f" % (ppl, err)
        raise ValueError(f"unknown style {style!r} (expected 'ik' or 'ml')")


# ---------------------------------------------------------------------------
# per-token quantities of a KLD run (docs/llama-perplexity.md#kld-token)
# ---------------------------------------------------------------------------


class TokenStats(NamedTuple):
    """Per-token quantities of one chunk of a KLD run (docs/llama-perplexity.md#kld-token); all
    arrays (S,)."""

    nll: np.ndarray  #: float32, f32(A − l_t), nats
    nll_base: np.ndarray  #: float32, −lp_t, nats
    kld: np.ndarray  #: float64, Σ_{lp_i > −16} f32(expf(lp_i)·f32(f32(lp_i − l_i) + A)), nats
    same_top: np.ndarray  #: bool, argmax(l) == argmax(lp)
    dp: np.ndarray  #: float32, f32(expf(−nll) − expf(−nll_base)), probability (not %)


def kld_token_stats(
    logits: np.ndarray,
    base_logprobs: np.ndarray,
    targets: np.ndarray,
    *,
    chunk: int | None = None,
) -> TokenStats:
    """Per-token quantities of docs/llama-perplexity.md#kld-token, vectorised over the whole (S, V)
    block.

    ``logits``: float32 (S, V) of the model under test (Q) at the scored positions;
    ``base_logprobs``: float32 (S, V) decoded base log-probs (see
    :func:`pytest_quantbench.kldbase.decode_rows`); ``targets``: int (S,), token ids
    in [0, V).  ``chunk`` (1-based) only labels error messages.

    Raises ``ValueError`` for mismatched shapes, out-of-range targets, or NaN/inf in
    either input (the message names the chunk and the count of bad positions).
    """
    logits = np.asarray(logits)
    base = np.asarray(base_logprobs)
    targets = np.asarray(targets)
    if logits.ndim != 2 or base.shape != logits.shape:
        raise ValueError(
            f"logits {logits.shape} and base log-probs {base.shape} must both be (S, V)"
        )
    n_rows, n_vocab = logits.shape
    if targets.shape != (n_rows,):
        raise ValueError(f"targets must have shape ({n_rows},), got {targets.shape}")
    if n_rows and (targets.min() < 0 or targets.max() >= n_vocab):
        raise ValueError(f"target token ids must lie in [0, {n_vocab})")
    logits = logits.astype(_F32, copy=False)
    base = base.astype(_F32, copy=False)
    check_finite(logits, "logits", chunk)
    check_finite(base, "base log-probs", chunk)
    targets = targets.astype(np.intp, copy=False)
    rows = np.arange(n_rows)

    imax, mx, lse = row_max_lse(logits)
    a = mx + lse  # A = f32(mx + lse)
    nll = a - logits[rows, targets]  # f32(A − l_t)
    nll_base = -base[rows, targets]
    imax_b = np.argmax(base, axis=1)

    kld = np.empty(n_rows, dtype=_F64)

    def block(blk: slice) -> None:
        lp = base[blk]
        rows, cols = np.nonzero(lp > KLD_LOG_PROB_CUTOFF)  # the summed terms, in row-major order
        lpk = lp[rows, cols]
        inner = (lpk - logits[blk][rows, cols]) + a[blk][rows]  # f32(f32(lp_i − l_i) + A)
        kld[blk] = _ordered_row_sum(_packed_rows(expf(lpk) * inner, rows, lp.shape[0]))

    for_row_blocks(n_rows, n_vocab, block)

    same_top = imax == imax_b
    dp = expf(-nll) - expf(-nll_base)
    return TokenStats(nll=nll, nll_base=nll_base, kld=kld, same_top=same_top, dp=dp)


# ---------------------------------------------------------------------------
# statistics (docs/llama-perplexity.md#statistics)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldInfo:
    """Metadata of one :class:`KLDStats` field.

    ``label``: llama-perplexity's printed label (trimmed; ``±`` fields add `` ±``);
    ``unit``: ``""`` (ratio / PPL), ``"nats"``, ``"%"`` (printed as percent) or
    ``"count"``; ``error_of``: for ± fields, the value field they qualify.
    """

    name: str
    label: str
    unit: str
    error_of: str | None = None


def _fields() -> tuple[FieldInfo, ...]:
    out: list[FieldInfo] = []

    def val(name: str, label: str, unit: str, err: bool = False) -> None:
        out.append(FieldInfo(name, label, unit))
        if err:
            out.append(FieldInfo(name + "_err", label + " \u00b1", unit, name))

    val("ppl_q", "Mean PPL(Q)", "", True)
    val("ppl_base", "Mean PPL(base)", "", True)
    val("cor_ln_ppl", "Cor(ln(PPL(Q)), ln(PPL(base)))", "%")
    val("ln_ratio", "Mean ln(PPL(Q)/PPL(base))", "nats", True)
    val("ppl_ratio", "Mean PPL(Q)/PPL(base)", "", True)
    val("ppl_diff", "Mean PPL(Q)-PPL(base)", "", True)
    val("mean_kld", "Mean KLD", "nats", True)
    for name, label in (
        ("max_kld", "Maximum KLD"),
        ("kld_p99_9", "99.9% KLD"),
        ("kld_p99", "99.0% KLD"),
        ("kld_p95", "95.0% KLD"),
        ("kld_p90", "90.0% KLD"),
        ("median_kld", "Median KLD"),
        ("kld_p10", "10.0% KLD"),
        ("kld_p5", "5.0% KLD"),
        ("kld_p1", "1.0% KLD"),
        ("kld_p0_1", "0.1% KLD"),
        ("min_kld", "Minimum KLD"),
    ):
        val(name, label, "nats")
    val("mean_dp", "Mean \u0394p", "%", True)
    for name, label in (
        ("max_dp", "Maximum \u0394p"),
        ("dp_p99_9", "99.9% \u0394p"),
        ("dp_p99", "99.0% \u0394p"),
        ("dp_p95", "95.0% \u0394p"),
        ("dp_p90", "90.0% \u0394p"),
        ("dp_p75", "75.0% \u0394p"),
        ("median_dp", "Median \u0394p"),
        ("dp_p25", "25.0% \u0394p"),
        ("dp_p10", "10.0% \u0394p"),
        ("dp_p5", "5.0% \u0394p"),
        ("dp_p1", "1.0% \u0394p"),
        ("dp_p0_1", "0.1% \u0394p"),
        ("min_dp", "Minimum \u0394p"),
    ):
        val(name, label, "%")
    val("rms_dp", "RMS \u0394p", "%", True)
    val("same_top_p", "Same top p", "%", True)
    val("n_tokens", "Scored tokens", "count")
    return tuple(out)


#: Every :class:`KLDStats` field, in block order, with its llama-perplexity label.
FIELDS: tuple[FieldInfo, ...] = _fields()
#: ``{field name: llama-perplexity label}``.
FIELD_LABELS: dict[str, str] = {f.name: f.label for f in FIELDS}


def _fmt(spec: str, x: float) -> str:
    """``spec % x`` with C printf's rendering of a sign-bit NaN (``-nan``)."""
    s = spec % x
    if math.isnan(x) and math.copysign(1.0, x) < 0:
        width = len(s)
        s = "-nan".rjust(width) if width > 4 else "-nan"
    return s


@dataclass(frozen=True)
class KLDStats:
    """All statistics of llama-perplexity's KLD block (docs/llama-perplexity.md#statistics), as
    Python floats.

    PPL fields are perplexities; ``ln_ratio*`` and ``*kld*`` are nats;
    ``cor_ln_ppl`` and every ``*dp*`` / ``same_top_p*`` field are **percent**, as
    printed (Δp = p_Q(target) − p_base(target), signed).  ``*_err`` is the ± of the
    field it suffixes.  ``n_tokens`` is the count n.  Formulas: docs/llama-perplexity.md#statistics.
    Values can be NaN/inf exactly where C's would be (e.g. ``rms_dp_err`` when
    every Δp is 0).
    """

    ppl_q: float
    ppl_q_err: float
    ppl_base: float
    ppl_base_err: float
    cor_ln_ppl: float
    ln_ratio: float
    ln_ratio_err: float
    ppl_ratio: float
    ppl_ratio_err: float
    ppl_diff: float
    ppl_diff_err: float
    mean_kld: float
    mean_kld_err: float
    max_kld: float
    kld_p99_9: float
    kld_p99: float
    kld_p95: float
    kld_p90: float
    median_kld: float
    kld_p10: float
    kld_p5: float
    kld_p1: float
    kld_p0_1: float
    min_kld: float
    mean_dp: float
    mean_dp_err: float
    max_dp: float
    dp_p99_9: float
    dp_p99: float
    dp_p95: float
    dp_p90: float
    dp_p75: float
    median_dp: float
    dp_p25: float
    dp_p10: float
    dp_p5: float
    dp_p1: float
    dp_p0_1: float
    min_dp: float
    rms_dp: float
    rms_dp_err: float
    same_top_p: float
    same_top_p_err: float
    n_tokens: int

    def as_dict(self) -> dict[str, float | int]:
        """All fields as ``{name: float|int}`` with builtin types only (xdist-safe)."""
        return {
            f.name: (
                int(getattr(self, f.name)) if f.name == "n_tokens" else float(getattr(self, f.name))
            )
            for f in dataclasses.fields(self)
        }

    def format_block(self) -> str:
        """The final statistics block, byte-for-byte as llama-perplexity prints it
        (docs/llama-perplexity.md#kld-output).

        From ``====== Perplexity statistics ======`` through the ``Same top p`` line,
        each line ending in ``\\n`` (blank separator lines included).  The tool prints
        it only when n ≥ 100; this method formats it regardless.  Encode the result
        as UTF-8 to get the tool's bytes (``±`` = C2 B1, ``Δ`` = CE 94).
        """
        pm = " \u00b1 "
        dl = "\u0394"
        f10 = "%10.6f"
        lines = [
            "====== Perplexity statistics ======",
            "Mean PPL(Q)                   : "
            + _fmt(f10, self.ppl_q)
            + pm
            + _fmt(f10, self.ppl_q_err),
            "Mean PPL(base)                : "
            + _fmt(f10, self.ppl_base)
            + pm
            + _fmt(f10, self.ppl_base_err),
            "Cor(ln(PPL(Q)), ln(PPL(base))): " + _fmt("%6.2f", self.cor_ln_ppl) + "%",
            "Mean ln(PPL(Q)/PPL(base))     : "
            + _fmt(f10, self.ln_ratio)
            + pm
            + _fmt(f10, self.ln_ratio_err),
            "Mean PPL(Q)/PPL(base)         : "
            + _fmt(f10, self.ppl_ratio)
            + pm
            + _fmt(f10, self.ppl_ratio_err),
            "Mean PPL(Q)-PPL(base)         : "
            + _fmt(f10, self.ppl_diff)
            + pm
            + _fmt(f10, self.ppl_diff_err),
            "",
            "====== KL divergence statistics ======",
            "Mean    KLD: " + _fmt(f10, self.mean_kld) + pm + _fmt(f10, self.mean_kld_err),
            "Maximum KLD: " + _fmt(f10, self.max_kld),
            "99.9%   KLD: " + _fmt(f10, self.kld_p99_9),
            "99.0%   KLD: " + _fmt(f10, self.kld_p99),
            "95.0%   KLD: " + _fmt(f10, self.kld_p95),
            "90.0%   KLD: " + _fmt(f10, self.kld_p90),
            "Median  KLD: " + _fmt(f10, self.median_kld),
            "10.0%   KLD: " + _fmt(f10, self.kld_p10),
            " 5.0%   KLD: " + _fmt(f10, self.kld_p5),
            " 1.0%   KLD: " + _fmt(f10, self.kld_p1),
            " 0.1%   KLD: " + _fmt(f10, self.kld_p0_1),
            "Minimum KLD: " + _fmt(f10, self.min_kld),
            "",
            "====== Token probability statistics ======",
            f"Mean    {dl}p: "
            + _fmt("%6.3f", self.mean_dp)
            + pm
            + _fmt("%5.3f", self.mean_dp_err)
            + " %",
            f"Maximum {dl}p: " + _fmt("%6.3f", self.max_dp) + "%",
            f"99.9%   {dl}p: " + _fmt("%6.3f", self.dp_p99_9) + "%",
            f"99.0%   {dl}p: " + _fmt("%6.3f", self.dp_p99) + "%",
            f"95.0%   {dl}p: " + _fmt("%6.3f", self.dp_p95) + "%",
            f"90.0%   {dl}p: " + _fmt("%6.3f", self.dp_p90) + "%",
            f"75.0%   {dl}p: " + _fmt("%6.3f", self.dp_p75) + "%",
            f"Median  {dl}p: " + _fmt("%6.3f", self.median_dp) + "%",
            f"25.0%   {dl}p: " + _fmt("%6.3f", self.dp_p25) + "%",
            f"10.0%   {dl}p: " + _fmt("%6.3f", self.dp_p10) + "%",
            f" 5.0%   {dl}p: " + _fmt("%6.3f", self.dp_p5) + "%",
            f" 1.0%   {dl}p: " + _fmt("%6.3f", self.dp_p1) + "%",
            f" 0.1%   {dl}p: " + _fmt("%6.3f", self.dp_p0_1) + "%",
            f"Minimum {dl}p: " + _fmt("%6.3f", self.min_dp) + "%",
            f"RMS {dl}p    : "
            + _fmt("%6.3f", self.rms_dp)
            + pm
            + _fmt("%5.3f", self.rms_dp_err)
            + " %",
            "Same top p: "
            + _fmt("%6.3f", self.same_top_p)
            + pm
            + _fmt("%5.3f", self.same_top_p_err)
            + " %",
        ]
        return "\n".join(lines) + "\n"


def format_kld_output(rows: list[str], stats: KLDStats | None) -> str:
    """The whole stdout of an ik KLD run: table (header once) and, if n ≥ 100, the block.

    ``rows``: the strings from :meth:`KLDAccumulator.chunk_row` (no newlines).
    Layout (docs/llama-perplexity.md#kld-output): ``\\n``, header, rows, one ``\\n``, then the
    block.
    """
    out = "\n" + TABLE_HEADER + "\n" + "".join(r + "\n" for r in rows) + "\n"
    if stats is not None and stats.n_tokens >= 100:
        out += stats.format_block()
    return out


#: Keys of :attr:`KLDAccumulator.chunk_means`, in the order it keeps them.
CHUNK_MEAN_KEYS: tuple[str, ...] = ("kld", "dp", "same_top", "ln_ratio", "dp2")

#: The chunk-level uncertainty columns (:meth:`KLDAccumulator.chunk_errors`) and the
#: llama-perplexity value each qualifies.
CHUNK_ERROR_OF: dict[str, str] = {
    "mean_kld_err_chunks": "mean_kld",
    "mean_dp_err_chunks": "mean_dp",
    "same_top_p_err_chunks": "same_top_p",
}


def chunk_mean_errors(chunk_means: np.ndarray) -> float:
    """Batch-means standard error of a mean from its per-chunk means.

    ``chunk_means``: float (k,), one mean per chunk of equal size. Returns
    ``std(chunk_means, ddof=1) / sqrt(k)`` as a Python float; NaN when k < 2.

    Tokens of one chunk share their context, so they are correlated and llama-perplexity's ±
    (MU of docs/llama-perplexity.md#stat-functions, which treats every token as independent)
    understates the uncertainty of a mean; the means of disjoint chunks are close to independent,
    and their spread gives an honest standard error (the batch-means method; see
    ``docs/llama-perplexity.md#uncertainty``).
    """
    x = np.asarray(chunk_means, dtype=_F64).ravel()
    if x.size < 2:
        return math.nan
    return float(np.std(x, ddof=1) / math.sqrt(x.size))


class KLDAccumulator:
    """Accumulates a ``--kl-divergence`` run chunk by chunk
    (docs/llama-perplexity.md#kld-token – #kld-output).

    Per token it adds (float64, in token order): S_n, S_n2 (nll, f32(nll²)); S_b,
    S_b2 (nll_base, f32(nll_base²)); S_nb (f32(nll·nll_base)); S_k, S_k2 (KLD,
    KLD² in float64); S_p, S_p2, S_p4 (Δp, d2 = f32(Δp²), d2²); N_top; n.  It also
    keeps the float32 lists ``kld[] = f32(KLD_tok)`` and ``dp[] = Δp``.

    ``fma``: emulate an FMA-contracted PCT interpolation (see :func:`percentile`).
    """

    def __init__(self, *, fma: bool = False) -> None:
        self.fma = fma
        self.s_n = self.s_n2 = 0.0
        self.s_b = self.s_b2 = 0.0
        self.s_nb = 0.0
        self.s_k = self.s_k2 = 0.0
        self.s_p = self.s_p2 = self.s_p4 = 0.0
        self.n_top = 0
        self.n = 0
        self.n_chunks = 0
        self._kld: list[np.ndarray] = []
        self._dp: list[np.ndarray] = []
        self._chunk_means: list[tuple[float, ...]] = []

    # -- accumulation ------------------------------------------------------
    def add_chunk(
        self, logits: np.ndarray, base_logprobs: np.ndarray, targets: np.ndarray
    ) -> TokenStats:
        """Process one chunk: Q ``logits`` f32 (S, V), ``base_logprobs`` f32 (S, V), ``targets`` int (S,).

        Computes :func:`kld_token_stats` and adds them (see :meth:`add_token_stats`).
        Raises ``ValueError`` (nothing is accumulated) on NaN/inf or bad shapes; the
        message names the 1-based chunk number.  Returns the per-token quantities.
        """
        ts = kld_token_stats(logits, base_logprobs, targets, chunk=self.n_chunks + 1)
        self.add_token_stats(ts)
        return ts

    def add_token_stats(self, ts: TokenStats) -> None:
        """Add one chunk's precomputed per-token quantities
        (docs/llama-perplexity.md#kld-accumulators)."""
        nll = np.asarray(ts.nll, dtype=_F32)
        nb = np.asarray(ts.nll_base, dtype=_F32)
        kld = np.asarray(ts.kld, dtype=_F64)
        dp = np.asarray(ts.dp, dtype=_F32)
        d2 = (dp * dp).astype(_F32).astype(_F64)
        self.s_n = _seq_add(self.s_n, nll)
        self.s_n2 = _seq_add(self.s_n2, (nll * nll).astype(_F32))
        self.s_b = _seq_add(self.s_b, nb)
        self.s_b2 = _seq_add(self.s_b2, (nb * nb).astype(_F32))
        self.s_nb = _seq_add(self.s_nb, (nll * nb).astype(_F32))
        self.s_k = _seq_add(self.s_k, kld)
        self.s_k2 = _seq_add(self.s_k2, kld * kld)
        self.s_p = _seq_add(self.s_p, dp)
        self.s_p2 = _seq_add(self.s_p2, d2)
        self.s_p4 = _seq_add(self.s_p4, d2 * d2)
        self.n_top += int(np.count_nonzero(ts.same_top))
        self.n += int(nll.shape[0])
        self.n_chunks += 1
        self._kld.append(kld.astype(_F32))
        self._dp.append(dp.copy())
        n = max(1, nll.shape[0])
        self._chunk_means.append(
            (
                float(kld.sum()) / n,
                float(dp.astype(_F64).sum()) / n,
                float(np.count_nonzero(ts.same_top)) / n,
                float((nll.astype(_F64) - nb.astype(_F64)).sum()) / n,
                float(d2.sum()) / n,
            )
        )

    # -- read-out ----------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        """Number of scored tokens accumulated so far (n)."""
        return self.n

    @property
    def kld_values(self) -> np.ndarray:
        """float32 (n,) ``kld[]`` in token order."""
        return np.concatenate(self._kld) if self._kld else np.zeros(0, _F32)

    @property
    def dp_values(self) -> np.ndarray:
        """float32 (n,) ``dp[]`` (probability, not %) in token order."""
        return np.concatenate(self._dp) if self._dp else np.zeros(0, _F32)

    @property
    def chunk_means(self) -> dict[str, np.ndarray]:
        """Per-chunk means of the token quantities, float64 (n_chunks,) each, in chunk order.

        Keys: ``kld`` (nats), ``dp`` (probability, not %), ``same_top`` (fraction),
        ``ln_ratio`` (nll − nll_base, nats) and ``dp2`` (Δp², probability²). Their mean over
        chunks is the token mean when every chunk scores the same number of tokens (always, in
        a llama-perplexity run). Used for batch-means uncertainties (:func:`chunk_mean_errors`)
        and early verdicts (:mod:`pytest_quantbench.earlystop`).
        """
        cols = np.array(self._chunk_means, dtype=_F64).reshape(-1, len(CHUNK_MEAN_KEYS))
        return {key: cols[:, i] for i, key in enumerate(CHUNK_MEAN_KEYS)}

    def chunk_errors(self) -> dict[str, float]:
        """The chunk-level (batch-means) standard errors of mean KLD, mean Δp and same-top-p.

        Returns ``{"mean_kld_err_chunks": nats, "mean_dp_err_chunks": %,
        "same_top_p_err_chunks": %}`` (:func:`chunk_mean_errors` of :attr:`chunk_means`), NaN
        with fewer than two chunks. llama-perplexity's own ± (``*_err``) are unchanged.
        """
        means = self.chunk_means
        return {
            "mean_kld_err_chunks": chunk_mean_errors(means["kld"]),
            "mean_dp_err_chunks": 100.0 * chunk_mean_errors(means["dp"]),
            "same_top_p_err_chunks": 100.0 * chunk_mean_errors(means["same_top"]),
        }

    def _ppl_parts(self):
        mq, sq = mean_and_uncertainty(self.s_n, self.s_n2, self.n)
        mb, sb = mean_and_uncertainty(self.s_b, self.s_b2, self.n)
        c = covariance(self.s_n, self.s_b, self.s_nb, self.n)
        ln_ratio = mq - mb
        ln_ratio_err = _csqrt(sq * sq + sb * sb - 2.0 * c)
        return mq, sq, mb, sb, c, ln_ratio, ln_ratio_err

    def _rms_same(self):
        m2, s2 = mean_and_uncertainty(self.s_p2, self.s_p4, self.n)
        rms = _csqrt(m2)
        rms_err = _cmul(_cdiv(0.5, rms), s2)
        p = self.n_top / self.n if self.n else _NEG_NAN
        p_err = _csqrt(_cdiv(p * (1.0 - p), float(self.n - 1)))
        return rms, rms_err, p, p_err

    def chunk_row(self, chunk_number: int | None = None) -> str:
        """The cumulative per-chunk table row (docs/llama-perplexity.md#kld-output), without the
        newline.

        ``%4d`` (``chunk_number``, default: chunks added so far) then PPL(Q),
        ln ratio, mean KLD, RMS Δp (%) and same top p (%), each with its ±.
        """
        if chunk_number is None:
            chunk_number = self.n_chunks
        mq, sq, _, _, _, ln_ratio, ln_ratio_err = self._ppl_parts()
        ppl = _cexp(mq)
        kl, kl_err = mean_and_uncertainty(self.s_k, self.s_k2, self.n)
        rms, rms_err, p, p_err = self._rms_same()
        return (
            "%4d" % chunk_number
            + "    "
            + _fmt("%9.4f", ppl)
            + " \u00b1 "
            + _fmt("%9.4f", _cmul(ppl, sq))
            + "    "
            + _fmt("%10.5f", ln_ratio)
            + " \u00b1 "
            + _fmt("%10.5f", ln_ratio_err)
            + "    "
            + _fmt("%10.5f", kl)
            + " \u00b1 "
            + _fmt("%10.5f", kl_err)
            + "    "
            + _fmt("%6.3f", 100.0 * rms)
            + " \u00b1 "
            + _fmt("%6.3f", 100.0 * rms_err)
            + " %"
            + "    "
            + _fmt("%6.3f", 100.0 * p)
            + " \u00b1 "
            + _fmt("%6.3f", 100.0 * p_err)
            + " %"
        )

    def stats(self) -> KLDStats:
        """Every statistic of the final block (docs/llama-perplexity.md#statistics) as a
        :class:`KLDStats`.

        Raises ``ValueError`` if no token was accumulated.
        """
        if self.n == 0:
            raise ValueError("no tokens accumulated")
        mq, sq, mb, sb, c, ln_ratio, ln_ratio_err = self._ppl_parts()
        pq, pb = _cexp(mq), _cexp(mb)
        pq_err, pb_err = _cmul(pq, sq), _cmul(pb, sb)
        ratio = _cexp(ln_ratio)
        diff_err = _csqrt(pq_err * pq_err + pb_err * pb_err - 2.0 * (pq * pb * c))
        kl, kl_err = mean_and_uncertainty(self.s_k, self.s_k2, self.n)
        mdp, mdp_err = mean_and_uncertainty(self.s_p, self.s_p2, self.n)
        rms, rms_err, p, p_err = self._rms_same()

        kld = np.sort(self.kld_values)
        dp = np.sort(self.dp_values)

        def kp(key: str) -> float:
            return float(percentile(kld, PERCENTILE_FRACTIONS[key], fma=self.fma))

        def dpp(key: str) -> float:
            return 100.0 * float(percentile(dp, PERCENTILE_FRACTIONS[key], fma=self.fma))

        return KLDStats(
            ppl_q=pq,
            ppl_q_err=pq_err,
            ppl_base=pb,
            ppl_base_err=pb_err,
            cor_ln_ppl=100.0 * _cdiv(c, sq * sb),
            ln_ratio=ln_ratio,
            ln_ratio_err=ln_ratio_err,
            ppl_ratio=ratio,
            ppl_ratio_err=_cmul(ratio, ln_ratio_err),
            ppl_diff=pq - pb,
            ppl_diff_err=diff_err,
            mean_kld=kl,
            mean_kld_err=kl_err,
            max_kld=float(kld[-1]),
            kld_p99_9=kp("p99_9"),
            kld_p99=kp("p99"),
            kld_p95=kp("p95"),
            kld_p90=kp("p90"),
            median_kld=float(median(kld)),
            kld_p10=kp("p10"),
            kld_p5=kp("p5"),
            kld_p1=kp("p1"),
            kld_p0_1=kp("p0_1"),
            min_kld=float(kld[0]),
            mean_dp=100.0 * mdp,
            mean_dp_err=100.0 * mdp_err,
            max_dp=100.0 * float(dp[-1]),
            dp_p99_9=dpp("p99_9"),
            dp_p99=dpp("p99"),
            dp_p95=dpp("p95"),
            dp_p90=dpp("p90"),
            dp_p75=dpp("p75"),
            median_dp=100.0 * float(median(dp)),
            dp_p25=dpp("p25"),
            dp_p10=dpp("p10"),
            dp_p5=dpp("p5"),
            dp_p1=dpp("p1"),
            dp_p0_1=dpp("p0_1"),
            min_dp=100.0 * float(dp[0]),
            rms_dp=100.0 * rms,
            rms_dp_err=100.0 * rms_err,
            same_top_p=100.0 * p,
            same_top_p_err=100.0 * p_err,
            n_tokens=int(self.n),
        )
