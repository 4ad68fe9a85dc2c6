"""Importance matrices: read (legacy ``.dat`` and GGUF), check against a model, write, compute.

An importance matrix ("imatrix") holds, for each weight matrix W of a model, one float per input
column j of W: the mean over calibration tokens of the squared activation x_j that multiplies
column j (llama-imatrix's ``collect_imatrix``). llama-quantize passes these ``ne0`` floats as the
column weights of ``ggml_quantize_chunk`` (one vector per expert for 3-D tensors), and the
very-low-bit types need them (spec §5.5: iq2_xxs / iq2_xs / iq1_s assert without one, and ik's
llama-quantize refuses iq2_s, iq1_m, iq1_kt, iq2_kt… without an entry for the tensor).

Formats (spec §5.3):

* **legacy** (the only one ik's llama-quantize reads), little-endian: ``int32 n_entries``; per
  entry ``int32 len, char name[len], int32 ncall, int32 nval, float32 values[nval]``; optionally
  ``int32 last_call, int32 dataset_len, char dataset[dataset_len]``. llama-imatrix stores
  ``values = mean(x²)·ncall``, and llama-quantize divides by ncall when ncall > 0.
* **GGUF** (mainline llama-imatrix): ``general.type = "imatrix"``, keys ``imatrix.datasets``
  (string array), ``imatrix.chunk_count``, ``imatrix.chunk_size`` (u32), and per weight two f32
  tensors ``<name>.in_sum2`` (ne0 × n_mat: Σx² per column and matrix) and ``<name>.counts``
  (1 × n_mat: tokens seen per matrix). Mainline llama-quantize uses ``in_sum2 / count`` (1 where
  the count is 0). :func:`write_legacy` converts it for ik's llama-quantize.

Public API: :func:`load_imatrix`, :class:`Imatrix`, :class:`ImatrixEntry`, :func:`check_imatrix`,
:func:`write_legacy`, :func:`compute_imatrix`, :func:`ensure_auto_imatrix`,
:func:`auto_imatrix_key`, :func:`auto_imatrix_path`, :func:`imatrix_names_for`,
:func:`quantize_has_gate_to_up_fallback`, :class:`ImatrixError`.
"""

from __future__ import annotations

import ast
import ctypes
import hashlib
import logging
import math
import operator
import os
import re
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np

__all__ = [
    "ImatrixError",
    "ImatrixEntry",
    "Imatrix",
    "load_imatrix",
    "check_imatrix",
    "write_legacy",
    "imatrix_names_for",
    "quantize_has_gate_to_up_fallback",
    "compute_imatrix",
    "ensure_auto_imatrix",
    "auto_imatrix_key",
    "auto_imatrix_path",
    "GgmlHeader",
]

log = logging.getLogger(__name__)

_NOT_IMATRIX = ("not an importance matrix: expected the legacy llama-imatrix .dat layout or a "
                "GGUF imatrix")
_FIX = ("pass a file written by llama-imatrix (-o imatrix.dat or imatrix.gguf) for this model, or "
        "--quantbench-imatrix=auto to compute one")
_MAX_NAME = 4096  # longer legacy entry names mean the file is not an imatrix


class ImatrixError(ValueError):
    """An importance-matrix file that cannot be read or does not fit the model.

    The message names the file, what is wrong and the fix.
    """


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ImatrixEntry:
    """One weight's importance data.

    Attributes:
        name: the entry name as stored (normally the weight's tensor name,
            ``blk.0.attn_q.weight``).
        weights: float32 (ne0·n_mat,), read-only: the column weights exactly as llama-quantize
            uses them: legacy ``values / ncall`` (float32 division; ``values`` unchanged when
            ncall ≤ 0), GGUF ``in_sum2 / count`` per matrix (1 where the count is 0). Expert e
            of a 3-D tensor is ``weights[e·ne0:(e+1)·ne0]``.
        values: float32 (nval,), read-only: the numbers as stored (legacy: mean(x²)·ncall;
            GGUF: Σx² = in_sum2 flattened matrix by matrix).
        ncall: legacy: the stored ncall (matmul calls seen); GGUF: None.
        counts: GGUF: float32 (n_mat,) tokens seen per matrix; legacy: None.
        n_per_row: ne0 when the file says it (GGUF ``in_sum2`` shape), else None.
    """

    name: str
    weights: np.ndarray
    values: np.ndarray
    ncall: int | None = None
    counts: np.ndarray | None = None
    n_per_row: int | None = None

    @property
    def n_values(self) -> int:
        """Number of floats (ne0·n_mat)."""
        return int(self.weights.size)


