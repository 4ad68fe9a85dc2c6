"""Tests of pytest_quantbench.qtypes: the ggml type table, presets, names, fallbacks.

The table is cross-checked against the wheel's own libggml.so (ctypes, test
only), ggml.h, llama.h and `llama-quantize --help`.
"""

from __future__ import annotations

import ctypes
import re
import subprocess
from pathlib import Path

import pytest

from conftest import WHEEL
from pytest_quantbench import qtypes
from pytest_quantbench.qtypes import (
    GGML_TYPES,
    PRESETS,
    TYPES_BY_NAME,
    GGMLType,
    QType,
    UnknownQTypeError,
    UnsupportedShapeError,
    needs_imatrix,
    parse_qtype_list,
    predict_written_type,
    resolve_qtype,
    row_size,
)

# --------------------------------------------------------------------------
# the wheel
# --------------------------------------------------------------------------

needs_wheel = pytest.mark.skipif(WHEEL is None, reason="ik-llama-cpp-python is not installed")


@pytest.fixture(scope="module")
def libggml():
    lib_path = WHEEL / "lib" / "libggml.so" if WHEEL else None
    if lib_path is None or not lib_path.is_file():
        pytest.skip("the wheel's libggml.so is not available")
    lib = ctypes.CDLL(str(lib_path))
    lib.ggml_type_name.restype = ctypes.c_char_p
    lib.ggml_type_name.argtypes = [ctypes.c_int]
    lib.ggml_blck_size.restype = ctypes.c_int64
    lib.ggml_blck_size.argtypes = [ctypes.c_int]
    lib.ggml_type_size.restype = ctypes.c_size_t
    lib.ggml_type_size.argtypes = [ctypes.c_int]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    return lib


def _include_file(name: str) -> Path:
    if WHEEL is None:
        pytest.skip("ik-llama-cpp-python is not installed")
    p = WHEEL.parent / "include" / name
    if not p.is_file():
        pytest.skip(f"the wheel's include/{name} is not installed")
    return p


# --------------------------------------------------------------------------
# table vs library
# --------------------------------------------------------------------------


@needs_wheel
@pytest.mark.parametrize("t", GGML_TYPES, ids=lambda t: t.name)
def test_table_matches_libggml(libggml, t: GGMLType) -> None:
    name = libggml.ggml_type_name(t.type_id)
    assert name is not None, f"libggml has no type id {t.type_id}"
    assert name.decode() == t.name
    assert libggml.ggml_blck_size(t.type_id) == t.block_size
    assert libggml.ggml_type_size(t.type_id) == t.type_size
    for k in (1, 2, 3, 8, 16):
        ne0 = k * t.block_size
        assert (
            libggml.ggml_row_size(t.type_id, ne0)
            == t.row_meta + k * t.type_size
            == row_size(t, ne0)
        )
    assert libggml.ggml_quantize_requires_imatrix(t.type_id) == (t.imatrix == "required")


@needs_wheel
def test_every_library_type_is_in_the_table(libggml) -> None:
    # ggml_type_name indexes a table of GGML_TYPE_COUNT (= 400) entries: ids
    # past it read garbage, so stay inside the enum.
    missing = []
    for type_id in range(max(qtypes.TYPES_BY_ID) + 1):
        name = libggml.ggml_type_name(type_id)
        if name is None or name == b"DEPRECATED":
            continue
        if type_id not in qtypes.TYPES_BY_ID:
            missing.append((type_id, name.decode()))
    assert missing == []


