"""In-process tensor swap: quantize one tensor in memory and point the loaded model at it.

The worker loads the baseline once (mmap). For an item, :meth:`SwapModel.swapped` converts the
target tensors' baseline weights (f32/f16/bf16) to float32, quantizes them with the engine's own
``ggml_quantize_chunk`` (as llama-quantize does, row blocks being independent), sets the loaded
``ggml_tensor``'s type, strides and data pointer to the quantized buffer, and restores all three
exactly afterwards. The context is created with graph reuse off, so no graph keeps the old layout.
Per-item cost outside evaluation therefore grows with the tensor, not with the model.

That pointer swap needs the tensor in host memory. A tensor in any other buffer (a GPU build with
``--quantbench-n-gpu-layers``) gets a private buffer instead, as ik_llama.cpp's own tensor
hot-swap does: allocated on the tensor's own buffer type with the size that type gives the
target type (CUDA adds a zeroed padding tail, :func:`.devices.cuda_padding`), cleared, marked as
weights, filled with ``ggml_backend_tensor_set``; restoring puts back type, strides, data and
buffer, then frees it. ``llama_synchronize`` runs before swapping in and before restoring.
``QUANTBENCH_SWAP_PRIVATE_BUFFERS=1`` (or ``SwapModel(private_buffers=True)``) forces that path
on host buffers, so the CPU tests exercise it.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .devices import cuda_padding
from .ggml import BUFFER_USAGE_WEIGHTS, Ggml, TypeTraits
from .llama import EngineError, EvalSettings, LlamaModel

#: Test switch: ``1`` forces the private-buffer swap on host buffers (see the module docstring).
PRIVATE_BUFFERS_ENV = "QUANTBENCH_SWAP_PRIVATE_BUFFERS"

GGML_MAX_DIMS = 4
_ROW_BLOCK_ELEMENTS = 1 << 24  # float32 staging per quantize call: 64 MB
_FLOAT_TYPES = {"f32": (np.float32, 4), "f16": (np.float16, 2), "bf16": (np.uint16, 2)}


class TensorSwap:
    """The in-process swap of a loaded model's tensors for the duration of a block: a pointer
    swap on host memory, a private buffer elsewhere (module docstring). The base of
    :class:`SwapModel` and of :class:`~pytest_quantbench.engine.tail.TailModel` (a tail's
    tensors are swapped by the same code), which provide ``model`` (a LlamaModel), ``ggml`` (a
    :class:`~pytest_quantbench.engine.ggml.Ggml`) and ``tensor(name)``, and call
    :meth:`_init_swap` once ``ggml`` is bound.

    Attributes:
        allocations: byte sizes of the private buffers of the last :meth:`swapped` block.
    """

    model: LlamaModel
    ggml: Ggml

    def tensor(self, name: str):
        raise NotImplementedError

    def _init_swap(self, private_buffers: bool) -> None:
        self.private_buffers = private_buffers or os.environ.get(PRIVATE_BUFFERS_ENV) == "1"
        self.allocations: list[int] = []
        types = self.ggml.header.types
        self._float_ids = {types.get(f"GGML_TYPE_{n.upper()}") for n in _FLOAT_TYPES}

    def _host(self, t) -> bool:
        """Whether the pointer swap can serve tensor ``t``: its data is host memory and the
        private-buffer path is not forced."""
        if self.private_buffers:
            return False
        return not t.buffer or bool(self.ggml.lib.ggml_backend_buffer_is_host(t.buffer))

    def _swap_private(self, t, data: np.ndarray, quantized: bool) -> int:
        """Give ``t`` (type and strides already set to the target) a private buffer on its own
        buffer type holding ``data``; returns the buffer. Raises EngineError when it cannot be
        allocated (t is left for the caller to restore)."""
        lib = self.ggml.lib
        addr = ctypes.addressof(t)
        buft = lib.ggml_backend_buffer_get_type(t.buffer)
        size = int(lib.ggml_backend_buft_get_alloc_size(buft, addr))
        if self.private_buffers:  # forced on a host buffer: allocate CUDA's padding as well
            size = max(
                size, len(data) + cuda_padding(lib.ggml_row_size, t.type, int(t.ne[0]), quantized)
            )
        buf = lib.ggml_backend_buft_alloc_buffer(buft, size)
        if not buf:
            raise EngineError(
                f"cannot allocate {size} bytes on the buffer type of "
                f"{t.name.decode(errors='replace')} for the swap"
            )
        lib.ggml_backend_buffer_clear(buf, 0)
        lib.ggml_backend_buffer_set_usage(buf, BUFFER_USAGE_WEIGHTS)
        t.buffer = buf
        t.data = lib.ggml_backend_buffer_get_base(buf)
        lib.ggml_backend_tensor_set(addr, data.ctypes.data, 0, len(data))
        self.allocations.append(size)
        return buf

    @contextmanager
    def swapped(self, replacements: dict[str, tuple[int, int, int, np.ndarray]]) -> Iterator[None]:
        """Point tensors at quantized data for the duration of the block, then restore them.

        replacements: tensor name → (ggml type id, type size (bytes per block, ggml's nb[0]),
        row size in bytes, uint8 data). The data arrays must stay alive during the block (the
        caller holds them). Host tensors are re-pointed at the arrays; others get a private
        buffer (module docstring). Restores type, strides, data pointer and buffer, and frees
        private buffers, even when the block raises. Raises EngineError when a private buffer
        cannot be allocated.
        """
        saved = []
        self.allocations = []
        self.model.synchronize()
        try:
            for name, (type_id, type_size, row_size, data) in replacements.items():
                t = self.tensor(name)
                host = self._host(t)
                entry = [t, t.type, tuple(t.nb), t.data, t.buffer, None]
                saved.append(entry)
                quantized = type_id not in self._float_ids
                t.type = type_id
                t.nb[0] = type_size
                t.nb[1] = row_size
                t.nb[2] = row_size * t.ne[1]
                t.nb[3] = t.nb[2] * t.ne[2]
                if host:
                    t.data = data.ctypes.data
                else:
                    entry[5] = self._swap_private(t, data, quantized)
            yield
        finally:
            self.model.synchronize()
            for t, type_id, nb, data, buffer, private in reversed(saved):
                t.type = type_id
                for i in range(GGML_MAX_DIMS):
                    t.nb[i] = nb[i]
                t.data = data
                t.buffer = buffer
                if private:
                    self.ggml.lib.ggml_backend_buffer_free(private)


class SwapModel(TensorSwap):
    """The baseline model, loaded once, whose tensors can be swapped for quantized versions.

    Args:
        path: baseline GGUF; settings: evaluation settings (same as the baseline's);
        private_buffers: swap through private buffers even for host tensors (a test switch;
        also ``QUANTBENCH_SWAP_PRIVATE_BUFFERS=1``).
    Attributes:
        allocations: byte sizes of the private buffers of the last :meth:`swapped` block.
    Raises EngineError when the engine's libggml or its header cannot be bound.
    """

    def __init__(
        self, path: Path, settings: EvalSettings, *, private_buffers: bool = False
    ) -> None:
        self.model = LlamaModel(path, settings)
        try:
            self.ggml = Ggml(self.model.lib.quantbench_path)
        except EngineError:
            self.model.close()
            raise
        self.ggml.bind_model_tensor_lookup(self.model.lib)
        self._init_swap(private_buffers)

    def close(self) -> None:
        """Free the model."""
        self.model.close()

    def tensor(self, name: str):
        """The loaded model's ``ggml_tensor`` named ``name``. Raises EngineError if absent."""
        ptr = self.model.lib.llama_get_model_tensor(self.model._model, name.encode())
        if not ptr:
            raise EngineError(f"the loaded model has no tensor {name}")
        return ptr.contents

    def baseline_f32(self, name: str, type_name: str) -> np.ndarray:
        """The tensor's baseline weights as float32 (rows, ne0), read from the loaded model.

        Raises EngineError for a type that is not f32/f16/bf16 (use the file engine).
        """
        t = self.tensor(name)
        if type_name not in _FLOAT_TYPES:
            raise EngineError(
                f"{name} is {type_name} in the baseline; the in-process engine "
                "quantizes from f32/f16/bf16 only"
            )
        dtype, size = _FLOAT_TYPES[type_name]
        ne0 = t.ne[0]
        rows = t.ne[1] * t.ne[2] * t.ne[3]
        nbytes = ne0 * rows * size
        if self._host(t):
            raw = self.ggml.host_array(t.data, nbytes)
        else:  # device memory: copied out by the buffer's backend
            raw = np.empty(nbytes, dtype=np.uint8)
            self.ggml.lib.ggml_backend_tensor_get(ctypes.addressof(t), raw.ctypes.data, 0, nbytes)
        raw = raw.view(dtype).reshape(rows, ne0)
        if type_name == "bf16":
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return raw.astype(np.float32)

    def quantize(
        self,
        weights: np.ndarray,
        type_id: int,
        row_size: int,
        interleave: int,
        imatrix: np.ndarray | None = None,
    ) -> np.ndarray:
        """Quantize float32 (rows, ne0) weights to ggml type ``type_id`` → uint8 (rows·row_size,).

        Calls ``ggml_quantize_chunk`` over blocks of rows (a multiple of ``interleave`` rows) on
        ``settings.threads`` threads, as llama-quantize spreads a tensor over its threads (ctypes
        releases the GIL during the call); rows are independent, so the bytes equal a single
        call's (and llama-quantize's). imatrix: float32 (ne0,) column weights or None.
        Raises EngineError when ggml_quantize_chunk writes an unexpected number of bytes.
        """
        from concurrent.futures import ThreadPoolExecutor

        rows, ne0 = weights.shape
        out = np.empty(rows * row_size, dtype=np.uint8)
        threads = max(1, self.model.settings.threads)
        per_thread = -(-rows // threads)  # ceil
        step = min(per_thread, _ROW_BLOCK_ELEMENTS // ne0)
        step = max(interleave, -(-step // interleave) * interleave)
        imx = imatrix.ctypes.data if imatrix is not None else None

        def block(start: int) -> None:
            part = np.ascontiguousarray(weights[start : start + step])
            n = part.shape[0]
            dst = out[start * row_size : (start + n) * row_size]
            written = self.ggml.quantize_chunk(
                type_id, part.ctypes.data, dst.ctypes.data, n, ne0, imx
            )
            if written != n * row_size:
                raise EngineError(
                    f"ggml_quantize_chunk wrote {written} bytes for {n} rows, "
                    f"expected {n * row_size}"
                )

        starts = range(0, rows, step)
        if threads == 1 or len(starts) == 1:
            for start in starts:
                block(start)
        else:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                list(pool.map(block, starts))  # list(): re-raises a block's error
        return out

    def traits(self, type_id: int) -> TypeTraits | None:
        """The loaded libggml's type traits of ``type_id`` (None when its header's layout is not
        the one this plugin knows)."""
        return self.ggml.traits(type_id)

    def dequantize(
        self, data: np.ndarray, type_id: int, rows: int, ne0: int, row_size: int, interleave: int
    ) -> np.ndarray | None:
        """uint8 quantized rows → float32 (rows, ne0) with the type's ``to_float`` (one row, or
        one group of ``interleave`` rows, per call: docs/llama-quantize.md#ggml-api). None when the
        type has no ``to_float`` in this build or its traits cannot be read."""
        traits = self.traits(type_id)
        to_float = self.ggml.to_float(traits) if traits is not None else None
        if to_float is None:
            return None
        out = np.empty((rows, ne0), dtype=np.float32)
        for start in range(0, rows, interleave):
            to_float(data.ctypes.data + start * row_size, out[start].ctypes.data, interleave * ne0)
        return out

    def swap_problem(self, name: str, type_name: str, shape: tuple[int, ...]) -> str | None:
        """Why the in-process swap cannot replace tensor ``name`` (None when it can): its data is
        split over several devices (``extra`` set: split mode graph/attn), it is a view into a
        merged tensor (``view_src``: ``-mqkv``/``-muge``), or the engine changed it at load
        (type or shape differ from the GGUF's ``type_name``/``shape``, or MLA's ``attn_kv_b``,
        which the engine converts to other tensors). ik_llama.cpp's own hot-swap refuses the
        same tensors."""
        t = self.tensor(name)
        if getattr(t, "extra", None):
            return (
                f"{name} is split over several devices (tensor->extra is set); the in-process "
                "swap cannot replace its parts"
            )
        if t.view_src:
            return (
                f"{name} is a view into a merged tensor (-mqkv/-muge); the in-process swap "
                "cannot replace part of it"
            )
        type_id = self.ggml.header.types.get(f"GGML_TYPE_{type_name.upper()}")
        loaded = tuple(int(t.ne[i]) for i in range(len(shape)))
        if t.type != type_id or loaded != tuple(shape):
            return (
                f"{name} was transformed at load (the engine holds it as type {t.type}, "
                f"shape {loaded}; the file has {type_name} {tuple(shape)})"
            )
        if name.endswith("attn_kv_b.weight"):
            return (
                f"{name} is converted at load into MLA's own tensors; swapping it would not "
                "change what the engine computes"
            )
        return None
