"""Will it fit? Sizes of what a run writes into its cache, checked against the free space there.

A baseline (or an auto imatrix, or the default model's conversion) that runs out of disk fails
late and says little (llama-quantize: ``basic_ios::clear: iostream error``), so each is checked
before it starts: :func:`require_space` compares the size the file will have with the free
space of its directory (:func:`free_bytes`) and stops with both numbers and the fixes.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError

__all__ = [
    "DiskSpaceError",
    "PlannedFile",
    "baseline_bytes",
    "cache_header_line",
    "check_cache_space",
    "converted_model_bytes",
    "format_bytes",
    "free_bytes",
    "imatrix_bytes",
    "plan_cache_files",
    "require_space",
]

#: Bytes kept free beyond a file's size: its sidecar, lock and the hash memo.
HEADROOM = 1 << 20


class DiskSpaceError(ConfigError):
    """The cache directory has less free space than a file about to be written needs."""


def free_bytes(directory: Path) -> int:
    """Free bytes for an unprivileged writer on the file system of ``directory`` (or of its
    nearest existing parent), as :func:`shutil.disk_usage` reports them."""
    path = Path(directory)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def format_bytes(n: int) -> str:
    """``n`` bytes in kB, MB or GB (decimal units, one decimal), e.g. ``'61.2 MB'``."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1e3:.1f} kB"


def baseline_bytes(n_ctx: int, n_vocab: int, n_chunk: int) -> int:
    """Size of the baseline logits file: llama-perplexity's base file,
    ``20 + 4·n_chunk·n_ctx + n_chunk·S·(4·⌊(n_vocab+1)/2⌋ + 8)`` bytes with ``S = n_ctx − 1 −
    n_ctx//2`` scored positions (about n_chunk × S × (2·n_vocab + 8)); docs/llama-perplexity.md
    (the KLD base file), :func:`kldbase.expected_file_size`."""
    from .kldbase import expected_file_size

    return expected_file_size(n_ctx, n_vocab, n_chunk)


def imatrix_bytes(header) -> int:
    """Upper bound of a legacy imatrix file for the model of ``header`` (a :class:`GGUFHeader`):
    per matrix tensor its name, two int32 and ``ne0·n_expert`` float32 values, as
    llama-imatrix's ``.dat`` stores them."""
    total = 4 + 8 + 1024  # entry count, last call + dataset name
    for t in header.tensors:
        if t.n_dims >= 2:
            experts = t.shape[2] if t.n_dims > 2 else 1
            total += 4 + len(t.name.encode()) + 8 + 4 * t.ne0 * experts
    return total


def converted_model_bytes(header, qtype: str) -> int:
    """About the size of ``header``'s model written by llama-quantize with every matrix in the
    ggml type ``qtype`` (1-D tensors keep their type): metadata + tensor data."""
    from .qtypes import TYPES_BY_NAME

    target = TYPES_BY_NAME[qtype]
    data = sum(
        t.n_bytes if t.n_dims < 2 else target.row_size(t.ne0) * t.n_rows for t in header.tensors
    )
    return header.data_offset + data + header.alignment * len(header.tensors)


def require_space(directory: Path, needed: int, what: str, fixes: str) -> None:
    """Raise :class:`DiskSpaceError` unless ``directory``'s file system has ``needed`` bytes
    (plus :data:`HEADROOM`) free.

    ``what`` names the file (e.g. ``"the baseline logits (n_chunk=80, n_ctx=512)"``), ``fixes``
    what the user can change; the message gives both sizes.
    """
    free = free_bytes(directory)
    if free < needed + HEADROOM:
        raise DiskSpaceError(
            f"{what} needs {format_bytes(needed)} ({needed} bytes) in "
            f"{directory}, but only {format_bytes(free)} ({free} bytes) are free "
            f"there: {fixes}"
        )


@dataclass(frozen=True)
class PlannedFile:
    """A file a run keeps in its cache: ``path``, ``size`` (bytes), ``what`` (for messages),
    ``cached`` (already there: nothing to write)."""

    path: Path
    size: int
    what: str
    cached: bool

    @property
    def label(self) -> str:
        """``what`` without its article and details, e.g. ``baseline logits file``."""
        return self.what.split(" (")[0].removeprefix("the ")


def plan_cache_files(
    *,
    baseline: Path | None,
    shape: tuple[int, int],
    n_vocab: int,
    imatrix: Path | None,
    model_header,
) -> tuple[PlannedFile, ...]:
    """The cache files of a run: the baseline logits (None: a user base file, nothing cached)
    for chunks of ``shape`` (n_chunk, n_ctx) and ``n_vocab``; the auto imatrix at ``imatrix``
    (None: none) for the model of ``model_header``."""
    files = []
    if baseline is not None:
        n_chunk, n_ctx = shape
        files.append(
            PlannedFile(
                baseline,
                baseline_bytes(n_ctx, n_vocab, n_chunk),
                f"the baseline logits file ({n_chunk} chunks, n_ctx={n_ctx}, n_vocab={n_vocab})",
                baseline.exists(),
            )
        )
    if imatrix is not None:
        files.append(
            PlannedFile(imatrix, imatrix_bytes(model_header), "the auto imatrix", imatrix.exists())
        )
    return tuple(files)


#: What to change when the run's cache files do not fit.
SPACE_FIXES = (
    "set --quantbench-cache-dir to a directory on a disk with more free space, pass "
    "fewer --quantbench-chunks (the baseline grows with the chunks), or free space "
    "there"
)


def _device(directory: Path) -> int:
    path = Path(directory)
    while not path.exists() and path != path.parent:
        path = path.parent
    return os.stat(path).st_dev


def check_cache_space(plan: tuple[PlannedFile, ...]) -> None:
    """Raise :class:`DiskSpaceError` when the files of ``plan`` not yet cached do not fit
    together on their disk (the first directory of each disk is named)."""
    by_disk: dict[int, list[PlannedFile]] = {}
    for f in plan:
        if not f.cached:
            by_disk.setdefault(_device(f.path.parent), []).append(f)
    for files in by_disk.values():
        require_space(
            files[0].path.parent,
            sum(f.size for f in files),
            " and ".join(f.what for f in files),
            SPACE_FIXES,
        )


def cache_header_line(cache_dir: Path, plan: tuple[PlannedFile, ...]) -> str:
    """The run header's cache line: the directory, what this run adds to it (and what it finds
    there already), and the free space."""
    parts = [
        f"{f.label} {format_bytes(f.size)} {'cached' if f.cached else 'to compute'}" for f in plan
    ]
    parts.append(f"{format_bytes(free_bytes(cache_dir))} free")
    return f"quantbench cache: {cache_dir} ({', '.join(parts)})"