@needs_wheel
def test_every_ggml_h_enum_entry_is_in_the_table() -> None:
    text = _include_file("ggml.h").read_text()
    enum = text[text.index("enum ggml_type {") : text.index("GGML_TYPE_COUNT")]
    ids = {
        int(m.group(2)): m.group(1)
        for m in re.finditer(r"^\s*GGML_TYPE_(\w+)\s*=\s*(\d+)", enum, re.M)
    }
    assert len(ids) > 90
    assert set(ids) == set(qtypes.TYPES_BY_ID), set(ids) ^ set(qtypes.TYPES_BY_ID)
    for type_id, enum_name in ids.items():
        # the enum spelling is upper-case; ik names differ only in case and x/_ (q4_0_4x4)
        t = qtypes.TYPES_BY_ID[type_id]
        assert t.name.lower().replace("x", "_") == enum_name.lower().replace("x", "_")


@needs_wheel
def test_presets_match_llama_h() -> None:
    text = _include_file("llama.h").read_text()
    ftypes = {
        m.group(1): int(m.group(2))
        for m in re.finditer(r"LLAMA_FTYPE_(?:MOSTLY_|ALL_)(\w+)\s*=\s*(\d+)", text)
    }
    for p in PRESETS:
        if p.ftype is None:
            continue
        key = p.alias_of or p.name
        assert ftypes[key] == p.ftype, p


@needs_wheel
def test_presets_match_llama_quantize_help() -> None:
    exe = WHEEL / "bin" / "llama-quantize"
    if not exe.is_file():
        pytest.skip("the wheel's llama-quantize is not installed")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    listed = dict()
    for m in re.finditer(r"^\s*(\d+)\s+or\s+(\S+)\s*:", out.stdout + out.stderr, re.M):
        listed[m.group(2)] = int(m.group(1))
    assert len(listed) > 80
    ours = {p.name: p.ftype for p in PRESETS if p.ftype is not None}
    assert ours == listed


# --------------------------------------------------------------------------
# table invariants
# --------------------------------------------------------------------------


def test_table_invariants() -> None:
    lower = [t.name.lower() for t in GGML_TYPES]
    assert len(set(lower)) == len(lower), "two ggml names differ only in case"
    for t in GGML_TYPES:
        if t.base is not None:
            assert t.base in TYPES_BY_NAME
            assert t.interleave > 1
            base = TYPES_BY_NAME[t.base]
            assert not base.is_interleaved
            # exceptions: q8_k_r8 falls back to q8_0 (ik interleaved_properties);
            # iq1_s_r4 / iq1_m_r4 are 32-block types whose bases are 256-block
            if t.name not in ("q8_k_r8", "iq1_s_r4", "iq1_m_r4"):
                assert (base.block_size, base.type_size) == (t.block_size, t.type_size), t
        if t.fallback is not None:
            assert TYPES_BY_NAME[t.fallback].block_size == 32
        if t.quantizable and t.block_size == 256:
            assert t.fallback is not None, f"{t.name}: 256-block weight type without fallback"
        if t.block_size != 256:
            assert t.fallback is None
    for p in PRESETS:
        if p.default_type is not None:
            assert TYPES_BY_NAME[p.default_type].quantizable, p


def test_table_spot_values() -> None:
    t = TYPES_BY_NAME["iq4_ks"]
    assert (t.type_id, t.block_size, t.type_size, t.row_meta, t.fallback) == (
        144,
        256,
        136,
        4,
        "iq4_nl",
    )
    assert t.row_size(256) == 140
    assert row_size("q8_KV", 4096) == 8 + 4096
    assert TYPES_BY_NAME["q4_K"].bpw == 4.5
    assert TYPES_BY_NAME["q8_KV_r8"].interleave == 8 and TYPES_BY_NAME["q8_KV_r8"].base == "q8_KV"
    assert TYPES_BY_NAME["q4_0_4x4"].base == "q4_0"
    assert not TYPES_BY_NAME["q8_K"].quantizable
    assert TYPES_BY_NAME["bf16"].quantizable and TYPES_BY_NAME["bf16"].is_float
    with pytest.raises(ValueError, match="block size 256"):
        row_size("q4_K", 576)


# --------------------------------------------------------------------------
# names
# --------------------------------------------------------------------------

