"""Helpers shared by the pytester-based plugin tests (test_plugin, test_bad_input, test_faults).

The common options live in the ``qb_args`` fixture of ``tests/conftest.py``.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def without(args: list[str], *prefixes: str) -> list[str]:
    """``args`` minus the options starting with any of ``prefixes``."""
    return [a for a in args if not a.startswith(prefixes)]


def results(pytester) -> pd.DataFrame:
    """The tidy results.csv of the last run in ``pytester``'s folder."""
    return pd.read_csv(pytester.path / "quantbench-results" / "results.csv")


def read_wide(path: Path) -> pd.DataFrame:
    """A suite-style wide CSV as strings, indexed by QTYPE."""
    return pd.read_csv(path, dtype=str).set_index("QTYPE")


def leftovers(directory: Path) -> list[str]:
    """Temporary files left anywhere under ``directory``: ``*.tmp`` and dot-files (atomic
    writes), ``faults-*`` (a worker's stderr and engine-log files)."""
    return sorted(
        str(p.relative_to(directory))
        for p in directory.rglob("*")
        if p.is_file() and (p.name.endswith(".tmp") or p.name.startswith((".", "faults-")))
    )


def usage_error(result) -> str:
    """The one ``ERROR:`` line of a run that stopped with a usage error (exit code 4), without
    the prefix; asserts exit code 4 and that no traceback was shown."""
    import pytest

    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str() + result.stderr.str()
    errors = [line for line in result.stderr.lines if line.startswith("ERROR: ")]
    assert len(errors) == 1, result.stderr.str()
    assert "Traceback" not in result.stderr.str()
    return errors[0][len("ERROR: ") :]


def assert_nothing_written(pytester, cache: Path | None = None) -> None:
    """No result table was written by the run, and no temporary file is left in ``cache``."""
    assert not (pytester.path / "quantbench-results").exists()
    if cache is not None and cache.exists():
        assert leftovers(cache) == []


def cache_of(args: list[str]) -> Path:
    """The ``--quantbench-cache-dir`` given in ``args``."""
    return Path(next(a.split("=", 1)[1] for a in args if a.startswith("--quantbench-cache-dir=")))


def measure_with_own_cache(pytester, qb_args: list[str], cache: Path, tensors: str):
    """Run one q4_0 item (``tensors``: a selection regex) with ``cache`` as the cache dir.

    Returns (the run's options, its results.csv row, the baseline file it cached).
    """
    args = without(qb_args, "--quantbench-cache-dir")
    args += [
        f"--quantbench-cache-dir={cache}",
        "--quantbench-qtypes=q4_0",
        "--quantbench-tensors",
        tensors,
    ]
    pytester.runpytest_subprocess(*args).assert_outcomes(passed=1)
    return args, results(pytester).iloc[0], next((cache / "baselines").glob("*.kld"))
