"""The one binding of ggml: ``struct ggml_tensor`` from the loaded library's ``ggml.h``, the
``ggml_backend_*`` functions, and the quantization functions and type traits.

Every ggml struct and function signature the plugin uses is declared here, once:

* :class:`GgmlHeader` reads the enums (``ggml_op``, ``ggml_type``) and the ``struct ggml_tensor``
  layout from the ``ggml.h`` shipped with the loaded ``libllama`` (:func:`header_for`), so the
  layout is the library's own, not a copy that may drift.
* :class:`Ggml` binds the loaded ``libggml``: ``ggml_quantize_chunk`` with the arity its header
  declares (:func:`quantize_chunk_arity`), ``ggml_internal_get_type_traits`` (:class:`TypeTraits`,
  only when the header's layout is the one declared here), ``ggml_nbytes``,
  ``ggml_tensor_overhead``, ``ggml_row_size`` and the ``ggml_backend_*`` buffer functions (is
  host, tensor get/set, a buffer type's allocation size, allocate, clear, set usage, free); it
  checks the header against the library (``ggml_tensor_overhead()``) and reads tensors.

Users: :mod:`pytest_quantbench.engine.swap` (in-process tensor swap) and the importance-matrix
collector (:mod:`pytest_quantbench.imatrix.collect`).
"""

from __future__ import annotations

import ast
import ctypes
import operator
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from . import bindings
from .llama import EngineError

_CTYPES: dict[str, type[ctypes._SimpleCData[Any]]] = {
    "int64_t": ctypes.c_int64,
    "uint64_t": ctypes.c_uint64,
    "int32_t": ctypes.c_int32,
    "uint32_t": ctypes.c_uint32,
    "int16_t": ctypes.c_int16,
    "uint16_t": ctypes.c_uint16,
    "int8_t": ctypes.c_int8,
    "uint8_t": ctypes.c_uint8,
    "size_t": ctypes.c_size_t,
    "char": ctypes.c_char,
    "bool": ctypes.c_bool,
    "float": ctypes.c_float,
    "int": ctypes.c_int,
    "double": ctypes.c_double,
}
_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.floordiv,
    ast.FloorDiv: operator.floordiv,
    ast.LShift: operator.lshift,
}


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def _eval_int(expr: str, names: Mapping[str, int]) -> int:
    """Evaluate a C integer constant expression of literals, known names and sizeof(type)."""

    def sizeof(m: re.Match) -> str:
        t = m.group(1).strip()
        if t not in _CTYPES:
            raise ValueError(f"sizeof({t})")
        return str(ctypes.sizeof(_CTYPES[t]))

    expr = re.sub(r"sizeof\s*\(([^)]*)\)", sizeof, expr)
    expr = re.sub(r"\b[A-Za-z_]\w*\b", lambda m: str(names[m.group(0)]), expr)
    expr = re.sub(r"\b(0x[0-9a-fA-F]+|\d+)[uUlL]*\b", lambda m: str(int(m.group(1), 0)), expr)

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        raise ValueError(expr)

    return int(ev(ast.parse(expr.strip(), mode="eval")))