ALL_80 = (
    "iq1_m_r4 iq3_xxs iq2_k_r4 iq2_ks iq4_ks iq3_k iq4_xs iq5_k_r4 iq1_m iq1_s iq1_s_r4 q4_K q5_K "
    "q2_K iq2_k iq2_kl iq2_m iq2_m_r4 iq2_s iq2_xs iq2_xs_r4 iq2_xxs iq2_xxs_r4 iq3_kl iq3_k_r4 "
    "iq3_ks iq3_kt iq3_m iq3_s iq3_s_r4 iq3_xs iq3_xxs_r4 iq4_k iq4_k_r4 iq4_ks_r4 iq4_kss iq4_nl "
    "iq4_nl_r4 iq4_xs_r8 iq5_k iq5_ks iq5_ks_r4 iq6_k q2_k_r4 q2_k_s q3_K q3_k_l q3_k_m q3_k_r4 "
    "q3_k_s q4_0 q4_0_r8 q4_1 q4_k_m q4_k_r4 q4_k_s q5_0 q5_0_r4 q5_1 q5_k_m q5_k_r4 q5_k_s q6_0 "
    "q6_0_r4 q6_K q6_k_r4 q4_0_4_4 q4_0_4_8 q4_0_8_8 q8_0_r8 q8_k_r8 q8_KV q8_kv_r8 iq1_kt iq2_kt "
    "iq4_kt iq1_bn iq2_bn iq2_bn_r4 q8_0"
).split()

PRESET_ONLY = {
    "iq2_m": "iq2_s",
    "iq2_m_r4": "iq2_s_r4",
    "iq3_xs": "iq3_s",
    "iq3_m": "iq3_s",
    "iq3_kl": "iq3_k",
    "q2_k_s": "q2_K",
    "q3_k_s": "q3_K",
    "q3_k_m": "q3_K",
    "q3_k_l": "q3_K",
    "q4_k_s": "q4_K",
    "q4_k_m": "q4_K",
    "q5_k_s": "q5_K",
    "q5_k_m": "q5_K",
    "q4_0_4_4": "q4_0_4x4",
    "q4_0_4_8": "q4_0_4x8",
    "q4_0_8_8": "q4_0_8x8",
    "q8_kv_r8": "q8_KV_r8",
}


def test_all_80_names_resolve() -> None:
    assert len(ALL_80) == 80
    for name in ALL_80:
        q = resolve_qtype(name)
        assert isinstance(q, QType)
        assert q.ggml_type.quantizable
        if name in PRESET_ONLY:
            assert q.kind == "preset", name
            assert q.preset is not None and q.name == q.preset.name == name.upper()
            assert q.ggml_type.name == PRESET_ONLY[name]
        else:
            assert q.kind == "type", name
            assert q.preset is None
            assert q.name == q.ggml_type.name
            assert q.name.lower() == name.lower()


@pytest.mark.parametrize(
    "given, kind, name, ggml",
    [
        ("q4_K", "type", "q4_K", "q4_K"),
        ("Q4_K", "type", "q4_K", "q4_K"),
        ("q4_k", "type", "q4_K", "q4_K"),
        ("q4_k_r4", "type", "q4_k_r4", "q4_k_r4"),
        ("Q4_K_R4", "type", "q4_k_r4", "q4_k_r4"),
        ("IQ4_KS", "type", "iq4_ks", "iq4_ks"),
        ("q8_kv", "type", "q8_KV", "q8_KV"),
        ("q8_KV_r8", "type", "q8_KV_r8", "q8_KV_r8"),
        ("q8_kv_r8", "preset", "Q8_KV_R8", "q8_KV_r8"),
        ("iq2_s", "type", "iq2_s", "iq2_s"),
        ("IQ2_M", "preset", "IQ2_M", "iq2_s"),
        ("q4_k_m", "preset", "Q4_K_M", "q4_K"),
        ("q4_0_4x4", "type", "q4_0_4x4", "q4_0_4x4"),
        ("q4_0_4_4", "preset", "Q4_0_4_4", "q4_0_4x4"),
        ("bf16", "type", "bf16", "bf16"),
        ("F16", "type", "f16", "f16"),
        ("  q6_K ", "type", "q6_K", "q6_K"),
    ],
)
def test_resolve(given: str, kind: str, name: str, ggml: str) -> None:
    q = resolve_qtype(given)
    assert (q.kind, q.name, q.ggml_type.name) == (kind, name, ggml)
    assert str(q) == name


