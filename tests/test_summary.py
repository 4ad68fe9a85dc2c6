"""summary.md: settings, worst items, failures, skips by reason, pictures; $GITHUB_STEP_SUMMARY."""

from __future__ import annotations

from pytest_quantbench.summary import write_summary

ROWS = [
    {
        "tensor": "blk.0.attn_q.weight",
        "qtype": "q4_0",
        "status": "passed",
        "mean_kld": 0.01,
        "mean_kld_err": 0.001,
        "written_type": "q4_0",
    },
    {
        "tensor": "blk.0.attn_k.weight",
        "qtype": "q4_0",
        "status": "failed",
        "mean_kld": 0.2,
        "written_type": "q4_0",
        "reason": "mean KLD 0.2 > max_kld 0.05 | rule 1",
    },
    {
        "tensor": "blk.1.attn_k.weight",
        "qtype": "q4_K",
        "status": "skipped",
        "reason": "llama-quantize writes q5_0 instead of q4_K",
    },
    {
        "tensor": "blk.1.attn_q.weight",
        "qtype": "q4_K",
        "status": "skipped",
        "reason": "llama-quantize writes q5_0 instead of q4_K",
    },
    {
        "tensor": "blk.1.attn_v.weight",
        "qtype": "iq1_s",
        "status": "skipped",
        "reason": "iq1_s needs an importance matrix",
    },
]


def test_summary_sections_and_step_summary(tmp_path):
    step = tmp_path / "step.md"
    step.write_text("earlier step\n")
    path = write_summary(
        ROWS,
        tmp_path,
        ["model: synth.gguf", "n_ctx 64, 2 chunks"],
        [tmp_path / "heatmap-q4_0.png"],
        top=1,
        step_summary=str(step),
    )
    text = path.read_text()
    assert "- model: synth.gguf" in text
    worst = text.split("## Worst 1 items by mean KLD")[1].split("##")[0]
    assert "`blk.0.attn_k.weight[q4_0]`" in worst and "attn_q" not in worst
    failures = text.split("## Failures and errors")[1].split("##")[0]
    assert "failed" in failures and "max_kld 0.05 \\| rule 1" in failures
    assert "| 2 | llama-quantize writes q5_0 instead of q4_K |" in text
    assert "| 1 | iq1_s needs an importance matrix |" in text
    assert "![heatmap-q4_0](heatmap-q4_0.png)" in text
    assert step.read_text() == "earlier step\n" + text


def test_no_step_summary_and_no_failures(tmp_path):
    text = write_summary(ROWS[:1], tmp_path, []).read_text()
    assert "## Failures and errors\n\nnone" in text and "Skips" not in text
    assert "Pictures" not in text
