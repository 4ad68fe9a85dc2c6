"""Evaluation tokens/second: our chunk loop vs a plain loop as llama-perplexity's KLD mode runs.

Plain loop: one chunk per llama_decode with logits for every position (logits_all), read where the
engine left them, as llama-perplexity --kl-divergence does when one decode holds the chunk
(perplexity.cpp: ``all_logits = num_batches > 1 ? logits.data() : llama_get_logits(ctx)``),
without a copy.
Ours: LlamaModel.eval_chunks with logits for the scored positions only (n_ctx/2 … n_ctx−2), copied
into two kept arrays in turn, as the items' loop does (the statistics of one chunk read one array
while the next chunk decodes). A third loop, "one output", decodes each chunk with a single output
row: a lower bound for any loop that decodes every position. These three are timed chunk by
chunk, interleaved (the order rotated), and their ratios are taken over the summed times of all
repeats (paired). All on the embedded default model (bf16), one process, same context settings
(flash attention on, ik's default; n_ubatch 512), same chunks.

Timed after them, not interleaved: the items' own chunk loop with the KLD statistics
(measure.evaluate against a base file, statistics overlapped with the next decode), and
--quantbench-n-seq 2 and 4 (several chunks per decode into kept arrays; flash attention off, as the
session sets it on the CPU). Every ratio printed is a speed ratio (the other loop's time / this
loop's time): above 1 is faster.

    python benchmarks/bench_eval.py [--chunks 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def plain_all_logits(model, chunk: np.ndarray) -> np.ndarray:
    """Decode one chunk requesting logits at every position; return a view of them (C, V)
    float32 in the engine's own buffer, as llama-perplexity's KLD mode reads them."""
    model.decode_all_outputs(chunk)
    return np.ctypeslib.as_array(
        model.lib.llama_get_logits(model._ctx), shape=(len(chunk), model.n_vocab)
    )


def ours_in_turn(model):
    """Our loop's decode of k ≤ n_seq chunks (k, C): scored logits only, copied into two kept
    arrays in turn, as the items' loop does."""
    from pytest_quantbench.engine.llama import scored_range

    n_scored = scored_range(model.settings.n_ctx)[1]
    kept = [np.empty((model.settings.n_seq, n_scored, model.n_vocab), np.float32) for _ in range(2)]
    turn = [0]

    def decode(group: np.ndarray) -> np.ndarray:
        turn[0] ^= 1
        return model.eval_chunks(group, out=kept[turn[0]][: len(group)])

    return decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    from pytest_quantbench.baseline import write_baseline
    from pytest_quantbench.engine.llama import EvalSettings, LlamaModel
    from pytest_quantbench.inputs import default_corpus_text, ensure_default_model
    from pytest_quantbench.kldbase import KLDBaseFile
    from pytest_quantbench.measure import ChunkBuffers, evaluate
    from pytest_quantbench.metrics import KLDAccumulator
    from pytest_quantbench.runinputs import default_threads

    threads = default_threads(1)
    n_ctx = 512
    spent: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = ensure_default_model(Path(tmp), "bf16", threads)
        with LlamaModel(path, EvalSettings(n_ctx=n_ctx, threads=threads)) as model:
            tokens = model.tokenize(default_corpus_text())[: args.chunks * n_ctx]
            chunks = tokens.reshape(args.chunks, n_ctx)
            write_baseline(model, chunks, Path(tmp) / "base.kld")  # also the warm-up
            base = KLDBaseFile(Path(tmp) / "base.kld")
            ours = ours_in_turn(model)
            loops = {
                "plain": lambda c: plain_all_logits(model, c),
                "ours": lambda c: ours(c[np.newaxis]),
                "one output": lambda c: model._decode(c[np.newaxis], n_ctx - 2, 1),
            }
            for loop in loops.values():
                loop(chunks[0])  # first use of each loop's arrays
            spent = dict.fromkeys([*loops, "ours+stats"], 0.0)
            buffers = ChunkBuffers()  # kept across repeats, as a session keeps them across items
            for r in range(args.repeats):
                # chunk by chunk, rotating which loop goes first, so that drift in the machine's
                # speed hits all alike
                names = list(loops)
                for i, c in enumerate(chunks):
                    k = (r * args.chunks + i) % len(names)
                    for name in names[k:] + names[:k]:
                        start = time.perf_counter()
                        loops[name](c)
                        spent[name] += time.perf_counter() - start
                start = time.perf_counter()
                evaluate(model, base, KLDAccumulator(), buffers)
                spent["ours+stats"] += time.perf_counter() - start
            base.close()
        for n_seq in (2, 4):
            name = f"n_seq={n_seq}"
            spent[name] = 0.0
            settings = EvalSettings(n_ctx=n_ctx, threads=threads, n_seq=n_seq, flash_attn=False)
            with LlamaModel(path, settings) as model:
                ours = ours_in_turn(model)
                for _ in range(2):
                    ours(chunks[:n_seq])  # warm-up, first use of both arrays
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    for i in range(0, args.chunks, n_seq):
                        ours(chunks[i : i + n_seq])
                    spent[name] += time.perf_counter() - start
    n_tokens = args.chunks * n_ctx * args.repeats
    print(
        f"default model, n_ctx={n_ctx}, {args.chunks} chunks x {args.repeats} repeats, "
        f"{threads} threads; plain, ours and one output interleaved chunk by chunk"
    )
    for name, seconds in spent.items():
        print(
            f"  {name:11s} {n_tokens / seconds:8.1f} tokens/s   "
            f"{seconds / (args.chunks * args.repeats):6.3f} s/chunk"
        )
    speed = {name: spent["plain"] / seconds for name, seconds in spent.items()}
    print(
        f"  speed vs plain: ours {speed['ours']:.2f}x (a loop that decodes every position: at "
        f"most {speed['one output']:.2f}x, one output's);  ours with statistics "
        f"{speed['ours+stats']:.2f}x;  n_seq 2, 4: {speed['n_seq=2']:.2f}x, "
        f"{speed['n_seq=4']:.2f}x (vs ours: {spent['ours'] / spent['n_seq=2']:.2f}x, "
        f"{spent['ours'] / spent['n_seq=4']:.2f}x)"
    )


if __name__ == "__main__":
    main()
