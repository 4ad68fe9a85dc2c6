"""Bad input: every input a user can get wrong stops the run before any item with exit code 4
(usage error) and one message naming the input and the fix, or errors just the item it concerns.
No result table or temporary file is left behind by a usage error.

Each case is a real pytest subprocess (pytester) on the tiny synthetic model.
"""

from __future__ import annotations

import pytest

from runhelpers import assert_nothing_written, cache_of, usage_error, without


def run_usage_error(pytester, args: list[str], *extra: str) -> str:
    """Run with ``args`` + ``extra``, expect a usage error, and return its message."""
    result = pytester.runpytest_subprocess(*args, *extra)
    message = usage_error(result)
    assert_nothing_written(pytester, cache_of(args))
    return message


# ---- the model -----------------------------------------------------------------------------


def test_missing_model(pytester, qb_args, tmp_path):
    missing = tmp_path / "nope.gguf"
    args = without(qb_args, "--quantbench-model")
    message = run_usage_error(
        pytester, args, f"--quantbench-model={missing}", "--quantbench-qtypes=q4_0"
    )
    assert message == (
        f"--quantbench-model {missing}: no such file; check the model path (or build/download the "
        "model first)"
    )


def test_model_path_that_is_a_directory(pytester, qb_args, tmp_path):
    args = without(qb_args, "--quantbench-model")
    message = run_usage_error(
        pytester, args, f"--quantbench-model={tmp_path}", "--quantbench-qtypes=q4_0"
    )
    assert message == (
        f"--quantbench-model {tmp_path}: is a directory, not a GGUF file; point the option at the "
        ".gguf file inside it"
    )


@pytest.mark.parametrize(
    "content, message",
    [
        (
            b"",
            "--quantbench-model {path}: not a GGUF file (magic b'', expected b'GGUF'); pass a .gguf model (convert "
            "safetensors with convert_hf_to_gguf.py)",
        ),
        (
            b"NOTAGGUF" + bytes(64),
            "--quantbench-model {path}: not a GGUF file (magic b'NOTA', expected b'GGUF'); pass a "
            ".gguf model (convert safetensors with convert_hf_to_gguf.py)",
        ),
    ],
)
def test_model_that_is_not_a_gguf(pytester, qb_args, tmp_path, content, message):
    bad = tmp_path / "empty.gguf"
    bad.write_bytes(content)
    args = without(qb_args, "--quantbench-model")
    got = run_usage_error(pytester, args, f"--quantbench-model={bad}", "--quantbench-qtypes=q4_0")
    assert got == message.format(path=bad)


_REDO = (
    "re-download or re-convert the model (convert_hf_to_gguf.py / llama-quantize) and point "
    "the option at a complete .gguf file"
)


@pytest.mark.parametrize(
    "keep, message",
    [
        (
            200,
            "--quantbench-model {path}: header claims 21 tensors and 23 metadata keys, more than a 200-byte file can "
            "hold: truncated or corrupt; " + _REDO,
        ),
        (
            0.5,
            "--quantbench-model {path}: truncated: tensor 'blk.0.ffn_down.weight' (bf16 [512, 256], 262144 bytes at "
            "byte 1126624) extends to byte 1388768 but the file has only {size} bytes; the "
            "download or copy is incomplete: " + _REDO,
        ),
    ],
    ids=["in-header", "in-tensor-data"],
)
def test_truncated_model(pytester, qb_args, synth_model, tmp_path, keep, message):
    data = synth_model.read_bytes()
    size = keep if isinstance(keep, int) else int(len(data) * keep)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:size])
    args = without(qb_args, "--quantbench-model")
    got = run_usage_error(pytester, args, f"--quantbench-model={cut}", "--quantbench-qtypes=q4_0")
    assert got == message.format(path=cut, size=size)


