"""Prefix reuse: tail time / full time per first layer L, on the default model (issue 12).

For each L, one process holds the full model and the header-only tail of layers L…N−1 (pointed
at the full model's weights, :mod:`pytest_quantbench.engine.tail`); the input of layer L of each
chunk is captured first (one full pass with the ``l_out-(L−1)`` nodes asked for). Then tail
decodes and full decodes are timed chunk by chunk, interleaved (the order alternated), and the
ratio is taken over the summed times (paired). Every tail's logits are checked bit for bit
against the full model's on every chunk before timing (the self-check of the item path).

The ideal share of a tail is ``(N−L)/N`` of the body plus the head (the output matmul, a fixed
share that every tail pays); the script prints the body share ``(N−L)/N`` beside each ratio.

``--items STEP`` then measures items per minute with prefix reuse vs without: every
``attn_q/k/v/output`` of every STEP-th layer at q4_0 (STEP 1 = all 120 items of the default model),
each item quantized in memory, swapped in and evaluated by the session's own chunk loop with its
KLD statistics (``measure.evaluate``), on the tail of its layer
(:func:`pytest_quantbench.prefix.evaluate_item`, tails kept in a pool of 2, items in layer order)
or on the full model. The one-time cost (baseline and hidden states in one pass) is printed
apart, and every item's statistics are checked identical in both modes. Until the session is
wired this is the item path without pytest around it.

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
    parser.add_argument("--items", type=int, default=0, metavar="STEP",
                        help="also time items per minute, every STEP-th layer (0: off)")
    parser.add_argument("--skip-layers", action="store_true",
                        help="skip the per-layer tail/full timing")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="keep the converted default model here (default: a temp dir)")
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
            items_per_minute(path, settings, Path(tmp), args.chunks, args.items)
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


def items_per_minute(path: Path, settings, tmp: Path, n_chunk: int, step: int) -> None:
    """Print items/minute with and without prefix reuse (see the module docstring)."""
    import resource

    from pytest_quantbench.baseline import RunIdentity
    from pytest_quantbench.engine.swap import SwapModel
    from pytest_quantbench.gguf import read_header
    from pytest_quantbench.inputs import default_corpus_text
    from pytest_quantbench.kldbase import expected_file_size
    from pytest_quantbench.metrics import KLDAccumulator
    from pytest_quantbench.prefix import (
        TailPool,
        ensure_baseline_and_hidden,
        evaluate_item,
        start_layer,
    )
    from pytest_quantbench.qtypes import TYPES_BY_NAME
    from pytest_quantbench.measure import ChunkBuffers, evaluate

    header = read_header(path, max_array_items=0)
    names = [f"blk.{L}.{kind}.weight" for L in range(0, header.n_layer, step)
             for kind in ("attn_q", "attn_k", "attn_v", "attn_output")]
    layers = sorted({start_layer([n]) for n in names} - {None})
    q4 = TYPES_BY_NAME["q4_0"]
    swap = SwapModel(path, settings)
    tokens = swap.model.tokenize(default_corpus_text())[: n_chunk * settings.n_ctx]
    tokens = tokens.reshape(n_chunk, settings.n_ctx)
    key = RunIdentity("bench" + "0" * 59, "corpus", settings.n_ctx, n_chunk, "bench",
                      settings.layout)
    start = time.perf_counter()
    base, hidden_size = ensure_baseline_and_hidden(
        path, settings, None, tmp, key, tokens, swap.model.n_vocab, header.n_embd, layers,
        tmp / "base.kld", expected_file_size(settings.n_ctx, swap.model.n_vocab, n_chunk))
    once = time.perf_counter() - start
    pool = TailPool(swap.model, settings, tmp, key, "bench" * 4, tokens, capacity=2)
    buffers = ChunkBuffers()
    spent, stats = {}, {}
    for mode in ("off", "on"):
        start = time.perf_counter()
        for name in names:
            t = swap.tensor(name)
            data = swap.quantize(swap.baseline_f32(name, header.tensor(name).type_name),
                                 q4.type_id, q4.row_size(t.ne[0]), q4.interleave)
            acc = KLDAccumulator()
            evaluate_item(pool if mode == "on" else None, swap,
                          {name: (q4.type_id, q4.type_size, q4.row_size(t.ne[0]), data)},
                          lambda m, acc=acc: evaluate(m, base, acc, buffers))
            stats[mode, name] = acc.kld_values.tobytes()
        spent[mode] = time.perf_counter() - start
    pool.close()
    base.close()
    swap.close()
    same = all(stats["on", n] == stats["off", n] for n in names)
    print(f"items: {len(names)} (attn_q/k/v/output of every {step}. layer, q4_0), {n_chunk} "
          f"chunks, n_ctx={settings.n_ctx}; statistics identical on/off: {same}; "
          f"off: {len(names) / spent['off'] * 60:.1f} items/min, on: "
          f"{len(names) / spent['on'] * 60:.1f} items/min, speed-up "
          f"{spent['off'] / spent['on']:.2f}x; one-time baseline + hidden states of "
          f"{len(layers)} layers ({hidden_size / 1e6:.1f} MB) {once:.1f} s; peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    if pool.off_reason:
        print(f"  prefix reuse turned itself off: {pool.off_reason}")


if __name__ == "__main__":
    main()
