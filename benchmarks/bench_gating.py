"""Early verdicts (--quantbench-early-stop): chunks evaluated with and without, and verdict agreement.

Default: the embedded default model, every attn_q/k/v/output of all layers at q4_0, n_ctx 512,
32 chunks. Two runs in a fresh temporary folder (one pytest process, all cores):
1. the full run: every item over all chunks; its median mean KLD becomes the limit
   (``max_kld``), so about half the items fail;
2. the same items with that limit and --quantbench-early-stop (and --quantbench-rerun).
Prints the chunks evaluated by each run (target: early ≤ 0.5× full; the chunk loop waits for the
statistics at a look, so a stopped item decodes no chunk past its verdict), and the verdict
agreement: every item whose full-run mean KLD is more than 10 % from the limit must get the same
verdict; disagreements among the rest are listed.

    python benchmarks/bench_gating.py            # the figures of issue 14 (long: ~120 items)
    python benchmarks/bench_gating.py --small    # the synthetic test model, seconds
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]


def run_pytest(workdir: Path, options: list[str], *extra: str) -> tuple[float, pd.DataFrame]:
    """One pytest run in ``workdir``; returns its wall time and results.csv (this run's rows)."""
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:randomly",
        "-p",
        "no:cacheprovider",
        *options,
        *extra,
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode not in (0, 1):  # 1: some items failed their limit, as intended
        sys.exit(
            f"pytest failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}"
        )
    rows = pd.read_csv(workdir / "quantbench-results" / "results.csv")
    return wall, rows[rows["status"].isin(["passed", "failed"])].reset_index(drop=True)


def small_inputs(tmp: Path) -> list[str]:
    """The synthetic 2-layer model and the tests' corpus (n_ctx 64)."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import CORPUS_TEXT
    from synthmodel import build_synthetic_model

    model = build_synthetic_model(tmp / "synth-bf16.gguf")
    corpus = tmp / "corpus.txt"
    corpus.write_text(CORPUS_TEXT + "\n", encoding="utf-8")
    return [f"--quantbench-model={model}", f"--quantbench-corpus={corpus}", "--quantbench-ctx=64"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--small",
        action="store_true",
        help="the synthetic test model at n_ctx 64 instead of the default model",
    )
    parser.add_argument("--chunks", type=int, default=32)
    parser.add_argument("--qtype", default="q4_0")
    parser.add_argument("--tensors", default=r"^blk\.\d+\.attn_(q|k|v|output)\.weight$")
    parser.add_argument("--confidence", type=float, default=0.99)
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="keep the converted model and baselines here between invocations",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        workdir = tmp / "run"
        workdir.mkdir()
        cache = args.cache_dir or tmp / "cache"
        options = (small_inputs(tmp) if args.small else ["--quantbench-ctx=512"]) + [
            f"--quantbench-cache-dir={cache}",
            f"--quantbench-chunks={args.chunks}",
            f"--quantbench-qtypes={args.qtype}",
            "--quantbench-tensors",
            args.tensors,
        ]
        full_wall, full = run_pytest(workdir, options)
        limit = float(full["mean_kld"].median())
        limits = workdir / "limits.yaml"
        limits.write_text(f"defaults:\n  max_kld: {limit!r}\n", encoding="utf-8")
        early_wall, early = run_pytest(
            workdir,
            options,
            f"--quantbench-thresholds={limits}",
            "--quantbench-early-stop",
            f"--quantbench-early-stop-confidence={args.confidence}",
            "--quantbench-rerun",
        )
    merged = full.merge(early, on=["tensor", "qtype"], suffixes=("_full", "_early")).copy()
    n, chunks = len(merged), args.chunks
    full_chunks = int(merged["chunks_used_full"].sum())
    used = int(merged["chunks_used_early"].sum())
    stopped = merged["stopped_early_early"].astype(str) == "True"
    merged["verdict_full"] = merged["mean_kld_full"].map(lambda k: "fail" if k > limit else "pass")
    merged["verdict_early"] = merged["status_early"].map({"passed": "pass", "failed": "fail"})
    far = (merged["mean_kld_full"] - limit).abs() > 0.1 * limit
    disagree = merged[merged["verdict_full"] != merged["verdict_early"]]
    model = "synthetic test model, n_ctx 64" if args.small else "default model, n_ctx 512"
    print(
        f"{model}, {n} items ({args.tensors} at {args.qtype}), {chunks} chunks, "
        f"limit max_kld = median full-run mean KLD = {limit:.6f}, "
        f"confidence {args.confidence}"
    )
    print(f"chunks evaluated without early stop: {full_chunks:6d}  ({full_wall:7.1f} s)")
    print(
        f"chunks evaluated with early stop:    {used:6d}  ({early_wall:7.1f} s)  "
        f"ratio {used / full_chunks:.3f}x (target <= 0.5x)"
    )
    print(
        f"stopped early: {int(stopped.sum())} of {n}; at chunk counts "
        f"{merged.loc[stopped, 'chunks_used_early'].value_counts().sort_index().to_dict()}"
    )
    print(
        f"items more than 10% from the limit: {int(far.sum())}; same verdict: "
        f"{int((far & (merged['verdict_full'] == merged['verdict_early'])).sum())}"
    )
    print(
        f"verdict disagreements: {len(disagree)} "
        f"({int((far & (merged['verdict_full'] != merged['verdict_early'])).sum())} of them "
        "more than 10% from the limit)"
    )
    for _, row in disagree.iterrows():
        print(
            f"  {row['tensor']}[{row['qtype']}]: full mean KLD {row['mean_kld_full']:.6f} "
            f"({100 * (row['mean_kld_full'] / limit - 1):+.1f}% from the limit) -> "
            f"{row['verdict_full']}; early after {row['chunks_used_early']} chunks "
            f"{row['mean_kld_early']:.6f} -> {row['verdict_early']}"
        )
    ratio = merged["mean_kld_err_chunks_full"] / merged["mean_kld_err_full"]
    print(
        f"mean KLD ± chunk-level / llama-perplexity over {chunks} chunks: median "
        f"{ratio.median():.2f}x, range {ratio.min():.2f}x .. {ratio.max():.2f}x"
    )
    for _, row in merged.head(4).iterrows():
        print(
            f"  {row['tensor']}: mean KLD {row['mean_kld_full']:.4g} ± "
            f"{row['mean_kld_err_full']:.2g} (llama-perplexity) ± "
            f"{row['mean_kld_err_chunks_full']:.2g} (chunk-level)"
        )


if __name__ == "__main__":
    main()
