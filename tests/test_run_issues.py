"""What real runs tripped over (issue 11): the kernel probe is a fact of the type (item 8), a
failing baseline is computed once and stops the run (item 2), a GPU layer count on a CPU-only
build is said (item 14), a quantized baseline through the file engine (item 5), progress of long
steps (item 17)."""

from __future__ import annotations

from runhelpers import results

PROBED = [
    "--quantbench-qtypes=q4_0",
    "--quantbench-tensors",
    r"^blk\.0\.attn_(q|k|v|output)\.weight$",
    "--quantbench-threads=1",
    "--quantbench-rerun",
]


def test_kernel_probe_is_the_same_for_a_type_under_any_xdist_layout(pytester, qb_args):
    """Item 8: every item of a type reports the probe of one fixed tensor, whichever worker ran
    it and whichever tensor that worker measured first."""
    values = {}
    for n in ("1", "2"):
        pytester.runpytest_subprocess(*qb_args, *PROBED, "-n", n).assert_outcomes(passed=4)
        column = results(pytester)["kernel_probe_kld"]
        assert column.notna().all() and column.nunique() == 1, column.tolist()
        values[n] = column.iloc[0]
    assert values["1"] == values["2"]


NAN_BASELINE = """
import os
import numpy as np
from pytest_quantbench import kldbase

_orig = kldbase.KLDBaseWriter.write_chunk

def nan_at_position_3(self, logits):
    with open(os.path.join(os.environ["COUNT_DIR"], "chunks"), "a") as fh:
        fh.write("chunk\\n")
    logits = np.array(logits)
    logits[3, 0] = np.nan
    return _orig(self, logits)

kldbase.KLDBaseWriter.write_chunk = nan_at_position_3
"""


def test_a_failing_baseline_is_computed_once_and_every_item_errors_with_why(
    pytester, qb_args, tmp_path, monkeypatch
):
    """Item 2: NaN baseline logits are evaluated once for the whole run (two workers, four
    items); every item errors at once with one message that says the baseline failed and where."""
    pytester.makeconftest(NAN_BASELINE)
    monkeypatch.setenv("COUNT_DIR", str(tmp_path))
    args = [a for a in qb_args if not a.startswith("--quantbench-cache-dir=")]
    result = pytester.runpytest_subprocess(
        *args,
        f"--quantbench-cache-dir={tmp_path / 'cache'}",
        "--quantbench-qtypes=q8_0",
        "--quantbench-tensors",
        r"^blk\.0\.attn_(q|k|v|output)\.weight$",
        "-n",
        "2",
    )
    result.assert_outcomes(errors=4)
    assert (tmp_path / "chunks").read_text().count("chunk") == 1
    reasons = set(results(pytester)["reason"])
    assert len(reasons) == 1, reasons
    reason = reasons.pop()
    assert reason.startswith("BaselineError: the baseline failed (")
    assert (
        "chunk 1: 1 of 31 scored positions have non-finite logits (NaN or inf); first at "
        "position 3" in reason
    )
    result.stdout.fnmatch_lines(
        ["BaselineError: the baseline failed (*(4 item(s) errored at once)"]
    )


def test_a_full_disk_during_the_baseline_says_the_sizes(tmp_path):
    """Item 2: the message of a full disk gives the baseline's size and the free space."""
    import errno

    from pytest_quantbench.baseline import baseline_failure

    exc = baseline_failure(
        OSError(errno.ENOSPC, "No space left on device"), tmp_path / "b.kld", 123_400_000
    )
    text = str(exc)
    assert text.startswith(f"the baseline failed ({tmp_path / 'b.kld'}): baseline cache: No space")
    assert "the baseline file needs 123.4 MB, " in text and " MB free there)" in text