@dataclass(eq=False)
class Imatrix:
    """An importance matrix read by :func:`load_imatrix` (or written by :func:`compute_imatrix`).

    Attributes:
        path: the file it was read from.
        source_format: ``"legacy"`` (llama-imatrix ``.dat``) or ``"gguf"``.
        entries: entry name → :class:`ImatrixEntry`, in file order.
        datasets: calibration text names (legacy: the one stored after the entries, if any;
            GGUF: ``imatrix.datasets``).
        chunk_count: legacy ``last_call`` (calls of the most-called weight, = chunks when
            n_ctx ≤ n_ubatch) or GGUF ``imatrix.chunk_count``; None when absent.
        chunk_size: GGUF ``imatrix.chunk_size`` (tokens per chunk); None otherwise.
        bound: filled by :func:`check_imatrix`: model tensor → (entry name, ne0, ne2) for every
            tensor llama-quantize would give imatrix data; None before the check.
        gate_to_up: whether ``ffn_gate`` falls back to the ``ffn_up`` entry; None (default) →
            as the engine's llama-quantize does (:func:`quantize_has_gate_to_up_fallback`).
    """

    path: Path
    source_format: str
    entries: dict[str, ImatrixEntry]
    datasets: tuple[str, ...] = ()
    chunk_count: int | None = None
    chunk_size: int | None = None
    bound: dict[str, tuple[str, int, int]] | None = field(default=None, repr=False)
    gate_to_up: bool | None = field(default=None, repr=False)

    def names_for(self, tensor_name: str) -> list[str]:
        """:func:`imatrix_names_for` with this imatrix's ``gate_to_up`` (None → as the loaded
        library's llama-quantize, :func:`quantize_has_gate_to_up_fallback`)."""
        gate_to_up = self.gate_to_up
        if gate_to_up is None:
            gate_to_up = quantize_has_gate_to_up_fallback()
        return imatrix_names_for(tensor_name, gate_to_up=gate_to_up)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def entry_for(self, tensor_name: str) -> ImatrixEntry | None:
        """The entry llama-quantize uses for ``tensor_name``, or None.

        After :func:`check_imatrix` this is the checked mapping (None for tensors whose entry
        llama-quantize ignores: token_embd with a size mismatch). Before it, the exact name and
        then ik's fallbacks (:meth:`names_for`).
        """
        if self.bound is not None:
            hit = self.bound.get(tensor_name)
            return self.entries[hit[0]] if hit else None
        for candidate in self.names_for(tensor_name):
            if candidate in self.entries:
                return self.entries[candidate]
        return None

    def weights_for(self, tensor_name: str, expert: int | None = None) -> np.ndarray | None:
        """Column weights that llama-quantize passes to ``ggml_quantize_chunk`` for a tensor.

        Args:
            tensor_name: model tensor name (``blk.3.ffn_down.weight``).
            expert: for a 3-D (expert) tensor, the index e along ne2: the slice
                ``weights[e·ne0:(e+1)·ne0]`` (llama-quantize's ``imatrix + i03·n_per_row``).
                None for a 2-D tensor.
        Returns:
            float32 (ne0,), read-only, or None when the imatrix has no entry for the tensor.
        Raises:
            ValueError: ``expert`` is None but the entry holds several matrices; ``expert`` is
                given but ne0 is unknown (a legacy file not yet checked with
                :func:`check_imatrix`); ``expert`` out of range.
        """
        entry = self.entry_for(tensor_name)
        if entry is None:
            return None
        ne0 = self.bound[tensor_name][1] if self.bound is not None else entry.n_per_row
        w = entry.weights
        if expert is None:
            if ne0 is not None and w.size != ne0:
                raise ValueError(f"{tensor_name}: imatrix entry {entry.name} holds {w.size // ne0} "
                                 f"matrices of {ne0} columns: pass expert=0…{w.size // ne0 - 1}")
            return w
        if ne0 is None:
            raise ValueError(f"{tensor_name}: the row length of {entry.name} is unknown in the "
                             f"legacy file {self.path}: call check_imatrix(imatrix, header) first")
        n_mat = w.size // ne0
        if not 0 <= expert < n_mat:
            raise ValueError(f"{tensor_name}: expert {expert} out of range 0…{n_mat - 1}")
        return w[expert * ne0:(expert + 1) * ne0]


