"""Evaluation tokens/second: our chunk loop vs a plain loop as llama-perplexity's KLD mode runs.

Plain loop: one chunk per llama_decode with logits requested for every position (what
llama-perplexity --kl-divergence does), logits copied out. Ours: LlamaModel.eval_chunk, one chunk
per decode with logits requested for the scored positions only (n_ctx/2 … n_ctx−2). Both on the
embedded default model (bf16), same context settings (flash attention on, n_ubatch 512), same
chunks; also ours plus the KLD statistics (KLDAccumulator.add_chunk) as the items run it.

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
    n = len(chunk)
    batch = model._batch
    np.ctypeslib.as_array(batch.token, shape=(n,))[:] = chunk
    if model.add_bos:
        batch.token[0] = model.bos
    np.ctypeslib.as_array(batch.pos, shape=(n,))[:] = np.arange(n, dtype=np.int32)
    np.ctypeslib.as_array(batch.n_seq_id, shape=(n,))[:] = 1
    for i in range(n):
        batch.seq_id[i][0] = 0
    np.ctypeslib.as_array(batch.logits, shape=(n,))[:] = 1
    batch.n_tokens = n
    model.lib.llama_kv_cache_clear(model._ctx)
    if model.lib.llama_decode(model._ctx, batch) != 0:
        raise RuntimeError("llama_decode failed")
    return np.ctypeslib.as_array(model.lib.llama_get_logits(model._ctx),
                                 shape=(n, model.n_vocab)).copy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    from pytest_quantbench.engine.llama import EvalSettings, LlamaModel
    from pytest_quantbench.inputs import default_corpus_text, ensure_default_model
    from pytest_quantbench.kldbase import decode_rows, encode_logits
    from pytest_quantbench.metrics import KLDAccumulator
    from pytest_quantbench.session import default_threads

    threads = default_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = ensure_default_model(Path(tmp), "bf16", threads)
        n_ctx = 512
        with LlamaModel(path, EvalSettings(n_ctx=n_ctx, threads=threads)) as model:
            tokens = model.tokenize(default_corpus_text())[: args.chunks * n_ctx]
            chunks = tokens.reshape(args.chunks, n_ctx)
            model.eval_chunk(chunks[0])  # warm-up
            first = n_ctx // 2
            base = [decode_rows(*encode_logits(model.eval_chunk(c))[:3]) for c in chunks]
            best = {"plain": np.inf, "ours": np.inf, "ours+stats": np.inf}
            for _ in range(args.repeats):
                start = time.perf_counter()
                for c in chunks:
                    plain_all_logits(model, c)
                best["plain"] = min(best["plain"], time.perf_counter() - start)
                start = time.perf_counter()
                for c in chunks:
                    model.eval_chunk(c)
                best["ours"] = min(best["ours"], time.perf_counter() - start)
                acc = KLDAccumulator()
                start = time.perf_counter()
                for c, b in zip(chunks, base):
                    acc.add_chunk(model.eval_chunk(c), b, c[first + 1:])
                best["ours+stats"] = min(best["ours+stats"], time.perf_counter() - start)
    n_tokens = args.chunks * n_ctx
    print(f"default model, n_ctx={n_ctx}, {args.chunks} chunks, {threads} threads, best of "
          f"{args.repeats}")
    for name, seconds in best.items():
        print(f"  {name:11s} {n_tokens / seconds:8.1f} tokens/s   {seconds / args.chunks:6.3f} s/chunk")
    print(f"  ours / plain: {best['plain'] / best['ours']:.2f}x;  ours with statistics / plain: "
          f"{best['plain'] / best['ours+stats']:.2f}x")


if __name__ == "__main__":
    main()