def test_model_of_an_unknown_architecture(pytester, qb_args, tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "alien.gguf"
    writer = gguf.GGUFWriter(path, "notanarch")
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((256, 256), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    args = without(qb_args, "--quantbench-model")
    result = pytester.runpytest_subprocess(
        *args, f"--quantbench-model={path}", "--quantbench-qtypes=q4_0"
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            f"ERROR: the engine could not load model {path}*",
            "*unknown model architecture: 'notanarch'*",
        ]
    )
    assert_nothing_written(pytester, cache_of(args))


def test_missing_engine_library(pytester, qb_args):
    message = run_usage_error(
        pytester,
        qb_args,
        "--quantbench-qtypes=q4_0",
        "--quantbench-engine-lib=/nonexistent/libllama.so",
    )
    assert message == (
        "--quantbench-engine-lib /nonexistent/libllama.so does not exist: give the "
        "libllama.so of an ik_llama.cpp build"
    )


# ---- qtypes and the tensor selection -------------------------------------------------------


def test_unknown_qtype_names_the_closest(pytester, qb_args):
    message = run_usage_error(pytester, qb_args, "--quantbench-qtypes=iq2-kt")
    assert message == (
        "unknown qtype 'iq2-kt'; did you mean 'iq2_kt', 'iq2_k', 'iq4_kt', "
        "'iq3_kt'? (valid names are the ggml weight types and llama-quantize "
        "presets; `python -m pytest_quantbench.qtypes` lists them)"
    )


@pytest.mark.parametrize("value", [",", " "])
def test_empty_qtype_list(pytester, qb_args, value):
    message = run_usage_error(pytester, qb_args, f"--quantbench-qtypes={value}")
    assert message == (
        "no qtypes given: pass --quantbench-qtypes (e.g. --quantbench-qtypes="
        "q4_0,q8_0), --quantbench-variant FILE.gguf, --quantbench-recipe "
        "FILE.recipe, or set qtypes in quantbench.yaml or quantbench_qtypes in ini"
    )


def test_bad_regex_in_a_selection_rule(pytester, qb_args):
    message = run_usage_error(
        pytester, qb_args, "--quantbench-qtypes=q4_0", "--quantbench-tensors", "blk.(("
    )
    assert message == (
        "invalid regex in selection rule 'blk.((' (--quantbench-tensors (entry 1)): "
        "missing ), unterminated subpattern at position 5"
    )


def test_a_rule_matching_no_tensor_is_a_warning_naming_it(pytester, qb_args):
    result = pytester.runpytest_subprocess(
        *qb_args,
        "--quantbench-qtypes=q4_0",
        "--collect-only",
        "-q",
        "--quantbench-tensors",
        r"blk\.0\.attn_q",
        r"blk\.9\.attn_q",
    )
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(
        [
            "quantbench::blk.0.attn_q.weight[[]q4_0[]]",
            "*PytestWarning: quantbench: selection rule 'blk\\.9\\.attn_q' (--quantbench-tensors "
            "(entry 2)) matches no tensor of synth-bf16.gguf",
        ]
    )
    assert "blk\\.0\\.attn_q' (" not in result.stdout.str()  # the matching rule is not named


def test_nothing_selected_is_an_error(pytester, qb_args):
    message = run_usage_error(
        pytester, qb_args, "--quantbench-qtypes=q4_0", "--quantbench-tensors", "nomatch"
    )
    assert message == (
        "no tensor selected: the rules 'nomatch' (--quantbench-tensors (entry 1)) select none of "
        "the 16 eligible tensors (e.g. blk.0.attn_k.weight, blk.0.attn_output.weight, "
        "blk.0.attn_q.weight, blk.0.attn_v.weight, blk.0.ffn_down.weight, …); rules are regexes "
        "searched in the full tensor name, such as '^blk\\.[0-9]+\\.ffn_down\\.weight$=q4_K'"
    )


# ---- n_ctx and chunks ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "ctx, message",
    [
        (
            1024,
            "--quantbench-ctx 1024 is larger than the model's training context (512 tokens): use "
            "a smaller n_ctx",
        ),
        (
            8,
            "--quantbench-ctx (from CLI): n_ctx=8 is too small; use 16 or more (llama-perplexity's "
            "default is 512)",
        ),
    ],
)
def test_bad_n_ctx(pytester, qb_args, ctx, message):
    args = without(qb_args, "--quantbench-ctx")
    assert (
        run_usage_error(pytester, args, f"--quantbench-ctx={ctx}", "--quantbench-qtypes=q4_0")
        == message
    )