def imatrix_names_for(tensor_name: str, *, gate_to_up: bool = True) -> list[str]:
    """Entry names llama-quantize (ik) tries for ``tensor_name``, in order.

    The exact name, then ik's fallbacks (src/llama-quantize.cpp): ``ffn_up_exps`` /
    ``ffn_gate_exps`` → ``ffn_gate_up_exps`` then ``ffn_up_exps``; ``ffn_gate_up_exps`` →
    ``ffn_up_exps``; ``ffn_gate`` → ``ffn_up`` (they see the same input) when ``gate_to_up``;
    ``attn_v_b`` ↔ ``attn_kv_b`` (MLA). The ik-llama-cpp-python 0.1.5 wheel predates the
    ``ffn_gate`` → ``ffn_up`` fallback: see :func:`quantize_has_gate_to_up_fallback`.
    """
    names = [tensor_name]
    for key in ("ffn_up_exps.weight", "ffn_gate_exps.weight"):
        pos = tensor_name.find(key)
        if pos >= 0:
            prefix = tensor_name[:pos]
            return names + [prefix + "ffn_gate_up_exps.weight", prefix + "ffn_up_exps.weight"]
    pos = tensor_name.find("ffn_gate_up_exps.weight")
    if pos >= 0:
        return names + [tensor_name[:pos] + "ffn_up_exps.weight"]
    pos = tensor_name.find("ffn_gate.weight")
    if pos >= 0:
        return names + [tensor_name[:pos] + "ffn_up.weight"] if gate_to_up else names
    alternatives = (".attn_v_b.weight", ".attn_kv_b.weight")
    for j, alt in enumerate(alternatives):
        pos = tensor_name.find(alt)
        if pos >= 0:
            return names + [tensor_name[:pos] + alternatives[(j + 1) % 2]]
    return names


_GATE_TO_UP_CACHE: dict[str, bool] = {}


def quantize_has_gate_to_up_fallback(lib_path: str | os.PathLike[str] | None = None) -> bool:
    """Whether the llama-quantize code of ``libllama`` falls back from ``ffn_gate`` to ``ffn_up``.

    Newer ik_llama.cpp looks up ``blk.N.ffn_up.weight`` when ``blk.N.ffn_gate.weight`` has no
    entry; the ik-llama-cpp-python 0.1.5 wheel does not (its llama-quantize then says "did not
    find weights for …ffn_gate.weight"). Told from the library: that fallback is the only code
    holding the string literals ``"ffn_gate.weight"`` and ``"ffn_up.weight"``. ``lib_path``
    None → the library llama-quantize links (:func:`bindings.default_library_path`). When no
    library can be read, the newer behaviour (True) is assumed. Cached per path.
    """
    from .engine import bindings

    try:
        path = Path(lib_path) if lib_path is not None else bindings.default_library_path()
    except Exception:  # noqa: BLE001 - no engine installed: assume current ik
        return True
    key = str(path)
    if key not in _GATE_TO_UP_CACHE:
        try:
            data = path.read_bytes()
            _GATE_TO_UP_CACHE[key] = (b"ffn_gate.weight\0" in data
                                       and b"ffn_up.weight\0" in data)
        except OSError:
            return True
    return _GATE_TO_UP_CACHE[key]


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=np.float32)
    a.flags.writeable = False
    return a


def _legacy_weights(values: np.ndarray, ncall: int) -> np.ndarray:
    """llama-quantize's ``v /= ncall`` (float32) when ncall > 0."""
    if ncall > 0:
        return values / np.float32(ncall)
    return values.copy()


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


def load_imatrix(path: str | os.PathLike[str]) -> Imatrix:
    """Read an importance matrix: llama-imatrix's legacy ``.dat`` or a GGUF imatrix.

    The format is told by the magic: ``GGUF`` → GGUF, anything else is parsed as legacy.

    Args:
        path: the file.
    Returns:
        :class:`Imatrix` whose entries hold the column weights as llama-quantize uses them.
    Raises:
        ImatrixError: missing file or directory; truncated or garbage content (the message says
            which entry and byte, and "not an importance matrix: expected the legacy llama-imatrix
            .dat layout or a GGUF imatrix"); a GGUF that is a model rather than an imatrix;
            non-finite or negative values.
    """
    p = Path(path)
    if not p.exists():
        raise ImatrixError(f"{p}: no such file; {_FIX}")
    if p.is_dir():
        raise ImatrixError(f"{p}: is a directory, not an importance matrix; {_FIX}")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ImatrixError(f"{p}: cannot read ({exc.strerror}); check the path and permissions") \
            from None
    if data[:4] == b"GGUF":
        return _load_gguf(p)
    return _load_legacy(p, data)


