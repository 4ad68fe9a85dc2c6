"""Wall time of one selection run three ways, and whether their tables are equal.

On the synthetic test model (tests/synthmodel.py; --model for another GGUF), in a fresh folder:
1. one pytest process;
2. two shards (--quantbench-shard 1/2 and 2/2), run one after the other as two batch jobs would
   run side by side, each with its own cache (each computes its baseline), then
   ``python -m pytest_quantbench merge``;
3. two simulated hosts: xdist workers ``--tx popen//chdir=HOST//env:QUANTBENCH_CACHE_DIR=…``
   (each host computes its own baseline; the controller stores the rows).
Each run starts with an empty cache, so every wall time includes its baselines. Prints the wall
time of each part and whether the merged and the two-host tables equal the single run's
(results.csv without the per-process column ``seconds``).

    python benchmarks/bench_shards.py [--chunks 4] [--ctx 64] [--tensors REGEX] [--qtypes q4_0]
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
TABLES = ("kld_results.csv", "ppl_results.csv", "topp_results.csv", "results.csv")


def timed(cmd: list[str], cwd: Path, env_cache: Path | None = None) -> float:
    import os

    env = dict(os.environ)
    if env_cache is not None:
        env["QUANTBENCH_CACHE_DIR"] = str(env_cache)
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=False, cwd=cwd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(
            f"{' '.join(cmd[:4])}… failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
            f"{proc.stderr[-2000:]}"
        )
    return wall


def tables(out: Path) -> dict[str, str]:
    from pytest_quantbench.merge import PER_PROCESS

    texts = {name: (out / name).read_text() for name in TABLES}
    tidy = pd.read_csv(out / "results.csv", dtype=str, keep_default_na=False)
    texts["results.csv"] = tidy.drop(columns=[c for c in PER_PROCESS if c in tidy]).to_csv()
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="GGUF (default: synthetic)")
    parser.add_argument("--corpus", type=Path, default=None)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--ctx", type=int, default=64)
    parser.add_argument("--tensors", default=r"blk\.")
    parser.add_argument("--qtypes", default="q4_0,q8_0")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, corpus = args.model, args.corpus
        if model is None:
            sys.path.insert(0, str(REPO / "tests"))
            from conftest import CORPUS_TEXT
            from synthmodel import build_synthetic_model

            model = build_synthetic_model(root / "synth-bf16.gguf")
            corpus = root / "corpus.txt"
            corpus.write_text((CORPUS_TEXT + "\n") * 2, encoding="utf-8")
        base = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:randomly",
            "-p",
            "no:cacheprovider",
            f"--quantbench-model={model}",
            f"--quantbench-ctx={args.ctx}",
            f"--quantbench-chunks={args.chunks}",
            f"--quantbench-qtypes={args.qtypes}",
            "--quantbench-tensors",
            args.tensors,
        ]
        if corpus is not None:
            base.append(f"--quantbench-corpus={corpus}")
        single = timed([*base, "--quantbench-output=single"], root, root / "cache-single")
        shards = [
            timed(
                [*base, f"--quantbench-shard={i}/2", f"--quantbench-output=shard{i}"],
                root,
                root / f"cache-shard{i}",
            )
            for i in (1, 2)
        ]
        merged = timed(
            [
                sys.executable,
                "-m",
                "pytest_quantbench",
                "merge",
                "shard1",
                "shard2",
                "--output",
                "merged",
            ],
            root,
        )
        tx = []
        for host in ("hostA", "hostB"):
            (root / host).mkdir()
            tx += ["--tx", f"popen//chdir={root / host}//env:QUANTBENCH_CACHE_DIR={root / host}/c"]
        hosts = timed(
            [*base, *tx, "--dist=load", "--quantbench-output=hosts"],
            root,
            root / "cache-controller",
        )
        n_items = len(pd.read_csv(root / "single" / "results.csv"))
        same_merge = tables(root / "merged") == tables(root / "single")
        same_hosts = tables(root / "hosts") == tables(root / "single")
    print(
        f"{model.name if args.model else 'synthetic model'}, n_ctx={args.ctx}, {args.chunks} "
        f"chunks, {n_items} items, each run with an empty cache (baseline included)"
    )
    print(f"single process:                 {single:7.1f} s")
    print(f"shard 1/2:                      {shards[0]:7.1f} s")
    print(f"shard 2/2:                      {shards[1]:7.1f} s")
    print(f"merge:                          {merged:7.1f} s")
    print(f"2 shards side by side (max+merge): {max(shards) + merged:4.1f} s")
    print(f"2 simulated hosts (--tx popen): {hosts:7.1f} s")
    print(f"merged tables equal the single run's: {same_merge}")
    print(f"two-host tables equal the single run's: {same_hosts}")


if __name__ == "__main__":
    main()
