"""Read GGUF headers: metadata and tensor infos, for every ik_llama.cpp type id.

No tensor math and no third-party imports.  gguf-py's reader raises on the
ik-only type ids (e.g. 144 = ``iq4_ks``), so the plugin reads headers itself,
with type names and byte sizes from :mod:`pytest_quantbench.qtypes`.

Format (GGUF v2/v3, little-endian): magic ``GGUF``, u32 version, u64 tensor
count, u64 kv count, the kv pairs (key string, u32 value type, value), the
tensor infos (name string, u32 n_dims, u64 ne[n_dims], u32 type, u64 offset),
padding to ``general.alignment`` (default 32), then the tensor data.  Strings
are a u64 byte length followed by UTF-8 bytes.

Public API: :func:`read_header`, :func:`read_model_header` (split models),
:class:`GGUFHeader`, :class:`TensorInfo`, :class:`SkippedArray`,
:class:`GGUFError`.
"""

from __future__ import annotations

import difflib
import mmap
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from .qtypes import TYPES_BY_ID, GGMLType

__all__ = [
    "GGUFError",
    "TensorInfo",
    "GGUFHeader",
    "SkippedArray",
    "read_header",
    "read_model_header",
    "split_paths",
    "tensor_nbytes",
    "GGUF_MAGIC",
    "DEFAULT_ALIGNMENT",
]

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
SUPPORTED_VERSIONS = (2, 3)

_FIX_HINT = (
    "re-download or re-convert the model (convert_hf_to_gguf.py / llama-quantize) "
    "and point the option at a complete .gguf file"
)


class GGUFError(ValueError):
    """A GGUF file that cannot be read; the message names the path and a fix."""


# value types (gguf.h enum gguf_type)
_U8, _I8, _U16, _I16, _U32, _I32, _F32, _BOOL, _STR, _ARR, _U64, _I64, _F64 = range(13)
_SCALAR_FMT = {
    _U8: "B",
    _I8: "b",
    _U16: "H",
    _I16: "h",
    _U32: "I",
    _I32: "i",
    _F32: "f",
    _BOOL: "?",
    _U64: "Q",
    _I64: "q",
    _F64: "d",
}
_SCALAR_SIZE = {k: struct.calcsize("<" + v) for k, v in _SCALAR_FMT.items()}
_VALUE_TYPE_NAMES = {
    _U8: "uint8",
    _I8: "int8",
    _U16: "uint16",
    _I16: "int16",
    _U32: "uint32",
    _I32: "int32",
    _F32: "float32",
    _BOOL: "bool",
    _STR: "string",
    _ARR: "array",
    _U64: "uint64",
    _I64: "int64",
    _F64: "float64",
}


@dataclass(frozen=True)
class SkippedArray:
    """Placeholder for a metadata array that was not decoded (see ``max_array_items``).

    ``len()`` gives the element count; ``elem_type`` is the GGUF value type name.
    """

    elem_type: str
    count: int

    def __len__(self) -> int:
        return self.count