def _garbage(p: Path, detail: str) -> ImatrixError:
    return ImatrixError(f"{p}: {_NOT_IMATRIX} ({detail}); {_FIX}")


def _load_legacy(p: Path, data: bytes) -> Imatrix:
    size = len(data)
    if size < 4:
        raise _garbage(p, f"the file has only {size} bytes")
    (n_entries,) = struct.unpack_from("<i", data, 0)
    # each entry needs at least len + 1 name byte + ncall + nval + one float = 17 bytes
    if n_entries <= 0 or 4 + 17 * n_entries > size:
        raise _garbage(p, f"it starts with n_entries = {n_entries}, impossible for a "
                          f"{size}-byte file")
    pos = 4
    entries: dict[str, ImatrixEntry] = {}
    for i in range(n_entries):
        where = f"entry {i + 1} of {n_entries} at byte {pos}"
        if pos + 4 > size:
            raise _garbage(p, f"truncated: the file ends before {where}")
        (length,) = struct.unpack_from("<i", data, pos)
        if not 0 < length <= _MAX_NAME:
            raise _garbage(p, f"{where} has a name length of {length}")
        if pos + 4 + length + 8 > size:
            raise _garbage(p, f"truncated: the file ends inside {where}")
        raw_name = data[pos + 4:pos + 4 + length]
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            raise _garbage(p, f"{where} has a name that is not text: {raw_name[:32]!r}") from None
        if not name.isprintable():
            raise _garbage(p, f"{where} has a name that is not text: {name[:32]!r}")
        pos += 4 + length
        ncall, nval = struct.unpack_from("<ii", data, pos)
        pos += 8
        if ncall < 0 or nval <= 0:
            raise _garbage(p, f"entry {name!r} has ncall = {ncall}, nval = {nval}")
        if pos + 4 * nval > size:
            raise _garbage(p, f"truncated: entry {name!r} needs {4 * nval} bytes of values at "
                              f"byte {pos}, the file has {size - pos}")
        values = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        _check_values(p, name, values)
        entries[name] = ImatrixEntry(name, _readonly(_legacy_weights(values, ncall)),
                                     _readonly(values), ncall=ncall)
    rest = size - pos
    last_call: int | None = None
    datasets: tuple[str, ...] = ()
    if rest == 4:
        (last_call,) = struct.unpack_from("<i", data, pos)
    elif rest >= 8:
        last_call, dataset_len = struct.unpack_from("<ii", data, pos)
        if dataset_len < 0 or rest != 8 + dataset_len:
            raise _garbage(p, f"{rest} unexpected bytes after the last entry (at byte {pos})")
        dataset = data[pos + 8:pos + 8 + dataset_len].decode("utf-8", "replace")
        datasets = (dataset,) if dataset else ()
    elif rest:
        raise _garbage(p, f"{rest} unexpected bytes after the last entry (at byte {pos})")
    return Imatrix(p, "legacy", entries, datasets, last_call, None)


def _check_values(p: Path, name: str, values: np.ndarray) -> None:
    bad = ~np.isfinite(values) | (values < 0)
    if bad.any():
        j = int(np.argmax(bad))
        raise ImatrixError(f"{p}: entry {name!r} holds {values[j]} at column {j}; importance "
                           f"values are sums of squares (finite, ≥ 0): the file is corrupt; {_FIX}")


