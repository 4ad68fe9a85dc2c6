"""In-process tensor swap: quantize one tensor in memory and point the loaded model at it.

The worker loads the baseline once (mmap). For an item, :meth:`SwapModel.swapped` converts the
target tensors' baseline weights (f32/f16/bf16) to float32, quantizes them with the engine's own
``ggml_quantize_chunk`` (as llama-quantize does, row blocks being independent), sets the loaded
``ggml_tensor``'s type, strides and data pointer to the quantized buffer, and restores all three
exactly afterwards. The context is created with graph reuse off, so no graph keeps the old layout.
Per-item cost outside evaluation therefore grows with the tensor, not with the model.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from .ggml import Ggml, TypeTraits
from .llama import EngineError, EvalSettings, LlamaModel

GGML_MAX_DIMS = 4
_ROW_BLOCK_ELEMENTS = 1 << 24  # float32 staging per quantize call: 64 MB
_FLOAT_TYPES = {"f32": (np.float32, 4), "f16": (np.float16, 2), "bf16": (np.uint16, 2)}


class SwapModel:
    """The baseline model, loaded once, whose tensors can be swapped for quantized versions.

    Args:
        path: baseline GGUF; settings: evaluation settings (same as the baseline's).
    Raises EngineError when the engine's libggml or its header cannot be bound.
    """

    def __init__(self, path: Path, settings: EvalSettings) -> None:
        self.model = LlamaModel(path, settings)
        try:
            self.ggml = Ggml(self.model.lib.quantbench_path)
        except EngineError:
            self.model.close()
            raise
        self.ggml.bind_model_tensor_lookup(self.model.lib)

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
            raise EngineError(f"{name} is {type_name} in the baseline; the in-process engine "
                              "quantizes from f32/f16/bf16 only")
        dtype, size = _FLOAT_TYPES[type_name]
        ne0 = t.ne[0]
        rows = t.ne[1] * t.ne[2] * t.ne[3]
        raw = self.ggml.host_array(t.data, ne0 * rows * size).view(dtype).reshape(rows, ne0)
        if type_name == "bf16":
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return raw.astype(np.float32)

    def quantize(self, weights: np.ndarray, type_id: int, row_size: int, interleave: int,
                 imatrix: np.ndarray | None = None) -> np.ndarray:
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
            part = np.ascontiguousarray(weights[start:start + step])
            n = part.shape[0]
            dst = out[start * row_size:(start + n) * row_size]
            written = self.ggml.quantize_chunk(type_id, part.ctypes.data, dst.ctypes.data, n,
                                               ne0, imx)
            if written != n * row_size:
                raise EngineError(f"ggml_quantize_chunk wrote {written} bytes for {n} rows, "
                                  f"expected {n * row_size}")

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

    def dequantize(self, data: np.ndarray, type_id: int, rows: int, ne0: int, row_size: int,
                   interleave: int) -> np.ndarray | None:
        """uint8 quantized rows → float32 (rows, ne0) with the type's ``to_float`` (one row, or
        one group of ``interleave`` rows, per call: spec §6). None when the type has no
        ``to_float`` in this build or its traits cannot be read."""
        traits = self.traits(type_id)
        to_float = self.ggml.to_float(traits) if traits is not None else None
        if to_float is None:
            return None
        out = np.empty((rows, ne0), dtype=np.float32)
        for start in range(0, rows, interleave):
            to_float(data.ctypes.data + start * row_size, out[start].ctypes.data,
                     interleave * ne0)
        return out

    @contextmanager
    def swapped(self, replacements: dict[str, tuple[int, int, int, np.ndarray]]) -> Iterator[None]:
        """Point tensors at quantized data for the duration of the block, then restore them.

        replacements: tensor name → (ggml type id, type size (bytes per block, ggml's nb[0]),
        row size in bytes, uint8 data). The data arrays
        must stay alive during the block (the caller holds them). Restores type, strides and data
        pointer even when the block raises.
        """
        saved = []
        try:
            for name, (type_id, type_size, row_size, data) in replacements.items():
                t = self.tensor(name)
                saved.append((t, t.type, tuple(t.nb), t.data))
                t.type = type_id
                t.nb[0] = type_size
                t.nb[1] = row_size
                t.nb[2] = row_size * t.ne[1]
                t.nb[3] = t.nb[2] * t.ne[2]
                t.data = data.ctypes.data
            yield
        finally:
            for t, type_id, nb, data in reversed(saved):
                t.type = type_id
                for i in range(GGML_MAX_DIMS):
                    t.nb[i] = nb[i]
                t.data = data

