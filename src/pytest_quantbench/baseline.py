"""The baseline logits: computed once per key across xdist workers and runs, kept in a cache.

The cache file is llama-perplexity's ``--kl-divergence-base`` format (ik variant, R = 24; see
:mod:`pytest_quantbench.kldbase`), so a file from llama-perplexity can be used as the baseline
(``--quantbench-kld-base``) and ours can be given to llama-perplexity. The cache key,
:class:`RunIdentity`, holds everything that changes a logit; the results store uses the same key.
Concurrency follows xdist's "session-scoped fixture once" recipe: a :class:`filelock.FileLock`
next to the file; the first process computes and atomically writes it, the others wait and read.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from filelock import FileLock

from .kldbase import KLDBaseFile, KLDBaseFormatError
from .report import atomic_write_text

if TYPE_CHECKING:  # pragma: no cover
    from .engine.swap import SwapModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunIdentity:
    """Everything that decides whether two numbers are comparable.

    model_sha256 / corpus_sha256: content hashes (hex); n_ctx: chunk length (tokens);
    chunks: number of chunks; engine: :attr:`EngineIdentity.key`; eval: evaluation settings text
    (flash attention, n_ubatch, batch layout).
    """

    model_sha256: str
    corpus_sha256: str
    n_ctx: int
    chunks: int
    engine: str
    eval: str

    def digest(self) -> str:
        """16-hex-char digest of all fields (cache file names, store keys)."""
        text = "|".join(f"{k}={v}" for k, v in sorted(asdict(self).items()))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def as_row(self) -> dict[str, str | int]:
        """The identity as result-row columns (builtin types only)."""
        return asdict(self)


def baseline_cache_path(cache_dir: Path, identity: RunIdentity) -> Path:
    """``<cache_dir>/baselines/<model12>-c<n_ctx>-<chunks>ch-<digest>.kld``."""
    name = (
        f"{identity.model_sha256[:12]}-c{identity.n_ctx}-{identity.chunks}ch-"
        f"{identity.digest()}.kld"
    )
    return cache_dir / "baselines" / name


def matches(base: KLDBaseFile, tokens: np.ndarray, n_vocab: int) -> str | None:
    """Why ``base`` does not belong to this run, or None when it does.

    tokens: int32 (n_chunk, n_ctx) of the run's corpus. Checks n_ctx, n_chunk, n_vocab and tokens.
    """
    n_chunk, n_ctx = tokens.shape
    if base.n_vocab != n_vocab:
        return f"it was computed for n_vocab={base.n_vocab}, the model has n_vocab={n_vocab}"
    if base.n_ctx != n_ctx:
        return f"it was computed with n_ctx={base.n_ctx}, this run uses n_ctx={n_ctx}"
    if base.n_chunk != n_chunk:
        return f"it holds {base.n_chunk} chunks, this run uses {n_chunk}"
    if not np.array_equal(base.tokens, tokens):
        return "its tokens differ from this run's corpus tokens"
    return None


def ensure_baseline(
    path: Path,
    tokens: np.ndarray,
    n_vocab: int,
    compute: Callable[[Path], None],
    source: dict[str, str] | None = None,
) -> KLDBaseFile:
    """Return the cached baseline at ``path``, computing it first if absent or invalid.

    Args:
        path: cache file; its directory is created. tokens: int32 (n_chunk, n_ctx), the chunks.
        n_vocab: the model's vocabulary size. compute: writes a complete file at the given path
            (atomically); called at most once across processes, under the lock.
        source: facts of the model the baseline must come from (:func:`inputs.model_source`:
            its sha256 and first/last MiB digest), recorded beside a fresh file; a cached file
            whose record disagrees (or has none) is recomputed.
    Returns:
        the opened :class:`KLDBaseFile`.
    Raises:
        DiskSpaceError (a ValueError) before computing when the cache's disk cannot hold the
        file; whatever ``compute`` raises, an OSError restated by :func:`cache_write_error`
        (same errno: a full disk is ENOSPC); KLDBaseFormatError if a fresh file is still invalid.
    """
    from .cachefiles import cache_notice, remove_temps_of

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        remove_temps_of(path)  # the lock holder writes them: any there now are a dead writer's
        if path.exists():
            try:
                base = KLDBaseFile(path)
                problem = matches(base, tokens, n_vocab) or source_problem(path, source)
            except KLDBaseFormatError as exc:
                problem = str(exc)
            if problem is None:
                return base
            cache_notice(f"baseline cache {path} is not usable ({problem}): recomputing")
            path.unlink()
        check_baseline_space(path, tokens.shape, n_vocab)
        try:
            compute(path)
            if source:
                atomic_write_text(
                    sidecar_path(path), json.dumps({**baseline_facts(path), **source}) + "\n"
                )
        except OSError as exc:
            raise cache_write_error(exc) from exc
    base = KLDBaseFile(path)
    problem = matches(base, tokens, n_vocab)
    if problem is not None:
        raise KLDBaseFormatError(f"freshly computed baseline {path} does not match: {problem}")
    return base


def check_baseline_space(path: Path, shape: tuple[int, int], n_vocab: int) -> None:
    """Raise DiskSpaceError when the baseline file ``path`` is not cached yet and its disk lacks
    room for it; ``shape`` is (n_chunk, n_ctx) of the chunks (size:
    :func:`diskspace.baseline_bytes`)."""
    from .diskspace import check_cache_space, plan_cache_files

    check_cache_space(
        plan_cache_files(
            baseline=path, shape=shape, n_vocab=n_vocab, imatrix=None, model_header=None
        )
    )


_SOURCE_LABELS = {"model_sha256": "sha256", "model_edges": "first/last MiB digest"}


def source_problem(path: Path, source: dict[str, str] | None) -> str | None:
    """Why the cached baseline ``path`` was not computed from the model of ``source``, or None
    (also None when ``source`` is None: nothing to check)."""
    if not source:
        return None
    recorded = baseline_facts(path)
    for key, want in source.items():
        got = recorded.get(key)
        if got != want:
            label = _SOURCE_LABELS.get(key, key)
            return (
                f"it was computed from a model whose {label} is "
                f"{str(got)[:12] if got else 'not recorded'}, the model now has {want[:12]}"
            )
    return None


def cache_write_error(exc: OSError) -> OSError:
    """``exc`` (a failed write of the baseline cache) restated with what to do, same errno."""
    detail = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = (
            "the disk of the quantbench cache is full: free space there, or set "
            "--quantbench-cache-dir to a directory on another disk, and run again"
        )
    elif exc.errno == errno.EFBIG:
        fix = "a file-size limit (ulimit -f) stopped it: raise the limit and run again"
    else:
        fix = "make the cache directory writable, or set --quantbench-cache-dir"
    return OSError(exc.errno, f"baseline cache: {detail}; {fix}")


#: Environment variable holding the id of one pytest run (set by the controller, inherited by
#: xdist workers): a baseline failure recorded under it is not recomputed by another process.
RUN_TOKEN_ENV = "QUANTBENCH_RUN_TOKEN"


class BaselineError(RuntimeError):
    """The baseline could not be computed; every item of the run needs it. str: what failed and
    why (e.g. the chunk and position of NaN logits, or the sizes on a full disk)."""


def failure_path(path: Path) -> Path:
    """The record beside a baseline cache file of the failure to compute it in this run."""
    return path.with_name(path.name + ".failed")


def known_failure(path: Path) -> str | None:
    """The message of a failure to compute ``path`` recorded by this run (any process), or None;
    a record of another run is removed (that run's failure may be fixed now)."""
    record = failure_path(path)
    try:
        facts = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    if facts.get("run") == os.environ.get(RUN_TOKEN_ENV):
        return facts.get("message")
    record.unlink(missing_ok=True)
    return None


def record_failure(path: Path, message: str) -> None:
    """Record that computing ``path`` failed in this run, so other processes do not retry it
    (best effort: a full disk may refuse even this)."""
    from .report import atomic_write_text

    try:
        atomic_write_text(
            failure_path(path),
            json.dumps({"run": os.environ.get(RUN_TOKEN_ENV), "message": message}) + "\n",
        )
    except OSError:
        pass


def baseline_failure(exc: BaseException, path: Path, expected_bytes: int) -> BaselineError:
    """``exc`` (raised while computing the baseline cache ``path``) as one BaselineError message
    that says the baseline failed and why; a full disk adds the expected file size
    (``expected_bytes``, :func:`kldbase.expected_file_size`) and the free space there."""
    detail = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, OSError):
        detail = cache_write_error(exc).strerror or detail  # always set: OSError(errno, text)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            try:
                free = shutil.disk_usage(path.parent).free
            except OSError:
                free = None
            have = f", {free / 1e6:.1f} MB free there" if free is not None else ""
            detail += f" (the baseline file needs {expected_bytes / 1e6:.1f} MB{have})"
    return BaselineError(
        f"the baseline failed ({path}): {detail}; every item needs it, so no "
        "item of this run is measured"
    )


