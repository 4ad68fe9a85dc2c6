"""The auto importance matrix's cache: its key (:func:`auto_imatrix_key`), its path and
:func:`ensure_auto_imatrix`, which computes it once across processes."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from ..cachefiles import cache_notice
from .formats import ImatrixError, load_imatrix


def auto_imatrix_key(
    model_sha256: str, corpus_sha256: str, n_ctx: int, chunks: int, engine: str = ""
) -> str:
    """File stem of a cached auto imatrix: ``<model12>-c<n_ctx>-<chunks>ch-<digest16>``.

    The digest covers all arguments (``engine``: e.g. :attr:`EngineIdentity.key`).
    """
    text = (
        f"model={model_sha256}|corpus={corpus_sha256}|n_ctx={n_ctx}|chunks={chunks}|engine={engine}"
    )
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return f"{model_sha256[:12]}-c{n_ctx}-{chunks}ch-{digest}"


def auto_imatrix_path(cache_dir: str | os.PathLike[str], key: str) -> Path:
    """``<cache_dir>/imatrix/<key>.imatrix.dat``."""
    return Path(cache_dir) / "imatrix" / f"{key}.imatrix.dat"


def ensure_auto_imatrix(
    cache_dir: str | os.PathLike[str], key: str, compute: Callable[[Path], object]
) -> Path:
    """Return the cached auto imatrix for ``key``, computing it once across processes if needed.

    Under a :class:`filelock.FileLock` beside the file (as :func:`baseline.ensure_baseline`): an
    existing file that loads is returned; an unreadable one is removed and recomputed (a
    :class:`~pytest_quantbench.cachefiles.CacheNotice` warning says so).

    Args:
        cache_dir: the plugin's cache directory. key: :func:`auto_imatrix_key`.
        compute: writes the file at the given path atomically (e.g.
            ``lambda dest: compute_imatrix(model, settings, tokens, dest, dataset=name)``);
            called at most once, under the lock.
    Returns:
        the path of a readable legacy imatrix.
    Raises:
        whatever ``compute`` raises; ImatrixError if the fresh file cannot be read.
    """
    from filelock import FileLock

    path = auto_imatrix_path(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.exists():
            try:
                load_imatrix(path)
                return path
            except ImatrixError as exc:
                cache_notice(f"cached imatrix {path} is not usable ({exc}): recomputing")
                path.unlink()
        started = time.perf_counter()
        compute(path)
        load_imatrix(path)
        from ..report import atomic_write_text

        atomic_write_text(
            auto_imatrix_facts_path(path),
            json.dumps(
                {
                    "seconds": round(time.perf_counter() - started, 3),
                    "computed_at": time.time(),
                    "bytes": path.stat().st_size,
                }
            )
            + "\n",
        )
    return path


def auto_imatrix_facts_path(path: Path) -> Path:
    """The JSON beside a cached auto imatrix: how long it took (``seconds``), when it was
    computed (``computed_at``, Unix time) and its size (``bytes``)."""
    return path.with_name(path.name + ".json")


def auto_imatrix_facts(path: Path) -> dict:
    """The facts beside a cached auto imatrix ({} when absent or unreadable)."""
    try:
        return json.loads(auto_imatrix_facts_path(path).read_text())
    except (OSError, ValueError):
        return {}