def _load_gguf(p: Path) -> Imatrix:
    from .gguf import GGUFError, read_header

    try:
        header = read_header(p, max_array_items=4096)
    except GGUFError as exc:
        raise ImatrixError(f"{p}: {_NOT_IMATRIX}: the GGUF header cannot be read ({exc})") from None
    kind = header.metadata.get("general.type")
    sums = {t.name[:-len(".in_sum2")]: t for t in header.tensors if t.name.endswith(".in_sum2")}
    counts = {t.name[:-len(".counts")]: t for t in header.tensors if t.name.endswith(".counts")}
    if kind not in (None, "imatrix") or not sums:
        what = f"a GGUF with general.type = {kind!r}" if kind else "a GGUF without imatrix tensors"
        raise ImatrixError(f"{p}: {_NOT_IMATRIX}; this is {what} (a model?), with no "
                           f"<name>.in_sum2 / <name>.counts tensors; {_FIX}")
    entries: dict[str, ImatrixEntry] = {}
    for name, st in sums.items():
        ct = counts.get(name)
        if ct is None:
            raise ImatrixError(f"{p}: GGUF imatrix has {name}.in_sum2 but no {name}.counts: "
                               f"incomplete file; {_FIX}")
        for t in (st, ct):
            if t.type_name != "f32":
                raise ImatrixError(f"{p}: GGUF imatrix tensor {t.name} is {t.type_name}, "
                                   f"expected f32; {_FIX}")
        n_mat = ct.n_elements
        ne0 = st.shape[0]
        if n_mat <= 0 or st.n_elements != ne0 * n_mat:
            raise ImatrixError(f"{p}: GGUF imatrix {name}.in_sum2 has shape {list(st.shape)} "
                               f"but {name}.counts has {n_mat} values (expected ne0 × {n_mat}); "
                               f"{_FIX}")
        sum2 = np.fromfile(p, dtype="<f4", count=st.n_elements, offset=st.data_offset)
        cnt = np.fromfile(p, dtype="<f4", count=n_mat, offset=ct.data_offset)
        sum2 = sum2.astype(np.float32)
        cnt = cnt.astype(np.float32)
        _check_values(p, name, sum2)
        _check_values(p, name + ".counts", cnt)
        weights = np.ones(sum2.size, dtype=np.float32)
        for j in range(n_mat):
            if cnt[j] > 0:
                weights[j * ne0:(j + 1) * ne0] = sum2[j * ne0:(j + 1) * ne0] / cnt[j]
        entries[name] = ImatrixEntry(name, _readonly(weights), _readonly(sum2), ncall=None,
                                     counts=_readonly(cnt), n_per_row=ne0)
    meta = header.metadata
    ds = meta.get("imatrix.datasets", ())
    datasets = tuple(str(d) for d in ds) if isinstance(ds, (tuple, list)) else ()
    cc = meta.get("imatrix.chunk_count")
    cs = meta.get("imatrix.chunk_size")
    return Imatrix(p, "gguf", entries, datasets, int(cc) if cc is not None else None,
                   int(cs) if cs is not None else None)


# --------------------------------------------------------------------------------------------
# checking against a model
# --------------------------------------------------------------------------------------------


def _quantizable(t) -> bool:
    """llama-quantize looks up imatrix data only for these tensors (names ending ``weight``,
    ≥ 2-D, not a norm)."""
    return t.name.endswith("weight") and t.n_dims >= 2 and "_norm.weight" not in t.name


def check_imatrix(imatrix: Imatrix, header, path: str | os.PathLike[str] | None = None
                  ) -> dict[str, str]:
    """Check that ``imatrix`` belongs to the model of ``header`` and bind it to the model.

    For every weight llama-quantize may quantize (name ending ``weight``, ≥ 2-D, not a norm), the
    entry is found as llama-quantize does (exact name, then ik's fallbacks, see
    :meth:`Imatrix.names_for`) and must hold ne0·ne2 floats (one ne0 vector per expert).
    ``token_embd.weight`` with a wrong size is skipped, as llama-quantize does.

    Args:
        imatrix: from :func:`load_imatrix`. header: :class:`pytest_quantbench.gguf.GGUFHeader`
            of the model (``read_model_header``). path: the file name for messages (default
            ``imatrix.path``).
    Returns:
        model tensor → entry name, for every tensor that gets imatrix data (also stored in
        ``imatrix.bound`` with ne0 and ne2, which :meth:`Imatrix.weights_for` then uses).
    Raises:
        ImatrixError: no entry matches any model tensor, or an entry's size differs from its
            tensor's ne0·ne2 (naming the file, the tensor, both sizes): the imatrix is likely for
            another model.
    """
    where = Path(path) if path is not None else imatrix.path
    model = getattr(header, "path", "the model")
    bound: dict[str, tuple[str, int, int]] = {}
    for t in header.tensors:
        if not _quantizable(t):
            continue
        entry = None
        for candidate in imatrix.names_for(t.name):
            if candidate in imatrix.entries:
                entry = imatrix.entries[candidate]
                break
        if entry is None:
            continue
        ne0 = t.shape[0]
        ne2 = t.shape[2] if t.n_dims >= 3 else 1
        if entry.n_values != ne0 * ne2:
            if t.name == "token_embd.weight":
                continue
            via = f" (entry {entry.name})" if entry.name != t.name else ""
            raise ImatrixError(
                f"{where}: the importance matrix holds {entry.n_values} values for {t.name}{via} "
                f"but that tensor of {model} needs ne0·ne2 = {ne0}·{ne2} = {ne0 * ne2} (shape "
                f"{list(t.shape)}): the imatrix is likely for another model; {_FIX}")
        bound[t.name] = (entry.name, ne0, ne2)
    if not bound:
        sample = ", ".join(list(imatrix.entries)[:3])
        raise ImatrixError(
            f"{where}: none of its {len(imatrix.entries)} entries ({sample}, …) names a weight of "
            f"{model}: the imatrix is likely for another model; {_FIX}")
    imatrix.bound = bound
    return {name: hit[0] for name, hit in bound.items()}


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def _atomic_write_bytes(dest: Path, chunks: Iterable[bytes]) -> None:
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _legacy_bytes(records: Iterable[tuple[str, int, np.ndarray]], last_call: int,
                  dataset: str) -> Iterable[bytes]:
    records = list(records)
    yield struct.pack("<i", len(records))
    for name, ncall, values in records:
        raw = name.encode("utf-8")
        yield struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, values.size)
        yield np.ascontiguousarray(values, dtype="<f4").tobytes()
    ds = dataset.encode("utf-8")
    yield struct.pack("<ii", last_call, len(ds)) + ds


