"""Shards for batch schedulers: one deterministic, cost-balanced share of a run's planned items.

``--quantbench-shard I/N`` keeps share ``I`` (1-based) of ``N``; ``--quantbench-shard=auto`` reads
the scheduler's environment (Slurm job arrays, Kubernetes Indexed Jobs). Every shard plans the
same full list of work units from the same inputs (:mod:`planning`), then keeps its share, so the
shares are disjoint, cover every item once and do not depend on the host, on ``-n`` or on what any
store holds. The cost of an item is its work: the elements of its tensors times the chunks (every
item evaluates every chunk, so within one run the chunks only scale the cost). The shares are
balanced by the longest-processing-time rule: items in decreasing cost (ties by item id) each go
to the share with the least cost so far (ties to the lowest share).

Why not pytest-split: it balances by measured durations from a ``.test_durations`` file (which
differ by host and rerun unless the file is shared and committed) and otherwise by item count,
whereas a tensor's cost is known before anything runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from .config import ConfigError

T = TypeVar("T")

#: Kubernetes sets JOB_COMPLETION_INDEX but not the number of completions: the Job gives it here.
COUNT_ENV = "QUANTBENCH_SHARD_COUNT"


@dataclass(frozen=True)
class Shard:
    """Share ``index`` (1-based) of ``count``; ``source`` says where it came from (for messages)."""

    index: int
    count: int
    source: str = "--quantbench-shard"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str | None, env: Mapping[str, str] | None = None) -> Shard | None:
    """The shard asked for by ``--quantbench-shard`` (``I/N``, or ``auto``), or None.

    ``auto`` reads ``SLURM_ARRAY_TASK_ID`` − ``SLURM_ARRAY_TASK_MIN`` (default 0) of
    ``SLURM_ARRAY_TASK_COUNT``, else ``JOB_COMPLETION_INDEX`` (0-based) of
    ``QUANTBENCH_SHARD_COUNT``.
    Raises ConfigError (a ValueError) naming the option or variable and the fix.
    """
    if text is None:
        return None
    env = os.environ if env is None else env
    if text.strip().lower() == "auto":
        return _from_scheduler(env)
    index, sep, count = text.partition("/")
    try:
        shard = Shard(int(index), int(count))
    except ValueError:
        shard = None
    if not sep or shard is None or not 1 <= shard.index <= shard.count:
        raise ConfigError(
            f"--quantbench-shard {text!r}: give I/N with 1 <= I <= N (e.g. 2/4), "
            "or auto under a Slurm job array or a Kubernetes Indexed Job"
        )
    return shard


def _from_scheduler(env: Mapping[str, str]) -> Shard:
    def number(name: str) -> int:
        try:
            return int(env[name])
        except ValueError:
            raise ConfigError(
                f"--quantbench-shard=auto: {name}={env[name]!r} is not a number"
            ) from None

    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        first = number("SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
        index, count, source = (
            number("SLURM_ARRAY_TASK_ID") - first,
            number("SLURM_ARRAY_TASK_COUNT"),
            "Slurm job array",
        )
        fix = "submit with a contiguous --array range (e.g. --array=0-3)"
    elif "JOB_COMPLETION_INDEX" in env:
        if COUNT_ENV not in env:
            raise ConfigError(
                f"--quantbench-shard=auto: JOB_COMPLETION_INDEX is set but "
                f"{COUNT_ENV} is not; set it in the Job's env to its completions"
            )
        index, count, source = (
            number("JOB_COMPLETION_INDEX"),
            number(COUNT_ENV),
            "Kubernetes Indexed Job",
        )
        fix = f"set {COUNT_ENV} to the Job's completions"
    else:
        raise ConfigError(
            "--quantbench-shard=auto: no scheduler index found (SLURM_ARRAY_TASK_ID"
            "/SLURM_ARRAY_TASK_COUNT or JOB_COMPLETION_INDEX); give I/N instead"
        )
    if not 0 <= index < count:
        raise ConfigError(
            f"--quantbench-shard=auto: {source} index {index} is outside 0..{count - 1}: {fix}"
        )
    return Shard(index + 1, count, source)


def assign_shards(ids: Sequence[str], costs: Sequence[float], count: int) -> list[int]:
    """The share (0-based) of each item: longest processing time first, deterministic.

    ids: unique item ids; costs: their work (any unit, >= 0), same length. Returns a list
    parallel to ``ids``.
    """
    order = sorted(range(len(ids)), key=lambda i: (-costs[i], ids[i]))
    loads = [0.0] * count
    share = [0] * len(ids)
    for i in order:
        target = min(range(count), key=lambda s: (loads[s], s))
        share[i] = target
        loads[target] += costs[i]
    return share


def select_shard(
    units: Sequence[T], shard: Shard, cost: Callable[[T], float], ident: Callable[[T], str]
) -> list[T]:
    """The units of ``shard``, in their planned order (see :func:`assign_shards`)."""
    shares = assign_shards([ident(u) for u in units], [cost(u) for u in units], shard.count)
    return [u for u, s in zip(units, shares, strict=True) if s == shard.index - 1]


class _Unit(Protocol):
    @property
    def tensors(self) -> Sequence[str]: ...


def unit_cost(header, chunks: int) -> Callable[[_Unit], float]:
    """Cost of a work unit: elements of its tensors (GGUF header) × chunks."""
    return lambda unit: float(sum(header.tensor(t).n_elements for t in unit.tensors) * chunks)