class GgmlHeader:
    """Constants and the ``struct ggml_tensor`` layout read from a ``ggml.h``.

    Attributes:
        path: the header. defines: ``#define NAME <int>`` values. ops: ``enum ggml_op`` name →
        value. types: ``enum ggml_type`` name → value. Tensor: a ``ctypes.Structure`` built from
        the header's ``struct ggml_tensor`` declaration, field by field.
    Raises (constructor):
        EngineError: the header lacks one of them or holds a declaration this parser cannot map.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        text = _strip_comments(self.path.read_text(errors="replace"))
        self.defines: dict[str, int] = {}
        for name, value in re.findall(
            r"^\s*#\s*define\s+(\w+)\s+(0x[0-9a-fA-F]+|\d+)\b", text, re.M
        ):
            self.defines.setdefault(name, int(value, 0))
        try:
            self.ops = self._enum(text, "ggml_op")
            self.types = self._enum(text, "ggml_type")
            self.Tensor = self._struct(text, "ggml_tensor")
            self.Object = (
                self._struct(text, "ggml_object")
                if re.search(r"struct\s+ggml_object\s*\{", text)
                else None
            )
        except (KeyError, ValueError) as exc:
            raise EngineError(
                f"{self.path}: cannot read {exc} from the loaded library's ggml.h; "
                "the ggml binding needs it"
            ) from None
        names = {f[0] for f in self.Tensor._fields_}
        missing = {"type", "buffer", "ne", "nb", "op", "src", "view_src", "data", "name"} - names
        if missing:
            raise EngineError(f"{self.path}: struct ggml_tensor lacks {sorted(missing)}")

    def _enum(self, text: str, name: str) -> dict[str, int]:
        m = re.search(r"enum\s+" + re.escape(name) + r"\s*\{(.*?)\}", text, re.S)
        if m is None:
            raise KeyError(f"enum {name}")
        out: dict[str, int] = {}
        value = -1
        for item in m.group(1).split(","):
            item = item.strip()
            if not item:
                continue
            if "=" in item:
                key, expr = item.split("=", 1)
                value = _eval_int(expr, {**self.defines, **out})
            else:
                key, value = item, value + 1
            out[key.strip()] = value
        return out

    def _struct(self, text: str, name: str) -> type[ctypes.Structure]:
        m = re.search(r"struct\s+" + re.escape(name) + r"\s*\{(.*?)\}\s*;", text, re.S)
        if m is None:
            raise KeyError(f"struct {name}")
        fields = []
        for decl in m.group(1).split(";"):
            decl = " ".join(decl.split())
            if not decl:
                continue
            d = re.fullmatch(r"(.*?)\s*\b(\w+)\s*(?:\[([^\]]+)\])?", decl)
            if d is None:
                raise ValueError(f"struct {name} field {decl!r}")
            ctype_text, fname, dim = d.group(1), d.group(2), d.group(3)
            ctype: type[ctypes._SimpleCData[Any]]
            if "*" in ctype_text:
                ctype = ctypes.c_void_p
            elif ctype_text.startswith("enum "):
                ctype = ctypes.c_int
            else:
                base = ctype_text.replace("const ", "").strip()
                if base not in _CTYPES:
                    raise ValueError(f"struct {name} field {decl!r} (type {base})")
                ctype = _CTYPES[base]
            fields.append((fname, ctype if dim is None else ctype * _eval_int(dim, self.defines)))
        return type(f"{name}_from_header", (ctypes.Structure,), {"_fields_": fields})


class TypeTraits(ctypes.Structure):
    """``ggml_type_traits_t`` as ik's ggml.h declares it (returned by value by
    ``ggml_internal_get_type_traits``; field order checked against the header at bind time)."""

    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
        ("from_float_to_mat", ctypes.c_void_p),
        ("vec_dot", ctypes.c_void_p),
        ("vec_dot_type", ctypes.c_int),
        ("nrows", ctypes.c_int64),
        ("ncols", ctypes.c_int64),
        ("gemv", ctypes.c_void_p),
        ("gemm", ctypes.c_void_p),
        ("row_meta_size", ctypes.c_int64),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


def _traits_match_header(header: Path) -> bool:
    """True when the header's ``ggml_type_traits_t`` has the fields of :class:`TypeTraits`, in
    that order (so reading the struct by value is safe)."""
    text = header.read_text(errors="replace")
    end = text.find("} ggml_type_traits_t;")
    if end < 0:
        return False
    body = text[text.rfind("typedef struct {", 0, end) : end]
    names = re.findall(r"\b(\w+)\s*;", re.sub(r"//[^\n]*", "", body))
    return names == [field[0] for field in TypeTraits._fields_]


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


def header_for(libllama: Path) -> Path:
    """The ggml.h shipped with the loaded library (wheel layout: site-packages/include)."""
    for candidate in (
        libllama.parent.parent.parent / "include" / "ggml.h",
        libllama.parent.parent / "include" / "ggml.h",
        libllama.parent / "ggml.h",
    ):
        if candidate.is_file():
            return candidate
    raise EngineError(
        f"no ggml.h found beside {libllama}: the in-process engine must bind "
        "ggml_quantize_chunk to the header of the loaded library; use "
        "--quantbench-engine=file"
    )


_SIGNATURES = {
    "ggml_backend_buffer_is_host": ([ctypes.c_void_p], ctypes.c_bool),
    "ggml_backend_tensor_get": (
        [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t],
        None,
    ),
    "ggml_backend_tensor_set": (
        [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t],
        None,
    ),
    "ggml_backend_buffer_get_type": ([ctypes.c_void_p], ctypes.c_void_p),
    "ggml_backend_buft_get_alloc_size": ([ctypes.c_void_p, ctypes.c_void_p], ctypes.c_size_t),
    "ggml_backend_buft_alloc_buffer": ([ctypes.c_void_p, ctypes.c_size_t], ctypes.c_void_p),
    "ggml_backend_buffer_get_base": ([ctypes.c_void_p], ctypes.c_void_p),
    "ggml_backend_buffer_clear": ([ctypes.c_void_p, ctypes.c_uint8], None),
    "ggml_backend_buffer_set_usage": ([ctypes.c_void_p, ctypes.c_int], None),
    "ggml_backend_buffer_free": ([ctypes.c_void_p], None),
    "ggml_nbytes": ([ctypes.c_void_p], ctypes.c_size_t),
    "ggml_row_size": ([ctypes.c_int, ctypes.c_int64], ctypes.c_size_t),
    "ggml_tensor_overhead": ([], ctypes.c_size_t),
}
#: ``enum ggml_backend_buffer_usage`` (ggml-backend.h): a buffer of weights, so the scheduler
#: runs the ops that read it on the buffer's backend.
BUFFER_USAGE_WEIGHTS = 1


class Ggml:
    """The ``libggml`` loaded with the engine, bound with the layout of its own ``ggml.h``.

    Args:
        libllama_path: the loaded libllama (``lib.quantbench_path``); its ggml.h is found beside it.
    Attributes:
        header: :class:`GgmlHeader`. Tensor: the header's ``struct ggml_tensor``. lib: the CDLL.
        arity: ``ggml_quantize_chunk``'s parameter count (7 or 8). has_traits: whether
        :meth:`traits` can read ``ggml_type_traits_t``. MUL_MAT, MUL_MAT_ID, F32, I32: enum values.
    Raises (constructor):
        EngineError: no ggml.h or libggml, a missing symbol, an unknown ``ggml_quantize_chunk``
        arity, or a header that does not describe the loaded library.
    """

    def __init__(self, libllama_path: Path) -> None:
        libllama_path = Path(libllama_path)
        header_path = header_for(libllama_path)
        self.header = h = GgmlHeader(header_path)
        self.Tensor = h.Tensor
        libggml = bindings.mapped_library(r"^libggml")
        if not libggml:
            raise EngineError("cannot find the libggml loaded with the engine")
        lib = ctypes.CDLL(libggml)
        for fname, (argtypes, restype) in _SIGNATURES.items():
            try:
                fn = getattr(lib, fname)
            except AttributeError:
                raise EngineError(f"{libggml} has no symbol {fname}") from None
            fn.argtypes, fn.restype = argtypes, restype
        self.lib = lib
        if h.Object is not None:
            expect = ctypes.sizeof(h.Tensor) + ctypes.sizeof(h.Object)
            if lib.ggml_tensor_overhead() != expect:
                raise EngineError(
                    f"{h.path} does not describe the loaded {libggml}: ggml_tensor_overhead() is "
                    f"{lib.ggml_tensor_overhead()} bytes, the header's structs make {expect}"
                )
        try:
            self.MUL_MAT = h.ops["GGML_OP_MUL_MAT"]
            self.MUL_MAT_ID = h.ops["GGML_OP_MUL_MAT_ID"]
            self.F32 = h.types["GGML_TYPE_F32"]
            self.I32 = h.types["GGML_TYPE_I32"]
        except KeyError as exc:
            raise EngineError(f"{h.path} does not declare {exc}") from None
        self.arity = quantize_chunk_arity(header_path)
        quantize_args: list[type[ctypes._SimpleCData[Any]]] = [
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_void_p,
        ]
        if self.arity == 8:
            quantize_args.append(ctypes.c_void_p)
        elif self.arity != 7:
            raise EngineError(
                f"ggml_quantize_chunk has {self.arity} parameters in "
                f"{libllama_path}'s ggml.h; this plugin knows 7 "
                "(ik-llama-cpp-python 0.1.5) and 8 (newer ik)"
            )
        lib.ggml_quantize_chunk.argtypes = quantize_args
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        self._user_data = (ctypes.c_bool * 2)(False, False)  # llama-quantize passes {false,false}
        self.has_traits = _traits_match_header(header_path)
        if self.has_traits:
            lib.ggml_internal_get_type_traits.argtypes = [ctypes.c_int]
            lib.ggml_internal_get_type_traits.restype = TypeTraits

    # ---- tensors ----------------------------------------------------------------------------
    def tensor(self, address: int):
        """The ``struct ggml_tensor`` at ``address`` (a view: writes reach the engine)."""
        return self.Tensor.from_address(address)

    def bind_model_tensor_lookup(self, libllama: ctypes.CDLL) -> None:
        """Declare ``llama_get_model_tensor`` of ``libllama`` to return a ``ggml_tensor *`` of
        this header's layout."""
        libllama.llama_get_model_tensor.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        libllama.llama_get_model_tensor.restype = ctypes.POINTER(self.Tensor)

    def host_array(self, address: int, nbytes: int) -> np.ndarray:
        """uint8 (nbytes,) view of host memory at ``address`` (no copy)."""
        return np.frombuffer(
            memoryview((ctypes.c_char * nbytes).from_address(address)), dtype=np.uint8
        )

    def read(self, ptr: int, dtype) -> np.ndarray:
        """A tensor's elements as an ndarray of shape (ne3, ne2, ne1, ne0) (a copy), from host
        memory or, for a device buffer, through ``ggml_backend_tensor_get``."""
        t = self.Tensor.from_address(ptr)
        nbytes = int(self.lib.ggml_nbytes(ptr))
        buf = t.buffer or (self.Tensor.from_address(t.view_src).buffer if t.view_src else None)
        if buf and not self.lib.ggml_backend_buffer_is_host(buf):
            raw = np.empty(nbytes, dtype=np.uint8)
            self.lib.ggml_backend_tensor_get(ptr, raw.ctypes.data, 0, nbytes)
        else:
            raw = self.host_array(t.data, nbytes)
        shape = tuple(int(t.ne[i]) for i in (3, 2, 1, 0))
        strides = tuple(int(t.nb[i]) for i in (3, 2, 1, 0))
        view = np.lib.stride_tricks.as_strided(
            raw.view(np.uint8), shape=shape + (np.dtype(dtype).itemsize,), strides=strides + (1,)
        )
        return np.ascontiguousarray(view).view(dtype).reshape(shape)

    # ---- quantization -----------------------------------------------------------------------
    def quantize_chunk(
        self, type_id: int, src: int, dst: int, n_rows: int, n_per_row: int, imatrix: int | None
    ) -> int:
        """``ggml_quantize_chunk(type, src, dst, 0, n_rows, n_per_row, imatrix[, user_data])``
        on float32 rows at address ``src`` into ``dst``; returns the bytes written."""
        extra = (ctypes.addressof(self._user_data),) if self.arity == 8 else ()
        return self.lib.ggml_quantize_chunk(
            type_id, src, dst, 0, n_rows, n_per_row, imatrix, *extra
        )

    def traits(self, type_id: int) -> TypeTraits | None:
        """The type traits of ``type_id`` (None when the header's layout is not the one this
        plugin knows)."""
        if not self.has_traits:
            return None
        return self.lib.ggml_internal_get_type_traits(type_id)

    def to_float(self, traits: TypeTraits):
        """The type's ``to_float(src, dst, n)`` as a callable (None when the build has none)."""
        return _TO_FLOAT(traits.to_float) if traits.to_float else None