def write_legacy(imatrix: Imatrix, path: str | os.PathLike[str]) -> Path:
    """Write ``imatrix`` in the legacy layout that ik's llama-quantize reads (atomically).

    Legacy entries are written back unchanged (stored values and ncall: a byte-exact round trip
    of the entries). GGUF entries are written with ncall = 1 and their column weights as values,
    so llama-quantize's division by ncall gives exactly the weights mainline would use. The
    trailer holds last_call (``chunk_count``, else the largest ncall) and the dataset names
    joined by ``", "``.

    Args:
        imatrix: any :class:`Imatrix`; path: destination (temp file + ``os.replace``).
    Returns:
        the path written.
    """
    records = []
    for e in imatrix.entries.values():
        if e.ncall is not None:
            records.append((e.name, e.ncall, e.values))
        else:
            records.append((e.name, 1, e.weights))
    last_call = imatrix.chunk_count if imatrix.chunk_count is not None else \
        max((r[1] for r in records), default=0)
    dest = Path(path)
    _atomic_write_bytes(dest, _legacy_bytes(records, int(last_call), ", ".join(imatrix.datasets)))
    return dest


# --------------------------------------------------------------------------------------------
# ggml.h: enums and struct ggml_tensor from the header of the loaded library
# --------------------------------------------------------------------------------------------

_CTYPES = {
    "int64_t": ctypes.c_int64, "uint64_t": ctypes.c_uint64, "int32_t": ctypes.c_int32,
    "uint32_t": ctypes.c_uint32, "int16_t": ctypes.c_int16, "uint16_t": ctypes.c_uint16,
    "int8_t": ctypes.c_int8, "uint8_t": ctypes.c_uint8, "size_t": ctypes.c_size_t,
    "char": ctypes.c_char, "bool": ctypes.c_bool, "float": ctypes.c_float, "int": ctypes.c_int,
    "double": ctypes.c_double,
}
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.floordiv, ast.FloorDiv: operator.floordiv, ast.LShift: operator.lshift}


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
        from .engine.llama import EngineError

        self.path = Path(path)
        text = _strip_comments(self.path.read_text(errors="replace"))
        self.defines: dict[str, int] = {}
        for name, value in re.findall(r"^\s*#\s*define\s+(\w+)\s+(0x[0-9a-fA-F]+|\d+)\b", text,
                                      re.M):
            self.defines.setdefault(name, int(value, 0))
        try:
            self.ops = self._enum(text, "ggml_op")
            self.types = self._enum(text, "ggml_type")
            self.Tensor = self._struct(text, "ggml_tensor")
            self.Object = self._struct(text, "ggml_object") if re.search(
                r"struct\s+ggml_object\s*\{", text) else None
        except (KeyError, ValueError) as exc:
            raise EngineError(f"{self.path}: cannot read {exc} from the loaded library's ggml.h; "
                              "the importance-matrix collector needs it") from None
        names = {f[0] for f in self.Tensor._fields_}
        missing = {"type", "buffer", "ne", "nb", "op", "src", "view_src", "data", "name"} - names
        if missing:
            raise EngineError(f"{self.path}: struct ggml_tensor lacks {sorted(missing)}")

    def _enum(self, text: str, name: str) -> dict[str, int]:
        m = re.search(r"enum\s+%s\s*\{(.*?)\}" % re.escape(name), text, re.S)
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
        m = re.search(r"struct\s+%s\s*\{(.*?)\}\s*;" % re.escape(name), text, re.S)
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
            if "*" in ctype_text:
                ctype = ctypes.c_void_p
            elif ctype_text.startswith("enum "):
                ctype = ctypes.c_int
            else:
                base = ctype_text.replace("const ", "").strip()
                if base not in _CTYPES:
                    raise ValueError(f"struct {name} field {decl!r} (type {base})")
                ctype = _CTYPES[base]
            if dim is not None:
                ctype = ctype * _eval_int(dim, self.defines)
            fields.append((fname, ctype))
        return type(f"{name}_from_header", (ctypes.Structure,), {"_fields_": fields})


