"""Housekeeping of the quantbench cache directory: notices about cache files, stale temporary files.

Every file of the cache is written atomically (a temporary file beside it, then ``os.replace``),
so a process killed mid-write (SIGKILL, OOM killer, a lost node) leaves its temporary file
behind, for good. :func:`sweep_stale_temps` removes those when the cache is opened.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Literal

from filelock import FileLock, Timeout

__all__ = [
    "CacheNotice",
    "cache_notice",
    "parse_temp_name",
    "remove_temps_of",
    "sweep_lines",
    "sweep_stale_temps",
    "temp_prefix",
]


class CacheNotice(UserWarning):
    """A cache file could not be used and is recomputed (shown in pytest's warnings summary)."""


def cache_notice(message: str) -> None:
    """Issue ``message`` as a :class:`CacheNotice` warning that always shows and never raises.

    pytest records warnings raised during an item (xdist forwards a worker's) and lists them in
    the warnings summary of a default run; a ``-W error`` or ``filterwarnings = error`` setting
    would turn this notice into an item error, so it is exempted here.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("always", CacheNotice)
        warnings.warn(CacheNotice(message), stacklevel=3)


def temp_prefix(target: Path) -> str:
    """The name prefix of a temporary file for ``target``: ``.<name>.<pid>.`` (the writer's PID
    lets :func:`sweep_stale_temps` tell a dead writer's file)."""
    return f".{target.name}.{os.getpid()}."


#: ``[.]<target>[.<pid>].<random>.tmp`` (atomic writes of the plugin and of llama-quantize runs)
_TEMP = re.compile(r"^\.?(?P<target>.+?)(?:\.(?P<pid>\d+))?\.(?P<rand>[A-Za-z0-9_]+)\.tmp$")
#: a worker's private directory of variant models, ``variants-<pid>-<random>``
_WORK_DIR = re.compile(r"^variants-(?P<pid>\d+)-[A-Za-z0-9_]+$")


def parse_temp_name(name: str) -> tuple[str, int | None] | None:
    """``(target name, writer PID or None)`` of a temporary file's name, None if it is not one."""
    match = _TEMP.match(name)
    if match is None:
        return None
    return match["target"], int(match["pid"]) if match["pid"] else None


def remove_temps_of(target: Path) -> list[Path]:
    """Remove every temporary file of ``target`` (and of its ``.json`` sidecar) in its directory.

    Call it holding ``target``'s lock: only the lock holder writes them, so any found then were
    left by an earlier holder that died (they are older than the lock holder). Returns them.
    """
    removed = []
    for entry in target.parent.glob(f"*{target.name}.*.tmp"):
        parsed = parse_temp_name(entry.name)
        if parsed is not None and parsed[0] in (target.name, target.name + ".json"):
            _remove(entry)
            removed.append(entry)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError as exc:  # EPERM: it exists, owned by someone else
        return exc.errno == errno.EPERM
    return True


def _locks_of(directory: Path, target: str) -> list[Path]:
    """Lock files that guard writes of ``target``: its own, or its baseline's (a sidecar)."""
    names = [target + ".lock"]
    if target.endswith(".json"):
        names.append(target[: -len(".json")] + ".lock")
    return [directory / n for n in names if (directory / n).exists()]


def _remove(path: Path) -> int | None:
    """Remove a file or directory; its size in bytes (None if it was gone already)."""
    try:
        if path.is_dir():
            size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
            shutil.rmtree(path)
            return size
        size = path.stat().st_size
        path.unlink()
        return size
    except FileNotFoundError:
        return None


def sweep_stale_temps(cache_dir: Path) -> list[tuple[Path, int]]:
    """Remove the temporary files that killed writers left in ``cache_dir``; return (path, bytes).

    A temporary file is stale when
      - its target is written under a lock (baselines, converted models, auto imatrices, the
        hash memo) and that lock is free: nobody writes the target now, and a writer that died
        released the lock with its process; it is removed holding the lock;
      - otherwise, when it names its writer's PID (``.<target>.<pid>.<random>.tmp``, a
        ``tmp/variants-<pid>-*`` directory) and no process of that PID exists on this machine.
    Anything else is left alone. Never raises for a file it cannot remove (another user's, a
    read-only cache): that file is skipped.
    """
    removed: list[tuple[Path, int]] = []
    if not cache_dir.is_dir():
        return removed
    for directory in [cache_dir, *(p for p in cache_dir.iterdir() if p.is_dir())]:
        try:
            entries = list(directory.iterdir())
        except OSError:
            continue
        for entry in entries:
            try:
                stale = _stale(entry)
                if stale is True:
                    size = _remove(entry)
                elif stale is not None:  # a lock to hold while removing
                    with stale:
                        size = _remove(entry)
                else:
                    continue
            except (OSError, Timeout):
                continue
            if size is not None:
                removed.append((entry, size))
    return removed


def sweep_lines(removed: list[tuple[Path, int]]) -> list[str]:
    """The run header's line about what :func:`sweep_stale_temps` removed ([] when nothing)."""
    if not removed:
        return []
    total = sum(n for _, n in removed)
    return [
        (
            f"quantbench cache: removed {len(removed)} temporary file(s) ({total / 1e6:.1f} MB) "
            f"left by killed runs, e.g. {removed[0][0].name}"
        )
    ]


def _stale(entry: Path) -> Literal[True] | FileLock | None:
    """True (remove), a free lock to remove under, or None (keep)."""
    if entry.is_dir():
        match = _WORK_DIR.match(entry.name)
        return True if match and not _pid_alive(int(match["pid"])) else None
    parsed = parse_temp_name(entry.name)
    if parsed is None:
        return None
    target, pid = parsed
    locks = _locks_of(entry.parent, target)
    if locks:  # acquired without waiting by the caller: a live writer's lock raises Timeout
        return FileLock(str(locks[0]), timeout=0)
    if pid is not None and not _pid_alive(pid):
        return True
    return None