def test_unknown_name_suggests() -> None:
    with pytest.raises(UnknownQTypeError, match="iq2_kt") as e:
        resolve_qtype("iq2-kt")
    assert "python -m pytest_quantbench.qtypes` lists them" in str(e.value)
    with pytest.raises(UnknownQTypeError, match="did you mean") as e:
        resolve_qtype("q4_k_x")
    assert "Q4_K_M" in str(e.value) or "Q4_K_S" in str(e.value)
    assert isinstance(e.value, ValueError)
    with pytest.raises(UnknownQTypeError, match="no quantize path"):
        resolve_qtype("q8_K")
    with pytest.raises(UnknownQTypeError, match="only copies"):
        resolve_qtype("copy")
    with pytest.raises(UnknownQTypeError, match="empty"):
        resolve_qtype("  ")


def test_parse_qtype_list() -> None:
    qs = parse_qtype_list("q4_K, iq4_ks  q8_0,,Q4_K")
    assert [q.name for q in qs] == ["q4_K", "iq4_ks", "q8_0"]
    qs = parse_qtype_list(["q4_k_m", "iq2_kt q6_K"])
    assert [q.name for q in qs] == ["Q4_K_M", "iq2_kt", "q6_K"]
    for empty in ("", " , ", [], [""]):
        with pytest.raises(UnknownQTypeError, match="no qtypes given"):
            parse_qtype_list(empty)
    with pytest.raises(UnknownQTypeError, match="'bogus'.*'iq9_q'|'iq9_q'.*'bogus'"):
        parse_qtype_list("q4_K bogus iq9_q")


def test_valid_names_all_resolve() -> None:
    for n in qtypes.valid_qtype_names():
        assert resolve_qtype(n).name == n


# --------------------------------------------------------------------------
# predictions and imatrix
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "req, ne0, ne1, written",
    [
        ("q4_K", 256, 256, "q4_K"),
        ("q4_K", 576, 192, "q5_0"),
        ("q5_K", 576, 192, "q6_0"),
        ("q6_K", 576, 192, "q8_0"),
        ("iq4_ks", 576, 192, "iq4_nl"),
        ("iq5_ks", 576, 192, "q5_0"),
        ("iq2_xxs", 864, 576, "iq4_nl"),
        ("q4_k_r4", 256, 130, "q4_K"),
        ("q4_k_r4", 576, 192, "q5_0"),  # row-length fallback first
        ("q8_k_r8", 256, 132, "q8_0"),
        ("q8_KV_r8", 576, 196, "q8_KV"),
        ("q4_0_r8", 576, 192, "q4_0_r8"),
        ("bf16_r16", 576, 200, "bf16"),
        ("iq2_bn", 576, 192, "iq2_bn"),
        ("q8_0", 576, 3, "q8_0"),
        ("iq1_s_r4", 512, 6, "iq1_s"),
    ],
)
def test_predict_written_type(req: str, ne0: int, ne1: int, written: str) -> None:
    t, reason = predict_written_type(req, ne0, ne1)
    assert t.name == written
    assert (reason is None) == (written == req)