def test_gpu_layers_on_a_cpu_only_build_are_said(pytester, qb_args):
    """Item 14: a warning naming the build, and a header line saying everything runs on the CPU."""
    import pytest

    from pytest_quantbench.engine.bindings import load_library
    from pytest_quantbench.engine.identity import engine_identity

    if engine_identity().device != "cpu":
        pytest.skip("this engine build has a GPU backend")
    result = pytester.runpytest_subprocess(
        *qb_args, "--quantbench-qtypes=q8_0", "--quantbench-n-gpu-layers=99", "--collect-only"
    )
    lib = str(load_library().quantbench_path)
    said = (
        f"--quantbench-n-gpu-layers 99 has no effect: the engine build {lib} has no GPU "
        "backend, so everything runs on the CPU*"
    )
    result.stdout.fnmatch_lines([f"quantbench gpu: {said}", f"*PytestWarning: quantbench: {said}"])


def test_an_already_quantized_baseline_is_measured_through_the_file_engine(
    pytester, qb_args, synth_model, tmp_path
):
    """Item 5: a baseline of mixed quantized types (llama-quantize's Q4_K_M of the synthetic
    model): a variant keeps every other tensor's own type instead of asking llama-quantize to
    turn it back to bf16, which it refuses ("requantizing from type … is disabled")."""
    from pytest_quantbench.engine.quantize import run_llama_quantize
    from pytest_quantbench.gguf import read_model_header

    quantized = tmp_path / "synth-q4_k_m.gguf"
    run_llama_quantize(synth_model, quantized, {}, baseline_type="bf16", threads=1, preset="Q4_K_M")
    types = {t.name: t.type_name for t in read_model_header(quantized).tensors}
    assert {"q4_K", "q6_K"} <= set(types.values())
    args = [a for a in qb_args if not a.startswith("--quantbench-model=")]
    result = pytester.runpytest_subprocess(
        *args,
        f"--quantbench-model={quantized}",
        "--quantbench-qtypes=q8_0",
        "--quantbench-tensors",
        r"^blk\.0\.attn_q\.weight$",
        "-rfEs",
    )
    result.assert_outcomes(passed=1)
    row = results(pytester).iloc[0]
    assert (row["engine_mode"], row["written_type"]) == ("file", "q8_0")
    assert row["mean_kld"] > 0


def test_progress_line_counts_elapsed_and_eta():
    """Item 17: the line of a long step: done/total, elapsed, ETA; rate-limited, last one shown."""
    from pytest_quantbench import progress

    now = [100.0]
    lines: list[str] = []
    progress.set_writer(lines.append)
    try:
        step = progress.Progress("baseline", 4, clock=lambda: now[0])
        for done, t in ((1, 102.5), (2, 103.0), (3, 107.5), (4, 110.0)):
            now[0] = t
            step.update(done)
    finally:
        progress.set_writer(None)
    assert lines == [
        "quantbench baseline: 1/4 chunks, 2.5 s elapsed, ETA 7.5 s",
        "quantbench baseline: 3/4 chunks, 7.5 s elapsed, ETA 2.5 s",
        "quantbench baseline: 4/4 chunks, 10.0 s elapsed",
    ]


def test_baseline_and_imatrix_progress_on_the_terminal_and_quiet_under_q(
    pytester, qb_args, tmp_path
):
    """Item 17: without -n the baseline pass and the auto imatrix print chunks done/total on the
    terminal; -q prints none; the summary gives both durations."""
    args = [a for a in qb_args if not a.startswith("--quantbench-cache-dir=")]
    args += ["--quantbench-qtypes=iq2_kt", "--quantbench-tensors", r"^blk\.0\.attn_v\.weight$"]
    loud = pytester.runpytest_subprocess(*args, f"--quantbench-cache-dir={tmp_path / 'a'}")
    loud.assert_outcomes(passed=1)
    loud.stdout.fnmatch_lines(
        [
            "quantbench imatrix: 2/2 chunks, * s elapsed",
            "quantbench baseline: 2/2 chunks, * s elapsed",
            "baseline: Final estimate*computed once in * s)",
            "imatrix: computed in this run in * s*",
        ]
    )
    quiet = pytester.runpytest_subprocess(*args, f"--quantbench-cache-dir={tmp_path / 'b'}", "-q")
    quiet.assert_outcomes(passed=1)
    assert "chunks, " not in quiet.stdout.str()
