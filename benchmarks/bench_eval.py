"""Evaluation tokens/second: our chunk loop vs a plain loop as llama-perplexity's KLD mode runs.

Plain loop: one chunk per llama_decode with logits requested for every position (what
llama-perplexity --kl-divergence does), logits copied out. Ours: LlamaModel.eval_chunk, one chunk
per decode with logits requested for the scored positions only (n_ctx/2 … n_ctx−2); the two are
timed chunk by chunk, interleaved. Both on the embedded default model (bf16), same context
settings (flash attention on, n_ubatch 512), same chunks; also the items' own chunk loop with the
KLD statistics (QuantbenchSession._evaluate against a base file, statistics overlapped with the
next decode), and --quantbench-n-seq 2 and 4 (several chunks per decode; flash attention off, as
the session sets it on the CPU).

    python benchmarks/bench_eval.py [--chunks 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def plain_all_logits(model, chunk: np.ndarray) -> np.ndarray:
    """Decode one chunk requesting logits at every position; return them (C, V) float32."""
    model.decode_all_outputs(chunk)
    return np.ctypeslib.as_array(model.lib.llama_get_logits(model._ctx),
                                 shape=(len(chunk), model.n_vocab)).copy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    from pytest_quantbench.baseline import write_baseline
    from pytest_quantbench.engine.llama import EvalSettings, LlamaModel
    from pytest_quantbench.inputs import default_corpus_text, ensure_default_model
    from pytest_quantbench.kldbase import KLDBaseFile
    from pytest_quantbench.metrics import KLDAccumulator
    from pytest_quantbench.session import QuantbenchSession, default_threads

    threads = default_threads(1)
    n_ctx = 512
    best = {"plain": np.inf, "ours": np.inf, "ours+stats": np.inf}
    with tempfile.TemporaryDirectory() as tmp:
        path = ensure_default_model(Path(tmp), "bf16", threads)
        with LlamaModel(path, EvalSettings(n_ctx=n_ctx, threads=threads)) as model:
            tokens = model.tokenize(default_corpus_text())[: args.chunks * n_ctx]
            chunks = tokens.reshape(args.chunks, n_ctx)
            write_baseline(model, chunks, Path(tmp) / "base.kld")  # also the warm-up
            base = KLDBaseFile(Path(tmp) / "base.kld")
            loops = {"plain": lambda c: plain_all_logits(model, c), "ours": model.eval_chunk}
            for _ in range(args.repeats):
                # chunk by chunk, alternating which loop goes first, so that drift in the
                # machine's speed hits both alike
                spent = dict.fromkeys(loops, 0.0)
                for i, c in enumerate(chunks):
                    for name in sorted(loops, reverse=bool(i % 2)):
                        start = time.perf_counter()
                        loops[name](c)
                        spent[name] += time.perf_counter() - start
                for name, seconds in spent.items():
                    best[name] = min(best[name], seconds)
                start = time.perf_counter()
                QuantbenchSession._evaluate(model, base, KLDAccumulator())
                best["ours+stats"] = min(best["ours+stats"], time.perf_counter() - start)
            base.close()
        for n_seq in (2, 4):
            name = f"n_seq={n_seq}"
            best[name] = np.inf
            settings = EvalSettings(n_ctx=n_ctx, threads=threads, n_seq=n_seq, flash_attn=False)
            with LlamaModel(path, settings) as model:
                model.eval_chunks(chunks[:n_seq])  # warm-up
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    for i in range(0, args.chunks, n_seq):
                        model.eval_chunks(chunks[i:i + n_seq])
                    best[name] = min(best[name], time.perf_counter() - start)
    n_tokens = args.chunks * n_ctx
    print(f"default model, n_ctx={n_ctx}, {args.chunks} chunks, {threads} threads, best of "
          f"{args.repeats}")
    for name, seconds in best.items():
        print(f"  {name:11s} {n_tokens / seconds:8.1f} tokens/s   {seconds / args.chunks:6.3f} s/chunk")
    print(f"  ours / plain: {best['plain'] / best['ours']:.2f}x;  ours with statistics / plain: "
          f"{best['plain'] / best['ours+stats']:.2f}x;  n_seq 2, 4 / ours: "
          f"{best['ours'] / best['n_seq=2']:.2f}x, {best['ours'] / best['n_seq=4']:.2f}x")


if __name__ == "__main__":
    main()
