"""Facts of a run's plan known before any item runs, from the planned work units and the
baseline's GGUF header alone (no engine, no cache):

* :func:`types_needing_imatrix`: which written types of the planned items need an importance
  matrix (then one is computed from the corpus unless the user gave one or ``=none``);
* :func:`fallback_notes`: the qtypes that fall back on every (or most) selected tensor, said once
  with the row lengths, the block size and the fixes.

Both follow llama-quantize's own rules as :func:`qtypes.predict_written_type` and
:func:`qtypes.needs_imatrix` state them (docs/llama-quantize.md).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

#: Tensors llama-quantize exempts from the "rule" imatrix need (the R types).
_RULE_EXEMPT = ("token_embd.weight", "output.weight")


def _tensor_qtype(unit, known: set[str]):
    """The resolved qtype of ``unit`` when it quantizes tensors of the model, else None (a
    variant-file or recipe item, whose ``tensors`` name a file digest)."""
    from .qtypes import resolve_qtype

    if any(name not in known for name in unit.tensors):
        return None
    try:
        return resolve_qtype(unit.qtype)
    except ValueError:
        return None


def _written(qtype_name: str, info):
    """(requested GGMLType, written GGMLType, reason) of ggml type ``qtype_name`` on tensor
    ``info`` (a :class:`~pytest_quantbench.gguf.TensorInfo`), or None for a preset or a shape the
    type cannot hold."""
    from .qtypes import UnsupportedShapeError, predict_written_type, resolve_qtype

    qtype = resolve_qtype(qtype_name)
    if qtype.kind != "type":
        return None
    try:
        wtype, why = predict_written_type(
            qtype.ggml_type, info.ne0, info.n_rows, tensor_name=info.name
        )
    except (UnsupportedShapeError, ValueError):
        return None
    return qtype.ggml_type, wtype, why


def types_needing_imatrix(units: Iterable, header, allow_fallback: bool) -> tuple[str, ...]:
    """The ggml types (sorted names) that planned items write and that need an importance matrix.

    units: the run's :class:`~pytest_quantbench.measure.WorkUnit` list; header: the baseline's
    :class:`~pytest_quantbench.gguf.GGUFHeader`; allow_fallback: ``--quantbench-allow-fallback``
    (without it an item with a fallback type is skipped, so its types need nothing). A preset
    counts when llama-quantize refuses it without an imatrix (:func:`qtypes.needs_imatrix`).
    Pure: every xdist worker gets the same answer, so the imatrix identity in result keys agrees.
    """
    from .qtypes import needs_imatrix

    known = {t.name for t in header.tensors}
    needed: set[str] = set()
    for unit in units:
        qtype = _tensor_qtype(unit, known)
        if qtype is None:
            continue
        if qtype.kind == "preset":
            if needs_imatrix(qtype):
                needed.add(qtype.name.lower())
            continue
        planned = []
        for name in unit.tensors:
            info = header.tensor(name)
            found = _written(unit.qtype, info)
            if found is None:
                break
            requested, wtype, _ = found
            planned.append((name, info, wtype))
        else:
            if not allow_fallback and any(w.name != requested.name for _, _, w in planned):
                continue
            for name, info, wtype in planned:
                if (
                    needs_imatrix(wtype)
                    and wtype.name != info.type_name
                    and not (wtype.imatrix == "rule" and name in _RULE_EXEMPT)
                ):
                    needed.add(wtype.name)
    return tuple(sorted(needed))


def fallback_notes(
    units: Iterable, header, allow_fallback: bool, eligible: Iterable[str] = ()
) -> list[str]:
    """One message per qtype that llama-quantize cannot write on most selected tensors.

    A ggml type falls back when the tensor's row length ne0 is not a multiple of its block (e.g.
    iq1_kt's 256 on SmolLM2's 576-wide rows: it writes iq4_nl). When that happens on every
    selected tensor, or on more than half of them, the message names the row lengths, the block,
    the fallback type, ``--quantbench-allow-fallback`` and which tensors of this model take the
    type (their kind and ne0 = k·block), chosen from ``eligible`` (the model's quantizable
    tensor names; default: all 2-D ones). The per-item skip reasons stay.

    units: planned :class:`~pytest_quantbench.measure.WorkUnit` (single tensors only are
    counted); header: the baseline's GGUFHeader. Returns the messages (possibly none).
    """
    from .selection import tensor_kind

    by_qtype: dict[str, list[tuple[str, int, str]]] = {}
    totals: Counter = Counter()
    block: dict[str, int] = {}
    known = {t.name for t in header.tensors}
    for unit in units:
        if len(unit.tensors) != 1 or _tensor_qtype(unit, known) is None:
            continue
        info = header.tensor(unit.tensors[0])
        found = _written(unit.qtype, info)
        if found is None:
            continue
        requested, wtype, _ = found
        totals[unit.qtype] += 1
        block[unit.qtype] = requested.block_size
        if wtype.name != requested.name and info.ne0 % requested.block_size:
            by_qtype.setdefault(unit.qtype, []).append((info.name, info.ne0, wtype.name))
    names = list(eligible) or [t.name for t in header.tensors if t.n_dims >= 2]
    notes = []
    for qtype, falls in sorted(by_qtype.items()):
        total, size = totals[qtype], block[qtype]
        if 2 * len(falls) <= total:
            continue
        widths = ", ".join(f"ne0 = {w}" for w in sorted({w for _, w, _ in falls}))
        written = ", ".join(sorted({t for _, _, t in falls}))
        fits: dict[str, int] = {}
        for name in names:
            info = header.tensor(name)
            if info.ne0 % size == 0:
                fits.setdefault(tensor_kind(name) or name, info.ne0)
        where = (
            "; tensors of this model that take it: "
            + ", ".join(
                f"{kind} (ne0 = {ne0} = {ne0 // size}·{size})" for kind, ne0 in fits.items()
            )
            if fits
            else "; no tensor of this model has rows it can hold"
        )
        action = (
            "they are measured as that type (--quantbench-allow-fallback)"
            if allow_fallback
            else "those items are skipped; --quantbench-allow-fallback measures the "
            "fallback type instead"
        )
        notes.append(
            f"{qtype} falls back on {len(falls)} of {total} selected tensors: their rows "
            f"({widths}) are not a multiple of its block {size}, so llama-quantize "
            f"writes {written}; {action}{where}"
        )
    return notes
