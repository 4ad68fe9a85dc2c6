"""Prefix reuse on the CPU engine: capture a layer's input hidden states, evaluate only the tail.

For a tensor in layer L of N, layers 0…L−1 compute exactly what the baseline computed. This
module provides the three engine pieces that let an item evaluate layers L…N−1 and the output
head only (issue 12; README.md#prefix-reuse):

* :class:`HiddenCapture` — a ``cb_eval`` that asks the scheduler only for the graph nodes
  ``l_out-(L−1)`` (the input of layer L, f32 n_embd × n_tokens) and copies them out. Asking for
  a node splits the graph there but changes no arithmetic, so the logits stay bit-identical.
* :func:`write_tail_gguf` — a header-only GGUF: the full model's metadata with
  ``<arch>.block_count = N−L`` (per-layer metadata arrays sliced to L…N−1), the layers L…N−1
  renamed 0…N−L−1, every tensor info at offset 0, and a data section that is one sparse region
  as large as the largest tensor (no weight is copied; the file takes a few MB on disk).
* :class:`TailModel` — that file loaded (mmap) with the worker's evaluation settings, every
  tensor's ``type``, ``nb[]`` and ``data`` pointed at the already-loaded full model's tensor
  (tail ``blk.i`` → full ``blk.(L+i)``), including the engine's duplicate tensors that
  ``llama_get_model_tensor`` does not return (the output head of a model with tied embeddings is
  a second ``ggml_tensor`` named ``token_embd.weight``): those are found as graph sources during
  the first decode and re-pointed before the node that reads them runs. Evaluation feeds
  ``llama_batch.embd`` with the stored rows (positions, sequence ids and scored outputs as
  :meth:`LlamaModel.eval_chunks`).

The ``ggml_tensor`` layout is the loaded library's own, read from its ``ggml.h`` by
:class:`pytest_quantbench.engine.ggml.Ggml` (:func:`ggml_for`, one binding per library).
"""

from __future__ import annotations

import ctypes
import os
import re
import struct
from pathlib import Path

import numpy as np

from .. import gguf as gguf_reader
from . import bindings
from .ggml import Ggml
from .llama import EngineError, EvalSettings, LlamaModel, scored_range
from .swap import TensorSwap

_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")
_GGML: dict[Path, Ggml] = {}


def ggml_for(lib_path: Path | None = None) -> Ggml:
    """The :class:`~pytest_quantbench.engine.ggml.Ggml` binding of the libllama at ``lib_path``
    (None: the default library), made once per library and process. Loads the library.
    Raises EngineError (EngineLibraryError) when the library or its ggml.h cannot be bound."""
    path = bindings.load_library(lib_path).quantbench_path
    if path not in _GGML:
        _GGML[path] = Ggml(path)
    return _GGML[path]


def hidden_node_name(first_layer: int) -> str:
    """Graph node holding the input of layer ``first_layer`` (L ≥ 1): ``l_out-(L−1)``
    (the engine's per-layer output name, llama.cpp's ``cb(cur, "l_out", il)``)."""
    if first_layer < 1:
        raise ValueError(f"the input of layer {first_layer} is not a layer output; L must be ≥ 1")
    return f"l_out-{first_layer - 1}"