@dataclass(frozen=True)
class TensorInfo:
    """One tensor info record.

    Attributes:
        name: tensor name (``blk.0.attn_v.weight``).
        shape: ``ne0, ne1, ...`` in ggml order (ne0 = row length).
        ggml_type: ``enum ggml_type`` id as stored in the file.
        type_name: the exact ik ggml spelling of that id.
        offset: byte offset relative to the file's data section.
        n_bytes: bytes of tensor data (rows × ``ggml_row_size``).
        file: path of the file (shard) that holds the data.
        data_offset: absolute byte offset of the data in ``file``.
    """

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    type_name: str
    offset: int
    n_bytes: int
    file: str = ""
    data_offset: int = 0

    @property
    def type(self) -> GGMLType:
        return TYPES_BY_ID[self.ggml_type]

    @property
    def n_dims(self) -> int:
        return len(self.shape)

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def ne0(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def n_rows(self) -> int:
        """ne1·ne2·ne3 (1 for a 1-D tensor)."""
        return self.n_elements // self.ne0 if self.ne0 else 0


@dataclass(frozen=True)
class GGUFHeader:
    """A parsed GGUF header.

    For a split model read by :func:`read_model_header`, ``tensors`` holds the
    tensors of all shards (each TensorInfo names its ``file``), ``shards``
    lists the shard paths and ``metadata`` is shard 1's.
    """

    path: str
    version: int
    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...]
    alignment: int
    data_offset: int
    file_size: int
    shards: tuple[str, ...] = field(default=())

    # ---- helpers -----------------------------------------------------------
    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    def arch_value(self, key: str, default: Any = None) -> Any:
        """``metadata[f"{architecture}.{key}"]``, e.g. ``arch_value("block_count")``."""
        arch = self.architecture
        return self.metadata.get(f"{arch}.{key}", default) if arch else default

    @property
    def n_ctx_train(self) -> int | None:
        """``<arch>.context_length``."""
        return self.arch_value("context_length")

    @property
    def n_layer(self) -> int | None:
        return self.arch_value("block_count")

    @property
    def n_embd(self) -> int | None:
        return self.arch_value("embedding_length")

    @property
    def n_vocab(self) -> int | None:
        """Length of ``tokenizer.ggml.tokens`` (else ``<arch>.vocab_size``)."""
        toks = self.metadata.get("tokenizer.ggml.tokens")
        if toks is not None:
            return len(toks)
        v = self.arch_value("vocab_size")
        return int(v) if v is not None else None

    @property
    def split_count(self) -> int:
        return int(self.metadata.get("split.count", 1) or 1)

    @property
    def n_tensors_total(self) -> int:
        """Tensors of the whole model: ``split.tensors.count`` when present."""
        v = self.metadata.get("split.tensors.count")
        return int(v) if v is not None else len(self.tensors)

    @property
    def n_bytes(self) -> int:
        """Bytes of tensor data of all tensors (all shards for a merged header)."""
        return sum(t.n_bytes for t in self.tensors)

    @cached_property
    def _by_name(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}

    def tensor(self, name: str) -> TensorInfo:
        """The TensorInfo of ``name``; KeyError with close names otherwise."""
        try:
            return self._by_name[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self._by_name), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise KeyError(f"no tensor {name!r} in {self.path}{hint}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


# --------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------


class _Truncated(Exception):
    def __init__(self, what: str, need: int, pos: int):
        super().__init__(what)
        self.what, self.need, self.pos = what, need, pos


class _Corrupt(Exception):
    """A header value that no valid GGUF file has (converted to GGUFError with the path)."""


class _Reader:
    __slots__ = ("buf", "pos", "end")

    def __init__(self, buf, pos: int = 0):
        self.buf = buf
        self.pos = pos
        self.end = len(buf)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.end:
            raise _Truncated(what, n, self.pos)

    def scalar(self, vtype: int, what: str):
        size = _SCALAR_SIZE[vtype]
        self.need(size, what)
        (v,) = struct.unpack_from("<" + _SCALAR_FMT[vtype], self.buf, self.pos)
        self.pos += size
        return v

    def u32(self, what: str) -> int:
        return self.scalar(_U32, what)

    def u64(self, what: str) -> int:
        return self.scalar(_U64, what)

    def string(self, what: str) -> str:
        n = self.u64(what)
        self.need(n, what)
        p = self.pos
        self.pos = p + n
        return str(self.buf[p : p + n], "utf-8", "replace")

    def skip_string(self, what: str) -> None:
        n = self.u64(what)
        self.need(n, what)
        self.pos += n


def _read_value(r: _Reader, vtype: int, key: str, max_items: int | None):
    if vtype in _SCALAR_FMT:
        return r.scalar(vtype, f"value of {key}")
    if vtype == _STR:
        return r.string(f"value of {key}")
    if vtype == _ARR:
        etype = r.u32(f"array type of {key}")
        count = r.u64(f"array length of {key}")
        if etype in _SCALAR_FMT:
            size = _SCALAR_SIZE[etype]
            r.need(count * size, f"array {key} ({count} x {_VALUE_TYPE_NAMES[etype]})")
            if max_items is not None and count > max_items:
                r.pos += count * size
                return SkippedArray(_VALUE_TYPE_NAMES[etype], count)
            vals = struct.unpack_from(f"<{count}{_SCALAR_FMT[etype]}", r.buf, r.pos)
            r.pos += count * size
            return vals
        if etype == _STR:
            # each element takes at least its 8-byte length
            r.need(count * 8, f"array {key} ({count} strings)")
            if max_items is not None and count > max_items:
                for _ in range(count):
                    r.skip_string(f"array {key}")
                return SkippedArray("string", count)
            return _read_string_array(r, count, key)
        if etype == _ARR:  # nested arrays: each element has its own type and count
            return tuple(_read_value(r, _ARR, key, max_items) for _ in range(count))
        raise _Corrupt(f"unknown array element type {etype} for metadata key {key!r}")
    raise _Corrupt(f"unknown metadata value type {vtype} for metadata key {key!r}")


def _read_string_array(r: _Reader, count: int, key: str) -> tuple[str, ...]:
    buf, pos, end = r.buf, r.pos, r.end
    unpack = struct.Struct("<Q").unpack_from
    out = [""] * count
    for i in range(count):
        if pos + 8 > end:
            r.pos = pos
            raise _Truncated(f"array {key} element {i}", 8, pos)
        (n,) = unpack(buf, pos)
        pos += 8
        if pos + n > end:
            r.pos = pos
            raise _Truncated(f"array {key} element {i}", n, pos)
        out[i] = str(buf[pos : pos + n], "utf-8", "replace")
        pos += n
    r.pos = pos
    return tuple(out)


def tensor_nbytes(t: GGMLType, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of type ``t`` and ggml shape ``shape`` (``ggml_nbytes``).

    ``i2_s`` (BitNet) is stored as ne/4 bytes of codes plus 32 bytes of scale.
    Raises ValueError if ``ne0`` is not a multiple of the block size.
    """
    n = 1
    for d in shape:
        n *= d
    if t.name == "i2_s":
        return n // 4 + 32
    ne0 = shape[0] if shape else 1
    if ne0 == 0:
        return 0
    if ne0 % t.block_size:
        raise ValueError(
            f"ne0 = {ne0} is not a multiple of the block size {t.block_size} of {t.name}"
        )
    return (n // ne0) * (t.row_meta + t.type_size * (ne0 // t.block_size))


def _check_path(path: Path) -> None:
    if not path.exists():
        raise GGUFError(
            f"{path}: no such file; check the model path (or build/download the model first)"
        )
    if path.is_dir():
        raise GGUFError(
            f"{path}: is a directory, not a GGUF file; point the option at the .gguf file inside it"
        )


#: ggml type ids of mainline llama.cpp (ggml/include/ggml.h, enum ggml_type) that ik_llama.cpp does
#: not have (31-33 and 36-38 are removed repack types there, 39 is MXFP4 in both).
MAINLINE_ONLY_TYPE_IDS: dict[int, str] = {34: "TQ1_0", 35: "TQ2_0", 40: "NVFP4"}


def unknown_type_message(path: Path, tensor: str, type_id: int) -> str:
    """The error text for a tensor whose ggml type id is not in the type table: the file, the
    tensor, the id, the engine version the table belongs to, and which build would know the id
    (mainline llama.cpp for :data:`MAINLINE_ONLY_TYPE_IDS`, else possibly a newer ik_llama.cpp).
    Raises nothing."""
    from importlib import metadata

    try:
        engine = f"ik-llama-cpp-python {metadata.version('ik-llama-cpp-python')}"
    except metadata.PackageNotFoundError:
        engine = "ik-llama-cpp-python (not installed)"
    known = max(TYPES_BY_ID)
    if type_id in MAINLINE_ONLY_TYPE_IDS:
        who = (
            f"id {type_id} is {MAINLINE_ONLY_TYPE_IDS[type_id]} in mainline llama.cpp, which "
            f"ik_llama.cpp cannot load: quantize the model from its bf16/f16 original with "
            f"ik_llama.cpp's llama-quantize, or use a model with ik or standard types"
        )
    else:
        who = (
            f"no llama.cpp build this plugin knows has it (ik ids go up to {known}): a newer "
            f"ik_llama.cpp may; update ik-llama-cpp-python and pytest-quantbench (or give "
            f"--quantbench-engine-lib for your own build), or re-quantize the model with the "
            f"ik_llama.cpp llama-quantize"
        )
    return (
        f"{path}: tensor {tensor!r} has ggml type id {type_id}, unknown to the ggml type "
        f"table of pytest-quantbench for the engine {engine} (ik_llama.cpp's ggml.h); {who}"
    )


def read_header(path: str | os.PathLike[str], *, max_array_items: int | None = None) -> GGUFHeader:
    """Read the header (metadata and tensor infos) of one GGUF file.

    Args:
        path: the ``.gguf`` file.  For a split model this reads that shard
            only; ``n_tensors_total`` still reports ``split.tensors.count``.
            Use :func:`read_model_header` to merge all shards.
        max_array_items: metadata arrays longer than this are not decoded but
            kept as :class:`SkippedArray` (``len()`` works).  None (default)
            decodes everything; a 49152-token vocab takes ~0.1 s.

    Raises:
        GGUFError: missing path, a directory, not a GGUF file, unsupported
            version or byte order, truncated header, tensor data past the end of
            the file, unknown type id, bad shape.
    """
    p = Path(path)
    _check_path(p)
    try:
        f = open(p, "rb")
    except OSError as e:
        raise GGUFError(f"{p}: cannot open ({e.strerror}); check the path and permissions") from e
    with f:
        file_size = os.fstat(f.fileno()).st_size
        if file_size < 4 or f.read(4) != GGUF_MAGIC:
            f.seek(0)
            head = f.read(4)
            raise GGUFError(
                f"{p}: not a GGUF file (magic {head!r}, expected b'GGUF'); "
                f"pass a .gguf model (convert safetensors with convert_hf_to_gguf.py)"
            )
        if file_size < 24:
            raise GGUFError(f"{p}: truncated header ({file_size} bytes); {_FIX_HINT}")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            return _parse(p, mm, file_size, max_array_items)
        finally:
            mm.close()


def _parse(p: Path, mm, file_size: int, max_items: int | None) -> GGUFHeader:
    r = _Reader(mm, 4)
    version = r.u32("version")
    if version not in SUPPORTED_VERSIONS:
        if version & 0xFFFF == 0 and (version >> 24) in SUPPORTED_VERSIONS:
            raise GGUFError(
                f"{p}: big-endian GGUF (version bytes {version:#010x}) is not supported; "
                f"convert the model on a little-endian machine"
            )
        hint = (
            "GGUF v1 is obsolete: re-convert the model with a current convert_hf_to_gguf.py"
            if version == 1
            else "upgrade pytest-quantbench or re-convert the model to GGUF v3"
        )
        raise GGUFError(f"{p}: unsupported GGUF version {version} (supported: 2, 3); {hint}")
    try:
        n_tensors = r.u64("tensor count")
        n_kv = r.u64("kv count")
        # each kv needs >= 12 bytes, each tensor info >= 24: catch absurd counts early
        if n_kv * 12 + n_tensors * 24 > file_size:
            raise GGUFError(
                f"{p}: header claims {n_tensors} tensors and {n_kv} metadata keys, more than a "
                f"{file_size}-byte file can hold: truncated or corrupt; {_FIX_HINT}"
            )
        metadata: dict[str, Any] = {}
        for i in range(n_kv):
            key = r.string(f"key of metadata entry {i}")
            vtype = r.u32(f"value type of {key}")
            metadata[key] = _read_value(r, vtype, key, max_items)
        raw = []
        for i in range(n_tensors):
            name = r.string(f"name of tensor info {i}")
            n_dims = r.u32(f"n_dims of {name}")
            if n_dims > 4:
                raise _Corrupt(f"tensor {name!r} has {n_dims} dimensions (GGML_MAX_DIMS is 4)")
            r.need(8 * n_dims, f"shape of {name}")
            shape = struct.unpack_from(f"<{n_dims}Q", mm, r.pos)
            r.pos += 8 * n_dims
            type_id = r.u32(f"type of {name}")
            offset = r.u64(f"offset of {name}")
            raw.append((name, tuple(shape), type_id, offset))
    except _Truncated as e:
        raise GGUFError(
            f"{p}: truncated header: the file ({file_size} bytes) ends while reading {e.what} "
            f"(at byte {e.pos}, {e.need} more bytes needed); {_FIX_HINT}"
        ) from None
    except _Corrupt as e:
        raise GGUFError(f"{p}: corrupt header: {e}; {_FIX_HINT}") from None

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if (
        not isinstance(alignment, int)
        or isinstance(alignment, bool)
        or alignment <= 0
        or alignment & (alignment - 1)
    ):
        raise GGUFError(
            f"{p}: general.alignment = {alignment!r} is not a power of two; corrupt header; {_FIX_HINT}"
        )
    data_offset = (r.pos + alignment - 1) // alignment * alignment
    path_s = str(p)

    tensors = []
    for name, shape, type_id, offset in raw:
        t = TYPES_BY_ID.get(type_id)
        if t is None:
            raise GGUFError(unknown_type_message(p, name, type_id))
        try:
            n_bytes = tensor_nbytes(t, shape)
        except ValueError as e:
            raise GGUFError(
                f"{p}: tensor {name!r} shape {list(shape)} type {t.name}: {e}; "
                f"corrupt header; {_FIX_HINT}"
            ) from None
        if offset % alignment:
            raise GGUFError(
                f"{p}: tensor {name!r} data offset {offset} is not a multiple of the alignment {alignment}; "
                f"corrupt header; {_FIX_HINT}"
            )
        start = data_offset + offset
        if start + n_bytes > file_size:
            raise GGUFError(
                f"{p}: truncated: tensor {name!r} ({t.name} {list(shape)}, {n_bytes} bytes at byte {start}) "
                f"extends to byte {start + n_bytes} but the file has only {file_size} bytes; "
                f"the download or copy is incomplete: {_FIX_HINT}"
            )
        tensors.append(TensorInfo(name, shape, type_id, t.name, offset, n_bytes, path_s, start))

    return GGUFHeader(
        path=path_s,
        version=version,
        metadata=metadata,
        tensors=tuple(tensors),
        alignment=alignment,
        data_offset=data_offset,
        file_size=file_size,
        shards=(path_s,),
    )


# --------------------------------------------------------------------------
# split models
# --------------------------------------------------------------------------

_SPLIT_RE = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def split_paths(path: str | os.PathLike[str], count: int | None = None) -> tuple[Path, ...]:
    """All shard paths of a ``<prefix>-0000K-of-0000N.gguf`` name (llama_split_path)."""
    p = Path(path)
    m = _SPLIT_RE.match(p.name)
    if not m:
        return (p,)
    n = count if count is not None else int(m.group("count"))
    prefix = m.group("prefix")
    return tuple(p.with_name(f"{prefix}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1))


def read_model_header(
    path: str | os.PathLike[str], *, max_array_items: int | None = None
) -> GGUFHeader:
    """Read a whole model: one file, or all shards of a split model.

    ``path`` may name any shard of ``<prefix>-0000K-of-0000N.gguf``; the
    metadata of shard 1 is returned with the tensor infos of every shard in
    shard order, each naming its ``file``.  A missing shard, a shard with the
    wrong ``split.no`` or a tensor count different from ``split.tensors.count``
    raises :class:`GGUFError`.
    """
    p = Path(path)
    _check_path(p)
    first = read_header(p, max_array_items=max_array_items)
    count = first.split_count
    if count <= 1 and not _SPLIT_RE.match(p.name):
        return first
    m = _SPLIT_RE.match(p.name)
    if not m:
        raise GGUFError(
            f"{p}: split.count = {count} but the file name does not follow "
            f"<name>-00001-of-{count:05d}.gguf, so the other shards cannot be found; "
            f"rename the shards back to their llama-gguf-split names"
        )
    if count <= 1:
        count = int(m.group("count"))
    paths = split_paths(p, count)
    missing = [str(s) for s in paths if not s.is_file()]
    if missing:
        raise GGUFError(
            f"{p}: split model with {count} shards, missing shard(s): {', '.join(missing)}; "
            f"download every -0000K-of-{count:05d}.gguf file into the same directory"
        )
    headers = []
    for i, sp in enumerate(paths):
        h = first if sp == p else read_header(sp, max_array_items=max_array_items)
        no = h.metadata.get("split.no")
        if no is not None and int(no) != i:
            raise GGUFError(f"{sp}: split.no = {no}, expected {i}; the shard files are mixed up")
        headers.append(h)
    tensors = tuple(t for h in headers for t in h.tensors)
    h0 = headers[0]
    expect = h0.metadata.get("split.tensors.count")
    if expect is not None and int(expect) != len(tensors):
        raise GGUFError(
            f"{paths[0]}: split.tensors.count = {expect} but the {count} shards hold {len(tensors)} "
            f"tensors; a shard is from another model or incomplete"
        )
    names = set()
    for t in tensors:
        if t.name in names:
            raise GGUFError(f"{t.file}: tensor {t.name!r} appears in more than one shard")
        names.add(t.name)
    return GGUFHeader(
        path=h0.path,
        version=h0.version,
        metadata=h0.metadata,
        tensors=tensors,
        alignment=h0.alignment,
        data_offset=h0.data_offset,
        file_size=h0.file_size,
        shards=tuple(h.path for h in headers),
    )