def test_predict_reason_text() -> None:
    t, reason = predict_written_type(
        TYPES_BY_NAME["q4_K"], 576, 192, tensor_name="blk.0.attn_v.weight"
    )
    assert t.name == "q5_0"
    for part in ("576", "256", "q4_K", "q5_0", "blk.0.attn_v.weight"):
        assert part in reason
    # the row length by its name, not "cols 576 x 192" (reads as a product: llama.cpp #6614)
    assert reason.startswith("row length ne0 = 576 for blk.0.attn_v.weight is not divisible")
    assert " x " not in reason
    t, reason = predict_written_type("q4_k_r4", 256, 130)
    assert t.name == "q4_K" and "130" in reason and "4" in reason
    t, reason = predict_written_type("q4_k_r4", 256, 384, tensor_name="token_embd.weight")
    assert t.name == "q4_K" and "token_embd" in reason
    t, reason = predict_written_type(resolve_qtype("q4_k_m"), 576, 192)
    assert t.name == "q5_0"


def test_predict_unsupported() -> None:
    with pytest.raises(UnsupportedShapeError, match="Unsupported tensor size"):
        predict_written_type("iq2_bn", 96, 4)
    with pytest.raises(UnsupportedShapeError, match="asserts"):
        predict_written_type("q4_0", 100, 4)
    with pytest.raises(UnsupportedShapeError, match="not divisible by 256, required for iq1_m"):
        predict_written_type("iq1_m_r4", 576, 6)  # -> iq1_m (256-block) on 576 cols
    with pytest.raises(ValueError, match="not a weight type"):
        predict_written_type(TYPES_BY_NAME["q8_K"], 256, 4)


def test_needs_imatrix() -> None:
    yes = [
        "iq2_xxs",
        "iq2_xs",
        "iq1_s",
        "iq2_s",
        "iq1_m",
        "iq1_kt",
        "iq2_kt",
        "iq2_xxs_r4",
        "iq2_xs_r4",
        "iq2_s_r4",
        "iq1_s_r4",
        "iq1_m_r4",
    ]
    for n in yes:
        assert needs_imatrix(TYPES_BY_NAME[n]), n
    assert {t.name for t in GGML_TYPES if needs_imatrix(t)} == set(yes)
    for n in ("q2_K", "iq3_kt", "iq4_kt", "q4_K", "iq3_xxs", "bf16"):
        assert not needs_imatrix(n)
    assert needs_imatrix(resolve_qtype("q2_k_s"))  # preset refusal
    assert needs_imatrix(resolve_qtype("IQ2_S"))
    assert not needs_imatrix(resolve_qtype("q2_K"))
    assert needs_imatrix(resolve_qtype("IQ2_M"))  # no preset refusal, but its default iq2_s is in R


def test_the_name_lister_labels_kinds_and_survives_a_closed_pipe(monkeypatch, capsys):
    import sys

    from pytest_quantbench.qtypes import main

    assert main([]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "q4_k_m       preset Q4_K_M (default type q4_K)" in out
    # one term for both ik imatrix sets (A: the quantizer asserts; R: llama-quantize refuses),
    # explained in a legend line (issue 11 item 16)
    assert "iq2_xxs      ggml type, 2.062 bpw, needs imatrix" in out
    assert "iq2_s        ggml type, 2.562 bpw, needs imatrix" in out
    assert "q2_k_s       preset Q2_K_S (default type q2_K), needs imatrix" in out
    assert not [line for line in out if "required" in line or "imatrix needed" in line]
    assert out[-1].startswith("needs imatrix: quantizing to this type without an importance")

    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "any case" not in help_text
    assert "q8_KV_r8 is the ggml type, q8_kv_r8 (any other case) the preset Q8_KV_R8" in help_text
    assert resolve_qtype("q8_KV_r8").kind == "type" and resolve_qtype("q8_kv_r8").kind == "preset"
    assert resolve_qtype("Q8_KV_r8").kind == "preset"

    class ClosedPipe:  # what `python -m pytest_quantbench.qtypes | head -1` leaves behind
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main([]) == 0