class HiddenCapture:
    """``cb_eval`` that copies the input hidden states of the given layers out of every decode.

    Args:
        layers: first layers L (≥ 1) whose input ``l_out-(L−1)`` is wanted; n_embd: model width;
        lib_path: the libllama the model will be loaded with (None: the default one).
    Use :meth:`hook` as ``LlamaModel(context_params_hook=…)``; after each decode,
    :meth:`take` returns ``{L: float32 (n_tokens, n_embd)}`` in batch order (ubatches
    concatenated). Errors inside the callback are re-raised by :meth:`take` (EngineError).
    """

    def __init__(self, layers, n_embd: int, lib_path: Path | None = None) -> None:
        self.n_embd = n_embd
        self.ggml = ggml_for(lib_path)
        self._by_name = {hidden_node_name(layer): layer for layer in sorted(set(layers))}
        self._rows: dict[int, list[np.ndarray]] = {layer: [] for layer in self._by_name.values()}
        self._error: str | None = None
        self._callback = bindings.ggml_backend_sched_eval_callback(self._on_node)

    def hook(self, cparams: bindings.llama_context_params) -> None:
        """Set this capture as the context's ``cb_eval``."""
        cparams.cb_eval = self._callback
        cparams.cb_eval_user_data = None

    def _on_node(self, address: int, ask: bool, _user: object) -> bool:
        try:
            t = self.ggml.tensor(address)
            layer = self._by_name.get(t.name.decode("utf-8", "replace"))
            if ask or layer is None:
                return layer is not None
            if t.type != self.ggml.F32 or t.ne[0] != self.n_embd or t.ne[2] != 1 or t.ne[3] != 1:
                raise EngineError(
                    f"graph node {t.name.decode()} is type {t.type} shape "
                    f"{list(t.ne)}, expected f32 ({self.n_embd}, n_tokens)"
                )
            n_tokens = int(t.ne[1])
            rows = np.lib.stride_tricks.as_strided(
                np.frombuffer(
                    memoryview((ctypes.c_char * (int(t.nb[1]) * n_tokens)).from_address(t.data)),
                    dtype=np.float32,
                ),
                shape=(n_tokens, self.n_embd),
                strides=(int(t.nb[1]), int(t.nb[0])),
            )
            self._rows[layer].append(rows.copy())
        except Exception as exc:  # noqa: BLE001 (a ctypes callback must not raise)
            self._error = self._error or f"{type(exc).__name__}: {exc}"
            return False
        return True

    def take(self) -> dict[int, np.ndarray]:
        """The rows captured since the last call: {L: float32 (n_tokens, n_embd)}.

        Raises EngineError when the callback failed or a wanted node never ran (an architecture
        whose graph does not name its layer outputs ``l_out-<il>``)."""
        if self._error:
            raise EngineError(f"capturing hidden states failed: {self._error}")
        out = {}
        for layer, parts in self._rows.items():
            if not parts:
                raise EngineError(
                    f"the engine's graph has no node {hidden_node_name(layer)}: "
                    "prefix reuse cannot capture the input of layer "
                    f"{layer}; use --quantbench-prefix-reuse=off"
                )
            out[layer] = np.concatenate(parts) if len(parts) > 1 else parts[0]
            parts.clear()
        return out


# --------------------------------------------------------------------------------------------
# the header-only tail GGUF
# --------------------------------------------------------------------------------------------


def _kv_records(path: Path) -> tuple[int, list[tuple[str, bytes]], int]:
    """(version, [(key, raw value-type + value bytes)], start of the tensor infos) of a GGUF."""
    import mmap

    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        r = gguf_reader._Reader(buf, 4)
        version = r.u32("version")
        r.u64("tensor count")
        n_kv = r.u64("kv count")
        records = []
        for _ in range(n_kv):
            key = r.string("key")
            start = r.pos
            vtype = r.u32(f"value type of {key}")
            gguf_reader._read_value(r, vtype, key, 0)
            records.append((key, bytes(buf[start : r.pos])))
        return version, records, r.pos


def _gguf_string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _slice_layer_array(raw: bytes, n_layer: int, first_layer: int) -> bytes:
    """A per-layer metadata array (n_layer scalars) cut to layers first_layer…n_layer−1."""
    if len(raw) < 16 or struct.unpack_from("<I", raw)[0] != gguf_reader._ARR:
        return raw
    vtype, etype, count = struct.unpack_from("<IIQ", raw)
    size = gguf_reader._SCALAR_SIZE.get(etype)
    if vtype != gguf_reader._ARR or size is None or count != n_layer:
        return raw
    body = raw[16 + first_layer * size : 16 + count * size]
    return struct.pack("<IIQ", vtype, etype, n_layer - first_layer) + body


