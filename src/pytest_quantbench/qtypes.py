"""The table of ik_llama.cpp ggml types and llama-quantize presets.

Pure Python: no ctypes, no numpy.  Everything else in the plugin that needs to
know "how many bytes is a row of type X", "what does llama-quantize write when
asked for X on a tensor of this shape" or "what does the user mean by
``q4_k_m``" asks this module.

Sources (see ``docs/llama-quantize.md``):

* type ids: ``enum ggml_type`` in the ``include/ggml.h`` shipped with the
  ik-llama-cpp-python 0.1.5 wheel.  ik-only ids differ from mainline and from
  gguf-py (e.g. ``iq4_ks`` = 144), which is why this table exists at all;
* names, block sizes, bytes per block and row meta: ``ggml_type_name``,
  ``ggml_blck_size``, ``ggml_type_size`` and ``ggml_row_size`` of the wheel's
  ``libggml.so`` (docs/llama-quantize.md#ggml-api).  ``tests/test_qtypes.py`` cross-checks every row
  against the loaded library;
* row-length fallbacks, interleaving and imatrix needs:
  docs/llama-quantize.md#fallbacks – #type-table (ik's ``change_type_if_necessary`` and
  ``interleaved_properties``);
* presets: ``enum llama_ftype`` in the wheel's ``include/llama.h``, the
  "Allowed quantization types" list that the wheel's ``llama-quantize --help``
  prints, and docs/llama-quantize.md#type-names (which names are ggml types and which are presets).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "GGMLType",
    "Preset",
    "QType",
    "UnknownQTypeError",
    "UnsupportedShapeError",
    "GGML_TYPES",
    "PRESETS",
    "TYPES_BY_ID",
    "TYPES_BY_NAME",
    "PRESETS_BY_NAME",
    "QK_K",
    "ggml_type",
    "type_by_id",
    "row_size",
    "resolve_qtype",
    "parse_qtype_list",
    "predict_written_type",
    "needs_imatrix",
    "find_preset",
    "valid_qtype_names",
]

#: Super-block size of the k-quants and the ik ``iq*_k*`` families.
QK_K = 256

ImatrixNeed = Literal["required", "rule"]


@dataclass(frozen=True)
class GGMLType:
    """One ggml tensor type as ik_llama.cpp knows it.

    Attributes:
        name: exact, case-sensitive ik ggml spelling (``q4_K``, ``q8_KV``,
            ``iq4_ks``, ``q4_k_r4``, ``q4_0_4x4``), as ``ggml_type_name`` returns.
        type_id: value in ``enum ggml_type`` (the id stored in GGUF tensor infos).
        block_size: elements per block (``ggml_blck_size``).
        type_size: bytes per block (``ggml_type_size``; for ``_rN`` types the
            per-row share).
        row_meta: extra bytes at the start of each row (docs/llama-quantize.md#type-table "meta").
        interleave: rows interleaved together (N of ``_rN``; 1 if none).
        base: the type an interleaved variant falls back to when
            ``ne1 % interleave != 0`` (ik ``interleaved_properties``), else None.
        fallback: for the 256-block types, the type llama-quantize writes when
            ``ne0 % 256 != 0`` (docs/llama-quantize.md#fallbacks, #type-table).  None for types with
            no fallback (32-block types assert in the quantizer; ``*_bn`` throw).
        imatrix: ``"required"`` for the A set (``ggml_quantize_requires_imatrix``:
            the quantizer asserts), ``"rule"`` for the R set (llama-quantize
            refuses without an imatrix entry), None otherwise
            (docs/llama-quantize.md#imatrix-needs).
        quantizable: True if llama-quantize can write it as a weight type
            (f32/f16/bf16/bf16_r16 count as targets).  Activation types
            (``q8_K*``, ``q8_1*``, ``*_x4``, ``q8_KR8``) and the integer/f64
            types are False.
    """

    name: str
    type_id: int
    block_size: int
    type_size: int
    row_meta: int = 0
    interleave: int = 1
    base: str | None = None
    fallback: str | None = None
    imatrix: ImatrixNeed | None = None
    quantizable: bool = False

    @property
    def bpw(self) -> float:
        """Bits per weight of the blocks, without row meta (docs/llama-quantize.md#type-table
        "bpw")."""
        return 8.0 * self.type_size / self.block_size

    def effective_bpw(self, ne0: int) -> float:
        """Bits per weight of a row of ``ne0`` elements, row meta included."""
        return 8.0 * self.row_size(ne0) / ne0

    @property
    def is_float(self) -> bool:
        """f32, f16, bf16 (and bf16_r16, f64): stored unquantized."""
        return self.name in ("f32", "f16", "bf16", "bf16_r16", "f64")

    @property
    def is_interleaved(self) -> bool:
        return self.interleave > 1

    def row_size(self, ne0: int) -> int:
        """Bytes of one row of ``ne0`` elements: ``row_meta + type_size*ne0/block_size``.

        Raises ValueError when ``ne0`` is not a multiple of the block size.
        """
        return row_size(self, ne0)

    def __str__(self) -> str:  # the exact ggml spelling, e.g. for ids and --custom-q
        return self.name


def _t(name, type_id, blck, size, meta=0, *, il=1, base=None, fb=None, imx=None, q=True):
    return GGMLType(name, type_id, blck, size, meta, il, base, fb, imx, q)


# Every entry of enum ggml_type in the wheel's ggml.h (ids 4, 5 are removed types
# that ggml_type_name reports as "DEPRECATED"; ids 142/143 are deprecated ik types
# that the library no longer names).  Order: by id.
GGML_TYPES: tuple[GGMLType, ...] = (
    # --- float and integer types -------------------------------------------
    _t("f32", 0, 1, 4),
    _t("f16", 1, 1, 2),
    # --- legacy 32-block quants (ne0 % 32: llama-quantize does no check, quantizer asserts)
    _t("q4_0", 2, 32, 18),
    _t("q4_1", 3, 32, 20),
    _t("q5_0", 6, 32, 22),
    _t("q5_1", 7, 32, 24),
    _t("q8_0", 8, 32, 34),
    _t("q8_1", 9, 32, 36, q=False),  # activation type
    # --- k-quants -----------------------------------------------------------
    _t("q2_K", 10, 256, 84, fb="iq4_nl"),  # R only under the Q2_K_S preset
    _t("q3_K", 11, 256, 110, fb="iq4_nl"),
    _t("q4_K", 12, 256, 144, fb="q5_0"),
    _t("q5_K", 13, 256, 176, fb="q6_0"),
    _t("q6_K", 14, 256, 210, fb="q8_0"),
    _t("q8_K", 15, 256, 296, q=False),  # activation type
    # --- i-quants -------------------------------------------------------------
    _t("iq2_xxs", 16, 256, 66, fb="iq4_nl", imx="required"),
    _t("iq2_xs", 17, 256, 74, fb="iq4_nl", imx="required"),
    _t("iq3_xxs", 18, 256, 98, fb="iq4_nl"),
    _t("iq1_s", 19, 256, 50, fb="iq4_nl", imx="required"),
    _t("iq4_nl", 20, 32, 18),
    _t("iq3_s", 21, 256, 110, fb="iq4_nl"),
    _t("iq2_s", 22, 256, 82, fb="iq4_nl", imx="rule"),
    _t("iq4_xs", 23, 256, 136, fb="iq4_nl"),
    _t("i8", 24, 1, 1, q=False),
    _t("i16", 25, 1, 2, q=False),
    _t("i32", 26, 1, 4, q=False),
    _t("i64", 27, 1, 8, q=False),
    _t("f64", 28, 1, 8, q=False),
    _t("iq1_m", 29, 256, 56, fb="iq4_nl", imx="rule"),
    _t("bf16", 30, 1, 2),
    # ARM-interleaved q4_0 (to_float is NULL; ik interleaved_properties: base q4_0)
    _t("q4_0_4x4", 31, 32, 18, il=4, base="q4_0"),
    _t("q4_0_4x8", 32, 32, 18, il=4, base="q4_0"),
    _t("q4_0_8x8", 33, 32, 18, il=8, base="q4_0"),
    # BitNet I2_S: ggml reports blck 1 / 1 byte, but the stored tensor is
    # ne/4 bytes of 2-bit codes + 32 bytes of scale (see gguf.tensor_nbytes).
    _t("i2_s", 36, 1, 1, q=False),
    _t("mxfp4", 39, 32, 17),
    _t("q1_0_g128", 41, 128, 18),
    # --- activation helper types (no ggml_quantize_chunk path) ---------------
    _t("q8_0_x4", 97, 32, 34, q=False),
    _t("q8_1_x4", 98, 32, 36, q=False),
    _t("q8_2_x4", 99, 32, 36, q=False),
    # --- ik types ---------------------------------------------------------------
    _t("q6_0", 133, 32, 26),
    _t("iq1_bn", 134, 64, 13, 2),  # ne0 % 64 != 0: "Unsupported tensor size encountered"
    _t("iq2_bn", 135, 64, 16, 4),
    _t("q8_K64", 136, 64, 68, q=False),
    _t("iq2_k", 137, 256, 76, fb="iq4_nl"),
    _t("iq3_k", 138, 256, 110, fb="iq4_nl"),
    _t("iq4_k", 139, 256, 144, fb="q5_0"),
    _t("iq5_k", 140, 256, 176, fb="q6_0"),
    _t("iq6_k", 141, 256, 212, fb="q8_0"),
    _t("iq4_ks", 144, 256, 136, 4, fb="iq4_nl"),
    _t("iq2_ks", 145, 256, 70, 2, fb="iq4_nl"),
    _t("iq4_kss", 146, 256, 128, 4, fb="iq4_nl"),
    _t("q8_K16", 147, 64, 64, 20, q=False),
    _t("q8_K32", 148, 256, 296, q=False),
    _t("q8_KR8", 149, 256, 296, q=False),
    _t("q8_K128", 150, 128, 140, q=False),
    _t("q8_KV", 151, 32, 32, 8),
    _t("iq5_ks", 152, 256, 168, 4, fb="q5_0"),
    _t("iq2_kt", 153, 256, 68, 4, fb="iq4_nl", imx="rule"),
    _t("iq3_kt", 154, 256, 100, 4, fb="iq4_nl"),
    _t("iq4_kt", 155, 256, 128, 4, fb="iq4_nl"),
    _t("iq3_ks", 156, 256, 102, 2, fb="iq4_nl"),
    _t("iq2_kl", 157, 256, 86, 2, fb="iq4_nl"),
    _t("iq1_kt", 158, 256, 56, 4, fb="iq4_nl", imx="rule"),
    # --- row-interleaved (_rN) variants: same row bytes as the base ----------
    _t("q4_0_r8", 202, 32, 18, il=8, base="q4_0"),
    _t("q5_0_r4", 206, 32, 22, il=4, base="q5_0"),
    _t("q8_0_r8", 208, 32, 34, il=8, base="q8_0"),
    _t("q2_k_r4", 210, 256, 84, il=4, base="q2_K", fb="iq4_nl"),
    _t("q3_k_r4", 211, 256, 110, il=4, base="q3_K", fb="iq4_nl"),
    _t("q4_k_r4", 212, 256, 144, il=4, base="q4_K", fb="q5_0"),
    _t("q5_k_r4", 213, 256, 176, il=4, base="q5_K", fb="q6_0"),
    _t("q6_k_r4", 214, 256, 210, il=4, base="q6_K", fb="q8_0"),
    _t("iq2_xxs_r4", 216, 256, 66, il=4, base="iq2_xxs", fb="iq4_nl", imx="rule"),
    _t("iq2_xs_r4", 217, 256, 74, il=4, base="iq2_xs", fb="iq4_nl", imx="rule"),
    _t("iq3_xxs_r4", 218, 256, 98, il=4, base="iq3_xxs", fb="iq4_nl"),
    _t("iq1_s_r4", 219, 32, 6, 2, il=4, base="iq1_s", imx="rule"),
    _t("iq4_nl_r4", 220, 32, 18, il=4, base="iq4_nl"),
    _t("iq3_s_r4", 221, 256, 110, il=4, base="iq3_s", fb="iq4_nl"),
    _t("iq2_s_r4", 222, 256, 82, il=4, base="iq2_s", fb="iq4_nl", imx="rule"),
    _t("iq4_xs_r8", 223, 256, 136, il=8, base="iq4_xs", fb="iq4_nl"),
    _t("iq1_m_r4", 229, 32, 7, 2, il=4, base="iq1_m", imx="rule"),
    _t("bf16_r16", 230, 1, 2, il=16, base="bf16"),
    _t("q6_0_r4", 233, 32, 26, il=4, base="q6_0"),
    _t("iq2_bn_r4", 335, 64, 16, 4, il=4, base="iq2_bn"),
    _t("iq2_k_r4", 337, 256, 76, il=4, base="iq2_k", fb="iq4_nl"),
    _t("iq3_k_r4", 338, 256, 110, il=4, base="iq3_k", fb="iq4_nl"),
    _t("iq4_k_r4", 339, 256, 144, il=4, base="iq4_k", fb="q5_0"),
    _t("iq5_k_r4", 340, 256, 176, il=4, base="iq5_k", fb="q6_0"),
    _t("iq4_ks_r4", 344, 256, 136, 4, il=4, base="iq4_ks", fb="iq4_nl"),
    _t("iq5_ks_r4", 352, 256, 168, 4, il=4, base="iq5_ks", fb="q5_0"),
    # q8_k_r16: a run-time repack target of the q8_K activation family; no preset,
    # not a llama-quantize output type.
    _t("q8_k_r16", 397, 256, 258, il=16, q=False),
    _t("q8_KV_r8", 398, 32, 32, 4, il=8, base="q8_KV"),
    # ik interleaved_properties sends q8_k_r8 to q8_0 (not q8_K) when ne1 % 8 != 0
    _t("q8_k_r8", 399, 256, 258, il=8, base="q8_0", fb="q8_0"),
)

TYPES_BY_ID: dict[int, GGMLType] = {t.type_id: t for t in GGML_TYPES}
TYPES_BY_NAME: dict[str, GGMLType] = {t.name: t for t in GGML_TYPES}
_TYPES_BY_LOWER: dict[str, GGMLType] = {t.name.lower(): t for t in GGML_TYPES}
assert len(TYPES_BY_ID) == len(GGML_TYPES) == len(TYPES_BY_NAME) == len(_TYPES_BY_LOWER)


def type_by_id(type_id: int) -> GGMLType:
    """The type with this ``enum ggml_type`` id; KeyError names the id."""
    try:
        return TYPES_BY_ID[int(type_id)]
    except KeyError:
        raise KeyError(f"unknown ggml type id {type_id} (not in the ik ggml.h enum)") from None


def ggml_type(t: GGMLType | str | int) -> GGMLType:
    """Coerce an exact ggml name, a type id or a GGMLType to a GGMLType."""
    if isinstance(t, GGMLType):
        return t
    if isinstance(t, int):
        return type_by_id(t)
    try:
        return TYPES_BY_NAME[t]
    except KeyError:
        raise UnknownQTypeError(_unknown_message(str(t), kind="ggml type")) from None


def row_size(t: GGMLType | str | int, ne0: int) -> int:
    """Bytes of one row: ``row_meta + type_size * ne0 / block_size`` (``ggml_row_size``)."""
    t = ggml_type(t)
    if ne0 % t.block_size:
        raise ValueError(
            f"row length {ne0} is not a multiple of the block size {t.block_size} of {t.name}"
        )
    return t.row_meta + t.type_size * (ne0 // t.block_size)


# --------------------------------------------------------------------------
# presets (llama_ftype)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """A llama-quantize ftype preset (the positional ``TYPE`` argument).

    Attributes:
        name: upper-case, as llama-quantize prints it (``Q4_K_M``).
        ftype: ``enum llama_ftype`` id (None for ``COPY``, which has none).
        default_type: ggml name of the preset's default type (None for COPY).
            Without ``--pure`` the mixture rules still change it per tensor.
        needs_imatrix: llama-quantize refuses the preset without an imatrix
            (docs/llama-quantize.md#preset-refusal).
        alias_of: for ``Q3_K``/``Q4_K``/``Q5_K``, the preset they alias.
    """

    name: str
    ftype: int | None
    default_type: str | None
    needs_imatrix: bool = False
    alias_of: str | None = None

    @property
    def default_ggml_type(self) -> GGMLType | None:
        return TYPES_BY_NAME[self.default_type] if self.default_type else None

    def __str__(self) -> str:
        return self.name


def _p(name, ftype, default, imx=False, alias=None):
    return Preset(name, ftype, default, imx, alias)


# In the order the wheel's `llama-quantize --help` lists them; default types from
# ik's llama_model_quantize_internal switch.
PRESETS: tuple[Preset, ...] = (
    _p("Q4_0", 2, "q4_0"),
    _p("Q4_1", 3, "q4_1"),
    _p("Q5_0", 8, "q5_0"),
    _p("Q5_1", 9, "q5_1"),
    _p("Q6_0", 135, "q6_0"),
    _p("MXFP4", 38, "mxfp4"),
    _p("IQ2_XXS", 19, "iq2_xxs", True),
    _p("IQ2_XXS_R4", 219, "iq2_xxs_r4", True),
    _p("IQ2_XS", 20, "iq2_xs", True),
    _p("IQ2_XS_R4", 220, "iq2_xs_r4", True),
    _p("IQ2_S", 28, "iq2_xs", True),
    _p("IQ2_M", 29, "iq2_s"),
    _p("IQ2_M_R4", 229, "iq2_s_r4"),
    _p("IQ1_S", 24, "iq1_s", True),
    _p("IQ1_S_R4", 224, "iq1_s_r4", True),
    _p("IQ1_M_R4", 231, "iq1_m_r4", True),
    _p("IQ1_M", 31, "iq1_m", True),
    _p("IQ1_BN", 136, "iq1_bn"),
    _p("IQ2_BN", 137, "iq2_bn"),
    _p("IQ2_BN_R4", 337, "iq2_bn_r4"),
    _p("Q2_K", 10, "q2_K"),
    _p("Q2_K_R4", 210, "q2_k_r4"),
    _p("Q2_K_S", 21, "q2_K", True),
    _p("IQ3_XXS", 23, "iq3_xxs"),
    _p("IQ3_KT", 152, "iq3_kt"),
    _p("IQ4_KT", 153, "iq4_kt"),
    _p("IQ3_XXS_R4", 223, "iq3_xxs_r4"),
    _p("IQ3_S", 26, "iq3_s"),
    _p("IQ3_S_R4", 226, "iq3_s_r4"),
    _p("IQ3_M", 27, "iq3_s"),
    _p("Q3_K", 12, "q3_K", alias="Q3_K_M"),
    _p("Q3_K_R4", 211, "q3_k_r4"),
    _p("IQ3_XS", 22, "iq3_s"),
    _p("Q3_K_S", 11, "q3_K"),
    _p("Q3_K_M", 12, "q3_K"),
    _p("Q3_K_L", 13, "q3_K"),
    _p("IQ4_NL", 25, "iq4_nl"),
    _p("IQ4_NL_R4", 225, "iq4_nl_r4"),
    _p("IQ4_XS_R8", 230, "iq4_xs_r8"),
    _p("Q4_0_R8", 202, "q4_0_r8"),
    _p("Q5_0_R4", 208, "q5_0_r4"),
    _p("Q6_0_R4", 335, "q6_0_r4"),
    _p("Q8_0_R8", 207, "q8_0_r8"),
    _p("Q8_KV", 149, "q8_KV"),
    _p("IQ4_XS", 30, "iq4_xs"),
    _p("IQ4_KS", 145, "iq4_ks"),
    _p("IQ4_KS_R4", 345, "iq4_ks_r4"),
    _p("IQ5_KS_R4", 350, "iq5_ks_r4"),
    _p("IQ4_KSS", 148, "iq4_kss"),
    _p("IQ5_KS", 150, "iq5_ks"),
    _p("IQ2_K", 138, "iq2_k"),
    _p("IQ2_K_R4", 338, "iq2_k_r4"),
    _p("IQ2_KS", 147, "iq2_ks"),
    _p("IQ1_KT", 156, "iq1_kt"),
    _p("IQ2_KT", 151, "iq2_kt"),
    _p("IQ2_KL", 155, "iq2_kl"),
    _p("IQ3_KS", 154, "iq3_ks"),
    _p("IQ3_K", 139, "iq3_k"),
    _p("IQ3_K_R4", 339, "iq3_k_r4"),
    _p("IQ3_KL", 146, "iq3_k"),
    _p("IQ4_K", 140, "iq4_k"),
    _p("IQ4_K_R4", 340, "iq4_k_r4"),
    _p("IQ5_K", 141, "iq5_k"),
    _p("IQ5_K_R4", 341, "iq5_k_r4"),
    _p("IQ6_K", 142, "iq6_k"),
    _p("Q4_K", 15, "q4_K", alias="Q4_K_M"),
    _p("Q4_K_R4", 214, "q4_k_r4"),
    _p("Q4_K_S", 14, "q4_K"),
    _p("Q4_K_M", 15, "q4_K"),
    _p("Q5_K", 17, "q5_K", alias="Q5_K_M"),
    _p("Q5_K_R4", 216, "q5_k_r4"),
    _p("Q5_K_S", 16, "q5_K"),
    _p("Q5_K_M", 17, "q5_K"),
    _p("Q6_K", 18, "q6_K"),
    _p("Q6_K_R4", 218, "q6_k_r4"),
    _p("Q8_K_R8", 399, "q8_k_r8"),
    _p("Q8_KV_R8", 398, "q8_KV_r8"),
    _p("Q8_0", 7, "q8_0"),
    _p("Q4_0_4_4", 33, "q4_0_4x4"),
    _p("Q4_0_4_8", 34, "q4_0_4x8"),
    _p("Q4_0_8_8", 35, "q4_0_8x8"),
    _p("F16", 1, "f16"),
    _p("BF16", 32, "bf16"),
    _p("BF16_R16", 232, "bf16_r16"),
    _p("F32", 0, "f32"),
    _p("COPY", None, None),
)

PRESETS_BY_NAME: dict[str, Preset] = {p.name: p for p in PRESETS}
assert len(PRESETS_BY_NAME) == len(PRESETS)


def find_preset(name: str) -> Preset | None:
    """The preset of this name (case-insensitive), or None."""
    return PRESETS_BY_NAME.get(name.strip().upper())


# --------------------------------------------------------------------------
# user-facing names
# --------------------------------------------------------------------------


class UnknownQTypeError(ValueError):
    """A qtype name that is neither a ggml weight type nor a llama-quantize preset."""


class UnsupportedShapeError(ValueError):
    """llama-quantize (ik) cannot write this type for this tensor shape."""


@dataclass(frozen=True)
class QType:
    """What a user-given qtype name means.

    Attributes:
        name: canonical spelling: the exact ggml name for ``kind == "type"``
            (``q4_K``, ``iq4_ks``), the upper-case preset name for
            ``kind == "preset"`` (``Q4_K_M``).
        kind: ``"type"`` (quantize exactly to this ggml type, e.g. via
            ``--custom-q``) or ``"preset"`` (a llama-quantize ftype mix).
        ggml_type: the ggml type; for presets the preset's default type.
        preset: the Preset for ``kind == "preset"``, else None.
    """

    name: str
    kind: Literal["type", "preset"]
    ggml_type: GGMLType
    preset: Preset | None = None

    def __str__(self) -> str:
        return self.name


# Names that match a ggml type only case-insensitively but that docs/llama-quantize.md#type-names
# lists as preset names ("q8_kv_r8: not as spelled: the ggml name is q8_KV_r8").
_PRESET_ONLY_LOWER = frozenset({"q8_kv_r8"})

_BITNET = frozenset({"iq1_bn", "iq2_bn", "iq2_bn_r4"})
_QUANTIZABLE = tuple(t for t in GGML_TYPES if t.quantizable)
_VALID_HINT = (
    "valid names are the ggml weight types and llama-quantize presets; "
    "`python -m pytest_quantbench.qtypes` lists them"
)


def _is_preset_name(p: Preset) -> bool:
    """True if the user-facing name of ``p`` resolves to the preset (not a type)."""
    low = p.name.lower()
    t = _TYPES_BY_LOWER.get(low)
    return p.default_type is not None and (
        t is None or not t.quantizable or low in _PRESET_ONLY_LOWER
    )


def valid_qtype_names() -> tuple[str, ...]:
    """Every accepted canonical name: the quantizable ggml types (exact
    spelling), then the presets whose names are not also ggml types
    (``Q4_K_M``, ``IQ2_M``, ``Q4_0_4_4``, ``Q8_KV_R8``...)."""
    return tuple(t.name for t in _QUANTIZABLE) + tuple(
        p.name for p in PRESETS if _is_preset_name(p)
    )


def _norm(s: str) -> str:
    return s.strip().lower().replace("-", "_")


def _unknown_message(name: str, *, kind: str = "qtype") -> str:
    candidates: dict[str, str] = {}
    for n in valid_qtype_names():
        candidates.setdefault(_norm(n), n)
    close = difflib.get_close_matches(_norm(name), list(candidates), n=4, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(candidates[c]) for c in close)}?" if close else ""
    return f"unknown {kind} {name!r}{hint} ({_VALID_HINT})"


def resolve_qtype(name: str) -> QType:
    """Resolve a user-given qtype name (docs/llama-quantize.md#type-names).

    Rules, in order:

    1. an exact ggml type name (case-sensitive: ``q4_K``, ``q8_KV_r8``) is that type;
    2. a case-insensitive match of a ggml weight type (``Q4_K``, ``q4_k_r4``,
       ``IQ4_KS``) is that type, except the names docs/llama-quantize.md#type-names lists as
       preset-only (``q8_kv_r8``);
    3. a case-insensitive preset name (``q4_k_m``, ``iq2_m``, ``q4_0_4_4``,
       ``q8_kv_r8``) is that preset, with its default ggml type.

    Activation / integer types (``q8_K``, ``i8``...) are rejected: they have no
    quantize path.  Unknown names raise :class:`UnknownQTypeError` with the
    closest valid names.
    """
    if not isinstance(name, str):
        raise UnknownQTypeError(f"qtype must be a string, got {type(name).__name__}: {name!r}")
    s = name.strip()
    if not s:
        raise UnknownQTypeError("empty qtype name (" + _VALID_HINT + ")")
    t = TYPES_BY_NAME.get(s)
    if t is None and s.lower() not in _PRESET_ONLY_LOWER:
        t = _TYPES_BY_LOWER.get(s.lower())
    if t is not None:
        if not t.quantizable:
            raise UnknownQTypeError(
                f"{t.name!r} is a ggml {'activation' if t.name.startswith('q8') else 'storage'} "
                "type with no quantize path (docs/llama-quantize.md#type-names); it cannot be a "
                f"qtype ({_VALID_HINT})"
            )
        return QType(t.name, "type", t, None)
    p = find_preset(s)
    if p is not None:
        if p.default_type is None:
            raise UnknownQTypeError(
                f"preset {p.name!r} only copies tensors; it is not a quantization type ({_VALID_HINT})"
            )
        return QType(p.name, "preset", TYPES_BY_NAME[p.default_type], p)
    raise UnknownQTypeError(_unknown_message(s))


_SPLIT_RE = re.compile(r"[\s,]+")


def qtype_label(qtype: QType) -> str:
    """The qtype as it appears in item ids, CSV rows and thresholds matching: the exact ggml name
    for a ggml type (``q4_k`` → ``q4_K``), the lower-case preset name for a preset (``Q4_K_M`` →
    ``q4_k_m``; ``q8_kv_r8``, the preset, stays apart from ``q8_KV_r8``, the type).

    qtype: a resolved :class:`QType` (:func:`resolve_qtype`). Raises nothing.
    """
    return qtype.name if qtype.kind == "type" else qtype.name.lower()


def parse_qtype_list(text_or_list: str | Iterable[str]) -> tuple[QType, ...]:
    """Parse ``"q4_K, iq4_ks q8_0"`` (or a list of such strings) into QTypes.

    Items are separated by commas and/or whitespace.  Order is kept and
    duplicates (same canonical name) are dropped.  Raises
    :class:`UnknownQTypeError` for an unknown item (all unknown items are
    named in one message) and ``"no qtypes given"`` for an empty list.
    """
    if isinstance(text_or_list, str):
        parts = [text_or_list]
    else:
        parts = [str(p) for p in text_or_list]
    items = [tok for part in parts for tok in _SPLIT_RE.split(part) if tok]
    if not items:
        raise UnknownQTypeError(f"no qtypes given ({_VALID_HINT})")
    out: list[QType] = []
    seen: set[str] = set()
    errors: list[str] = []
    for item in items:
        try:
            q = resolve_qtype(item)
        except UnknownQTypeError as e:
            errors.append(str(e))
            continue
        if q.name not in seen:
            seen.add(q.name)
            out.append(q)
    if errors:
        raise UnknownQTypeError("; ".join(errors) if len(errors) > 1 else errors[0])
    return tuple(out)


# --------------------------------------------------------------------------
# what llama-quantize (ik) writes
# --------------------------------------------------------------------------


def predict_written_type(
    qtype: GGMLType | QType | str,
    ne0: int,
    ne1: int,
    *,
    tensor_name: str | None = None,
) -> tuple[GGMLType, str | None]:
    """The type ik llama-quantize will write for a requested type and a 2-D shape.

    Returns ``(written_type, reason)``; ``reason`` is None when the written type
    is the requested one, else a human sentence naming the row length as ``ne0 = 576``
    and the row count as ``ne1 = …`` (not "cols 576 x 1536", which reads as a product,
    llama.cpp #6614).  Applied in llama-quantize's order (docs/llama-quantize.md#fallbacks):

    1. row length: a 256-block type with ``ne0 % 256 != 0`` falls back to
       ``GGMLType.fallback`` (e.g. ``q4_K`` on a 576-wide row → ``q5_0``);
    2. ``token_embd.weight`` is always un-interleaved (when ``tensor_name`` is given);
    3. row count: an interleaved type with ``ne1 % N != 0`` becomes its base.

    Raises :class:`UnsupportedShapeError` where llama-quantize would throw
    (``*_bn`` with ``ne0 % 64``: "Unsupported tensor size encountered") or the
    quantizer would assert (``ne0`` not a multiple of the block size, e.g.
    32-block types with ``ne0 % 32``), and ValueError for a type with no
    quantize path.  This is a prediction for messages and skips: always read
    back the type that was really written.
    """
    if isinstance(qtype, QType):
        req = qtype.ggml_type
    elif isinstance(qtype, GGMLType):
        req = qtype
    else:
        req = TYPES_BY_NAME.get(qtype) or resolve_qtype(qtype).ggml_type
    if not req.quantizable:
        raise ValueError(f"{req.name} is not a weight type llama-quantize can write")
    what = f" for {tensor_name}" if tensor_name else ""
    t = req
    reasons: list[str] = []

    if t.block_size == QK_K and ne0 % QK_K:
        if t.fallback is None:  # not reached with the current table
            raise UnsupportedShapeError(
                f"row length ne0 = {ne0}{what} is not divisible by {QK_K}, required for "
                f"{t.name}, and {t.name} has no fallback type"
            )
        fb = TYPES_BY_NAME[t.fallback]
        reasons.append(
            f"row length ne0 = {ne0}{what} is not divisible by {QK_K}, required for "
            f"{t.name}: llama-quantize falls back to {fb.name}"
        )
        t = fb
    if t.name in _BITNET and ne0 % t.block_size:
        raise UnsupportedShapeError(
            f"row length ne0 = {ne0}{what} is not divisible by 64, required for {t.name}: "
            f"llama-quantize throws 'Unsupported tensor size encountered' (no fallback)"
        )
    if ne0 % t.block_size:
        raise UnsupportedShapeError(
            f"row length ne0 = {ne0}{what} is not divisible by {t.block_size}, the block "
            f"size of {t.name}: llama-quantize does not check this and the quantizer asserts"
        )
    if t.is_interleaved and (base := t.base) is not None:
        if tensor_name == "token_embd.weight":
            reasons.append(
                f"token_embd.weight cannot be row-interleaved: llama-quantize writes "
                f"{t.base} instead of {t.name}"
            )
            t = TYPES_BY_NAME[base]
        elif ne1 % t.interleave:
            reasons.append(
                f"row count ne1 = {ne1}{what} is not divisible by {t.interleave}, required for "
                f"{t.name}: llama-quantize silently writes {t.base}"
            )
            t = TYPES_BY_NAME[base]
        if ne0 % t.block_size:  # iq1_s_r4 / iq1_m_r4 (32-block) -> iq1_s / iq1_m (256-block)
            raise UnsupportedShapeError(
                f"{reasons[-1]}, but row length ne0 = {ne0} is not divisible by {t.block_size}, "
                f"required for {t.name}: llama-quantize does not check this and the quantizer asserts"
            )
    return t, ("; ".join(reasons) if reasons else None)


def needs_imatrix(t: GGMLType | QType | str) -> bool:
    """True for the ik A ∪ R sets (docs/llama-quantize.md#imatrix-needs): quantizing to ``t``
    without an imatrix entry for the tensor fails (assert or llama-quantize refusal).

    For a preset, True when llama-quantize refuses the preset without an
    imatrix (e.g. ``Q2_K_S``) or its default type needs one.
    ``token_embd.weight`` and ``output.weight`` are exempt from the R rule in
    llama-quantize; that exemption is the caller's business.
    """
    if isinstance(t, QType):
        if t.preset is not None and t.preset.needs_imatrix:
            return True
        return t.ggml_type.imatrix is not None
    if isinstance(t, str):
        return needs_imatrix(TYPES_BY_NAME.get(t) or resolve_qtype(t))
    return t.imatrix is not None


#: What ``needs imatrix`` means in the name listing: one term for both sets of
#: :attr:`GGMLType.imatrix` (``required`` and ``rule``).
IMATRIX_LEGEND = (
    "needs imatrix: quantizing to this type without an importance matrix fails (llama-quantize "
    "refuses, or its quantizer asserts; token_embd.weight and output.weight are exempt for some "
    "types), so a run computes one from the corpus for such items unless --quantbench-imatrix "
    "gives a FILE, or skips them with --quantbench-imatrix=none."
)

#: The qtype names that differ only by case, and what each one is.
_CASE_PAIRS_TEXT = "q8_KV_r8 is the ggml type, q8_kv_r8 (any other case) the preset Q8_KV_R8"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pytest_quantbench.qtypes``: one line per accepted qtype name with its kind
    (ggml type, with bits per weight and ``needs imatrix`` where quantizing to it without an
    importance matrix fails; or preset, with its default type), then the legend
    (:data:`IMATRIX_LEGEND`)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m pytest_quantbench.qtypes",
        description="The qtype names --quantbench-qtypes accepts, case as users type it "
        "(q4_k_r4 = q4_K_R4), except where two names differ only by case: "
        f"{_CASE_PAIRS_TEXT}. A ggml type quantizes a tensor to exactly that type; "
        "a preset applies llama-quantize's per-tensor mixture rules. " + IMATRIX_LEGEND,
    )
    parser.parse_args(argv)
    lines = []
    for name in valid_qtype_names():
        q = resolve_qtype(name)
        if q.kind == "type":
            t = q.ggml_type
            need = ", needs imatrix" if t.imatrix else ""
            lines.append(f"{name:<12} ggml type, {t.bpw:.4g} bpw{need}")
        else:
            need = ", needs imatrix" if needs_imatrix(q) else ""
            lines.append(
                f"{name.lower():<12} preset {q.name} (default type {q.ggml_type.name}){need}"
            )
    lines.append("")
    lines.append(IMATRIX_LEGEND)
    try:
        print("\n".join(lines))
        sys.stdout.flush()
    except BrokenPipeError:  # `| head`: the reader has what it wanted
        sys.stdout = None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