def sidecar_path(path: Path) -> Path:
    """The JSON beside a baseline file: its own PPL line and how long it took."""
    return path.with_name(path.name + ".json")


def write_baseline(
    model, tokens: np.ndarray, path: Path, on_decode: Callable[[int], None] | None = None
) -> None:
    """Evaluate every chunk of ``tokens`` with ``model`` and write the base file at ``path``.

    model: :class:`pytest_quantbench.engine.llama.LlamaModel` of the baseline; tokens: int32
    (n_chunk, n_ctx), decoded ``model.settings.n_seq`` chunks at a time (the layout every variant
    is evaluated with). The file is written atomically by :class:`KLDBaseWriter`; beside it,
    :func:`sidecar_path` records the base run's ``Final estimate`` line (PPL from the raw logits,
    as llama-perplexity prints it when writing a base file,
    docs/llama-perplexity.md#ppl-output, #base-file) and the seconds taken.
    ``on_decode(first_chunk)`` runs after each decode (prefix reuse captures hidden states there:
    :class:`pytest_quantbench.hidden.HiddenWriter`).
    """
    import time

    from .kldbase import KLDBaseWriter
    from .metrics import PPLAccumulator
    from .progress import Progress

    start = time.perf_counter()
    n_chunk, n_ctx = tokens.shape
    ppl = PPLAccumulator()
    progress = Progress("baseline", n_chunk)
    with KLDBaseWriter(path, n_ctx, model.n_vocab, tokens) as writer:
        n_seq = model.settings.n_seq
        for first in range(0, n_chunk, n_seq):
            for logits in model.eval_chunks(tokens[first : first + n_seq]):
                ppl.add(writer.write_chunk(logits))
            progress.update(min(first + n_seq, n_chunk))
            if on_decode is not None:
                on_decode(first)
    value, err = ppl.ppl()
    atomic_write_text(
        sidecar_path(path),
        json.dumps(
            {
                "final_estimate": ppl.final_line(n_ctx),
                "ppl": value,
                "ppl_err": err,
                "seconds": round(time.perf_counter() - start, 3),
                "bytes": path.stat().st_size,
            }
        )
        + "\n",
    )


