"""In-process swap vs llama-quantize file path: items/minute and per-item time outside evaluation.

For each model, the same items are measured by both engines through QuantbenchSession.measure,
interleaved item by item (after one uncounted warm-up item each), with --quantbench-rerun so the
results store never serves an item;
time inside evaluation (decode + statistics) is taken from the session's chunk loop, and the rest
of the item's wall time is "outside evaluation" (quantize, write/load or swap/restore).
Models: the embedded default (n_ctx 512, --chunks chunks) and two synthetic bf16 models with the
same tensor shapes but different sizes (default about 0.25 GB and 1 GB; n_ctx 128, 1 chunk), so
the outside-evaluation cost is seen to follow the tensor, not the model.
Also prints the worker's peak RSS after --rss-items in-process items on the default model.

    python benchmarks/bench_engines.py [--chunks 4] [--items 8] [--rss-items 50]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def make_session(
    model: Path | None, corpus: Path | None, ctx: int, chunks: int, engine: str, cache: Path
):
    from pytest_quantbench.config import build_config
    from pytest_quantbench.session import QuantbenchSession

    cli = {
        "quantbench_model": str(model) if model else None,
        "quantbench_corpus": str(corpus) if corpus else None,
        "quantbench_ctx": ctx,
        "quantbench_chunks": chunks,
        "quantbench_qtypes": ["q4_0"],
        "quantbench_engine": engine,
        "quantbench_cache_dir": str(cache),
        # every item is measured (no reuse from the results store), stored under the cache
        "quantbench_rerun": True,
        "quantbench_output": str(cache / "results"),
    }
    config = build_config(
        cli.get,
        lambda _: None,
        invocation_dir=Path.cwd(),
        ini_dir=Path.cwd(),
        config_file=None,
        default_config_file=None,
    )
    return QuantbenchSession(config, cache)


def timed_item(session, unit) -> tuple[float, float]:
    """Wall time and outside-evaluation time (s) of one item measured by ``session``."""
    from pytest_quantbench import measure

    inside = [0.0]
    evaluate = measure.evaluate

    def timed_evaluate(*args):
        start = time.perf_counter()
        evaluate(*args)
        inside[0] += time.perf_counter() - start

    measure.evaluate = timed_evaluate  # both measuring paths call it through the module
    try:
        start = time.perf_counter()
        session.measure(unit, session.identity_row(unit))
        wall = time.perf_counter() - start
    finally:
        measure.evaluate = evaluate
    return wall, wall - inside[0]


def compare(label: str, model, corpus, ctx: int, chunks: int, units, cache: Path) -> dict:
    """Both engines on the same items, interleaved (file, in-process, file, …) so that drift in
    the machine's speed hits both alike; each engine first measures one warm-up item (its model
    load and the kernel check of the type) that is not counted."""
    sessions = {e: make_session(model, corpus, ctx, chunks, e, cache) for e in ("file", "inplace")}
    _ = sessions["file"].baseline  # computed once, outside the timed items
    for session in sessions.values():
        timed_item(session, units[0])
    times = {e: [] for e in sessions}
    for unit in units:
        for engine, session in sessions.items():
            times[engine].append(timed_item(session, unit))
    for session in sessions.values():
        session.close()
    results = {
        e: (sum(w for w, _ in t) / len(t), sum(o for _, o in t) / len(t)) for e, t in times.items()
    }
    (fw, fo), (iw, io) = results["file"], results["inplace"]
    print(f"{label}: {len(units)} items per engine, interleaved, n_ctx={ctx}, {chunks} chunk(s)")
    for engine, (w, o) in results.items():
        print(
            f"  {engine:8s} items/min {60 / w:7.2f}   per item {w:7.3f} s   outside evaluation "
            f"{o:7.3f} s ({100 * o / w:5.1f} % of the item)"
        )
    print(
        f"  items/min in-process / file: {fw / iw:5.2f}x;  outside-evaluation time file / "
        f"in-process: {fo / io:6.1f}x"
    )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--items", type=int, default=8)
    parser.add_argument("--rss-items", type=int, default=50)
    parser.add_argument("--big-layers", type=int, default=11, help="layers of the ~1 GB model")
    args = parser.parse_args()
    from pytest_quantbench.measure import WorkUnit
    from synthmodel import build_synthetic_model

    def units(names):
        return [WorkUnit(n, (n,), "q4_0") for n in names][: args.items]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = tmp / "cache"
        # first, so that the peak RSS is this loop's, not the larger models' below
        session = make_session(None, None, 128, 1, "inplace", cache)
        names = [f"blk.{i}.attn_{k}.weight" for i in range(30) for k in ("q", "k", "v", "output")]
        _ = session.baseline
        rss = []
        for i in range(args.rss_items):
            unit = WorkUnit(names[i % len(names)], (names[i % len(names)],), "q4_0")
            session.measure(unit, session.identity_row(unit))
            rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6)
        model_gb = session.model_path.stat().st_size / 1e9
        session.close()
        print(
            f"peak RSS over {args.rss_items} in-process items (default model {model_gb:.2f} GB, "
            f"n_ctx 128, 1 chunk): after item 1 {rss[0]:.2f} GB, after item 10 {rss[9]:.2f} GB, "
            f"after item {args.rss_items} {rss[-1]:.2f} GB"
        )
        compare(
            "default model (SmolLM2-135M bf16, 270 MB)",
            None,
            None,
            512,
            args.chunks,
            units([f"blk.{i}.attn_q.weight" for i in range(0, 30, 4)]),
            cache,
        )
        corpus = tmp / "corpus.txt"
        corpus.write_text("the model reads this text and predicts the next token. " * 400)
        for layers in (2, args.big_layers):
            path = build_synthetic_model(
                tmp / f"synth-{layers}.gguf",
                n_layer=layers,
                n_embd=2048,
                n_ff=5632,
                n_head=16,
                n_head_kv=4,
                n_ctx_train=512,
            )
            size = path.stat().st_size / 1e9
            compare(
                f"synthetic {layers} layers ({size:.2f} GB)",
                path,
                corpus,
                128,
                1,
                units([f"blk.{i}.attn_q.weight" for i in (0, 1, 0, 1)] * 2),
                cache,
            )
            path.unlink()


if __name__ == "__main__":
    main()