class _GgmlApi:
    """The libggml functions the collector calls, with the header-derived tensor layout."""

    def __init__(self, libllama_path: Path) -> None:
        from .engine import bindings
        from .engine.llama import EngineError
        from .engine.swap import _header_for

        self.header = GgmlHeader(_header_for(Path(libllama_path)))
        libggml = bindings.mapped_library(r"^libggml")
        if not libggml:
            raise EngineError("cannot find the libggml loaded with the engine")
        lib = ctypes.CDLL(libggml)
        sig = {
            "ggml_backend_buffer_is_host": ([ctypes.c_void_p], ctypes.c_bool),
            "ggml_backend_tensor_get": ([ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                         ctypes.c_size_t], None),
            "ggml_nbytes": ([ctypes.c_void_p], ctypes.c_size_t),
            "ggml_tensor_overhead": ([], ctypes.c_size_t),
        }
        for fname, (argtypes, restype) in sig.items():
            try:
                fn = getattr(lib, fname)
            except AttributeError:
                raise EngineError(f"{libggml} has no symbol {fname}") from None
            fn.argtypes, fn.restype = argtypes, restype
        self.lib = lib
        h = self.header
        if h.Object is not None:
            expect = ctypes.sizeof(h.Tensor) + ctypes.sizeof(h.Object)
            if lib.ggml_tensor_overhead() != expect:
                raise EngineError(
                    f"{h.path} does not describe the loaded {libggml}: ggml_tensor_overhead() is "
                    f"{lib.ggml_tensor_overhead()} bytes, the header's structs make {expect}")
        try:
            self.MUL_MAT = h.ops["GGML_OP_MUL_MAT"]
            self.MUL_MAT_ID = h.ops["GGML_OP_MUL_MAT_ID"]
            self.F32 = h.types["GGML_TYPE_F32"]
            self.I32 = h.types["GGML_TYPE_I32"]
        except KeyError as exc:
            raise EngineError(f"{h.path} does not declare {exc}") from None