@pytest.mark.parametrize("chunks", [0, -3])
def test_chunks_not_positive(pytester, qb_args, chunks):
    args = without(qb_args, "--quantbench-chunks")
    message = run_usage_error(
        pytester, args, f"--quantbench-chunks={chunks}", "--quantbench-qtypes=q4_0"
    )
    assert message == (
        f"--quantbench-chunks (from CLI): {chunks} chunks; give a positive number, "
        "or leave it unset for all the corpus allows"
    )


def test_n_seq_not_positive(pytester, qb_args):
    message = run_usage_error(pytester, qb_args, "--quantbench-n-seq=0", "--quantbench-qtypes=q4_0")
    assert message == "--quantbench-n-seq (from CLI): 0; give 1 or more chunks per decode"


# ---- the corpus ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.mkdir(), "--quantbench-corpus {path} is a directory: give a text file"),
        (
            lambda p: p.write_bytes(b"\xff\xfe bad"),
            "--quantbench-corpus {path} is not UTF-8 text (byte 0): convert it, e.g. iconv -t utf-8",
        ),
        (lambda p: p.write_text("\n"), "--quantbench-corpus {path} is empty"),
        (
            lambda p: None,
            "--quantbench-corpus {path} does not exist: give a text file (e.g. wiki.test.raw)",
        ),
    ],
    ids=["directory", "not-utf8", "empty", "missing"],
)
def test_bad_corpus(pytester, qb_args, tmp_path, make, message):
    corpus = tmp_path / "corpus-input"
    make(corpus)
    args = without(qb_args, "--quantbench-corpus")
    got = run_usage_error(
        pytester, args, f"--quantbench-corpus={corpus}", "--quantbench-qtypes=q4_0"
    )
    assert got == message.format(path=corpus)


@pytest.mark.parametrize(
    "words, chunks, message",
    [
        (
            300,
            50,
            "--quantbench-chunks 50: corpus {path} has 302 tokens, which allows at most 4 "
            "chunks of n_ctx=64; pass --quantbench-chunks 4 or less, the largest "
            "--quantbench-ctx it allows is 151 (one chunk pair), or a longer corpus",
        ),
        (
            300,
            10,
            "--quantbench-chunks 10: corpus {path} has 302 tokens, which allows at most 4 "
            "chunks of n_ctx=64; pass --quantbench-chunks 4 or less, --quantbench-ctx 30 or "
            "less for 10 chunks, or a longer corpus",
        ),
        (
            100,
            1,
            "corpus {path} has 102 tokens; llama-perplexity needs at least 128 for n_ctx=64: "
            "use a longer text or a smaller --quantbench-ctx (the largest --quantbench-ctx it "
            "allows is 51 (one chunk pair))",
        ),
        (
            20,
            1,
            "corpus {path} has 22 tokens; llama-perplexity needs at least 128 for n_ctx=64: use "
            "a longer text or a smaller --quantbench-ctx (it is too short for any n_ctx (the "
            "smallest is 16))",
        ),
    ],
)
def test_corpus_too_short_names_tokens_and_chunk_limit(
    pytester, qb_args, tmp_path, words, chunks, message
):
    short = tmp_path / "short.txt"
    short.write_text("the " * words, encoding="utf-8")
    args = without(qb_args, "--quantbench-corpus", "--quantbench-chunks")
    got = run_usage_error(
        pytester,
        args,
        f"--quantbench-corpus={short}",
        "--quantbench-qtypes=q4_0",
        f"--quantbench-chunks={chunks}",
    )
    assert got == message.format(path=short)


