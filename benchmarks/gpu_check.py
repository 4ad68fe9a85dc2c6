"""The device check of a CUDA build (run by benchmarks/gpu_check.sh; see README "GPU builds").

Steps, all with every layer offloaded (--quantbench-n-gpu-layers=999), no network:
(a) the default model: in-process vs file engine statistics, bit-identical, for q4_0, q8_0,
    iq4_ks, q6_K, iq2_kt (auto imatrix) and q4_0_r8 (no CUDA matmul: its engine_note says so);
(b) a restored model's logits equal the baseline's, bit for bit (private device buffers);
(c) items/minute in-process vs file on a synthetic model of random bf16 weights (>= 2 GB);
(d) decode tokens/s of the default model and the large one (512-token chunks).
Prints one table. ``--dry-run`` prints what it would run and loads nothing.

    python benchmarks/gpu_check.py [--dry-run] [--out DIR] [--chunks 8] [--big-layers 6]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

QTYPES_A = "q4_0,q8_0,iq4_ks,q6_K,iq2_kt,q4_0_r8"
# attn_v: ne0 576 (CUDA pads 448 columns), ffn_down: ne0 1536 (the 256-block types)
TENSORS_A = r"blk\.(3|12)\.(attn_v|ffn_down)\.weight"
QTYPES_C = "q4_0,q8_0"
TENSORS_C = r"blk\.(0|1|2)\.(attn_v|ffn_down)\.weight"
BIG = {
    "n_embd": 4096,
    "n_ff": 11008,
    "n_head": 32,
    "n_head_kv": 8,
}  # about 386 MB of bf16 per layer
METRIC_PREFIXES = ("ppl", "kld", "mean_", "median_", "max_", "min_", "dp_", "rms", "same")


def pytest_cmd(cache: Path, chunks: int, qtypes: str, tensors: str, *extra: str) -> list[str]:
    """One plugin run on the GPU (every layer offloaded)."""
    from importlib.metadata import entry_points

    registered = any(e.value == "pytest_quantbench.plugin" for e in entry_points(group="pytest11"))
    load = [] if registered else ["-p", "pytest_quantbench.plugin"]  # not pip-installed
    return [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:randomly",
        "-p",
        "no:cacheprovider",
        *load,
        f"--quantbench-cache-dir={cache}",
        f"--quantbench-chunks={chunks}",
        "--quantbench-n-gpu-layers=999",
        f"--quantbench-qtypes={qtypes}",
        "--quantbench-tensors",
        tensors,
        *extra,
    ]


def plan(args) -> list[tuple[str, str, list[str]]]:
    """(step, what it checks, command) for every plugin run of the check."""
    out = Path(args.out)
    big = out / "big-bf16.gguf"
    model = [f"--quantbench-model={Path(args.model).resolve()}"] if args.model else []
    helper = [f"--out={out}", *([f"--model={Path(args.model).resolve()}"] if args.model else [])]
    return [
        (
            "(a)",
            "default model, file engine",
            pytest_cmd(
                out / "cache",
                args.chunks,
                QTYPES_A,
                args.tensors,
                "--quantbench-imatrix=auto",
                "--quantbench-engine=file",
                *model,
            ),
        ),
        (
            "(a)",
            "default model, in-process engine on device memory (compare: bit-identical)",
            pytest_cmd(
                out / "cache",
                args.chunks,
                QTYPES_A,
                args.tensors,
                "--quantbench-imatrix=auto",
                "--quantbench-engine=inplace",
                "--quantbench-rerun",
                *model,
            ),
        ),
        (
            "(b)",
            "restore: baseline logits == logits after swap + restore (q4_0, q6_K, iq4_ks)",
            [sys.executable, __file__, "--step-b", *helper],
        ),
        (
            "(c)",
            f"synthetic model {big} ({args.big_layers} layers), file engine",
            pytest_cmd(
                out / "cache",
                1,
                QTYPES_C,
                TENSORS_C,
                f"--quantbench-model={big}",
                f"--quantbench-corpus={out / 'corpus.txt'}",
                "--quantbench-ctx=512",
                "--quantbench-engine=file",
            ),
        ),
        (
            "(c)",
            "same items, in-process engine",
            pytest_cmd(
                out / "cache",
                1,
                QTYPES_C,
                TENSORS_C,
                f"--quantbench-model={big}",
                f"--quantbench-corpus={out / 'corpus.txt'}",
                "--quantbench-ctx=512",
                "--quantbench-engine=inplace",
                "--quantbench-rerun",
            ),
        ),
        (
            "(d)",
            "decode tokens/s, default and synthetic model, 512-token chunks",
            [sys.executable, __file__, "--step-d", *helper],
        ),
    ]


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'src'}:{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, check=False)
    print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", flush=True)
    return proc


def results(workdir: Path):
    import pandas as pd

    return pd.read_csv(workdir / "quantbench-results" / "results.csv")


def compare_engines(file_rows, inplace_rows) -> tuple[str, str]:
    """(verdict, detail) of two results tables of the same items."""
    key = ["tensor", "qtype"]
    f = file_rows.sort_values(key).reset_index(drop=True)
    i = inplace_rows.sort_values(key).reset_index(drop=True)
    metrics = [c for c in f.columns if c.startswith(METRIC_PREFIXES)]
    if list(f[key].itertuples(index=False)) != list(i[key].itertuples(index=False)):
        return "FAIL", "the engines measured different items"
    same = (f[metrics].values == i[metrics].values) | (
        f[metrics].isna().values & i[metrics].isna().values
    )
    notes = "; ".join(sorted({str(n) for n in i.get("engine_note", []) if isinstance(n, str)}))
    bad = [
        f"{t}[{q}]"
        for (t, q), ok in zip(f[key].itertuples(index=False), same.all(axis=1), strict=True)
        if not ok
    ]
    modes = ",".join(sorted(set(i["engine_mode"])))
    detail = f"{len(f)} items, {len(metrics)} statistics, in-process rows: {modes}; {notes}"
    return ("bit-identical" if not bad else "FAIL " + ",".join(bad)), detail


def items_per_minute(rows) -> float:
    return 60.0 / float(rows["seconds"].mean())


def step_b(out: Path, model: Path | None) -> None:
    """Swap three types into the last ffn_down of the model on the GPU, restore, compare."""
    import numpy as np

    from pytest_quantbench.engine.llama import EvalSettings
    from pytest_quantbench.engine.swap import SwapModel
    from pytest_quantbench.gguf import read_model_header
    from pytest_quantbench.inputs import ensure_default_model
    from pytest_quantbench.qtypes import resolve_qtype

    model = model or ensure_default_model(out / "cache", "bf16", os.cpu_count() or 1)
    swap = SwapModel(model, EvalSettings(n_ctx=512, threads=os.cpu_count() or 1, n_gpu_layers=999))
    name = [t.name for t in read_model_header(model).tensors if "ffn_down" in t.name][-1]
    tokens = (np.arange(512, dtype=np.int32) * 31) % swap.model.n_vocab
    base = swap.model.eval_chunk(tokens)
    host = swap._host(swap.tensor(name))
    ok = True
    for q in ("q4_0", "q6_K", "iq4_ks"):
        t = resolve_qtype(q).ggml_type
        ne0 = int(swap.tensor(name).ne[0])
        data = swap.quantize(
            swap.baseline_f32(name, "bf16"), t.type_id, t.row_size(ne0), t.interleave
        )
        with swap.swapped({name: (t.type_id, t.type_size, t.row_size(ne0), data)}):
            changed = not np.array_equal(swap.model.eval_chunk(tokens), base)
        ok &= changed and np.array_equal(swap.model.eval_chunk(tokens), base)
    swap.close()
    print(
        f"STEP-B {'bit-identical' if ok else 'FAIL'} "
        f"{'host pointer swap' if host else 'private device buffers'}"
    )


def step_d(out: Path, model: Path | None, big: Path) -> None:
    """Tokens/s of 512-token chunks (8 decodes after one warm-up) on each model."""
    import numpy as np

    from pytest_quantbench.engine.llama import EvalSettings, LlamaModel
    from pytest_quantbench.inputs import ensure_default_model

    default = model or ensure_default_model(out / "cache", "bf16", os.cpu_count() or 1)
    for label, path in (("model", default), ("synthetic", big)):
        with LlamaModel(
            path, EvalSettings(n_ctx=512, threads=os.cpu_count() or 1, n_gpu_layers=999)
        ) as llama:
            tokens = (np.arange(512, dtype=np.int32) * 7) % llama.n_vocab
            llama.eval_chunk(tokens)
            start = time.perf_counter()
            for _ in range(8):
                llama.eval_chunk(tokens)
            print(f"STEP-D {label} {8 * 512 / (time.perf_counter() - start):.0f}")


def build_big(out: Path, layers: int, n_embd: int) -> Path:
    from conftest import CORPUS_TEXT
    from synthmodel import build_synthetic_model

    big = out / "big-bf16.gguf"
    if not big.exists():
        build_synthetic_model(
            big,
            n_layer=layers,
            n_ctx_train=1024,
            **{**BIG, "n_embd": n_embd, "n_ff": 256 * max(1, round(n_embd * 11008 / 4096 / 256))},
        )
    (out / "corpus.txt").write_text((CORPUS_TEXT + "\n") * 8, encoding="utf-8")
    return big


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    parser.add_argument("--out", default="gpu-check")
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument(
        "--model",
        default=None,
        help="GGUF for (a), (b), (d) instead of the "
        "default model (e.g. a synthetic one for a CPU smoke run)",
    )
    parser.add_argument("--tensors", default=TENSORS_A, help="tensors of (a) (regex)")
    parser.add_argument(
        "--big-layers",
        type=int,
        default=6,
        help="layers of the synthetic model (6: about 2.3 GB of bf16)",
    )
    parser.add_argument("--big-embd", type=int, default=BIG["n_embd"], help="its n_embd (4096)")
    parser.add_argument("--only", default="abcd", help="steps to run, e.g. 'bd'")
    parser.add_argument("--step-b", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--step-d", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.out).resolve()
    args.out = str(out)
    model = Path(args.model).resolve() if args.model else None
    if args.step_b:
        step_b(out, model)
        return 0
    if args.step_d:
        step_d(out, model, out / "big-bf16.gguf")
        return 0
    steps = [s for s in plan(args) if s[0].strip("()") in args.only]
    if args.dry_run:
        print(f"engine library: {os.environ.get('IK_LLAMA_CPP_LIB_PATH', 'the installed wheel')}")
        if "c" in args.only:
            print(
                f"would build the synthetic model {out / 'big-bf16.gguf'} "
                f"({args.big_layers} layers, n_embd {args.big_embd})"
            )
        for step, what, cmd in steps:
            print(f"{step} would run: {what}\n    {' '.join(cmd)}")
        return 0
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    rows = []
    if "a" in args.only:
        a_file, a_inplace = (run(cmd, out / f"a_{i}") for i, (_, _, cmd) in enumerate(steps[:2]))
        if a_file.returncode == 0 and a_inplace.returncode == 0:
            file_rows, inplace_rows = results(out / "a_0"), results(out / "a_1")
            rows.append(
                ("(a) in-process vs file statistics", *compare_engines(file_rows, inplace_rows))
            )
            speed = (
                f"file {items_per_minute(file_rows):.1f}, "
                f"in-process {items_per_minute(inplace_rows):.1f}"
            )
            rows.append(("(a) items/min", speed, ""))
        else:
            rows.append(("(a) in-process vs file statistics", "FAIL", "a plugin run failed"))
    if "b" in args.only:
        b = run(next(cmd for step, _, cmd in steps if step == "(b)"), out)
        line = next(
            (ln for ln in b.stdout.splitlines() if ln.startswith("STEP-B")),
            "STEP-B FAIL (no result)",
        ).split()
        rows.append(("(b) restored logits vs baseline", line[1], " ".join(line[2:])))
    if "c" in args.only or "d" in args.only:
        build_big(out, args.big_layers, args.big_embd)
    if "c" in args.only:
        c_file, c_inplace = (
            run(cmd, out / f"c_{i}")
            for i, (step, _, cmd) in enumerate(s for s in steps if s[0] == "(c)")
        )
        if c_file.returncode == 0 and c_inplace.returncode == 0:
            cf, ci = results(out / "c_0"), results(out / "c_1")
            speed = f"file {items_per_minute(cf):.2f}, in-process {items_per_minute(ci):.2f}"
            rows.append(("(c) items/min synthetic model", speed, compare_engines(cf, ci)[0]))
        else:
            rows.append(("(c) items/min synthetic model", "FAIL", "a plugin run failed"))
    if "d" in args.only:
        d = run(next(cmd for step, _, cmd in steps if step == "(d)"), out)
        for line in d.stdout.splitlines():
            if line.startswith("STEP-D"):
                _, label, tps = line.split()
                rows.append((f"(d) tokens/s {label}", tps, "512-token chunks, all layers on GPU"))
    table = pd.DataFrame(rows, columns=["check", "result", "detail"])
    print(table.to_string(index=False))
    return 0 if not table["result"].astype(str).str.startswith("FAIL").any() else 1


if __name__ == "__main__":
    sys.exit(main())
