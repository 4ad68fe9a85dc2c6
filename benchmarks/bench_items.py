"""Items per minute, baseline time and baseline cache size on the embedded default model.

Runs the plugin twice in a fresh temporary folder (one pytest process, all cores):
1. a cold run: converts the default model to bf16, computes the baseline logits, measures the items;
2. a warm run of the same items with --quantbench-rerun: the cached baseline is reused and every
   item is measured again, so its wall time is item work only;
3. a plain rerun: every item comes from the results store (resume), nothing is measured.
Prints the figures measured in this one invocation.

    python benchmarks/bench_items.py [--chunks 4] [--tensors REGEX] [--qtypes q8_0,q4_0]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_pytest(
    workdir: Path, cache: Path, args: argparse.Namespace, *extra: str
) -> tuple[float, int]:
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:randomly",
        "-p",
        "no:cacheprovider",
        f"--quantbench-cache-dir={cache}",
        f"--quantbench-chunks={args.chunks}",
        f"--quantbench-qtypes={args.qtypes}",
        "--quantbench-tensors",
        args.tensors,
        *extra,
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(
            f"pytest failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}"
        )
    rows = (workdir / "quantbench-results" / "results.csv").read_text().splitlines()
    return wall, len(rows) - 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--tensors", default=r"^blk\.(0|10|20)\.attn_(q|k|v|output)\.weight$")
    parser.add_argument("--qtypes", default="q8_0,q4_0")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir, cache = Path(tmp) / "run", Path(tmp) / "cache"
        workdir.mkdir()
        cold, n_items = run_pytest(workdir, cache, args)
        warm, _ = run_pytest(workdir, cache, args, "--quantbench-rerun")
        reused, _ = run_pytest(workdir, cache, args)
        facts = json.loads(next((cache / "baselines").glob("*.kld.json")).read_text())
    print(f"default model, n_ctx=512, {args.chunks} chunks, {n_items} items, one process")
    print(f"cold run (convert + baseline + items): {cold:8.1f} s")
    print(f"warm run (items only, cached baseline): {warm:8.1f} s")
    print(f"items per minute (warm):                {60 * n_items / warm:8.2f}")
    print(f"seconds per item (warm):                {warm / n_items:8.2f}")
    print(f"rerun, every item reused from the store: {reused:8.1f} s ({warm / reused:.0f}x faster)")
    print(f"baseline time:                          {facts['seconds']:8.1f} s")
    print(f"baseline cache size:                    {facts['bytes'] / 1e6:8.1f} MB")
    print(f"baseline: {facts['final_estimate']}")


if __name__ == "__main__":
    main()
