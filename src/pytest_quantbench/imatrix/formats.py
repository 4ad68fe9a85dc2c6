"""Importance-matrix files: the data (:class:`Imatrix`, :class:`ImatrixEntry`), reading both
formats (:func:`load_imatrix`) and writing the legacy one (:func:`write_legacy`).

Formats (docs/llama-quantize.md#imatrix-file):

* **legacy** (the only one ik's llama-quantize reads), little-endian: ``int32 n_entries``; per
  entry ``int32 len, char name[len], int32 ncall, int32 nval, float32 values[nval]``; optionally
  ``int32 last_call, int32 dataset_len, char dataset[dataset_len]``. llama-imatrix stores
  ``values = mean(x²)·ncall``, and llama-quantize divides by ncall when ncall > 0.
* **GGUF** (mainline llama-imatrix): ``general.type = "imatrix"``, keys ``imatrix.datasets``
  (string array), ``imatrix.chunk_count``, ``imatrix.chunk_size`` (u32), and per weight two f32
  tensors ``<name>.in_sum2`` (ne0 × n_mat: Σx² per column and matrix) and ``<name>.counts``
  (1 × n_mat: tokens seen per matrix). Mainline llama-quantize uses ``in_sum2 / count`` (1 where
  the count is 0). :func:`write_legacy` converts it for ik's llama-quantize.
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

_NOT_IMATRIX = (
    "not an importance matrix: expected the legacy llama-imatrix .dat layout or a GGUF imatrix"
)
_FIX = (
    "pass a file written by llama-imatrix (-o imatrix.dat or imatrix.gguf) for this model, or "
    "--quantbench-imatrix=auto to compute one"
)
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
                raise ValueError(
                    f"{tensor_name}: imatrix entry {entry.name} holds {w.size // ne0} "
                    f"matrices of {ne0} columns: pass expert=0…{w.size // ne0 - 1}"
                )
            return w
        if ne0 is None:
            raise ValueError(
                f"{tensor_name}: the row length of {entry.name} is unknown in the "
                f"legacy file {self.path}: call check_imatrix(imatrix, header) first"
            )
        n_mat = w.size // ne0
        if not 0 <= expert < n_mat:
            raise ValueError(f"{tensor_name}: expert {expert} out of range 0…{n_mat - 1}")
        return w[expert * ne0 : (expert + 1) * ne0]


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
    from ..engine import bindings

    try:
        path = Path(lib_path) if lib_path is not None else bindings.default_library_path()
    except Exception:  # noqa: BLE001 - no engine installed: assume current ik
        return True
    key = str(path)
    if key not in _GATE_TO_UP_CACHE:
        try:
            data = path.read_bytes()
            _GATE_TO_UP_CACHE[key] = b"ffn_gate.weight\0" in data and b"ffn_up.weight\0" in data
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
        raise ImatrixError(
            f"{p}: cannot read ({exc.strerror}); check the path and permissions"
        ) from None
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
        raise _garbage(
            p, f"it starts with n_entries = {n_entries}, impossible for a {size}-byte file"
        )
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
        raw_name = data[pos + 4 : pos + 4 + length]
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
            raise _garbage(
                p,
                f"truncated: entry {name!r} needs {4 * nval} bytes of values at "
                f"byte {pos}, the file has {size - pos}",
            )
        values = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        _check_values(p, name, values)
        entries[name] = ImatrixEntry(
            name, _readonly(_legacy_weights(values, ncall)), _readonly(values), ncall=ncall
        )
    rest = size - pos
    last_call: int | None = None
    datasets: tuple[str, ...] = ()
    if rest == 4:
        (last_call,) = struct.unpack_from("<i", data, pos)
    elif rest >= 8:
        last_call, dataset_len = struct.unpack_from("<ii", data, pos)
        if dataset_len < 0 or rest != 8 + dataset_len:
            raise _garbage(p, f"{rest} unexpected bytes after the last entry (at byte {pos})")
        dataset = data[pos + 8 : pos + 8 + dataset_len].decode("utf-8", "replace")
        datasets = (dataset,) if dataset else ()
    elif rest:
        raise _garbage(p, f"{rest} unexpected bytes after the last entry (at byte {pos})")
    return Imatrix(p, "legacy", entries, datasets, last_call, None)


def _check_values(p: Path, name: str, values: np.ndarray) -> None:
    bad = ~np.isfinite(values) | (values < 0)
    if bad.any():
        j = int(np.argmax(bad))
        raise ImatrixError(
            f"{p}: entry {name!r} holds {values[j]} at column {j}; importance "
            f"values are sums of squares (finite, ≥ 0): the file is corrupt; {_FIX}"
        )


def _load_gguf(p: Path) -> Imatrix:
    from ..gguf import GGUFError, read_header

    try:
        header = read_header(p, max_array_items=4096)
    except GGUFError as exc:
        raise ImatrixError(f"{p}: {_NOT_IMATRIX}: the GGUF header cannot be read ({exc})") from None
    kind = header.metadata.get("general.type")
    sums = {t.name[: -len(".in_sum2")]: t for t in header.tensors if t.name.endswith(".in_sum2")}
    counts = {t.name[: -len(".counts")]: t for t in header.tensors if t.name.endswith(".counts")}
    if kind not in (None, "imatrix") or not sums:
        what = f"a GGUF with general.type = {kind!r}" if kind else "a GGUF without imatrix tensors"
        raise ImatrixError(
            f"{p}: {_NOT_IMATRIX}; this is {what} (a model?), with no "
            f"<name>.in_sum2 / <name>.counts tensors; {_FIX}"
        )
    entries: dict[str, ImatrixEntry] = {}
    for name, st in sums.items():
        ct = counts.get(name)
        if ct is None:
            raise ImatrixError(
                f"{p}: GGUF imatrix has {name}.in_sum2 but no {name}.counts: "
                f"incomplete file; {_FIX}"
            )
        for t in (st, ct):
            if t.type_name != "f32":
                raise ImatrixError(
                    f"{p}: GGUF imatrix tensor {t.name} is {t.type_name}, expected f32; {_FIX}"
                )
        n_mat = ct.n_elements
        ne0 = st.shape[0]
        if n_mat <= 0 or st.n_elements != ne0 * n_mat:
            raise ImatrixError(
                f"{p}: GGUF imatrix {name}.in_sum2 has shape {list(st.shape)} "
                f"but {name}.counts has {n_mat} values (expected ne0 × {n_mat}); "
                f"{_FIX}"
            )
        sum2 = np.fromfile(p, dtype="<f4", count=st.n_elements, offset=st.data_offset)
        cnt = np.fromfile(p, dtype="<f4", count=n_mat, offset=ct.data_offset)
        sum2 = sum2.astype(np.float32)
        cnt = cnt.astype(np.float32)
        _check_values(p, name, sum2)
        _check_values(p, name + ".counts", cnt)
        weights = np.ones(sum2.size, dtype=np.float32)
        for j in range(n_mat):
            if cnt[j] > 0:
                weights[j * ne0 : (j + 1) * ne0] = sum2[j * ne0 : (j + 1) * ne0] / cnt[j]
        entries[name] = ImatrixEntry(
            name,
            _readonly(weights),
            _readonly(sum2),
            ncall=None,
            counts=_readonly(cnt),
            n_per_row=ne0,
        )
    meta = header.metadata
    ds = meta.get("imatrix.datasets", ())
    datasets = tuple(str(d) for d in ds) if isinstance(ds, (tuple, list)) else ()
    cc = meta.get("imatrix.chunk_count")
    cs = meta.get("imatrix.chunk_size")
    return Imatrix(
        p,
        "gguf",
        entries,
        datasets,
        int(cc) if cc is not None else None,
        int(cs) if cs is not None else None,
    )


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


def _legacy_bytes(
    records: Iterable[tuple[str, int, np.ndarray]], last_call: int, dataset: str
) -> Iterable[bytes]:
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
    last_call = (
        imatrix.chunk_count
        if imatrix.chunk_count is not None
        else max((r[1] for r in records), default=0)
    )
    dest = Path(path)
    _atomic_write_bytes(dest, _legacy_bytes(records, int(last_call), ", ".join(imatrix.datasets)))
    return dest
