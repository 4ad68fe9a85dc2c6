"""Computing an importance matrix as llama-imatrix does: the engine's ``cb_eval`` collector
(:class:`_Collector`, reading tensors through :class:`pytest_quantbench.engine.ggml.Ggml`) and
:func:`compute_imatrix`."""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt

from ..engine.ggml import Ggml
from .formats import (
    Imatrix,
    ImatrixError,
    _atomic_write_bytes,
    _legacy_bytes,
    load_imatrix,
)

log = logging.getLogger(__name__)


def _filter_tensor_name(name: str) -> str:
    """llama-imatrix's filter_tensor_name: ``CUDA0#blk.0.attn_k.weight#0`` → the weight name."""
    if "#" in name:
        rest = name.split("#", 1)[1]
        return rest.split("#", 1)[0]
    return name


class _Stats:
    """Running sums of one weight: float32 Σx² per (matrix, column), tokens per matrix, calls."""

    __slots__ = ("values", "counts", "ncall", "n_as")

    def __init__(self, ne0: int, n_as: int) -> None:
        self.values = np.zeros((n_as, ne0), dtype=np.float32)
        self.counts = np.zeros(n_as, dtype=np.int64)
        self.ncall = 0
        self.n_as = n_as


class _Collector:
    """The ``cb_eval`` callback: collect Σx² of src1's columns for each MUL_MAT(_ID) of a weight.

    Follows llama-imatrix's ``collect_imatrix`` (ik_llama.cpp examples/imatrix/imatrix.cpp):
    ask phase: MUL_MAT with src1 F32 of ≥ 16 rows and src0 a ``blk.*`` weight (``output.weight``
    too with ``process_output``), and MUL_MAT_ID of such a weight; collect phase: for MUL_MAT,
    every row x of src1 adds x_j² to column j (float32 running sums, row by row) and one to the
    count, and ncall += 1; for MUL_MAT_ID, row ``idx % ne11`` of token ``row`` goes to expert
    ``ids[row, idx]``. Exceptions are kept (a C callback cannot raise) and re-raised by
    :meth:`raise_if_failed`; the callback always returns true so the graph finishes.
    """

    def __init__(self, api: Ggml, weight_names: set[str], process_output: bool) -> None:
        self.api = api
        self.Tensor = api.header.Tensor
        self.weights = weight_names
        self.process_output = process_output
        self.stats: dict[str, _Stats] = {}
        self.last_call = 0
        self.error: BaseException | None = None

    def __call__(self, t_ptr: int, ask: bool, _user: object) -> bool:
        try:
            t = self.Tensor.from_address(t_ptr)
            if ask:
                return self._wanted(t)
            self._collect(t)
        except BaseException as exc:  # noqa: BLE001 - must not propagate into C
            if self.error is None:
                self.error = exc
        return True

    def raise_if_failed(self) -> None:
        if self.error is not None:
            err, self.error = self.error, None
            raise err

    def _weight_name(self, t) -> str | None:
        src0 = t.src[0]
        if not src0:
            return None
        name = _filter_tensor_name(self.Tensor.from_address(src0).name.decode("utf-8", "replace"))
        if name not in self.weights:
            return None
        if name.startswith("blk.") or (self.process_output and name == "output.weight"):
            return name
        return None

    def _wanted(self, t) -> bool:
        api = self.api
        if t.op == api.MUL_MAT_ID:
            return self._weight_name(t) is not None
        if t.op != api.MUL_MAT or not t.src[1]:
            return False
        src1 = self.Tensor.from_address(t.src[1])
        if src1.ne[1] < 16 or src1.type != api.F32:
            return False
        return self._weight_name(t) is not None

    def _read(self, ptr: int, dtype: npt.DTypeLike) -> np.ndarray:
        """A tensor's elements as an ndarray of shape (ne3, ne2, ne1, ne0) (a copy)."""
        return self.api.read(ptr, dtype)

    def _entry(self, name: str, ne0: int, n_as: int) -> _Stats:
        e = self.stats.get(name)
        if e is None:
            e = self.stats[name] = _Stats(ne0, n_as)
        elif e.values.shape != (n_as, ne0):
            raise ImatrixError(
                f"inconsistent size for {name}: {e.values.size} vs {ne0 * n_as} "
                "(llama-imatrix: 'Oops: inconsistent size')"
            )
        return e

    def _collect(self, t) -> None:
        api = self.api
        name = self._weight_name(t)
        if name is None:
            return
        src0 = self.Tensor.from_address(t.src[0])
        x = self._read(t.src[1], np.float32)  # (ne13, ne12, ne11, ne10)
        ne10 = x.shape[3]
        if t.op == api.MUL_MAT_ID:
            n_as = int(src0.ne[2])
            ids = self._read(t.src[2], np.int32)[0, 0]  # (n_tokens, n_ids)
            x = x[0]  # (n_tokens, ne11, ne10)
            n_tokens, n_ids = ids.shape
            if n_tokens != x.shape[0]:
                raise ImatrixError(f"{name}: ids has {n_tokens} rows, src1 {x.shape[0]}")
            if ids.size and (ids.min() < 0 or ids.max() >= n_as):
                raise ImatrixError(f"{name}: expert id outside 0…{n_as - 1}")
            e = self._entry(name, ne10, n_as)
            e.ncall += 1
            # llama-imatrix adds, per expert, rows in (idx, token) order; np.add.at is unbuffered
            # and applies them in this order too.
            experts = ids.T.reshape(-1)  # (n_ids·n_tokens,)
            rows = x[:, np.arange(n_ids) % x.shape[1], :]  # (n_tokens, n_ids, ne10)
            rows = rows.transpose(1, 0, 2).reshape(-1, ne10)
            np.add.at(e.values, experts, rows * rows)
            np.add.at(e.counts, experts, 1)
        else:
            rows = x.reshape(-1, ne10)
            e = self._entry(name, ne10, 1)
            e.ncall += 1
            # float32 running sums, row after row, as llama-imatrix's values[j] += x[j]*x[j]
            # (numpy reduces axis 0 of a C-contiguous array sequentially, row by row)
            stack = np.empty((rows.shape[0] + 1, ne10), dtype=np.float32)
            stack[0] = e.values[0]
            np.multiply(rows, rows, out=stack[1:])
            e.values[0] = np.add.reduce(stack, axis=0)
            e.counts[0] += rows.shape[0]
        if not np.isfinite(e.values).all():
            raise ImatrixError(f"non-finite sum of squares in {name} (llama-imatrix exits here)")
        self.last_call = max(self.last_call, e.ncall)

    def records(self) -> list[tuple[str, int, np.ndarray]]:
        """(name, ncall, values) as llama-imatrix's save_imatrix writes them.

        values[i] = (Σx²[i] / count[i]) · ncall in float32. Entries without data are skipped;
        a MoE entry with experts that saw no token is kept (those experts get 1) when fewer than
        round(5 % of the experts) lack data, else skipped (ik's rule), with a warning.
        """
        out = []
        for name, e in self.stats.items():
            counts = e.counts.copy()
            values = e.values.copy()
            zero = counts == 0
            if zero.all():
                log.warning("imatrix entry %s has no data - skipping", name)
                continue
            if zero.any():
                if e.n_as > 1 and zero.sum() < math.floor(e.n_as * 0.05 + 0.5):
                    log.warning(
                        "imatrix entry %s: %d of %d experts are missing data; storing 1 for them",
                        name,
                        int(zero.sum()),
                        e.n_as,
                    )
                    counts[zero] = 1
                    values[zero] = 1
                else:
                    log.warning(
                        "imatrix entry %s has partial data (%d of %d experts) - skipping",
                        name,
                        int((~zero).sum()),
                        e.n_as,
                    )
                    continue
            mean = values / counts.astype(np.float32)[:, None]
            out.append((name, e.ncall, (mean * np.float32(e.ncall)).astype(np.float32).ravel()))
        return out


