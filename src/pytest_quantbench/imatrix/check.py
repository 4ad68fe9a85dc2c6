"""Checking an importance matrix against a model: :func:`check_imatrix` binds each weight to the
entry llama-quantize would use and refuses a matrix made for another model."""

from __future__ import annotations

import os
from pathlib import Path

from .formats import _FIX, Imatrix, ImatrixError


def _quantizable(t) -> bool:
    """llama-quantize looks up imatrix data only for these tensors (names ending ``weight``,
    ≥ 2-D, not a norm)."""
    return t.name.endswith("weight") and t.n_dims >= 2 and "_norm.weight" not in t.name


def check_imatrix(
    imatrix: Imatrix, header, path: str | os.PathLike[str] | None = None
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
                f"{list(t.shape)}): the imatrix is likely for another model; {_FIX}"
            )
        bound[t.name] = (entry.name, ne0, ne2)
    if not bound:
        sample = ", ".join(list(imatrix.entries)[:3])
        raise ImatrixError(
            f"{where}: none of its {len(imatrix.entries)} entries ({sample}, …) names a weight of "
            f"{model}: the imatrix is likely for another model; {_FIX}"
        )
    imatrix.bound = bound
    return {name: hit[0] for name, hit in bound.items()}
