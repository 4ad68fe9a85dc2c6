"""Shared fixtures: a tiny synthetic GGUF model and a corpus, built once per test session."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def _wheel_dir() -> Path | None:
    """The installed ik_llama_cpp package folder (lib/, bin/), or None."""
    spec = importlib.util.find_spec("ik_llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


WHEEL = _wheel_dir()

CORPUS_TEXT = "\n\n".join(
    f"Paragraph {i}: the model reads this text and predicts the next token; "
    f"{' '.join(str(i * j) for j in range(12))} is a line of numbers, and words "
    "like the, a, of and to come back again and again."
    for i in range(60)
)


@pytest.fixture(scope="session")
def synth_model(tmp_path_factory) -> Path:
    """A 2-layer bf16 llama GGUF (n_embd 256, vocab 384) that the engine loads (seconds)."""
    pytest.importorskip("gguf", reason="gguf-py writes the synthetic test model")
    from synthmodel import build_synthetic_model

    return build_synthetic_model(tmp_path_factory.mktemp("model") / "synth-bf16.gguf")


@pytest.fixture(scope="session")
def synth_corpus(tmp_path_factory) -> Path:
    """A UTF-8 text long enough for several 64-token chunks of the synthetic model."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(CORPUS_TEXT + "\n", encoding="utf-8")
    return path


@pytest.fixture
def qb_args(synth_model, synth_corpus, tmp_path_factory) -> list[str]:
    """Common options of a pytester run: synthetic model and corpus, n_ctx 64, 2 chunks, a
    cache dir shared by the session's runs, pytest-randomly off."""
    cache = tmp_path_factory.getbasetemp() / "qb-cache"
    return [
        f"--quantbench-model={synth_model}",
        f"--quantbench-corpus={synth_corpus}",
        "--quantbench-ctx=64",
        "--quantbench-chunks=2",
        f"--quantbench-cache-dir={cache}",
        "-p",
        "no:randomly",
    ]
