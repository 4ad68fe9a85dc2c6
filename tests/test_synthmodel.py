"""The synthetic test model is a real model: llama-quantize and the engine accept it.

Runs the wheel's own llama-quantize on it (``--custom-q``) and loads and
decodes it with the wheel's Python API in a subprocess (a C abort must not
take the test session down).  Seconds, CPU only.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pytest_quantbench.gguf import read_header
from pytest_quantbench.qtypes import predict_written_type

pytest.importorskip("gguf", reason="gguf-py writes the synthetic test models (pip install gguf)")
if str(Path(__file__).parent) not in sys.path:  # also under --import-mode=importlib
    sys.path.insert(0, str(Path(__file__).parent))
from conftest import WHEEL  # noqa: E402
from synthmodel import build_synthetic_model, f32_to_bf16_bits, synthetic_vocab  # noqa: E402

QUANTIZE = WHEEL / "bin" / "llama-quantize" if WHEEL else None
needs_quantize = pytest.mark.skipif(
    QUANTIZE is None or not QUANTIZE.is_file(), reason="the wheel's llama-quantize is not installed"
)


def run_quantize(src: Path, dst: Path, custom_q: str, preset: str = "Q8_0") -> str:
    """`llama-quantize --custom-q RULES src dst PRESET 1`; returns its combined output."""
    # The binary finds its libraries through its RPATH
    # ($ORIGIN/../../ik_llama_cpp_python.libs); no LD_LIBRARY_PATH needed.
    cmd = [str(QUANTIZE), "--custom-q", custom_q, str(src), str(dst), preset, "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{out[-3000:]}"
    return out


# --------------------------------------------------------------------------
# the builder
# --------------------------------------------------------------------------


def test_vocab() -> None:
    tokens, scores, types = synthetic_vocab(384)
    assert len(tokens) == len(scores) == len(types) == 384 == len(set(tokens))
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and types[:3] == [2, 3, 3]
    assert tokens[3] == "<0x00>" and tokens[258] == "<0xFF>" and set(types[3:259]) == {6}
    for piece in ("\u2581the", "\u2581a", "e", "t", "\u2581"):
        assert piece in tokens
    with pytest.raises(ValueError):
        synthetic_vocab(100)


def test_bf16_bits() -> None:
    x = np.array([1.0, -2.5, 0.0, 3.14159, 1e-3], dtype=np.float32)
    back = (f32_to_bf16_bits(x).astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_allclose(back, x, rtol=1 / 128)
    assert f32_to_bf16_bits(np.array([1.0], np.float32))[0] == 0x3F80


@pytest.mark.parametrize("dtype, type_name", [("bf16", "bf16"), ("f32", "f32")])
def test_builder_header(tmp_path: Path, dtype: str, type_name: str) -> None:
    p = build_synthetic_model(tmp_path / "m.gguf", dtype=dtype, n_layer=3, seed=1)
    h = read_header(p)
    assert h.n_layer == 3 and len(h.tensors) == 3 + 9 * 3
    for t in h.tensors:
        if t.n_dims == 1:
            assert t.type_name == "f32" and t.name.endswith("norm.weight")
        else:
            assert t.type_name == type_name and t.shape[0] % 256 == 0
    assert h.tensor("blk.2.ffn_down.weight").shape == (512, 256)
    assert h.tensor("output.weight").shape == (256, 384)
    assert h.metadata["llama.attention.head_count_kv"] == 2


def test_builder_is_deterministic(tmp_path: Path) -> None:
    a = build_synthetic_model(tmp_path / "a.gguf", seed=3).read_bytes()
    b = build_synthetic_model(tmp_path / "b.gguf", seed=3).read_bytes()
    c = build_synthetic_model(tmp_path / "c.gguf", seed=4).read_bytes()
    assert a == b and a != c


# --------------------------------------------------------------------------
# llama-quantize
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return build_synthetic_model(tmp_path_factory.mktemp("synth") / "in.gguf")


@needs_quantize
def test_quantize_one_tensor_to_iq4_ks(synth: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    log = run_quantize(synth, out, r"blk\.0\.attn_v\.weight=iq4_ks,.*=bf16")
    assert "Using custom type iq4_ks for tensor blk.0.attn_v.weight" in log

    src, dst = read_header(synth), read_header(out)
    assert [t.name for t in src.tensors] == [t.name for t in dst.tensors]
    v = dst.tensor("blk.0.attn_v.weight")
    assert (v.ggml_type, v.type_name) == (144, "iq4_ks")
    assert v.shape == (256, 128) and v.n_bytes == 128 * (4 + 136)
    for a, b in zip(src.tensors, dst.tensors, strict=True):
        if a.name != v.name:
            assert (a.type_name, a.shape, a.n_bytes) == (b.type_name, b.shape, b.n_bytes), a.name
    assert dst.metadata["tokenizer.ggml.tokens"] == src.metadata["tokenizer.ggml.tokens"]


@needs_quantize
def test_written_types_match_predictions(tmp_path: Path) -> None:
    """Row-length and row-count fallbacks, predicted vs what llama-quantize writes."""
    src = build_synthetic_model(tmp_path / "odd.gguf", n_ff=576, n_vocab=388)
    rules = [
        (r"ffn_down", "q4_K"),  # 576 cols -> q5_0
        (r"^output\.weight", "q4_0_r8"),  # 388 rows -> q4_0
        (r"blk\.0\.attn_q", "q4_k_r4"),  # 256 x 256: as asked
        (r"blk\.1\.attn_k", "q8_k_r8"),  # 256 x 128: as asked
        (r"blk\.0\.ffn_gate", "iq5_ks_r4"),  # 256 x 576: as asked
        (r"ffn_up", "iq2_bn"),
        (r"blk\.1\.attn_v", "q6_K"),
        (r".*", "bf16"),
    ]
    out = tmp_path / "odd-out.gguf"
    log = run_quantize(src, out, ",".join(f"{r}={t}" for r, t in rules))
    assert re.search(
        r"tensor cols 576 x 256 are not divisible by 256, required for q4_K\s*- using fallback quantization q5_0",
        log,
    )
    assert "2 of 2 tensor(s) required fallback quantization" in log

    h_src, h_out = read_header(src), read_header(out)
    checked = 0
    for t in h_src.tensors:
        written = h_out.tensor(t.name)
        if t.n_dims < 2:
            assert written.type_name == t.type_name
            continue
        requested = next(typ for rx, typ in rules if re.search(rx, t.name))
        predicted, reason = predict_written_type(
            requested, t.shape[0], t.shape[1], tensor_name=t.name
        )
        assert written.type_name == predicted.name, (t.name, requested, reason)
        checked += 1
    assert checked == 16
    assert h_out.tensor("blk.0.ffn_down.weight").type_name == "q5_0"
    assert h_out.tensor("output.weight").type_name == "q4_0"
    assert h_out.tensor("blk.0.attn_output.weight").type_name == "bf16"


# --------------------------------------------------------------------------
# the engine
# --------------------------------------------------------------------------

_DECODE = textwrap.dedent(
    """
    import json, math, sys
    from ik_llama_cpp.llama import IkLlama
    from ik_llama_cpp._internals import make_batch_range
    from ik_llama_cpp import _ctypes_api as C

    out = {}
    for path in sys.argv[1:]:
        llm = IkLlama(path, n_ctx=64, n_threads=2, flash_attn=False, verbose=False)
        toks = llm.tokenize("the cat and a dog", add_bos=True)
        batch = make_batch_range(toks, pos_start=0, logits_last=True)
        rc = llm._context.decode(batch)
        C.llama_batch_free(batch)
        ptr = llm._context.get_logits(-1)
        logits = [float(ptr[i]) for i in range(llm._model.n_vocab)]
        gen = llm.generate(toks, max_tokens=3)
        out[path] = dict(rc=rc, tokens=toks, n_vocab=llm._model.n_vocab, logits=logits, gen=gen)
        llm.close()
    print("RESULT " + json.dumps(out))
    """
)


@needs_quantize
def test_engine_loads_and_decodes(synth: Path, tmp_path: Path) -> None:
    pytest.importorskip("ik_llama_cpp.llama")
    out = tmp_path / "iq4ks.gguf"
    run_quantize(synth, out, r"blk\.0\.attn_v\.weight=iq4_ks,.*=bf16")
    proc = subprocess.run(
        [sys.executable, "-c", _DECODE, str(synth), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, (
        f"decode failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    )
    res = json.loads(line[len("RESULT ") :])
    tokens, _, _ = synthetic_vocab(384)
    base, quant = res[str(synth)], res[str(out)]
    for r in (base, quant):
        assert r["rc"] == 0 and r["n_vocab"] == 384
        assert [tokens[i] for i in r["tokens"][:3]] == ["<s>", "\u2581the", "\u2581c"]
        logits = np.array(r["logits"])
        assert np.isfinite(logits).all()
        assert logits.std() > 1e-3  # not degenerate
        assert len(r["gen"]) <= 3
    diff = np.abs(np.array(base["logits"]) - np.array(quant["logits"]))
    assert 0 < diff.max() < 1.0  # one tensor quantized: close, not identical