def compute_imatrix(
    model_path: str | os.PathLike[str],
    eval_settings,
    chunk_tokens: np.ndarray,
    dest: str | os.PathLike[str],
    *,
    lib_path: Path | None = None,
    dataset: str = "",
    process_output: bool = False,
) -> Imatrix:
    """Compute an importance matrix as llama-imatrix does and write it (legacy layout) to ``dest``.

    Loads the model with a context whose ``cb_eval`` is the collector (fused up/gate ops off, so
    ``ffn_up``/``ffn_gate`` are separate MUL_MATs, as ik's ``--no-fused-up-gate`` advice for
    imatrix runs), decodes every chunk with all positions as outputs (llama-imatrix's
    ``logits_all``), and for each weight ``W`` (``blk.*``; ``output.weight`` only with
    ``process_output``, as ``--process-output``) accumulates, over every token row x of the
    matmul input, Σ x_j² per input column j, the tokens counted and the calls (one per ubatch).
    The file stores (Σx²/count)·ncall per column, so llama-quantize's division by ncall yields
    the mean of x_j² over tokens. ``token_embd`` (a row lookup, not a matmul) gets no entry.
    MoE weights (MUL_MAT_ID) get one vector per expert, routed by the ids tensor.

    Args:
        model_path: GGUF model (first shard of a split model).
        eval_settings: :class:`pytest_quantbench.engine.llama.EvalSettings` (n_ctx = chunk
            length; n_ubatch = min(512, n_ctx) as llama-imatrix's default).
        chunk_tokens: int32 (n_chunk, n_ctx): the chunks, as for perplexity (BOS replaces the
            first token of each chunk when the vocabulary adds BOS).
        dest: output ``.dat`` path, written atomically.
        lib_path: libllama to use (default: the wheel's). dataset: the calibration text's name,
            stored after the entries. process_output: also collect ``output.weight``.
    Returns:
        the written file, loaded (:func:`load_imatrix`).
    Raises:
        ValueError: chunk_tokens has the wrong shape. EngineError: the engine fails or its
        ggml.h / libggml cannot be bound. ImatrixError: no matmul of a weight was seen.
    """
    from ..engine import bindings
    from ..engine.llama import LlamaModel
    from ..gguf import read_model_header

    tokens = np.ascontiguousarray(chunk_tokens, dtype=np.int32)
    if tokens.ndim != 2 or tokens.shape[1] != eval_settings.n_ctx or tokens.shape[0] < 1:
        raise ValueError(
            f"chunk_tokens must be int32 (n_chunk ≥ 1, n_ctx={eval_settings.n_ctx}), "
            f"got shape {tokens.shape}"
        )
    header = read_model_header(model_path)
    lib = bindings.load_library(lib_path)
    api = Ggml(lib.quantbench_path)
    collector = _Collector(api, {t.name for t in header.tensors}, process_output)
    callback = bindings.ggml_backend_sched_eval_callback(collector)

    def hook(cparams) -> None:
        cparams.cb_eval = callback
        cparams.cb_eval_user_data = None
        cparams.fused_up_gate = False
        cparams.fused_moe_up_gate = False
        cparams.fused_mmad = False

    from ..progress import Progress

    start = time.perf_counter()
    progress = Progress("imatrix", tokens.shape[0])
    with LlamaModel(Path(model_path), eval_settings, lib_path, context_params_hook=hook) as model:
        for done, chunk in enumerate(tokens, 1):
            model.decode_all_outputs(chunk)
            collector.raise_if_failed()
            progress.update(done)
    records = collector.records()
    if not records:
        raise ImatrixError(
            f"computing an importance matrix for {model_path}: the engine ran no "
            "matrix multiplication of a blk.* weight with ≥ 16 tokens; use chunks "
            "of ≥ 16 tokens"
        )
    _atomic_write_bytes(Path(dest), _legacy_bytes(records, collector.last_call, dataset))
    log.info(
        "imatrix: %d entries from %d chunks of %d tokens in %.1f s -> %s",
        len(records),
        tokens.shape[0],
        tokens.shape[1],
        time.perf_counter() - start,
        dest,
    )
    return load_imatrix(dest)