# ---- the thresholds file -------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "rules:\n  - tensor: attn_v\n    max_kdl: 0.1\n",
            "rule 1 (tensor='attn_v') in {path}: unknown key 'max_kdl'; did you mean 'max_kld'? "
            "(allowed: tensor, qtype, max_kld, max_kld_p99_9, max_kld_p99, max_kld_p95, max_kld_p90, "
            "max_median_kld, max_ppl_ratio, max_ppl_increase_pct, max_rms_dp, min_same_top_p)",
        ),
        (
            "rulez:\n  - tensor: attn_v\n",
            "thresholds file {path}: unknown top-level key 'rulez'; did you mean 'rules'? (allowed: "
            "defaults, rules)",
        ),
        (
            "rules:\n  - tensor: attn_v\n    max_kld: lots\n",
            "rule 1 (tensor='attn_v') in {path}: max_kld must be a number, got 'lots' (str); write e.g. "
            "'max_kld: 0.05', or 'max_kld: null' to remove an inherited limit",
        ),
        (
            "rules:\n  - tensor: [attn_v]\n    max_kld: 0.1\n",
            "rule 1 (tensor='['attn_v']') in {path}: tensor must be a non-empty regex string, got a "
            "list",
        ),
        (
            "rules:\n  - tensor: attn_v\n    qtype: q4_00\n    max_kld: 0.1\n",
            "rule 1 (tensor='attn_v', qtype=q4_00) in {path}: unknown qtype 'q4_00'; did you mean "
            "'q4_0', 'q8_0', 'q6_0', 'q5_0'? (valid names are the ggml weight types and "
            "llama-quantize presets; `python -m pytest_quantbench.qtypes` lists them); fix the qtype "
            "or remove the rule",
        ),
    ],
    ids=[
        "unknown-key",
        "unknown-top-level-key",
        "wrong-type",
        "wrong-type-tensor",
        "unknown-qtype",
    ],
)
def test_bad_thresholds_file_is_a_usage_error_before_any_item(pytester, qb_args, text, message):
    path = pytester.makefile(".yaml", thresholds=text)
    got = run_usage_error(
        pytester, qb_args, "--quantbench-qtypes=q4_0", "--quantbench-thresholds=thresholds.yaml"
    )
    assert got == message.format(path=path)


# ---- a user-given baseline -----------------------------------------------------------------


def test_kld_base_for_another_vocabulary(pytester, qb_args, tmp_path):
    import numpy as np

    from pytest_quantbench.kldbase import KLDBaseWriter

    wrong = tmp_path / "other-vocab.kld"
    tokens = np.zeros((1, 32), dtype=np.int32)
    with KLDBaseWriter(wrong, 32, 50, tokens) as writer:
        writer.write_chunk(np.zeros((15, 50), dtype=np.float32))
    args = without(qb_args, "--quantbench-corpus", "--quantbench-ctx", "--quantbench-chunks")
    message = run_usage_error(
        pytester,
        args,
        f"--quantbench-kld-base={wrong}",
        "--quantbench-qtypes=q4_0",
        "--quantbench-tensors",
        r"blk\.1\.attn_q",
    )
    assert message == (
        f"--quantbench-kld-base {wrong} was computed for n_vocab=50 but the model "
        "has n_vocab=384: use the base file of this model"
    )


# ---- outputs and groups --------------------------------------------------------------------


def test_unknown_csv_metric_lists_the_valid_names(pytester, qb_args):
    message = run_usage_error(
        pytester, qb_args, "--quantbench-qtypes=q4_0", "--quantbench-csv-metrics=kld_p99,rms_dpp"
    )
    assert message.startswith("--quantbench-csv-metrics: unknown metric 'rms_dpp'; valid: all, ")
    assert "rms_dp," in message and "same_top_p_err" in message


def test_a_bad_group_regex_is_a_usage_error(pytester, qb_args):
    message = run_usage_error(
        pytester,
        qb_args,
        "--quantbench-qtypes=q4_0",
        "--quantbench-group-tensors",
        "attn_q",
        "ffn_(up",
    )
    assert message.startswith("--quantbench-group-tensors group1: invalid regex 'ffn_(up': ")


def test_groups_only_without_groups_is_a_usage_error(pytester, qb_args):
    message = run_usage_error(
        pytester, qb_args, "--quantbench-qtypes=q4_0", "--quantbench-groups-only"
    )
    assert message == (
        "--quantbench-groups-only: no group has a member; give "
        "--quantbench-group-tensors REGEX[,REGEX] (e.g. '.*' for the whole model)"
    )