def baseline_facts(path: Path) -> dict:
    """The sidecar of a cached baseline ({} when absent or unreadable)."""
    try:
        return json.loads(sidecar_path(path).read_text())
    except (OSError, ValueError):
        return {}


def open_user_base(config) -> KLDBaseFile:
    """Open ``config.kld_base`` (a llama-perplexity ``--kl-divergence-base`` file) for this run.

    The file decides n_ctx, the chunks and their tokens. ``--quantbench-chunks N`` reads its
    first N chunks (the statistics equal those of a file written with N chunks); a
    ``--quantbench-ctx`` set anywhere (CLI, YAML, ini) must equal the file's n_ctx.
    Raises ConfigError naming both numbers and the fix; KLDBaseFormatError for a bad file.
    """
    from .config import ConfigError

    path = config.kld_base
    base = KLDBaseFile(path)
    ctx_from = config.sources.get("ctx", "default")
    if ctx_from != "default" and config.ctx != base.n_ctx:
        raise ConfigError(
            f"--quantbench-ctx {config.ctx} (from {ctx_from}) but "
            f"--quantbench-kld-base {path} was computed with n_ctx={base.n_ctx}: "
            f"n_ctx comes from the base file; drop --quantbench-ctx or set it to "
            f"{base.n_ctx}"
        )
    if config.chunks is not None and config.chunks != base.n_chunk:
        if config.chunks > base.n_chunk:
            raise ConfigError(
                f"--quantbench-chunks {config.chunks} but --quantbench-kld-base "
                f"{path} holds {base.n_chunk} chunks: pass --quantbench-chunks "
                f"{base.n_chunk} or less, or a base file with more chunks"
            )
        base = KLDBaseFile(path, chunks=config.chunks)
    return base