def tail_tensor_names(names, first_layer: int) -> dict[str, str]:
    """Tail tensor name → full model tensor name: ``blk.i.X`` ← ``blk.(L+i).X`` for every full
    layer ≥ L, every non-``blk`` tensor under its own name; layers < L are dropped."""
    out = {}
    for name in names:
        m = _BLK.match(name)
        if m is None:
            out[name] = name
        elif int(m.group(1)) >= first_layer:
            out[f"blk.{int(m.group(1)) - first_layer}.{m.group(2)}"] = name
    return out


def write_tail_gguf(model_path: Path, first_layer: int, dest: Path) -> Path:
    """Write the header-only tail GGUF of layers ``first_layer``…N−1 of ``model_path`` to ``dest``.

    Same metadata except ``<arch>.block_count = N−L`` (every ``<arch>.*`` array of N scalars is
    cut to its last N−L entries; ``split.*`` keys are dropped: the tail is one file); tensors
    as :func:`tail_tensor_names`, each info at offset 0; the data section is a hole of the
    largest tensor's size (``truncate``), so the file takes a few MB on disk whatever the model.
    Written atomically (temp + ``os.replace``).

    Raises ValueError for L outside 1…N−1, GGUFError for an unreadable model.
    """
    header = gguf_reader.read_model_header(model_path, max_array_items=0)
    arch, n_layer = header.architecture, header.n_layer
    if not n_layer or not 1 <= first_layer < n_layer:
        raise ValueError(
            f"a tail must start at a layer 1…{(n_layer or 1) - 1} of {model_path}, "
            f"got {first_layer}"
        )
    version, records, _ = _kv_records(Path(header.shards[0]) if header.shards else model_path)
    kv = []
    for key, raw in records:
        if key.startswith("split."):
            continue
        if key == f"{arch}.block_count":
            vtype = struct.unpack_from("<I", raw)[0]
            fmt = "<" + gguf_reader._SCALAR_FMT[vtype]
            raw = struct.pack("<I", vtype) + struct.pack(fmt, n_layer - first_layer)
        elif key.startswith(f"{arch}."):
            raw = _slice_layer_array(raw, n_layer, first_layer)
        kv.append(_gguf_string(key) + raw)
    names = tail_tensor_names([t.name for t in header.tensors], first_layer)
    infos = []
    for tail_name, full_name in names.items():
        t = header.tensor(full_name)
        infos.append(
            _gguf_string(tail_name)
            + struct.pack(f"<I{len(t.shape)}QIQ", len(t.shape), *t.shape, t.ggml_type, 0)
        )
    head = b"GGUF" + struct.pack("<IQQ", version, len(infos), len(kv)) + b"".join(kv + infos)
    alignment = header.alignment
    data_offset = -(-len(head) // alignment) * alignment
    largest = max(t.n_bytes for t in header.tensors)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(head)
            fh.truncate(data_offset + -(-largest // alignment) * alignment)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


# --------------------------------------------------------------------------------------------
# the tail model
# --------------------------------------------------------------------------------------------


def _point(dst, src) -> None:
    """Make ``dst`` read ``src``'s weights (both ``Ggml.Tensor`` views): same type, strides and
    data pointer."""
    if tuple(dst.ne) != tuple(src.ne):
        raise EngineError(
            f"tail tensor {dst.name.decode()} has shape {list(dst.ne)}, the full "
            f"model's {src.name.decode()} {list(src.ne)}"
        )
    dst.type = src.type
    for i in range(len(dst.nb)):
        dst.nb[i] = src.nb[i]
    dst.data = src.data


class TailModel(TensorSwap):
    """A header-only tail GGUF loaded and pointed at a loaded full model's weights.

    Args:
        full: the worker's loaded full model (:class:`LlamaModel`, e.g. ``SwapModel.model``);
        tail_path: :func:`write_tail_gguf`'s file for ``first_layer``; first_layer: L (≥ 1);
        settings: the evaluation settings (the full model's, so the layouts match).
    Attributes:
        model: the tail's :class:`LlamaModel`; names: tail → full tensor names;
        duplicates: names of the engine-internal duplicate tensors re-pointed during the first
        decode (``["token_embd.weight"]`` for tied embeddings).
    Raises EngineError when the engine refuses the file or a tensor cannot be matched.
    """

    def __init__(
        self, full: LlamaModel, tail_path: Path, first_layer: int, settings: EvalSettings
    ) -> None:
        self.full = full
        self.ggml = ggml_for(full.lib.quantbench_path)
        self._init_swap(private_buffers=False)  # an item's swap on the tail's tensors: the same
        # code as on the full model (engine.swap.TensorSwap), through tensor()
        self.first_layer = first_layer
        self.settings = settings
        self.duplicates: list[str] = []
        self._armed = True
        self._error: str | None = None
        self._callback = bindings.ggml_backend_sched_eval_callback(self._on_node)
        header = gguf_reader.read_header(tail_path, max_array_items=0)
        full_names = [
            t.name for t in gguf_reader.read_model_header(full.path, max_array_items=0).tensors
        ]
        self.names = tail_tensor_names(full_names, first_layer)
        self._tail_name = {full_name: name for name, full_name in self.names.items()}
        if set(self.names) != {t.name for t in header.tensors}:
            raise EngineError(f"{tail_path} is not the tail at layer {first_layer} of {full.path}")
        self.model = LlamaModel(
            Path(tail_path), settings, full.lib.quantbench_path, context_params_hook=self._hook
        )
        lib = self.model.lib
        # lib["…"] is a function object of our own: the declarations other modules give the
        # shared library's attributes (Ggml.bind_model_tensor_lookup's llama_get_model_tensor) stay as they are
        self._get_tensor = lib["llama_get_model_tensor"]
        self._get_tensor.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        self._get_tensor.restype = ctypes.c_void_p
        n_embd = lib["llama_model_n_embd"]
        n_embd.argtypes, n_embd.restype = [ctypes.c_void_p], ctypes.c_int32
        self.n_embd = int(n_embd(self.model._model))
        self._embd_batch = lib.llama_batch_init(settings.n_batch, self.n_embd, 1)
        self._full_tensor = {
            name: self._tensor(full, full_name) for name, full_name in self.names.items()
        }
        self._own = set()  # addresses of the tensors the model file declares (not duplicates)
        for name, src in self._full_tensor.items():
            dst = self._tensor(self.model, name)
            _point(dst, src)
            self._own.add(ctypes.addressof(dst))

    def _tensor(self, model: LlamaModel, name: str):
        address = self._get_tensor(model._model, name.encode())
        if not address:
            raise EngineError(f"{model.path} has no tensor {name}")
        return self.ggml.tensor(address)

    def tensor(self, name: str):
        """The tail's ``ggml_tensor`` for the FULL model's tensor ``name`` (``blk.(L+i).X`` →
        the tail's ``blk.i.X``), so item code names tensors as in the model file.
        Raises EngineError for a tensor of a layer before L."""
        tail_name = self._tail_name.get(name)
        if tail_name is None:
            raise EngineError(
                f"{name} is not in the tail at layer {self.first_layer}: an item "
                "that changes it must start at its layer or earlier"
            )
        return self._tensor(self.model, tail_name)

    def _hook(self, cparams: bindings.llama_context_params) -> None:
        cparams.cb_eval = self._callback
        cparams.cb_eval_user_data = None

    def _on_node(self, address: int, ask: bool, _user: object) -> bool:
        """Before each node runs (ask phase) during the first decode, re-point every weight
        source that is not one of the file's tensors but carries one's name: the engine's
        duplicates (the file's own tensors are left alone: an item may have swapped them)."""
        if not self._armed or not ask:
            return not ask
        try:
            node = self.ggml.tensor(address)
            for src_address in node.src:
                if not src_address or src_address in self._own:
                    continue
                src = self.ggml.tensor(src_address)
                full = self._full_tensor.get(src.name.decode("utf-8", "replace"))
                if full is not None and src.data != full.data:
                    _point(src, full)
                    self.duplicates.append(src.name.decode())
        except Exception as exc:  # noqa: BLE001 (a ctypes callback must not raise)
            self._error = self._error or f"{type(exc).__name__}: {exc}"
        return False

    def close(self) -> None:
        """Free the embedding batch and the tail model (the full model stays loaded)."""
        if self.model._ctx:
            self.model.lib.llama_batch_free(self._embd_batch)
        self.model.close()

    def __enter__(self) -> TailModel:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def eval_hidden(self, hidden: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Evaluate layers L…N−1 and the head on stored hidden states of k ≤ n_seq chunks.

        Args:
            hidden: float32 (k, C, n_embd), the input of layer L of each chunk (the full
                model's ``l_out-(L−1)`` rows, positions 0…C−1). out: float32 (k, S, V) or None.
        Returns:
            float32 (k, S, V): logits of positions C/2 … C−2 of each chunk, as
            :meth:`LlamaModel.eval_chunks` returns for the full model.
        Raises EngineError (failed decode, failed duplicate search), ValueError (shapes).
        """
        settings, lib = self.settings, self.model.lib
        n_ctx = settings.n_ctx
        if (
            hidden.ndim != 3
            or hidden.shape[1:] != (n_ctx, self.n_embd)
            or not 1 <= hidden.shape[0] <= settings.n_seq
            or hidden.dtype != np.float32
        ):
            raise ValueError(
                f"hidden states must be float32 (k ≤ {settings.n_seq}, {n_ctx}, "
                f"{self.n_embd}), got {hidden.dtype} {hidden.shape}"
            )
        k = hidden.shape[0]
        first, n_scored = scored_range(n_ctx)
        shape = (k, n_scored, self.model.n_vocab)
        if out is not None and (out.shape != shape or out.dtype != np.float32):
            raise ValueError(f"out must be float32 {shape}, got {out.dtype} {out.shape}")
        n = k * n_ctx
        batch = self._embd_batch
        np.copyto(
            np.ctypeslib.as_array(batch.embd, shape=(n, self.n_embd)),
            hidden.reshape(n, self.n_embd),
        )
        np.ctypeslib.as_array(batch.pos, shape=(n,))[:] = np.tile(
            np.arange(n_ctx, dtype=np.int32), k
        )
        np.ctypeslib.as_array(batch.n_seq_id, shape=(n,))[:] = 1
        for i in range(n):
            batch.seq_id[i][0] = i // n_ctx
        want = np.ctypeslib.as_array(batch.logits, shape=(k, n_ctx))
        want[:] = 0
        want[:, first : first + n_scored] = 1
        batch.n_tokens = n
        lib.llama_kv_cache_clear(self.model._ctx)
        rc = lib.llama_decode(self.model._ctx, batch)
        self._armed = False
        if self._error:
            raise EngineError(f"pointing the tail's duplicate tensors failed: {self._error}")
        if rc != 0:
            raise EngineError(f"llama_decode of the tail failed ({rc}):\n{lib.log_tail.text()}")
        logits = np.ctypeslib.as_array(lib.llama_get_logits(self.model._ctx), shape=shape)
        if out is None:
            return logits.copy()
        np.copyto(out, logits)
        return out


def self_check(tail: TailModel, hidden: np.ndarray, full_logits: np.ndarray) -> str | None:
    """Why the tail cannot serve items, or None when its logits equal the full model's bit for
    bit on one chunk.

    hidden: float32 (k, C, n_embd), the input of layer L; full_logits: float32 (k, S, V), the
    full model's logits of the same chunks (:meth:`LlamaModel.eval_chunks`).
    """
    try:
        logits = tail.eval_hidden(hidden)
    except (EngineError, ValueError) as exc:
        return f"the tail at layer {tail.first_layer} did not evaluate: {exc}"
    if logits.shape != full_logits.shape:
        return f"tail logits have shape {logits.shape}, the full model's {full_logits.shape}"
    if np.array_equal(logits.view(np.uint32), full_logits.view(np.uint32)):
        return None
    diff = np.abs(logits.astype(np.float64) - full_logits)
    return (
        f"the tail at layer {tail.first_layer} gives logits that differ from the full "
        f"model's (max |Δlogit| = {np.nanmax(diff):.3g} in "
        f"{int(np.count_nonzero(logits.view(np.uint32) != full_logits.view(np.uint32)))} of "
        f"{logits.size}): this architecture or build treats embeddings input differently"
    )
