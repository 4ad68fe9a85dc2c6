"""``python -m pytest_quantbench cache list|prune``: what the cache directory holds, and removal.

The cache (``--quantbench-cache-dir``, else ``$QUANTBENCH_CACHE_DIR``, else pytest's cache
``.pytest_cache/d/quantbench`` under the directory pytest runs in) keeps, per host:

* ``baselines/*.kld``: baseline logits (with a ``.json`` sidecar), one per run identity; about
  n_chunk × n_ctx/2 × n_vocab × 2 bytes (llama-perplexity's ``--kl-divergence-base`` layout,
  :func:`pytest_quantbench.kldbase.expected_file_size`), e.g. 1.25 GB for SmolLM2 (vocab 49152) at 50
  chunks of 512;
* ``models/*.gguf``: the default model converted to the baseline type;
* ``imatrix/*.imatrix.dat``: importance matrices of ``--quantbench-imatrix=auto``;
* ``hidden/<baseline key>/``: prefix reuse's hidden states of that baseline (f32, per layer and
  chunk);
* ``tails/*.gguf``: prefix reuse's header-only tail models (sparse: little space on disk);
* ``tmp/``: variant models of running processes (left behind only by a killed one).

Last use is the file's access time when newer than its modification time (file systems mounted
``relatime`` update it about once a day, enough for ``--older-than DAYS``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

#: (kind, folder, file pattern) of what the list shows.
KINDS = (
    ("baseline", "baselines", "*.kld"),
    ("model", "models", "*.gguf"),
    ("imatrix", "imatrix", "*.imatrix.dat"),
    ("hidden", "hidden", "*"),
    ("tail", "tails", "*.gguf"),
    ("tmp", "tmp", "*"),
)


@dataclass(frozen=True)
class CacheEntry:
    """One cached file (or tmp folder): ``size`` in bytes (with its sidecar), ``last_use`` in
    seconds since the epoch, ``key`` its name without the suffix."""

    kind: str
    path: Path
    key: str
    size: int
    last_use: float


def default_cache_dir(cwd: Path | None = None) -> Path:
    """``$QUANTBENCH_CACHE_DIR``, else the nearest ``.pytest_cache/d/quantbench`` in ``cwd`` or
    one of its parents (pytest keeps its cache in the rootdir, often a parent of where it runs),
    else ``<cwd>/.pytest_cache/d/quantbench``."""
    env = os.environ.get("QUANTBENCH_CACHE_DIR")
    if env:
        return Path(env)
    here = (cwd or Path.cwd()).absolute()
    for folder in (here, *here.parents):
        if (folder / ".pytest_cache" / "d" / "quantbench").is_dir():
            return folder / ".pytest_cache" / "d" / "quantbench"
    return here / ".pytest_cache" / "d" / "quantbench"


def _disk_bytes(path: Path) -> int:
    """Bytes ``path`` takes on disk (a sparse tail model takes far less than its length)."""
    stat = path.stat()
    return min(stat.st_size, getattr(stat, "st_blocks", stat.st_size // 512 + 1) * 512)


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(_disk_bytes(p) for p in path.rglob("*") if p.is_file())
    return _disk_bytes(path)


def scan(cache_dir: Path) -> list[CacheEntry]:
    """The entries of ``cache_dir``, by kind then key. Missing folders are empty."""
    entries = []
    for kind, folder, pattern in KINDS:
        for path in sorted((cache_dir / folder).glob(pattern)):
            if path.name.endswith(".lock") or (
                kind == "tmp" and path.name.startswith("faults-") and path.stat().st_size == 0
            ):
                continue
            sidecar = path.with_name(path.name + ".json")
            stat = path.stat()
            size = _size(path) + (sidecar.stat().st_size if sidecar.is_file() else 0)
            key = path.name.removesuffix(".imatrix.dat").removesuffix(".kld").removesuffix(".gguf")
            entries.append(CacheEntry(kind, path, key, size, max(stat.st_atime, stat.st_mtime)))
    return entries


def prune(
    entries: Sequence[CacheEntry],
    older_than_days: float,
    now: float | None = None,
    dry_run: bool = False,
) -> list[CacheEntry]:
    """Remove the entries not used for ``older_than_days`` (with their sidecar and lock file);
    an entry whose lock another process holds (being computed) is kept. Returns the removed."""
    from filelock import FileLock, Timeout

    limit = (time.time() if now is None else now) - older_than_days * 86400
    removed = []
    for entry in entries:
        if entry.last_use >= limit:
            continue
        if not dry_run:
            lock = FileLock(f"{entry.path}.lock", timeout=0)
            try:
                with lock:
                    if entry.path.is_dir():
                        shutil.rmtree(entry.path, ignore_errors=True)
                    else:
                        entry.path.unlink(missing_ok=True)
                    entry.path.with_name(entry.path.name + ".json").unlink(missing_ok=True)
            except Timeout:
                continue
            Path(f"{entry.path}.lock").unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _line(e: CacheEntry) -> str:
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_use))
    return f"{e.kind:<9} {_human(e.size):>9}  {when}  {e.key}"


def main(argv: Sequence[str] | None = None) -> int:
    """``cache list|prune [--older-than DAYS] [--cache-dir DIR] [--dry-run]``; exit 0, or 4."""
    parser = argparse.ArgumentParser(
        prog="python -m pytest_quantbench cache", description="List or prune the quantbench cache."
    )
    parser.add_argument("action", choices=("list", "prune"))
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="the cache (default: $QUANTBENCH_CACHE_DIR, else .pytest_cache/d/quantbench here)",
    )
    parser.add_argument(
        "--older-than",
        type=float,
        default=None,
        metavar="DAYS",
        help="only entries not used for DAYS days (prune needs it)",
    )
    parser.add_argument("--dry-run", action="store_true", help="prune: say what would go")
    args = parser.parse_args(argv)
    cache = args.cache_dir or default_cache_dir()
    if not cache.is_dir():
        print(
            f"error: {cache} is not a directory; give the cache with --cache-dir DIR "
            "(the run's --quantbench-cache-dir)",
            file=sys.stderr,
        )
        return 4
    entries = scan(cache)
    if args.action == "prune":
        if args.older_than is None or args.older_than < 0:
            print(
                "error: prune needs --older-than DAYS (0 removes everything not in use)",
                file=sys.stderr,
            )
            return 4
        removed = prune(entries, args.older_than, dry_run=args.dry_run)
        verb = "would remove" if args.dry_run else "removed"
        for e in removed:
            print(f"{verb} {_line(e)}")
        print(
            f"{verb} {len(removed)} entr{'y' if len(removed) == 1 else 'ies'}, "
            f"{_human(sum(e.size for e in removed))}"
        )
        return 0
    if args.older_than is not None:
        entries = [e for e in entries if e.last_use < time.time() - args.older_than * 86400]
    print(f"{'kind':<9} {'size':>9}  {'last use':<16}  key   ({cache})")
    for e in entries:
        print(_line(e))
    print(f"{len(entries)} entries, {_human(sum(e.size for e in entries))}")
    return 0
