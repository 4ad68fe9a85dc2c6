"""In-process tensor swap: quantize one tensor in memory and point the loaded model at it.

The worker loads the baseline once (mmap). For an item, :meth:`SwapModel.swapped` converts the
target tensors' baseline weights (f32/f16/bf16) to float32, quantizes them with the engine's own
``ggml_quantize_chunk`` (as llama-quantize does, row blocks being independent), sets the loaded
``ggml_tensor``'s type, strides and data pointer to the quantized buffer, and restores all three
exactly afterwards. The context is created with graph reuse off, so no graph keeps the old layout.
Per-item cost outside evaluation therefore grows with the tensor, not with the model.
"""

from __future__ import annotations

import ctypes
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from . import bindings
from .llama import EngineError, EvalSettings, LlamaModel

GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
GGML_MAX_NAME = 64
GGML_MAX_OP_PARAMS = 64
_ROW_BLOCK_ELEMENTS = 1 << 24  # float32 staging per quantize call: 64 MB


class GgmlTensor(ctypes.Structure):
    """``struct ggml_tensor`` of ik_llama.cpp's ggml.h (the fields this module reads/writes)."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("backend", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("grad", ctypes.c_void_p),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
    ]


_FLOAT_TYPES = {"f32": (np.float32, 4), "f16": (np.float16, 2), "bf16": (np.uint16, 2)}


class TypeTraits(ctypes.Structure):
    """``ggml_type_traits_t`` as ik's ggml.h declares it (returned by value by
    ``ggml_internal_get_type_traits``; field order checked against the header at bind time)."""

    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float", ctypes.c_void_p), ("from_float_ref", ctypes.c_void_p),
                ("from_float_to_mat", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p),
                ("vec_dot_type", ctypes.c_int), ("nrows", ctypes.c_int64),
                ("ncols", ctypes.c_int64), ("gemv", ctypes.c_void_p), ("gemm", ctypes.c_void_p),
                ("row_meta_size", ctypes.c_int64)]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


def _traits_match_header(header: Path) -> bool:
    """True when the header's ``ggml_type_traits_t`` has the fields of :class:`TypeTraits`, in
    that order (so reading the struct by value is safe)."""
    text = header.read_text(errors="replace")
    end = text.find("} ggml_type_traits_t;")
    if end < 0:
        return False
    body = text[text.rfind("typedef struct {", 0, end):end]
    names = re.findall(r"\b(\w+)\s*;", re.sub(r"//[^\n]*", "", body))
    return names == [name for name, _ in TypeTraits._fields_]


def quantize_chunk_arity(header: Path) -> int:
    """Number of parameters of ``ggml_quantize_chunk`` declared in ``header`` (ggml.h).

    The ik-llama-cpp-python 0.1.5 wheel declares 7; newer ik_llama.cpp adds an 8th (user_data).
    Raises EngineError when the declaration is not found.
    """
    text = header.read_text(errors="replace")
    match = re.search(r"ggml_quantize_chunk\s*\(([^)]*)\)", text)
    if match is None:
        raise EngineError(f"{header} does not declare ggml_quantize_chunk")
    return len([p for p in match.group(1).split(",") if p.strip()])


def _header_for(libllama: Path) -> Path:
    """The ggml.h shipped with the loaded library (wheel layout: site-packages/include)."""
    for candidate in (libllama.parent.parent.parent / "include" / "ggml.h",
                      libllama.parent.parent / "include" / "ggml.h",
                      libllama.parent / "ggml.h"):
        if candidate.is_file():
            return candidate
    raise EngineError(f"no ggml.h found beside {libllama}: the in-process engine must bind "
                      "ggml_quantize_chunk to the header of the loaded library; use "
                      "--quantbench-engine=file")


def load_ggml(libllama: Path, libggml: Path) -> ctypes.CDLL:
    """Bind ``ggml_quantize_chunk`` of ``libggml`` with the arity its header declares.

    Raises EngineError for an unsupported arity or a missing header.
    """
    lib = ctypes.CDLL(str(libggml))
    arity = quantize_chunk_arity(_header_for(libllama))
    argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                ctypes.c_int64, ctypes.c_void_p]
    if arity == 8:
        argtypes.append(ctypes.c_void_p)
    elif arity != 7:
        raise EngineError(f"ggml_quantize_chunk has {arity} parameters in {libllama}'s ggml.h; "
                          "this plugin knows 7 (ik-llama-cpp-python 0.1.5) and 8 (newer ik)")
    lib.ggml_quantize_chunk.argtypes = argtypes
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.quantbench_arity = arity
    lib.quantbench_traits = _traits_match_header(_header_for(libllama))
    if lib.quantbench_traits:
        lib.ggml_internal_get_type_traits.argtypes = [ctypes.c_int]
        lib.ggml_internal_get_type_traits.restype = TypeTraits
    return lib


class SwapModel:
    """The baseline model, loaded once, whose tensors can be swapped for quantized versions.

    Args:
        path: baseline GGUF; settings: evaluation settings (same as the baseline's).
    Raises EngineError when the engine's libggml or its header cannot be bound.
    """

    def __init__(self, path: Path, settings: EvalSettings) -> None:
        self.model = LlamaModel(path, settings)
        libggml = bindings.mapped_library(r"^libggml")
        if not libggml:
            raise EngineError("cannot find the libggml loaded with the engine")
        self.ggml = load_ggml(self.model.lib.quantbench_path, Path(libggml))
        self._user_data = (ctypes.c_bool * 2)(False, False)  # llama-quantize passes {false,false}
        self.model.lib.llama_get_model_tensor.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        self.model.lib.llama_get_model_tensor.restype = ctypes.POINTER(GgmlTensor)

    def close(self) -> None:
        """Free the model."""
        self.model.close()

    def tensor(self, name: str) -> GgmlTensor:
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
        buf = (ctypes.c_char * (ne0 * rows * size)).from_address(t.data)
        raw = np.frombuffer(buf, dtype=dtype).reshape(rows, ne0)
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
        extra = (ctypes.addressof(self._user_data),) if self.ggml.quantbench_arity == 8 else ()

        def block(start: int) -> None:
            part = np.ascontiguousarray(weights[start:start + step])
            n = part.shape[0]
            dst = out[start * row_size:(start + n) * row_size]
            written = self.ggml.ggml_quantize_chunk(type_id, part.ctypes.data, dst.ctypes.data,
                                                    0, n, ne0, imx, *extra)
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
        if not self.ggml.quantbench_traits:
            return None
        return self.ggml.ggml_internal_get_type_traits(type_id)

    def dequantize(self, data: np.ndarray, type_id: int, rows: int, ne0: int, row_size: int,
                   interleave: int) -> np.ndarray | None:
        """uint8 quantized rows → float32 (rows, ne0) with the type's ``to_float`` (one row, or
        one group of ``interleave`` rows, per call: spec §6). None when the type has no
        ``to_float`` in this build or its traits cannot be read."""
        traits = self.traits(type_id)
        if traits is None or not traits.to_float:
            return None
        to_float = _TO_FLOAT(traits.to_float)
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

