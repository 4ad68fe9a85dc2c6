"""llama-perplexity's ``--kl-divergence-base`` file format (ik variant, R = 24), in numpy.

Format: ``docs/llama-perplexity.md#base-file`` (layout, row encoding,
decoding) and ``docs/llama-perplexity.md#bit-exactness`` (FMA contraction).

Layout (little-endian, packed)::

    0   8 bytes   b"_logits_"
    8   int32     n_ctx (C)
    12  int32     n_vocab (V)
    16  int32     n_chunk
    20  int32     tokens[n_chunk * C]       (original ids, not BOS-patched)
    ... records, chunk-major, j = C//2 … C-2; each nv = 2*((V+1)//2) + 4 uint16:
        [0..1] float32 scale, [2..3] float32 min_log_prob, [4..4+V) q_i,
        one zero uint16 of padding if V is odd.

Size: ``20 + 4*n_chunk*C + n_chunk*S*2*nv`` with ``S = C - 1 - C//2``.

Public API: :func:`encode_logits`, :func:`decode_rows`, :func:`base_nll`,
:class:`KLDBaseWriter`, :class:`KLDBaseFile`, :class:`KLDBaseFormatError`,
:data:`LOG_PROB_RANGE`.  The float32 primitives (``expf``, ordered sums) are the
ones of :mod:`pytest_quantbench.metrics`.
"""

from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np

from .cachefiles import temp_prefix
from .metrics import check_finite, for_row_blocks, row_blocks, row_max_lse

__all__ = [
    "LOG_PROB_RANGE",
    "MAGIC",
    "HEADER_SIZE",
    "KLDBaseFormatError",
    "EncodedRows",
    "ChunkRecords",
    "encode_logits",
    "decode_rows",
    "base_nll",
    "n_scored",
    "record_words",
    "expected_file_size",
    "KLDBaseWriter",
    "KLDBaseFile",
]

#: ik's log-prob window R (PR #325): logits below ``max − R`` are clamped (ML uses 16).
LOG_PROB_RANGE = 24.0
#: File magic, no NUL.
MAGIC = b"_logits_"
#: Bytes before the token array: magic + three int32.
HEADER_SIZE = 20

_F32 = np.float32
_F64 = np.float64
_FIX = "recompute the baseline / pass a complete file"


class KLDBaseFormatError(ValueError):
    """A file is not a complete llama-perplexity KLD base file (bad magic, header or size)."""


class EncodedRows(NamedTuple):
    """One block of encoded rows (docs/llama-perplexity.md#base-encoding).

    ``scale``, ``min_log_prob``: float32 (S,); ``q``: uint16 (S, V).
    ``max_logit`` and ``log_sum_exp``: float32 (S,), the row's ``mx`` and ``lse``
    (kept so :func:`base_nll` need not recompute them).
    """

    scale: np.ndarray
    min_log_prob: np.ndarray
    q: np.ndarray
    max_logit: np.ndarray
    log_sum_exp: np.ndarray


class ChunkRecords(NamedTuple):
    """Read-only views of one chunk's records: scale f32 (S,), min_log_prob f32 (S,), q uint16 (S, V)."""

    scale: np.ndarray
    min_log_prob: np.ndarray
    q: np.ndarray


def n_scored(n_ctx: int) -> int:
    """Scored positions per chunk, ``S = C − 1 − C//2``
    (docs/llama-perplexity.md#scored-positions)."""
    return n_ctx - 1 - n_ctx // 2