def user_base_header(base: KLDBaseFile) -> str:
    """The run header's corpus line for a user base file: where n_ctx, chunks and tokens come
    from."""
    used = (
        f"all {base.n_chunk} chunks"
        if base.n_chunk == base.file_chunks
        else f"its first {base.n_chunk} of {base.file_chunks} chunks"
    )
    return f"kld-base {base.path} (n_ctx, chunks and tokens come from the base file; {used})"


def check_user_baseline(
    base: KLDBaseFile,
    n_vocab: int,
    corpus: Path | None = None,
    corpus_tokens: Callable[[], np.ndarray] | None = None,
) -> KLDBaseFile:
    """Check that a user-given ``--kl-divergence-base`` file fits the model (and the corpus, when
    ``--quantbench-corpus`` is given too); return it.

    corpus_tokens: returns the corpus's tokens, int32 (N,); called only when ``corpus`` is set.
    The base file holds its tokens, so a corpus is accepted only when its first
    ``n_chunk·n_ctx`` tokens are the file's (used) chunks.
    Raises ValueError when n_vocab differs or the tokens differ, naming the file and the fix.
    """
    if base.n_vocab != n_vocab:
        raise ValueError(
            f"--quantbench-kld-base {base.path} was computed for "
            f"n_vocab={base.n_vocab} but the model has n_vocab={n_vocab}: use the "
            "base file of this model"
        )
    if corpus is not None and corpus_tokens is not None:
        tokens, need = corpus_tokens(), base.n_chunk * base.n_ctx
        if len(tokens) < need:
            why: str | None = (
                f"it has {len(tokens)} tokens, the file's {base.n_chunk} chunks hold {need}"
            )
        else:
            differ = np.flatnonzero(np.asarray(tokens[:need]) != np.asarray(base.tokens).ravel())
            why = (
                None
                if differ.size == 0
                else f"its tokens differ from the file's, first at chunk {differ[0] // base.n_ctx + 1}"
                f" position {differ[0] % base.n_ctx}"
            )
        if why is not None:
            raise ValueError(
                f"--quantbench-corpus {corpus} does not match --quantbench-kld-base "
                f"{base.path} ({why}): the base file already holds the tokens; "
                "drop --quantbench-corpus, or give the corpus the file was "
                "computed from"
            )
    return base


