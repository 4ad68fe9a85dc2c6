"""A loaded model and one evaluation context: tokenize a corpus and evaluate chunks to logits.

Evaluation follows llama-perplexity's KLD mode
(docs/llama-perplexity.md#chunks – #scored-positions, #kld-run): every chunk is C tokens at
positions 0…C−1 with a cleared KV cache, its first token overwritten by BOS when the vocabulary adds
BOS, and the logits of positions C/2 … C−2 are the scored rows. Flash attention is on and n_ubatch
is min(512, C), as llama-perplexity's defaults on ik_llama.cpp. Several chunks can share one decode
as separate sequences (EvalSettings.n_seq), as llama-perplexity's base run does
(docs/llama-perplexity.md#chunks).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import bindings


class EngineError(RuntimeError):
    """The engine failed on a model or a batch; the message carries the engine's last log lines."""


@dataclass(frozen=True)
class EvalSettings:
    """Context settings shared by the baseline and every variant (so their logits are comparable).

    n_ctx: the chunk length C (tokens); threads: CPU threads for decode; n_gpu_layers: layers
    offloaded to a GPU build (0 on CPU); flash_attn: llama-perplexity's default on ik (True);
    n_seq: chunks decoded together as separate sequences in one call (llama-perplexity's
    n_seq = n_batch/C of its base run, docs/llama-perplexity.md#chunks). With n_seq > 1 the physical
    batch holds all of them (n_ubatch = n_seq·C), which feeds a GPU larger matrix products; with 1
    (default), n_ubatch = min(512, C) as llama-perplexity's KLD run. single_gpu: split mode NONE
    (one GPU per worker, ``--quantbench-gpus``); otherwise the engine's default split over the GPUs
    it sees.
    """

    n_ctx: int
    threads: int
    n_gpu_layers: int = 0
    flash_attn: bool = True
    n_seq: int = 1
    single_gpu: bool = False

    @property
    def n_batch(self) -> int:
        """Logical batch size (tokens per decode call): n_seq·C."""
        return self.n_seq * self.n_ctx

    @property
    def n_ubatch(self) -> int:
        """Physical batch size: llama-perplexity's default 512 clamped to C for one sequence,
        the whole batch (n_seq·C) for several."""
        return min(512, self.n_ctx) if self.n_seq == 1 else self.n_batch

    @property
    def layout(self) -> str:
        """The batch layout as it enters the run key and header, e.g. ``fa=1,ub=512,seq=1``:
        identical weights give bit-identical logits only under the same layout."""
        return f"fa={int(self.flash_attn)},ub={self.n_ubatch},seq={self.n_seq}"


def scored_range(n_ctx: int) -> tuple[int, int]:
    """First scored position and the number of scored positions S of a chunk of n_ctx tokens.

    As llama-perplexity (docs/llama-perplexity.md#scored-positions): first = floor(C/2), S = C − 1 −
    floor(C/2).
    """
    first = n_ctx // 2
    return first, n_ctx - 1 - first


