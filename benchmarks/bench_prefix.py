"""Prefix reuse: tail time / full time per first layer L, on the default model (issue 12).

For each L, one process holds the full model and the header-only tail of layers L…N−1 (pointed
at the full model's weights, :mod:`pytest_quantbench.engine.tail`); the input of layer L of each
chunk is captured first (one full pass with the ``l_out-(L−1)`` nodes asked for). Then tail
decodes and full decodes are timed chunk by chunk, interleaved (the order alternated), and the
ratio is taken over the summed times (paired). Every tail's logits are checked bit for bit
against the full model's on every chunk before timing (the self-check of the item path).

The ideal share of a tail is ``(N−L)/N`` of the body plus the head (the output matmul, a fixed
share that every tail pays); the script prints the body share ``(N−L)/N`` beside each ratio.

Items per minute with prefix reuse vs without needs the item path wired (session); until then
``--items`` is not available and the script prints the per-layer part only.

    python benchmarks/bench_prefix.py [--chunks 4] [--repeats 3] [--layers 1,8,15,22,29]
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
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="keep the converted default model here (default: a temp dir)")
    args = parser.parse_args()
    from pytest_quantbench.engine.llama import EvalSettings, LlamaModel
    from pytest_quantbench.engine.tail import HiddenCapture, TailModel, write_tail_gguf
    from pytest_quantbench.gguf import read_header
    from pytest_quantbench.inputs import default_corpus_text, ensure_default_model
    from pytest_quantbench.session import default_threads

    threads = default_threads(1)
    layers = [int(x) for x in args.layers.split(",")]
    settings = EvalSettings(n_ctx=args.n_ctx, threads=threads)
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache_dir or Path(tmp)
        path = ensure_default_model(cache, "bf16", threads)
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
                    for i, c in enumerate(chunks):
                        got = tail.eval_hidden(hidden[L][i])
                        if not np.array_equal(got.view(np.uint32),
                                              full_logits[i].view(np.uint32)):
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
                results[L] = (spent["tail"] / n, spent["full"] / n, setup,
                              tail_path.stat().st_blocks * 512, tail_path.stat().st_size)
    print(f"default model ({n_layer} layers, n_embd {n_embd}), n_ctx={args.n_ctx}, "
          f"{args.chunks} chunks x {args.repeats} repeats, {threads} threads; tail and full "
          "decodes interleaved chunk by chunk; logits bit-identical on every chunk")
    ratios = []
    for L, (t_tail, t_full, setup, disk, apparent) in results.items():
        ratio = t_tail / t_full
        ratios.append(ratio)
        print(f"  L={L:2d}  tail {t_tail:6.3f} s  full {t_full:6.3f} s  tail/full {ratio:5.2f}  "
              f"(body share (N-L)/N = {(n_layer - L) / n_layer:4.2f}; tail file "
              f"{disk / 1e6:.1f} MB on disk, {apparent / 1e6:.0f} MB apparent, "
              f"written+loaded in {setup:.2f} s)")
    print(f"  mean tail/full over these layers: {np.mean(ratios):.2f} "
          f"(ideal without head: {np.mean([(n_layer - L) / n_layer for L in layers]):.2f})")
    hidden_mb = args.chunks * args.n_ctx * n_embd * 4 / 1e6
    print(f"  hidden states: {hidden_mb:.1f} MB per layer for {args.chunks} chunks "
          f"(layers x chunks x n_ctx x n_embd x 4 bytes)")


if __name__ == "__main__":
    main()