class RunBaseline:
    """The baseline of one run: its logits file, computed once across workers and runs, or the
    user's ``--quantbench-kld-base`` file.

    Args:
        inputs: the run's :class:`~pytest_quantbench.runinputs.RunInputs` (chunks, tokenizer,
            identity, user base file, model and settings).
        swap_model: returns the worker's in-process
            :class:`~pytest_quantbench.engine.swap.SwapModel` (or None); with
            ``--quantbench-engine=inplace`` its loaded model computes the
            baseline too (same load, same settings).
        prefix: the run's :class:`~pytest_quantbench.prefix.PrefixReuse` (or None); when it is
            active, its ``baseline(path)`` computes the base file and the hidden states of the
            planned start layers in one pass.
    """

    def __init__(self, inputs, swap_model: Callable[[], SwapModel | None], prefix=None) -> None:
        self.inputs = inputs
        self._swap_model = swap_model
        self._prefix = prefix
        self._file: KLDBaseFile | None = None
        self._failure: BaselineError | None = None  # raised again by every later item

    @property
    def file(self) -> KLDBaseFile:
        """The baseline logits file (:class:`KLDBaseFile`), checked or computed on first use.

        Raises KLDBaseFormatError / ValueError (a user file that does not fit), EngineError.
        """
        if self._failure is not None:
            raise self._failure
        if self._file is None:
            ins = self.inputs
            n_vocab = ins.tokenizer.n_vocab
            if ins.user_base is not None:
                self._file = check_user_baseline(ins.user_base, n_vocab)
            elif self._prefix is not None and self._prefix.active:  # prefix reuse (issue 12)
                self._file = self._prefix.baseline(self.path)
            else:
                try:
                    self._file = ensure_baseline(
                        self.path, ins.chunk_tokens, n_vocab, self._compute_once, ins.model_source
                    )
                except BaselineError as exc:
                    self._failure = exc
                    raise
                except (ValueError, OSError, RuntimeError) as exc:  # e.g. DiskSpaceError
                    self._failure = BaselineError(
                        f"the baseline failed ({self.path}): {type(exc).__name__}: {exc}"
                    )
                    raise self._failure from None
        return self._file

    def _compute_once(self, dest: Path) -> None:
        """:meth:`_compute`, once per run across processes (under the baseline's lock): a
        failure is recorded beside the cache file and raised, as BaselineError, by every process
        that needs the baseline after it, without computing it again."""
        from .kldbase import expected_file_size

        known = known_failure(dest)
        if known is not None:
            raise BaselineError(known)
        try:
            self._compute(dest)
        except (ValueError, OSError, RuntimeError) as exc:
            tokens = self.inputs.chunk_tokens
            failure = baseline_failure(
                exc,
                dest,
                expected_file_size(tokens.shape[1], self.inputs.tokenizer.n_vocab, tokens.shape[0]),
            )
            record_failure(dest, str(failure))
            raise failure from None

    def _compute(self, dest: Path) -> None:
        """Evaluate the baseline into the base file: with the swap model when items use it
        (same load, same settings), else with a model loaded for this and freed."""
        from .engine.llama import LlamaModel

        ins = self.inputs
        swap = self._swap_model() if ins.config.engine == "inplace" else None
        if swap is not None:
            write_baseline(swap.model, ins.chunk_tokens, dest)
            return  # the worker's one model load serves the baseline and every swap
        with LlamaModel(ins.model_path, ins.eval_settings) as model:
            write_baseline(model, ins.chunk_tokens, dest)

    @property
    def path(self) -> Path:
        """Where this run's baseline logits are cached."""
        return baseline_cache_path(self.inputs.cache_dir, self.inputs.run_identity)

    def summary_lines(self) -> list[str]:
        """Summary lines about the baseline: its own PPL line, time and cache size."""
        ins = self.inputs
        if ins.user_base is not None:
            return [f"baseline: --quantbench-kld-base {ins.config.kld_base}"]
        facts = baseline_facts(self.path)
        if not facts:
            return []
        return [
            f"baseline: {facts['final_estimate']} (cached: {self.path}, "
            f"{facts['bytes'] / 1e6:.1f} MB, computed once in {facts['seconds']:.1f} s)"
        ]