class LlamaModel:
    """One GGUF model loaded (mmap) into the engine, with one evaluation context.

    Use as a context manager or call :meth:`close`. Raises :class:`EngineError` when the engine
    refuses the file (the message holds the engine's log tail: unknown architecture, bad tensor…).
    """

    def __init__(
        self,
        path: Path,
        settings: EvalSettings,
        lib_path: Path | None = None,
        *,
        vocab_only: bool = False,
        context_params_hook: Callable[[bindings.llama_context_params], None] | None = None,
    ) -> None:
        """``vocab_only`` loads just the vocabulary (tokenize only: no weights, no context).

        ``context_params_hook`` is called with the ``llama_context_params`` just before the
        context is created, after the settings above are applied (the importance-matrix collector
        sets ``cb_eval`` there and turns the fused up/gate ops off).
        """
        self._context_params_hook = context_params_hook
        self.lib = bindings.load_library(lib_path)
        self.path = Path(path)
        self.settings = settings
        self._model = None
        self._ctx = None
        mparams = self.lib.llama_model_default_params()
        mparams.n_gpu_layers = settings.n_gpu_layers
        mparams.use_mmap = True
        if settings.single_gpu:
            mparams.split_mode = 0  # LLAMA_SPLIT_MODE_NONE: the worker's one GPU holds it all
            mparams.main_gpu = 0
        mparams.vocab_only = vocab_only
        self.lib.log_tail.lines.clear()
        self._model = self.lib.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not self._model:
            raise EngineError(
                f"the engine could not load model {self.path}:\n{self.lib.log_tail.text()}"
            )
        vocab = self.lib.llama_model_get_vocab(self._model)
        self.n_vocab = int(self.lib.llama_n_vocab(self._model))
        self.n_ctx_train = int(self.lib.llama_n_ctx_train(self._model))
        self.add_bos = bool(self.lib.llama_vocab_get_add_bos(vocab))
        self.add_eos = bool(self.lib.llama_vocab_get_add_eos(vocab))
        self.bos = int(self.lib.llama_vocab_bos(vocab))
        if not vocab_only:
            self._create_context()

    def _create_context(self) -> None:
        settings = self.settings
        cparams = self.lib.llama_context_default_params()
        cparams.n_ctx = settings.n_batch  # KV cells for every sequence, as llama-perplexity
        cparams.n_batch = settings.n_batch
        cparams.n_ubatch = settings.n_ubatch
        cparams.n_seq_max = settings.n_seq
        cparams.n_threads = settings.threads
        cparams.n_threads_batch = settings.threads
        cparams.flash_attn = settings.flash_attn
        cparams.graph_reuse = False
        from .devices import CUDA_PARAMS_NO_GRAPHS, is_gpu_build

        if is_gpu_build():  # CUDA graphs off: a captured graph ignores a swapped weight's type
            self._cuda_params = ctypes.create_string_buffer(CUDA_PARAMS_NO_GRAPHS)
            cparams.cuda_params = ctypes.cast(self._cuda_params, ctypes.c_void_p)
        if self._context_params_hook is not None:
            self._context_params_hook(cparams)
        self._ctx = self.lib.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            self.close()
            raise EngineError(
                f"the engine could not create a context (n_ctx={settings.n_ctx}) for {self.path}:\n"
                f"{self.lib.log_tail.text()}"
            )
        self._batch = self.lib.llama_batch_init(settings.n_batch, 0, 1)

    def synchronize(self) -> None:
        """Wait for the context's queued device work (``llama_synchronize``); no-op without a
        context."""
        if self._ctx:
            self.lib.llama_synchronize(self._ctx)

    def __enter__(self) -> LlamaModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Free the context, batch and model (idempotent)."""
        if self._ctx:
            self.lib.llama_batch_free(self._batch)
            self.lib.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            self.lib.llama_free_model(self._model)
            self._model = None

    def describe(self) -> str:
        """The engine's one-line model description (e.g. ``llama ?B BF16``)."""
        buf = ctypes.create_string_buffer(256)
        self.lib.llama_model_desc(self._model, buf, 256)
        return buf.value.decode("utf-8", "replace")

    def tokenize(self, text: str) -> np.ndarray:
        """Tokenize ``text`` as one stream, as llama-perplexity does
        (docs/llama-perplexity.md#input).

        Special tokens are added (BOS once at the start if the vocabulary adds BOS), not parsed.
        Returns int32 array (N,). Raises EngineError if the engine fails.
        """
        data = text.encode("utf-8")
        n_max = len(data) + 16
        buf = (bindings.llama_token * n_max)()
        n = self.lib.llama_tokenize(self._model, data, len(data), buf, n_max, True, False)
        if n < 0:
            raise EngineError(f"tokenization failed ({n}) for {len(data)} bytes of text")
        return np.frombuffer(memoryview(buf), dtype=np.int32, count=n).copy()

    def eval_chunk(self, tokens: np.ndarray) -> np.ndarray:
        """Evaluate one chunk and return the logits of its scored positions.

        Args:
            tokens: int32 (C,) with C == settings.n_ctx, the chunk's original tokens.
        Returns:
            float32 (S, V): logits of positions first … C−2
            (docs/llama-perplexity.md#scored-positions), a copy.
        Raises:
            EngineError: decode failed (with the engine's log tail).
        """
        return self.eval_chunks(tokens[np.newaxis])[0]

    def eval_chunks(self, tokens: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Evaluate k ≤ n_seq chunks in one decode, chunk j as sequence j, and return the logits
        of their scored positions.

        Args:
            tokens: int32 (k, C) with C == settings.n_ctx and 1 ≤ k ≤ settings.n_seq.
            out: float32 (k, S, V) to copy the logits into, or None for a new array. A chunk
                loop that reuses its arrays saves the page faults of a fresh one per decode
                (about 30 ms per 50 MB on a 2-core VM, against 5 ms for the copy itself).
        Returns:
            float32 (k, S, V): logits of positions first … C−2 of each chunk
            (docs/llama-perplexity.md#scored-positions), a copy (``out`` when given).
        Raises:
            EngineError: decode failed (with the engine's log tail); ValueError: wrong shape of
            ``tokens`` or ``out``.
        """
        first, n_scored = scored_range(self.settings.n_ctx)
        shape = (tokens.shape[0], n_scored, self.n_vocab)
        if out is not None and (out.shape != shape or out.dtype != np.float32):
            raise ValueError(f"out must be float32 {shape}, got {out.dtype} {out.shape}")
        self._decode(tokens, first, n_scored)
        logits = np.ctypeslib.as_array(self.lib.llama_get_logits(self._ctx), shape=shape)
        if out is None:
            return logits.copy()
        np.copyto(out, logits)
        return out

    def decode_all_outputs(self, tokens: np.ndarray) -> None:
        """Evaluate one chunk with every position an output, as llama-imatrix does (logits_all).

        Same chunk layout as :meth:`eval_chunk` (positions 0…C−1, cleared KV cache, BOS first when
        the vocabulary adds BOS), but no position is skipped, so the last layer sees all C tokens
        (with only the scored outputs it would see C/2 of them). Used to collect an importance
        matrix through the context's ``cb_eval`` (which does not read the logits), and by
        ``benchmarks/bench_eval.py`` as llama-perplexity's all-logits decode (the logits are then
        at ``llama_get_logits``, (C, V) float32, until the next decode).

        Args:
            tokens: int32 (C,) with C == settings.n_ctx.
        Raises:
            EngineError: decode failed (with the engine's log tail).
        """
        self._decode(tokens[np.newaxis], 0, self.settings.n_ctx)

    def _decode(self, tokens: np.ndarray, first: int, n_out: int) -> None:
        """Decode k chunks, chunk j as sequence j (positions 0…C−1, KV cache cleared first, BOS
        first when the vocabulary adds BOS), with outputs at positions ``first … first+n_out−1``
        of each chunk. The outputs are in chunk order, then position order.

        Raises EngineError (tokenizer-only model, failed decode with the log tail), ValueError
        (tokens not int32 (k, n_ctx) with 1 ≤ k ≤ n_seq).
        """
        if not self._ctx:
            raise EngineError(f"{self.path} was loaded for tokenizing only; it cannot evaluate")
        n_ctx, n_seq = self.settings.n_ctx, self.settings.n_seq
        if tokens.ndim != 2 or tokens.shape[1] != n_ctx or not 1 <= tokens.shape[0] <= n_seq:
            raise ValueError(
                f"chunks must be (k ≤ {n_seq}, n_ctx={n_ctx}) tokens, got shape {tokens.shape}"
            )
        k = tokens.shape[0]
        n = k * n_ctx
        batch = self._batch
        tok = np.ctypeslib.as_array(batch.token, shape=(n,))
        pos = np.ctypeslib.as_array(batch.pos, shape=(n,))
        nseq = np.ctypeslib.as_array(batch.n_seq_id, shape=(n,))
        want = np.ctypeslib.as_array(batch.logits, shape=(k, n_ctx))
        tok[:] = tokens.ravel()
        if self.add_bos:
            tok[::n_ctx] = self.bos
        pos[:] = np.tile(np.arange(n_ctx, dtype=np.int32), k)
        nseq[:] = 1
        for i in range(n):
            batch.seq_id[i][0] = i // n_ctx
        want[:] = 0
        want[:, first : first + n_out] = 1
        batch.n_tokens = n
        self.lib.llama_kv_cache_clear(self._ctx)
        rc = self.lib.llama_decode(self._ctx, batch)
        if rc != 0:
            raise EngineError(f"llama_decode failed ({rc}):\n{self.lib.log_tail.text()}")
