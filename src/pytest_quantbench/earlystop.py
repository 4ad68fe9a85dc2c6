"""Early verdicts (``--quantbench-early-stop``): stop an item's chunk loop once its verdict is sure.

An item with threshold limits is looked at after 4, 8, 16, 32 … chunks (the *planned looks*: every
such count below the run's chunk count). At a look, each limit whose statistic is a mean over
tokens gets a two-sided Student-t confidence interval on the per-chunk means (chunks are close to
independent, tokens of one chunk are not; see :func:`pytest_quantbench.metrics.chunk_mean_errors`).
The overall error rate is split over the planned looks (Bonferroni): each interval has level
``1 − (1 − confidence) / n_looks``, so the chance that any look gives a wrong early verdict stays
below ``1 − confidence`` (99 % by default). The item stops with

* **pass** when every limit's interval lies wholly on the allowed side (and every limit can be
  checked this way: percentile limits such as ``max_kld_p99`` cannot, so they never pass early);
* **fail** when one limit's interval lies wholly on the forbidden side.

Otherwise it runs on; an item without limits runs all chunks. :class:`EarlyStop` decides (pure,
no engine, no pytest); :class:`EarlyStopAccumulator` is a :class:`~pytest_quantbench.metrics.
KLDAccumulator` that asks it after each chunk and raises :class:`EarlyVerdict` to end the loop.
Early-stopped results are not llama-perplexity's fixed-chunk numbers: :func:`early_store_run` and
:func:`early_item_key` keep them under their own store keys.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .metrics import KLDAccumulator, TokenStats

__all__ = [
    "DEFAULT_CONFIDENCE",
    "FIRST_LOOK",
    "Decision",
    "EarlyStop",
    "EarlyStopAccumulator",
    "EarlyVerdict",
    "early_item_key",
    "early_store_run",
    "gating_facts",
    "item_accumulator",
    "planned_looks",
    "t_quantile",
]

#: Overall confidence of the early verdicts (settable with --quantbench-early-stop-confidence).
DEFAULT_CONFIDENCE = 0.99
#: Chunks before the first look; later looks double it.
FIRST_LOOK = 4


def planned_looks(n_chunks: int, first: int = FIRST_LOOK) -> tuple[int, ...]:
    """The chunk counts at which an item is looked at: ``first``, 2·first, 4·first … < n_chunks.

    A look at ``n_chunks`` itself would be the full run (its verdict is the ordinary one).
    """
    looks, n = [], first
    while n < n_chunks:
        looks.append(n)
        n *= 2
    return tuple(looks)


def _t_two_sided_coverage(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with integer ``df`` (Abramowitz & Stegun 26.7.3, 26.7.4)."""
    theta = math.atan(t / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2 == 1:
        total, term = 0.0, c
        for k in range(1, (df - 1) // 2 + 1):
            if k > 1:
                term *= c * c * (2 * k - 2) / (2 * k - 1)
            total += term
        return (2.0 / math.pi) * (theta + (s * total if df > 1 else 0.0))
    total, term = 1.0, 1.0
    for k in range(1, df // 2):
        term *= c * c * (2 * k - 1) / (2 * k)
        total += term
    return s * total


def t_quantile(alpha: float, df: int) -> float:
    """The two-sided critical value t with P(|T| > t) = ``alpha`` for Student's t with ``df``
    (integer ≥ 1) degrees of freedom, by bisection on the exact CDF (A&S 26.7.3/26.7.4).

    E.g. ``t_quantile(0.05, 10)`` = 2.228. Raises ValueError for alpha outside (0, 1) or df < 1.
    """
    if not 0.0 < alpha < 1.0 or df < 1:
        raise ValueError(f"t_quantile needs 0 < alpha < 1 and df >= 1, got {alpha}, {df}")
    lo, hi = 0.0, 1.0
    while 1.0 - _t_two_sided_coverage(hi, df) > alpha:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if 1.0 - _t_two_sided_coverage(mid, df) > alpha:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return hi


@dataclass(frozen=True)
class _Bound:
    """One threshold limit expressed on a per-chunk mean: ``quantity`` (a key of
    :attr:`KLDAccumulator.chunk_means`), ``kind`` max/min, ``limit`` on that scale."""

    key: str
    quantity: str
    kind: str
    limit: float


def _bound(key: str, value: float) -> _Bound | None:
    """The limit ``key`` = ``value`` (thresholds file units) on a chunk-mean scale, or None when
    its statistic is not a monotone function of a token mean (percentiles)."""
    if key == "max_kld":
        return _Bound(key, "kld", "max", value)
    if key == "min_same_top_p":
        return _Bound(key, "same_top", "min", value / 100.0)
    if key == "max_ppl_ratio":  # PPL(Q)/PPL(base) = exp(mean ln ratio)
        return _Bound(key, "ln_ratio", "max", math.log(value) if value > 0 else -math.inf)
    if key == "max_ppl_increase_pct":
        ratio = 1.0 + value / 100.0
        return _Bound(key, "ln_ratio", "max", math.log(ratio) if ratio > 0 else -math.inf)
    if key == "max_rms_dp":  # RMS Δp (%) = 100·sqrt(mean Δp²)
        return _Bound(key, "dp2", "max", (value / 100.0) ** 2)
    return None


@dataclass(frozen=True)
class Decision:
    """An early verdict: ``verdict`` "pass"/"fail", after ``chunks`` of ``n_chunks``; ``limit``
    the key that decided a fail (None for pass); ``intervals`` limit key → (low, high) of the
    chunk-mean interval on the limit's own scale; ``level`` the per-look confidence."""

    verdict: str
    chunks: int
    n_chunks: int
    limit: str | None
    intervals: Mapping[str, tuple[float, float]]
    level: float

    def describe(self) -> str:
        """One line for messages, e.g. ``early fail after 4 of 32 chunks: max_kld interval
        [0.0213, 0.0305] (99.67% per look)``."""
        keys = [self.limit] if self.limit else list(self.intervals)
        shown = ", ".join(
            f"{k} interval [{self.intervals[k][0]:.6g}, {self.intervals[k][1]:.6g}]" for k in keys
        )
        return (
            f"early {self.verdict} after {self.chunks} of {self.n_chunks} chunks: {shown} "
            f"({100 * self.level:.4g}% per look, Bonferroni over the planned looks)"
        )


class EarlyStop:
    """The early-verdict rule of one item.

    Args:
        limits: limit key → value, as the thresholds file gives them (``max_kld``,
            ``min_same_top_p`` in %, ``max_ppl_ratio``, ``max_ppl_increase_pct`` in %,
            ``max_rms_dp`` in %, percentile limits …); empty: never stops.
        n_chunks: the run's chunk count; confidence: overall level in (0, 1).
    Raises ValueError for a confidence outside (0, 1).
    """

    def __init__(
        self, limits: Mapping[str, float], n_chunks: int, confidence: float = DEFAULT_CONFIDENCE
    ) -> None:
        if not 0.0 < confidence < 1.0:
            raise ValueError(f"early-stop confidence {confidence} must lie between 0 and 1")
        self.n_chunks = n_chunks
        self.confidence = confidence
        self.looks = planned_looks(n_chunks) if limits else ()
        self.level = 1.0 - (1.0 - confidence) / max(1, len(self.looks))
        bounds = {key: _bound(key, float(value)) for key, value in limits.items()}
        self.bounds = [b for b in bounds.values() if b is not None]
        self.unchecked = sorted(key for key, b in bounds.items() if b is None)

    def is_look(self, n_done: int) -> bool:
        """Whether ``n_done`` chunks is one of the planned looks."""
        return n_done in self.looks

    def decide(self, chunk_means: Mapping[str, np.ndarray]) -> Decision | None:
        """The verdict at a look, or None to run on.

        ``chunk_means``: :attr:`KLDAccumulator.chunk_means` (float64 (k,) per quantity); k must
        be a planned look, else None. Intervals: mean ± t·sd/√k, t the two-sided Student-t
        quantile of :attr:`level` with k − 1 degrees of freedom.
        """
        k = len(next(iter(chunk_means.values()), ()))
        if not self.bounds or not self.is_look(k):
            return None
        t = t_quantile(1.0 - self.level, k - 1)
        intervals, inside, failed = {}, True, None
        for b in self.bounds:
            x = np.asarray(chunk_means[b.quantity], dtype=np.float64)
            half = t * float(np.std(x, ddof=1)) / math.sqrt(k)
            lo, hi = float(x.mean()) - half, float(x.mean()) + half
            if not (math.isfinite(lo) and math.isfinite(hi)):
                return None
            intervals[b.key] = _shown(b.key, lo, hi)
            above, below = lo > b.limit, hi < b.limit
            ok, bad = (below, above) if b.kind == "max" else (above, below)
            inside = inside and ok
            if bad and failed is None:
                failed = b.key
        if failed is not None:
            return Decision("fail", k, self.n_chunks, failed, intervals, self.level)
        if inside and not self.unchecked:
            return Decision("pass", k, self.n_chunks, None, intervals, self.level)
        return None


def _shown(key: str, lo: float, hi: float) -> tuple[float, float]:
    """An interval on a chunk-mean scale back on the limit's own scale (monotone maps)."""
    if key == "min_same_top_p":
        return 100.0 * lo, 100.0 * hi
    if key == "max_ppl_ratio":
        return math.exp(lo), math.exp(hi)
    if key == "max_ppl_increase_pct":
        return 100.0 * (math.exp(lo) - 1.0), 100.0 * (math.exp(hi) - 1.0)
    if key == "max_rms_dp":
        return 100.0 * math.sqrt(max(lo, 0.0)), 100.0 * math.sqrt(max(hi, 0.0))
    return lo, hi


class EarlyVerdict(Exception):
    """Raised by :class:`EarlyStopAccumulator` to end the chunk loop; ``decision`` says why."""

    def __init__(self, decision: Decision) -> None:
        super().__init__(decision.describe())
        self.decision = decision


class EarlyStopAccumulator(KLDAccumulator):
    """A :class:`KLDAccumulator` that asks ``rule`` after each chunk and raises
    :class:`EarlyVerdict` (after adding the chunk) when the verdict is sure.

    The exception ends the chunk loop like an engine error would, and the accumulator holds
    exactly the looked-at chunks; :meth:`is_look` lets the loop wait for the statistics at a
    look instead of decoding on. :attr:`decision` keeps the verdict.
    """

    def __init__(self, rule: EarlyStop, **kwargs) -> None:
        super().__init__(**kwargs)
        self.rule = rule
        self.decision: Decision | None = None

    def is_look(self, n_done: int) -> bool:
        """Whether the rule decides after ``n_done`` chunks (:func:`measure.evaluate` waits for
        the statistics there before it decodes on)."""
        return self.rule.is_look(n_done)

    def add_token_stats(self, ts: TokenStats) -> None:
        super().add_token_stats(ts)
        if self.rule.is_look(self.n_chunks):
            decision = self.rule.decide(self.chunk_means)
            if decision is not None:
                self.decision = decision
                raise EarlyVerdict(decision)


def _spec_digest(limits: Mapping[str, float], confidence: float) -> str:
    payload = {
        "limits": {k: float(v) for k, v in sorted(limits.items())},
        "confidence": confidence,
        "first_look": FIRST_LOOK,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def early_store_run(run_key: str) -> str:
    """The store's run key for early-stopped results of the run ``run_key``: a full run's table
    never lists them and a full run never reuses them."""
    return f"{run_key}:early-stop"


def early_item_key(
    run_key: str, tensors, qtype: str, limits: Mapping[str, float], confidence: float
) -> str:
    """The store key of one early-stopped result: the run, the item, and the limits and
    confidence that decided where it stopped (another limit needs another measurement)."""
    from .store import item_key

    return item_key(
        f"{early_store_run(run_key)}:{_spec_digest(limits, confidence)}", tensors, qtype
    )


def item_accumulator(
    limits: Mapping[str, float], n_chunks: int, confidence: float = DEFAULT_CONFIDENCE
) -> KLDAccumulator:
    """The accumulator for one item: an :class:`EarlyStopAccumulator` when ``limits`` (the
    item's threshold limits under ``--quantbench-early-stop``) are given, else a plain
    :class:`KLDAccumulator` (all chunks)."""
    if not limits:
        return KLDAccumulator()
    return EarlyStopAccumulator(EarlyStop(limits, n_chunks, confidence))


def gating_facts(acc: KLDAccumulator, n_chunks: int) -> dict[str, object]:
    """The result-row facts of an evaluated item: the chunk-level ± columns
    (:meth:`KLDAccumulator.chunk_errors`), ``chunks_used``, ``stopped_early`` and
    ``early_verdict`` ("pass"/"fail", "" when all ``n_chunks`` ran)."""
    decision = getattr(acc, "decision", None)
    return {
        **acc.chunk_errors(),
        "chunks_used": acc.n_chunks,
        "stopped_early": decision is not None and acc.n_chunks < n_chunks,
        "early_verdict": decision.verdict if decision is not None else "",
    }