def record_words(n_vocab: int) -> int:
    """uint16 words per record, ``nv = 2·floor((V+1)/2) + 4``
    (docs/llama-perplexity.md#base-file)."""
    return 2 * ((n_vocab + 1) // 2) + 4


def expected_file_size(n_ctx: int, n_vocab: int, n_chunk: int) -> int:
    """Exact file size in bytes, ``20 + 4·n_chunk·C + n_chunk·S·2·nv``
    (docs/llama-perplexity.md#base-file)."""
    return HEADER_SIZE + 4 * n_chunk * n_ctx + n_chunk * n_scored(n_ctx) * 2 * record_words(n_vocab)


def _as_logits(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[1] < 1:
        raise ValueError(f"logits must be a 2-D (positions, vocab) array, got shape {logits.shape}")
    return logits.astype(_F32, copy=False)


def encode_logits(
    logits: np.ndarray,
    *,
    fma: bool = False,
    log_prob_range: float = LOG_PROB_RANGE,
    chunk: int | None = None,
) -> EncodedRows:
    """Encode float32 logits rows exactly as llama-perplexity's base writer
    (docs/llama-perplexity.md#base-file).

    ``logits``: float32 (S, V) (other float dtypes are cast to float32 first).
    Per row, all in float32 where C is::

        mx = max(l); mn = max(min(l), f32(mx − R))
        lse = f32(ln Σ_i float64(expf(f32(l_i − mx))))        (sequential sum)
        min_log_prob = f32(f32(mn − mx) − lse);  scale = f32(f32(mx − mn)/65535)
        q_i = RNE(f32(f32(1/scale)·f32(l_i − mn))) if l_i > mn else 0   (0 if scale == 0)

    ``fma=True`` emulates an FMA-contracted build: ``q_i = RNE(inv·f32(l_i − mn))``
    from the exact product (docs/llama-perplexity.md#fma).  ``log_prob_range`` is R (24 in ik, 16 in
    ML). Raises ``ValueError`` for a non-2-D array or NaN/inf (``chunk`` labels the
    message).  Returns :class:`EncodedRows`.
    """
    logits = _as_logits(logits)
    check_finite(logits, "logits", chunk)
    n_rows, n_vocab = logits.shape
    _, mx, lse = row_max_lse(logits)
    mn = np.maximum(logits.min(axis=1), mx - _F32(log_prob_range))
    min_log_prob = (mn - mx) - lse
    scale = (mx - mn) / _F32(65535)
    q = np.zeros((n_rows, n_vocab), dtype=np.uint16)
    nz = scale != 0
    inv = np.zeros_like(scale)
    inv[nz] = _F32(1) / scale[nz]
    for blk in row_blocks(n_rows, n_vocab):
        rows = logits[blk]
        d = rows - mn[blk, None]  # f32(l_i − mn)
        if fma:
            v = np.rint(inv[blk, None].astype(_F64) * d)  # exact product, one rounding
        else:
            v = np.rint(inv[blk, None] * d)  # f32 product, then RNE
        keep = (rows > mn[blk, None]) & nz[blk, None]
        q[blk] = np.where(keep, v, 0).astype(np.uint16)
    return EncodedRows(scale=scale, min_log_prob=min_log_prob, q=q, max_logit=mx, log_sum_exp=lse)


def decode_rows(
    scale: np.ndarray,
    min_log_prob: np.ndarray,
    q: np.ndarray,
    *,
    fma: bool = False,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Decode records to float32 log-probs (S, V): ``lp_i = f32(f32(scale·q_i) + min_log_prob)``.

    ``scale``, ``min_log_prob``: float32 (S,); ``q``: uint16 (S, V).  Every logit
    that was ≤ mn decodes to ``min_log_prob``.  ``fma=True`` emulates an
    FMA-contracted reader: ``f32(float64(scale)·q_i + float64(min_log_prob))``
    (docs/llama-perplexity.md#fma).  ``out``: a float32 (S, V) array to decode into and return (a
    chunk loop reuses one instead of faulting in a fresh one per chunk); a new array when None.
    Raises ``ValueError`` on inconsistent shapes or an ``out`` of another shape or dtype.
    """
    scale = np.asarray(scale, dtype=_F32).reshape(-1)
    mlp = np.asarray(min_log_prob, dtype=_F32).reshape(-1)
    q = np.asarray(q)
    if q.ndim != 2 or scale.shape[0] != q.shape[0] or mlp.shape[0] != q.shape[0]:
        raise ValueError(
            f"decode_rows: scale {scale.shape}, min_log_prob {mlp.shape} and q {q.shape} "
            "must be (S,), (S,) and (S, V)"
        )
    if out is None:
        out = np.empty(q.shape, dtype=_F32)
    elif out.shape != q.shape or out.dtype != _F32:
        raise ValueError(f"decode_rows: out must be float32 {q.shape}, got {out.dtype} {out.shape}")

    def block(blk: slice) -> None:
        qb, ob = q[blk], out[blk]
        if fma:
            ob[:] = scale[blk, None].astype(_F64) * qb + mlp[blk, None].astype(_F64)
        else:  # in place: q → float32 is exact (q < 2**16), one rounding per operation
            np.multiply(qb, scale[blk, None], out=ob, dtype=_F32)
            np.add(ob, mlp[blk, None], out=ob)

    for_row_blocks(q.shape[0], q.shape[1], block)
    return out


def base_nll(
    logits: np.ndarray, targets: np.ndarray, *, encoded: EncodedRows | None = None
) -> np.ndarray:
    """Per-token NLL of a base-writing run: ``f32(f32(mx + lse) − l_t)``
    (docs/llama-perplexity.md#base-file).

    ``logits``: float32 (S, V); ``targets``: int (S,).  Pass the
    :class:`EncodedRows` of the same logits as ``encoded`` to reuse its ``mx`` and
    ``lse``.  Returns float32 (S,) in nats; feed it to
    :class:`pytest_quantbench.metrics.PPLAccumulator`.
    """
    logits = _as_logits(logits)
    targets = np.asarray(targets).astype(np.intp)
    if targets.shape != (logits.shape[0],):
        raise ValueError(f"targets must have shape ({logits.shape[0]},), got {targets.shape}")
    if encoded is None:
        _, mx, lse = row_max_lse(logits)
    else:
        mx, lse = encoded.max_logit, encoded.log_sum_exp
    return (mx + lse) - logits[np.arange(logits.shape[0]), targets]


def _records_bytes(enc: EncodedRows, n_vocab: int) -> bytes:
    n_rows = enc.q.shape[0]
    rec = np.zeros((n_rows, record_words(n_vocab)), dtype="<u2")
    rec[:, 0:2] = np.ascontiguousarray(enc.scale, dtype="<f4").view("<u2").reshape(n_rows, 2)
    rec[:, 2:4] = np.ascontiguousarray(enc.min_log_prob, dtype="<f4").view("<u2").reshape(n_rows, 2)
    rec[:, 4 : 4 + n_vocab] = enc.q
    return rec.tobytes()


class KLDBaseWriter:
    """Write a KLD base file atomically (context manager).

    ``tokens``: int32 (n_chunk, n_ctx), the **original** token ids (not BOS-patched).
    Inside the ``with`` block call :meth:`write_chunk` once per chunk, in order.
    On a clean exit after all ``n_chunk`` chunks the temporary file (same
    directory) is flushed, fsync'ed and ``os.replace``'d onto ``path``; on an
    exception — or if chunks are missing — the temporary file is removed and
    ``path`` is left untouched.  ``fma`` / ``log_prob_range`` are as in
    :func:`encode_logits`.  A failed write (a full disk, ENOSPC) raises
    :class:`OSError` with the same errno, naming ``path``; no temporary file
    is left behind.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        n_ctx: int,
        n_vocab: int,
        tokens: np.ndarray,
        *,
        fma: bool = False,
        log_prob_range: float = LOG_PROB_RANGE,
    ) -> None:
        self.path = Path(path)
        self.n_ctx = int(n_ctx)
        self.n_vocab = int(n_vocab)
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or tokens.shape[1] != self.n_ctx or tokens.shape[0] < 1:
            raise ValueError(f"tokens must have shape (n_chunk, {self.n_ctx}), got {tokens.shape}")
        if self.n_ctx < 2 or self.n_vocab < 1:
            raise ValueError(f"invalid n_ctx={self.n_ctx} / n_vocab={self.n_vocab}")
        self.tokens = tokens.astype("<i4")
        self.n_chunk = int(tokens.shape[0])
        self.first = self.n_ctx // 2
        self.n_scored = n_scored(self.n_ctx)
        self.fma = fma
        self.log_prob_range = log_prob_range
        self.chunks_written = 0
        self._fh: BinaryIO | None = None
        self._tmp: str | None = None

    def __enter__(self) -> KLDBaseWriter:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, self._tmp = tempfile.mkstemp(
                prefix=temp_prefix(self.path), suffix=".tmp", dir=self.path.parent
            )
        except OSError as exc:
            raise self._write_error(exc) from exc
        self._fh = os.fdopen(fd, "wb")
        try:
            self._fh.write(MAGIC + struct.pack("<iii", self.n_ctx, self.n_vocab, self.n_chunk))
            self._fh.write(self.tokens.tobytes())
        except OSError as exc:
            self._abort()
            raise self._write_error(exc) from exc
        except BaseException:
            self._abort()
            raise
        return self

    def _write_error(self, exc: OSError) -> OSError:
        """``exc`` restated naming the file, with the same errno (ENOSPC: disk full)."""
        return OSError(
            exc.errno,
            f"could not write KLD base file {self.path} (an existing file "
            f"is left unchanged): {exc.strerror or exc}",
        )

    def write_chunk(self, logits: np.ndarray) -> np.ndarray:
        """Encode and append one chunk's records; return its per-token base NLL f32 (S,).

        ``logits``: float32 (S, V) for positions ``C//2 … C−2`` of the chunk, or
        (C, V) for all positions (the scored rows are then sliced out).  The NLL
        targets are the chunk's tokens at ``j+1``.  Raises ``ValueError`` for a
        wrong shape, NaN/inf, or more than ``n_chunk`` chunks.
        """
        if self._fh is None:
            raise RuntimeError("KLDBaseWriter.write_chunk outside its 'with' block")
        if self.chunks_written >= self.n_chunk:
            raise ValueError(f"all {self.n_chunk} chunks were already written")
        logits = _as_logits(logits)
        if logits.shape[0] == self.n_ctx:
            logits = logits[self.first : self.n_ctx - 1]
        if logits.shape != (self.n_scored, self.n_vocab):
            raise ValueError(
                f"chunk logits must have shape ({self.n_scored}, {self.n_vocab}) "
                f"or ({self.n_ctx}, {self.n_vocab}), got {logits.shape}"
            )
        enc = encode_logits(
            logits, fma=self.fma, log_prob_range=self.log_prob_range, chunk=self.chunks_written + 1
        )
        try:
            self._fh.write(_records_bytes(enc, self.n_vocab))
        except OSError as exc:
            raise self._write_error(exc) from exc
        targets = self.tokens[self.chunks_written, self.first + 1 : self.n_ctx]
        self.chunks_written += 1
        return base_nll(logits, targets, encoded=enc)

    def _abort(self) -> None:
        if self._fh is not None:
            try:  # closing flushes: on a full disk that fails again, and must not keep the unlink
                self._fh.close()
            except OSError:
                pass
            finally:
                self._fh = None
        if self._tmp is not None:
            try:
                os.unlink(self._tmp)
            except FileNotFoundError:
                pass
            self._tmp = None

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._abort()
            return None
        if self.chunks_written != self.n_chunk:
            self._abort()
            raise KLDBaseFormatError(
                f"{self.path}: only {self.chunks_written} of {self.n_chunk} chunks were written; "
                "the file was not created"
            )
        assert self._fh is not None and self._tmp is not None  # set by __enter__
        try:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None
            os.replace(self._tmp, self.path)
            self._tmp = None
        except OSError as exc:
            self._abort()
            raise self._write_error(exc) from exc
        except BaseException:
            self._abort()
            raise
        try:  # make the rename durable; not possible everywhere (e.g. Windows)
            dfd = os.open(self.path.parent, os.O_RDONLY)
        except OSError:
            return None
        try:
            os.fsync(dfd)
        except OSError:
            pass
        finally:
            os.close(dfd)
        return None


class KLDBaseFile:
    """Memory-mapped reader of a KLD base file (docs/llama-perplexity.md#base-file).

    Attributes: ``path``, ``n_ctx``, ``n_vocab``, ``n_chunk``, ``first`` (= n_ctx//2),
    ``n_scored`` (S = C − 1 − C//2), ``tokens`` (read-only int32 (n_chunk, n_ctx)),
    ``fma`` (decoder mode used by :meth:`chunk_logprobs`), ``file_chunks`` (chunks the file
    holds). ``chunks``: read only the first ``chunks`` chunks (``n_chunk`` is then that number;
    the statistics equal those of a file written with that many chunks).

    Raises :class:`KLDBaseFormatError` — naming the path, expected and actual size
    and the fix — for a bad magic, an implausible header, or a file whose size is
    not exactly ``20 + 4·n_chunk·C + n_chunk·S·2·nv`` (truncated or oversized); ValueError
    when ``chunks`` is not between 1 and the file's chunks.
    """

    def __init__(
        self, path: str | os.PathLike, *, fma: bool = False, chunks: int | None = None
    ) -> None:
        self.path = Path(path)
        self.fma = fma
        actual = os.path.getsize(self.path)
        with open(self.path, "rb") as fh:
            head = fh.read(HEADER_SIZE)
        if len(head) < len(MAGIC) or head[: len(MAGIC)] != MAGIC:
            raise KLDBaseFormatError(
                f"{self.path}: not a llama-perplexity KLD base file (magic {head[:8]!r}, "
                f"expected {MAGIC!r}); {_FIX}"
            )
        if len(head) < HEADER_SIZE:
            raise KLDBaseFormatError(
                f"{self.path}: truncated KLD base file: expected at least {HEADER_SIZE} bytes of "
                f"header, actual size {actual} bytes (a failed llama-perplexity run leaves a "
                f"12-byte stub); {_FIX}"
            )
        n_ctx, n_vocab, n_chunk = struct.unpack("<Iii", head[8:20])
        if n_ctx < 2 or n_vocab < 1 or n_chunk < 1:
            raise KLDBaseFormatError(
                f"{self.path}: implausible KLD base header n_ctx={n_ctx}, n_vocab={n_vocab}, "
                f"n_chunk={n_chunk}; {_FIX}"
            )
        expected = expected_file_size(n_ctx, n_vocab, n_chunk)
        if actual != expected:
            what = "truncated" if actual < expected else "oversized"
            raise KLDBaseFormatError(
                f"{self.path}: {what} KLD base file: expected {expected} bytes for n_ctx={n_ctx}, "
                f"n_vocab={n_vocab}, n_chunk={n_chunk}, actual size {actual} bytes; {_FIX}"
            )
        if chunks is not None and not 1 <= chunks <= n_chunk:
            raise ValueError(f"{self.path} holds {n_chunk} chunks; cannot read {chunks}")
        self.n_ctx = int(n_ctx)
        self.n_vocab = int(n_vocab)
        self.file_chunks = int(n_chunk)
        self.n_chunk = int(n_chunk if chunks is None else chunks)
        self.first = self.n_ctx // 2
        self.n_scored = n_scored(self.n_ctx)
        self.record_words = record_words(self.n_vocab)
        self.tokens = np.memmap(
            self.path, dtype="<i4", mode="r", offset=HEADER_SIZE, shape=(self.n_chunk, self.n_ctx)
        )
        self._records = np.memmap(
            self.path,
            dtype="<u2",
            mode="r",
            offset=HEADER_SIZE + 4 * self.file_chunks * self.n_ctx,
            shape=(self.n_chunk, self.n_scored, self.record_words),
        )

    def __repr__(self) -> str:
        return (
            f"KLDBaseFile({str(self.path)!r}, n_ctx={self.n_ctx}, n_vocab={self.n_vocab}, "
            f"n_chunk={self.n_chunk})"
        )

    def _check(self, i: int) -> int:
        if not -self.n_chunk <= i < self.n_chunk:
            raise IndexError(f"chunk {i} out of range for {self.n_chunk} chunks")
        return i % self.n_chunk

    def chunk(self, i: int) -> ChunkRecords:
        """Read-only views of chunk ``i`` (0-based): scale f32 (S,), min_log_prob f32 (S,), q uint16 (S, V)."""
        rec = self._records[self._check(i)]
        scale = rec[:, 0:2].view("<f4")[:, 0]
        mlp = rec[:, 2:4].view("<f4")[:, 0]
        q = rec[:, 4 : 4 + self.n_vocab]
        return ChunkRecords(scale, mlp, q)

    def chunk_logprobs(self, i: int, out: np.ndarray | None = None) -> np.ndarray:
        """Decoded base log-probs of chunk ``i``: float32 (S, V), into ``out`` when given (see
        :func:`decode_rows`)."""
        return decode_rows(*self.chunk(i), fma=self.fma, out=out)

    def targets(self, i: int) -> np.ndarray:
        """Target token ids of chunk ``i``: int32 (S,), the chunk's tokens at ``j+1`` for ``j = first … C−2``."""
        return np.asarray(self.tokens[self._check(i), self.first + 1 : self.n_ctx])

    def close(self) -> None:
        """Drop this reader's memory maps; the mapping is released once no view handed out
        earlier is alive (numpy memmaps cannot be closed under live views)."""
        # a closed reader is not read again: None drops the maps without an Optional type
        self.tokens = None  # type: ignore[assignment]
        self._records = None  # type: ignore[assignment]

    def __enter__(self) -> KLDBaseFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
