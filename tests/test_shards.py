"""Shards (--quantbench-shard) and merge: every planned item in exactly one shard, the same
share on every rerun and -n, and a merge equal to the one-process tables."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pytest_quantbench.config import ConfigError
from pytest_quantbench.merge import PER_PROCESS, MergeError, merge
from pytest_quantbench.shard import Shard, assign_shards, parse_shard
from runhelpers import without

TABLES = ("kld_results.csv", "ppl_results.csv", "topp_results.csv", "results.csv")
TIMING = PER_PROCESS  # the time depends on the process, not the item


def test_parse_shard_forms_and_scheduler_environments():
    assert parse_shard(None) is None
    assert parse_shard("2/3", env={}) == Shard(2, 3)
    slurm = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_COUNT": "3"}
    assert str(parse_shard("auto", env=slurm)) == "2/3"
    k8s = {"JOB_COMPLETION_INDEX": "0", "QUANTBENCH_SHARD_COUNT": "4"}
    assert str(parse_shard("auto", env=k8s)) == "1/4"
    for bad, env, says in (
        ("0/3", {}, "1 <= I <= N"),
        ("4/3", {}, "1 <= I <= N"),
        ("2", {}, "I/N"),
        ("auto", {}, "no scheduler index"),
        ("auto", {"JOB_COMPLETION_INDEX": "1"}, "QUANTBENCH_SHARD_COUNT"),
        ("auto", {**k8s, "JOB_COMPLETION_INDEX": "4"}, "outside 0..3"),
    ):
        with pytest.raises(ConfigError, match=says):
            parse_shard(bad, env=env)


def test_assign_shards_is_a_balanced_partition_independent_of_order():
    ids = [f"t{i}" for i in range(40)]
    costs = [float((i * 7919) % 97 + 1) for i in range(40)]
    shares = assign_shards(ids, costs, 3)
    assert sorted(set(shares)) == [0, 1, 2]
    loads = [sum(c for c, s in zip(costs, shares, strict=True) if s == k) for k in range(3)]
    assert max(loads) - min(loads) <= max(costs)  # the LPT bound
    shuffled = list(reversed(range(40)))  # same items in another order: same shares
    again = assign_shards([ids[i] for i in shuffled], [costs[i] for i in shuffled], 3)
    assert {ids[i]: s for i, s in zip(shuffled, again, strict=True)} == dict(
        zip(ids, shares, strict=True)
    )


def _collected(pytester, args) -> list[str]:
    result = pytester.runpytest_subprocess("--collect-only", "-q", *args)
    return [
        line.split("::", 1)[1] for line in result.stdout.lines if line.startswith("quantbench::")
    ]


def _tables(out: Path) -> dict[str, str]:
    """The tables' text, timing columns dropped from results.csv."""
    texts = {name: (out / name).read_text() for name in TABLES}
    tidy = pd.read_csv(out / "results.csv", dtype=str, keep_default_na=False)
    texts["results.csv"] = tidy.drop(columns=list(TIMING)).to_csv(index=False)
    return texts


def _store_rows(out: Path) -> dict[str, tuple[str, float]]:
    with sqlite3.connect(out / "results-store.sqlite") as conn:
        return {
            k: (t, at)
            for k, t, at in conn.execute("SELECT item_key, row_json, stored_at FROM results")
        }


def test_three_shards_cover_every_item_once_and_merge_to_the_single_run(pytester, qb_args):
    args = [*qb_args, "--quantbench-qtypes=q4_0", "--quantbench-tensors", r"blk\."]
    everything = _collected(pytester, args)
    assert len(everything) == 14
    shards = [_collected(pytester, [*args, f"--quantbench-shard={i}/3"]) for i in (1, 2, 3)]
    assert sorted(i for shard in shards for i in shard) == sorted(
        everything
    )  # each item in exactly one shard
    assert all(shards)
    assert _collected(pytester, [*args, "--quantbench-shard=2/3"]) == shards[1]  # rerun
    pytester.runpytest_subprocess(*args, "--quantbench-output=single").assert_outcomes(passed=14)
    for i, n in ((1, "0"), (2, "2"), (3, "0")):  # shard 2 under xdist: the same share
        run = pytester.runpytest_subprocess(
            *args, f"--quantbench-shard={i}/3", f"--quantbench-output=shard{i}", "-n", n
        )
        run.assert_outcomes(passed=len(shards[i - 1]))
        tidy = pd.read_csv(pytester.path / f"shard{i}" / "results.csv")
        assert sorted(
            f"{t}[{q}]" for t, q in zip(tidy["tensor"], tidy["qtype"], strict=True)
        ) == sorted(shards[i - 1])
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest_quantbench",
            "merge",
            "shard1",
            "shard2",
            "shard3",
            "--output",
            "merged",
        ],
        check=False,
        cwd=pytester.path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert _tables(pytester.path / "merged") == _tables(pytester.path / "single")
    before = _store_rows(pytester.path / "merged")
    assert len(before) == 14
    rerun = pytester.runpytest_subprocess(
        *args, "--quantbench-shard=1/3", "--quantbench-output=merged"
    )
    rerun.assert_outcomes(passed=len(shards[0]))
    rerun.stdout.fnmatch_lines([f"{len(shards[0])} item(s) reused from the results store*"])
    assert _store_rows(pytester.path / "merged") == before  # nothing measured, nothing rewritten


def test_merge_refuses_conflicting_rows_and_other_settings(pytester, qb_args):
    args = [*qb_args, "--quantbench-qtypes=q4_0", "--quantbench-tensors", r"blk\.0\.attn_[qk]"]
    pytester.runpytest_subprocess(*args, "--quantbench-output=a").assert_outcomes(passed=2)
    root = pytester.path
    shutil.copytree(root / "a", root / "b")
    with sqlite3.connect(root / "b" / "results-store.sqlite") as conn:
        key, text = conn.execute("SELECT item_key, row_json FROM results LIMIT 1").fetchone()
        row = json.loads(text)
        row["stats"]["mean_kld"] *= 1.5
        conn.execute("UPDATE results SET row_json = ? WHERE item_key = ?", (json.dumps(row), key))
    with pytest.raises(MergeError) as conflict:
        merge([root / "a", root / "b"], root / "m1")
    said = str(conflict.value)
    assert f"{row['tensor']}[q4_0]" in said and str(root / "a") in said and str(root / "b") in said
    assert not (root / "m1" / "results.csv").exists()
    assert not (root / "m1" / "results-store.sqlite").exists()
    other = without(args, "--quantbench-chunks") + [
        "--quantbench-chunks=1",
        "--quantbench-output=c",
    ]
    pytester.runpytest_subprocess(*other).assert_outcomes(passed=2)
    with pytest.raises(MergeError, match=r"other settings \(differing: identity \(chunks\)"):
        merge([root / "a", root / "c"], root / "m2")
    assert list((root / "m2").iterdir()) == []
    with pytest.raises(MergeError, match="no results store"):
        merge([root / "a", root / "nowhere"], root / "m3")


def test_main_dispatches_commands_and_names_unknown_ones():
    from pytest_quantbench.__main__ import main

    assert main(["nope"]) == 4
    with pytest.raises(SystemExit) as help_exit:
        main(["merge", "--help"])
    assert help_exit.value.code == 0