# --------------------------------------------------------------------------------------------
# collecting (llama-imatrix's collect_imatrix)
# --------------------------------------------------------------------------------------------


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

    def __init__(self, api: _GgmlApi, weight_names: set[str], process_output: bool) -> None:
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

    def _read(self, ptr: int, dtype: np.dtype) -> np.ndarray:
        """A tensor's elements as an ndarray of shape (ne3, ne2, ne1, ne0) (a copy)."""
        t = self.Tensor.from_address(ptr)
        nbytes = int(self.api.lib.ggml_nbytes(ptr))
        buf = t.buffer or (self.Tensor.from_address(t.view_src).buffer if t.view_src else None)
        if buf and not self.api.lib.ggml_backend_buffer_is_host(buf):
            raw = np.empty(nbytes, dtype=np.uint8)
            self.api.lib.ggml_backend_tensor_get(ptr, raw.ctypes.data, 0, nbytes)
        else:
            raw = np.frombuffer((ctypes.c_char * nbytes).from_address(t.data), dtype=np.uint8)
        shape = tuple(int(t.ne[i]) for i in (3, 2, 1, 0))
        strides = tuple(int(t.nb[i]) for i in (3, 2, 1, 0))
        view = np.lib.stride_tricks.as_strided(raw.view(np.uint8), shape=shape + (np.dtype(
            dtype).itemsize,), strides=strides + (1,))
        return np.ascontiguousarray(view).view(dtype).reshape(shape)

    def _entry(self, name: str, ne0: int, n_as: int) -> _Stats:
        e = self.stats.get(name)
        if e is None:
            e = self.stats[name] = _Stats(ne0, n_as)
        elif e.values.shape != (n_as, ne0):
            raise ImatrixError(f"inconsistent size for {name}: {e.values.size} vs {ne0 * n_as} "
                               "(llama-imatrix: 'Oops: inconsistent size')")
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
            experts = ids.T.reshape(-1)                                  # (n_ids·n_tokens,)
            rows = x[:, np.arange(n_ids) % x.shape[1], :]                # (n_tokens, n_ids, ne10)
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
                    log.warning("imatrix entry %s: %d of %d experts are missing data; storing 1 "
                                "for them", name, int(zero.sum()), e.n_as)
                    counts[zero] = 1
                    values[zero] = 1
                else:
                    log.warning("imatrix entry %s has partial data (%d of %d experts) - skipping",
                                name, int((~zero).sum()), e.n_as)
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
    from .engine import bindings
    from .engine.llama import LlamaModel
    from .gguf import read_model_header

    tokens = np.ascontiguousarray(chunk_tokens, dtype=np.int32)
    if tokens.ndim != 2 or tokens.shape[1] != eval_settings.n_ctx or tokens.shape[0] < 1:
        raise ValueError(f"chunk_tokens must be int32 (n_chunk ≥ 1, n_ctx={eval_settings.n_ctx}), "
                         f"got shape {tokens.shape}")
    header = read_model_header(model_path)
    lib = bindings.load_library(lib_path)
    api = _GgmlApi(lib.quantbench_path)
    collector = _Collector(api, {t.name for t in header.tensors}, process_output)
    callback = bindings.ggml_backend_sched_eval_callback(collector)

    def hook(cparams) -> None:
        cparams.cb_eval = callback
        cparams.cb_eval_user_data = None
        cparams.fused_up_gate = False
        cparams.fused_moe_up_gate = False
        cparams.fused_mmad = False

    start = time.perf_counter()
    with LlamaModel(Path(model_path), eval_settings, lib_path, context_params_hook=hook) as model:
        for chunk in tokens:
            model.decode_all_outputs(chunk)
            collector.raise_if_failed()
    records = collector.records()
    if not records:
        raise ImatrixError(f"computing an importance matrix for {model_path}: the engine ran no "
                           "matrix multiplication of a blk.* weight with ≥ 16 tokens; use chunks "
                           "of ≥ 16 tokens")
    _atomic_write_bytes(Path(dest), _legacy_bytes(records, collector.last_call, dataset))
    log.info("imatrix: %d entries from %d chunks of %d tokens in %.1f s -> %s", len(records),
             tokens.shape[0], tokens.shape[1], time.perf_counter() - start, dest)
    return load_imatrix(dest)


# --------------------------------------------------------------------------------------------
# the auto imatrix cache
# --------------------------------------------------------------------------------------------


def auto_imatrix_key(model_sha256: str, corpus_sha256: str, n_ctx: int, chunks: int,
                     engine: str = "") -> str:
    """File stem of a cached auto imatrix: ``<model12>-c<n_ctx>-<chunks>ch-<digest16>``.

    The digest covers all arguments (``engine``: e.g. :attr:`EngineIdentity.key`).
    """
    text = f"model={model_sha256}|corpus={corpus_sha256}|n_ctx={n_ctx}|chunks={chunks}|" \
           f"engine={engine}"
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return f"{model_sha256[:12]}-c{n_ctx}-{chunks}ch-{digest}"


def auto_imatrix_path(cache_dir: str | os.PathLike[str], key: str) -> Path:
    """``<cache_dir>/imatrix/<key>.imatrix.dat``."""
    return Path(cache_dir) / "imatrix" / f"{key}.imatrix.dat"


def ensure_auto_imatrix(cache_dir: str | os.PathLike[str], key: str,
                        compute: Callable[[Path], object]) -> Path:
    """Return the cached auto imatrix for ``key``, computing it once across processes if needed.

    Under a :class:`filelock.FileLock` beside the file (as :func:`baseline.ensure_baseline`): an
    existing file that loads is returned; an unreadable one is removed and recomputed.

    Args:
        cache_dir: the plugin's cache directory. key: :func:`auto_imatrix_key`.
        compute: writes the file at the given path atomically (e.g.
            ``lambda dest: compute_imatrix(model, settings, tokens, dest, dataset=name)``);
            called at most once, under the lock.
    Returns:
        the path of a readable legacy imatrix.
    Raises:
        whatever ``compute`` raises; ImatrixError if the fresh file cannot be read.
    """
    from filelock import FileLock

    path = auto_imatrix_path(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.exists():
            try:
                load_imatrix(path)
                return path
            except ImatrixError as exc:
                from .cachefiles import cache_notice  # issue 11.4: shown in a default run

                cache_notice(f"cached imatrix {path} is not usable ({exc}): recomputing")
                path.unlink()
        compute(path)
        load_imatrix(path)
    return path
