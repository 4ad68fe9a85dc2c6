"""Prefix reuse: tail time / full time per first layer L, on the default model (issue 12).

For each L, one process holds the full model and the header-only tail of layers L…N−1 (pointed
at the full model's weights, :mod:`pytest_quantbench.engine.tail`); the input of layer L of each
chunk is captured first (one full pass with the ``l_out-(L−1)`` nodes asked for). Then tail
decodes and full decodes are timed chunk by chunk, interleaved (the order alternated), and the
ratio is taken over the summed times (paired). Every tail's logits are checked bit for bit
against the full model's on every chunk before timing (the self-check of the item path).

The ideal share of a tail is ``(N−L)/N`` of the body plus the head (the output matmul, a fixed
share that every tail pays); the script prints the body share ``(N−L)/N`` beside each ratio.

``--items STEP`` first measures items per minute of the plugin itself: two pytest runs (one
process each, no xdist) on the same selection, every ``attn_q/k/v/output`` of every STEP-th layer
at q4_0 (STEP 1 = all 120 items of the default model), with ``--quantbench-prefix-reuse=off`` and
``=auto``, each with its own output directory (so nothing is reused) and one cache. The one-time
costs (model conversion, baseline and hidden states) are paid before, by a one-item run, and
printed apart. Printed per mode: items/min over the run's wall time and over the items' own
``seconds``, the process's peak RSS, the ``eval_path`` counts; the CSV tables of both runs must
be identical byte for byte.

    python benchmarks/bench_prefix.py [--chunks 4] [--repeats 3] [--layers 1,8,15,22,29]
                                      [--items STEP] [--skip-layers]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", default="1,8,15,22,29")
    parser.add_argument("--n-ctx", type=int, default=512)
    parser.add_argument(
        "--items",
        type=int,
        default=0,
        metavar="STEP",
        help="also time items per minute, every STEP-th layer (0: off)",
    )
    parser.add_argument(
        "--skip-layers", action="store_true", help="skip the per-layer tail/full timing"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="keep the converted default model here (default: a temp dir)",
    )
    args = parser.parse_args()
    from pytest_quantbench.engine.llama import EvalSettings, LlamaModel
    from pytest_quantbench.engine.tail import HiddenCapture, TailModel, write_tail_gguf
    from pytest_quantbench.gguf import read_header
    from pytest_quantbench.inputs import default_corpus_text, ensure_default_model
    from pytest_quantbench.runinputs import default_threads

    threads = default_threads(1)
    layers = [int(x) for x in args.layers.split(",")]
    settings = EvalSettings(n_ctx=args.n_ctx, threads=threads)
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache_dir or Path(tmp)
        path = ensure_default_model(cache, "bf16", threads)
        if args.items:
            items_per_minute(
                cache, Path(tmp), args.n_ctx, args.chunks, args.items, read_header(path).n_layer
            )
        if args.skip_layers:
            return
        header = read_header(path)
        n_layer, n_embd = header.n_layer, header.n_embd
        capture = HiddenCapture(layers, n_embd)
        with LlamaModel(path, settings, context_params_hook=capture.hook) as model:
            tokens = model.tokenize(default_corpus_text())[: args.chunks * args.n_ctx]
            chunks = tokens.reshape(args.chunks, args.n_ctx)
            hidden = {L: [] for L in layers}
            for c in chunks:
                model.eval_chunks(c[np.newaxis])
                for L, rows in capture.take().items():
                    hidden[L].append(rows.reshape(1, args.n_ctx, n_embd))
        results = {}
        with LlamaModel(path, settings) as full:
            full_logits = [full.eval_chunks(c[np.newaxis]) for c in chunks]  # also the warm-up
            for L in layers:
                start = time.perf_counter()
                tail_path = write_tail_gguf(path, L, Path(tmp) / f"tail{L}.gguf")
                with TailModel(full, tail_path, L, settings) as tail:
                    setup = time.perf_counter() - start
                    for i in range(len(chunks)):
                        got = tail.eval_hidden(hidden[L][i])
                        if not np.array_equal(got.view(np.uint32), full_logits[i].view(np.uint32)):
                            raise SystemExit(f"tail at layer {L}: logits differ on chunk {i}")
                    spent = {"tail": 0.0, "full": 0.0}
                    for r in range(args.repeats):
                        for i, c in enumerate(chunks):
                            order = ("tail", "full") if (r + i) % 2 == 0 else ("full", "tail")
                            for name in order:
                                t0 = time.perf_counter()
                                if name == "tail":
                                    tail.eval_hidden(hidden[L][i])
                                else:
                                    full.eval_chunks(c[np.newaxis])
                                spent[name] += time.perf_counter() - t0
                n = args.repeats * args.chunks
                results[L] = (
                    spent["tail"] / n,
                    spent["full"] / n,
                    setup,
                    tail_path.stat().st_blocks * 512,
                    tail_path.stat().st_size,
                )
    print(
        f"default model ({n_layer} layers, n_embd {n_embd}), n_ctx={args.n_ctx}, "
        f"{args.chunks} chunks x {args.repeats} repeats, {threads} threads; tail and full "
        "decodes interleaved chunk by chunk; logits bit-identical on every chunk"
    )
    ratios = []
    for L, (t_tail, t_full, setup, disk, apparent) in results.items():
        ratio = t_tail / t_full
        ratios.append(ratio)
        print(
            f"  L={L:2d}  tail {t_tail:6.3f} s  full {t_full:6.3f} s  tail/full {ratio:5.2f}  "
            f"(body share (N-L)/N = {(n_layer - L) / n_layer:4.2f}; tail file "
            f"{disk / 1e6:.1f} MB on disk, {apparent / 1e6:.0f} MB apparent, "
            f"written+loaded in {setup:.2f} s)"
        )
    print(
        f"  mean tail/full over these layers: {np.mean(ratios):.2f} "
        f"(ideal without head: {np.mean([(n_layer - L) / n_layer for L in layers]):.2f})"
    )
    hidden_mb = args.chunks * args.n_ctx * n_embd * 4 / 1e6
    print(
        f"  hidden states: {hidden_mb:.1f} MB per layer for {args.chunks} chunks "
        f"(layers x chunks x n_ctx x n_embd x 4 bytes)"
    )


def pytest_run(cwd: Path, args: list[str]) -> tuple[float, int, str]:
    """Run ``python -m pytest args`` in ``cwd``: (wall seconds, peak RSS in bytes of that
    process, its output). Raises SystemExit with the output when pytest fails."""
    import os
    import subprocess
    import sys

    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"pytest {' '.join(args)} failed ({proc.returncode}):\n{out[-4000:]}")
    return wall, usage.ru_maxrss * 1024, out


def items_per_minute(
    cache: Path, tmp: Path, n_ctx: int, n_chunk: int, step: int, n_layer: int
) -> None:
    """Items per minute of the plugin with ``--quantbench-prefix-reuse`` auto vs off on the same
    selection (see the module docstring); prints both, the speed-up, each run's peak RSS, and
    whether the tables are identical."""
    import pandas as pd

    layers = "|".join(str(L) for L in range(0, n_layer, step))
    common = [
        "-p",
        "no:cacheprovider",
        "-p",
        "no:randomly",
        "-q",
        f"--quantbench-cache-dir={cache}",
        f"--quantbench-ctx={n_ctx}",
        f"--quantbench-chunks={n_chunk}",
        "--quantbench-qtypes=q4_0",
        "--quantbench-tensors",
        rf"^blk\.({layers})\.attn_(q|k|v|output)\.weight$",
    ]
    # one-time costs first (model conversion, baseline, hidden states of every planned start
    # layer): one item with prefix reuse on, so both timed runs find them cached
    once, _, _ = pytest_run(
        tmp, [*common, f"--quantbench-output={tmp / 'prime'}", "-k", "layer0 and attn_q"]
    )
    runs = {}
    for mode in ("off", "auto"):
        out = tmp / mode
        wall, rss, text = pytest_run(
            tmp, [*common, f"--quantbench-output={out}", f"--quantbench-prefix-reuse={mode}"]
        )
        tidy = pd.read_csv(out / "results.csv")
        runs[mode] = (
            wall,
            rss,
            tidy,
            {
                name: (out / name).read_bytes()
                for name in ("kld_results.csv", "ppl_results.csv", "topp_results.csv")
            },
        )
        note = [line for line in text.splitlines() if line.startswith("prefix reuse")]
        print(f"  {mode}: " + ("; ".join(note) or "all items on the full model"))
    n_items = len(runs["off"][2])
    same = runs["off"][3] == runs["auto"][3]
    print(
        f"items: {n_items} (attn_q/k/v/output of every {step}. layer of {n_layer}, q4_0), "
        f"{n_chunk} chunk(s), n_ctx={n_ctx}, one pytest process each; tables identical "
        f"auto vs off: {same}; one-time model + baseline + hidden states: {once:.1f} s"
    )
    rates = {}
    for mode, (wall, rss, tidy, _) in runs.items():
        rates[mode] = (n_items / wall * 60, n_items / tidy["seconds"].sum() * 60)
        paths = tidy["eval_path"].value_counts().to_dict()
        print(
            f"  prefix reuse {mode:4s}: {rates[mode][0]:6.1f} items/min over the run's "
            f"{wall:.1f} s ({rates[mode][1]:6.1f} over the items' own seconds); peak RSS "
            f"{rss / 1e6:.0f} MB; eval_path {paths}"
        )
    print(
        f"  speed-up auto/off: {rates['auto'][0] / rates['off'][0]:.2f}x over the run, "
        f"{rates['auto'][1] / rates['off'][1]:.2f}x over the items"
    )
    if not same:
        raise SystemExit("the tables differ between prefix reuse auto and off")


if __name__ == "__main__":
    main()
