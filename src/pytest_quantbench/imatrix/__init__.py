"""Importance matrices: read (legacy ``.dat`` and GGUF), check against a model, write, compute.

An importance matrix ("imatrix") holds, for each weight matrix W of a model, one float per input
column j of W: the mean over calibration tokens of the squared activation x_j that multiplies
column j (llama-imatrix's ``collect_imatrix``). llama-quantize passes these ``ne0`` floats as the
column weights of ``ggml_quantize_chunk`` (one vector per expert for 3-D tensors), and the
very-low-bit types need them (docs/llama-quantize.md#imatrix-needs: iq2_xxs / iq2_xs / iq1_s assert
without one, and ik's llama-quantize refuses iq2_s, iq1_m, iq1_kt, iq2_kt… without an entry for the
tensor).

Modules, one role each: :mod:`.formats` (the data, reading the legacy ``.dat`` and GGUF formats,
writing the legacy one), :mod:`.check` (binding to a model), :mod:`.collect` (computing, as
llama-imatrix does) and :mod:`.cache` (the auto imatrix). This package re-exports their public
names.

Public API: :func:`load_imatrix`, :class:`Imatrix`, :class:`ImatrixEntry`, :func:`check_imatrix`,
:func:`write_legacy`, :func:`compute_imatrix`, :func:`ensure_auto_imatrix`,
:func:`auto_imatrix_key`, :func:`auto_imatrix_path`, :func:`imatrix_names_for`,
:func:`quantize_has_gate_to_up_fallback`, :class:`ImatrixError`.
"""

from ..engine.ggml import GgmlHeader
from .cache import auto_imatrix_key, auto_imatrix_path, ensure_auto_imatrix
from .check import check_imatrix
from .collect import _Collector, compute_imatrix
from .formats import (
    Imatrix,
    ImatrixEntry,
    ImatrixError,
    imatrix_names_for,
    load_imatrix,
    quantize_has_gate_to_up_fallback,
    write_legacy,
)

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
    "_Collector",
]
