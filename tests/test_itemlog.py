"""Tests for pytest_quantbench.itemlog: suite-style per-item logs
(docs/suite-formats.md#resume – #csv-layout)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from pytest_quantbench.itemlog import format_item_log, log_file_name, write_item_log
from pytest_quantbench.metrics import KLDAccumulator, KLDStats

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "llama-perplexity"
VARIANT_STDOUT = FIXTURES / "variant-blk3-attn_output-q4_1.stdout.txt"

# The figures of variant-blk3-attn_output-q4_1.stdout.txt (real llama-perplexity output:
# SmolLM2 bf16 with blk.3.attn_output.weight at q4_1, n_ctx 128, 4 chunks of 63 tokens).
FIXTURE_STATS = KLDStats(
    ppl_q=13.439586,
    ppl_q_err=2.411612,
    ppl_base=13.332524,
    ppl_base_err=2.380710,
    cor_ln_ppl=99.84,
    ln_ratio=0.007998,
    ln_ratio_err=0.010316,
    ppl_ratio=1.008030,
    ppl_ratio_err=0.010399,
    ppl_diff=0.107062,
    ppl_diff_err=0.141018,
    mean_kld=0.006878,
    mean_kld_err=0.000459,
    max_kld=0.038623,
    kld_p99_9=0.038373,
    kld_p99=0.033807,
    kld_p95=0.021033,
    kld_p90=0.015436,
    median_kld=0.004661,
    kld_p10=0.000564,
    kld_p5=0.000337,
    kld_p1=0.000031,
    kld_p0_1=0.000019,
    min_kld=0.000019,
    mean_dp=-0.179,
    mean_dp_err=0.120,
    max_dp=10.764,
    dp_p99_9=9.423,
    dp_p99=5.096,
    dp_p95=2.654,
    dp_p90=1.521,
    dp_p75=0.172,
    median_dp=-0.018,
    dp_p25=-0.524,
    dp_p10=-2.016,
    dp_p5=-3.357,
    dp_p1=-6.199,
    dp_p0_1=-7.244,
    min_dp=-7.303,
    rms_dp=1.915,
    rms_dp_err=0.175,
    same_top_p=94.444,
    same_top_p_err=1.446,
    n_tokens=252,
)
FIXTURE_ROWS = [
    "   1       6.5243 ±    2.2189       0.01517 ±    0.01651       0.00495 ±    0.00072"
    "     1.839 ±  0.279 %    98.413 ±  1.587 %",
    "   2       9.3967 ±    2.1592       0.00851 ±    0.01065       0.00548 ±    0.00056"
    "     2.074 ±  0.277 %    96.825 ±  1.568 %",
    "   3      12.6367 ±    2.6560       0.00891 ±    0.00996       0.00707 ±    0.00054"
    "     2.002 ±  0.215 %    94.180 ±  1.708 %",
    "   4      13.4396 ±    2.4116       0.00800 ±    0.01032       0.00688 ±    0.00046"
    "     1.915 ±  0.175 %    94.444 ±  1.446 %",
]
WHEN = datetime(2026, 7, 14, 9, 30, 5, tzinfo=timezone(timedelta(hours=2)))
COMMAND = "pytest --quantbench-qtypes=q4_1 --quantbench-ctx=128 --quantbench-chunks=4"
FACTS = {
    "members": "blk.3.attn_output.weight",
    "requested_type": "q4_1",
    "written_type": "q4_1",
    "engine": "inplace",
    "n_ctx": 128,
    "reason": None,
}
HEADER = (
    "=== Command used to generate this file (recorded: 2026-07-14T09:30:05+02:00) ===\n"
    f"{COMMAND}\n"
    "=== End of command header ===\n"
    "quantbench: unit = blk.3.attn_output.weight\n"
    "quantbench: qtype = q4_1\n"
    "quantbench: chunks = 4\n"
    "quantbench: members = blk.3.attn_output.weight\n"
    "quantbench: requested_type = q4_1\n"
    "quantbench: written_type = q4_1\n"
    "quantbench: engine = inplace\n"
    "quantbench: n_ctx = 128\n"
)

# ------------------------------------------------ the collector's reading rules
# (docs/suite-formats.md#value-extraction)

SAME_TOP_P_ERE = r".*Same top p[[:space:]]*:[[:space:]]*([0-9]+(\.[0-9]+)?).*"
NUM = r"([-+]?[0-9]+(?:\.[0-9]+)?)"


def first_capture(text: str, pattern: str, line_filter=None) -> str | None:
    """Capture group 1 of ``pattern`` on the first line that matches (and passes the filter)."""
    for line in text.splitlines():
        if line_filter is not None and not line_filter(line):
            continue
        m = re.search(pattern, line)
        if m:
            return m.group(1)
    return None


def collector_ppl(text: str) -> str | None:
    """PPL as collect_ppl_results.sh reads it: the first of its five rules that matches."""
    rules = [
        (rf"PPL = {NUM}", lambda line: "Final" in line and "PPL" in line),
        (rf"Mean PPL\(Q\)\s*:\s*{NUM}", None),
        (rf"PPL= {NUM}", None),
        (rf"PPL: {NUM}", None),
        (rf"= {NUM} \+/-", None),
    ]
    for pattern, line_filter in rules:
        value = first_capture(text, pattern, line_filter)
        if value is not None:
            return value
    return None


def collector_kld(text: str) -> str | None:
    """KLD as collect_ppl_results.sh reads it: ``Mean    KLD:``, then ``KLD:``, then
    ``KL Divergence:``."""
    for pattern in (rf"Mean    KLD:\s*{NUM}", rf"KLD:\s*{NUM}", rf"KL Divergence:\s*{NUM}"):
        value = first_capture(text, pattern)
        if value is not None:
            return value
    return None


def collector_regex(text: str, ere: str) -> str | None:
    """A ``--regex`` ERE as the collector applies it: group 1 of the first matching line."""
    return first_capture(text, ere.replace("[[:space:]]", r"\s"))


# ------------------------------------------------------------------ file name


def test_log_file_name_tensor_and_group():
    assert log_file_name("blk.3.attn_output.weight", "q4_1", 4) == (
        "bench_ppl_kld_result.blk.3.attn_output.weight.q4_1.4.txt"
    )
    assert log_file_name("group0", "iq4_ks", 250) == "bench_ppl_kld_result.group0.iq4_ks.250.txt"
    assert log_file_name("token_embd.weight", "q4_K", np.int64(8)) == (
        "bench_ppl_kld_result.token_embd.weight.q4_K.8.txt"
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (("", "q4_0", 4), r"unit_name='': give a non-empty name"),
        (("a/b", "q4_0", 4), r"unit_name='a/b': give a non-empty name without '/'"),
        (("blk.0.x", "q4\n0", 4), r"qtype='q4\\n0'"),
        (("blk.0.x", "q4_0", 0), r"chunks=0: give the number of evaluated chunks"),
        (("blk.0.x", "q4_0", None), r"chunks=None"),
        (("blk.0.x", "q4_0", True), r"chunks=True"),
        (("blk.0.x", "q4_0", 4.0), r"chunks=4.0"),
    ],
)
def test_log_file_name_rejects_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        log_file_name(*args)


# ------------------------------------------------------------------ content


def test_log_bytes_are_header_facts_then_llama_perplexity_stdout():
    text = format_item_log(
        "blk.3.attn_output.weight",
        "q4_1",
        4,
        FIXTURE_STATS,
        command=COMMAND,
        facts=FACTS,
        chunk_rows=FIXTURE_ROWS,
        recorded=WHEN,
    )
    assert text.startswith(HEADER)
    stdout = text[len(HEADER) :]
    assert stdout.startswith("\nchunk             PPL ")
    assert stdout.endswith("RMS Δp    :  1.915 ± 0.175 %\nSame top p: 94.444 ± 1.446 %\n")
    if not VARIANT_STDOUT.is_file():
        pytest.skip(f"{VARIANT_STDOUT} (shared fixtures) is absent")
    assert stdout.encode("utf-8") == VARIANT_STDOUT.read_bytes()


def test_log_without_chunk_rows_is_the_final_block_alone():
    text = format_item_log(
        "group0", "q4_1", 4, FIXTURE_STATS, command="pytest", facts={}, recorded=WHEN
    )
    lines = text.split("\n")
    assert lines[:7] == [
        "=== Command used to generate this file (recorded: 2026-07-14T09:30:05+02:00) ===",
        "pytest",
        "=== End of command header ===",
        "quantbench: unit = group0",
        "quantbench: qtype = q4_1",
        "quantbench: chunks = 4",
        "",
    ]
    assert text[len("\n".join(lines[:6])) + 1 :] == "\n" + FIXTURE_STATS.format_block()


def test_collector_reads_the_printed_numbers(tmp_path):
    path = write_item_log(
        tmp_path / "logs",
        "blk.3.attn_output.weight",
        "q4_1",
        4,
        FIXTURE_STATS,
        command=COMMAND,
        facts=FACTS,
        chunk_rows=FIXTURE_ROWS,
        recorded=WHEN,
    )
    assert path == tmp_path / "logs" / "bench_ppl_kld_result.blk.3.attn_output.weight.q4_1.4.txt"
    text = path.read_text(encoding="utf-8")
    assert collector_ppl(text) == "13.439586"
    assert collector_kld(text) == "0.006878"
    assert collector_regex(text, SAME_TOP_P_ERE) == "94.444"
    assert "Final" not in text  # a KLD run prints no Final estimate; PPL comes from rule 2
    # The suite's "is this log complete" check (docs/suite-formats.md#log-complete) finds its
    # marker.
    assert "KL divergence statistics" in text


@pytest.mark.skipif(
    shutil.which("grep") is None or shutil.which("sed") is None, reason="needs grep and sed"
)
def test_real_grep_and_sed_read_same_top_p(tmp_path):
    path = write_item_log(
        tmp_path,
        "blk.3.attn_output.weight",
        "q4_1",
        4,
        FIXTURE_STATS,
        command=COMMAND,
        facts=FACTS,
        chunk_rows=FIXTURE_ROWS,
    )
    env = {**os.environ, "LC_ALL": "C.UTF-8"}
    grep = subprocess.run(
        ["grep", "-E", SAME_TOP_P_ERE, str(path)], capture_output=True, env=env, check=True
    )
    # Only the final line matches; the table header "Same top p" has no colon after it.
    assert grep.stdout == "Same top p: 94.444 ± 1.446 %\n".encode()
    sed = subprocess.run(
        ["sed", "-nE", f"s/{SAME_TOP_P_ERE}/\\1/p", str(path)],
        capture_output=True,
        env=env,
        check=True,
    )
    assert sed.stdout == b"94.444\n"
    mean_kld = subprocess.run(
        ["grep", "-E", "Mean    KLD:", str(path)], capture_output=True, env=env, check=True
    )
    assert mean_kld.stdout == "Mean    KLD:   0.006878 ±   0.000459\n".encode()


def test_collector_reads_accumulated_stats_to_printed_places(tmp_path):
    rng = np.random.default_rng(7)
    acc = KLDAccumulator()
    rows = []
    for _ in range(2):
        base = rng.normal(size=(63, 40)).astype(np.float32)
        base_lp = base - np.log(np.exp(base.astype(np.float64)).sum(1, keepdims=True))
        logits = (base + 0.3 * rng.normal(size=base.shape)).astype(np.float32)
        acc.add_chunk(logits, base_lp.astype(np.float32), rng.integers(0, 40, size=63))
        rows.append(acc.chunk_row())
    stats = acc.stats()
    path = write_item_log(
        tmp_path,
        "blk.0.attn_q.weight",
        "q2_K",
        2,
        stats,
        command="pytest",
        facts={"engine": "file"},
        chunk_rows=rows,
    )
    text = path.read_text(encoding="utf-8")
    assert collector_ppl(text) == f"{stats.ppl_q:.6f}"
    assert collector_kld(text) == f"{stats.mean_kld:.6f}"
    assert collector_regex(text, SAME_TOP_P_ERE) == f"{stats.same_top_p:.3f}"


def test_write_replaces_atomically_and_leaves_no_temp_files(tmp_path):
    args = ("group1", "q8_0", 4, FIXTURE_STATS)
    first = write_item_log(tmp_path, *args, command="pytest -x", facts={})
    second = write_item_log(tmp_path, *args, command="pytest -y", facts={})
    assert first == second
    assert os.listdir(tmp_path) == ["bench_ppl_kld_result.group1.q8_0.4.txt"]
    assert first.read_text(encoding="utf-8").split("\n")[1] == "pytest -y"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"command": "pytest\n-x", "facts": {}}, r"command 'pytest\\n-x' contains a line break"),
        ({"command": "pytest", "facts": {"chunks": 4}}, r"fact key 'chunks'"),
        ({"command": "pytest", "facts": {"a=b": 1}}, r"fact key 'a=b'"),
        ({"command": "pytest", "facts": {"note": "x\ny"}}, r"fact 'note' value 'x\\ny'"),
    ],
)
def test_bad_header_input_raises_and_writes_nothing(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        write_item_log(tmp_path, "group0", "q4_0", 4, FIXTURE_STATS, **kwargs)
    assert os.listdir(tmp_path) == []
