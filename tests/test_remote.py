"""Remote xdist workers (``--tx``), simulated as two hosts on this machine: popen workers with
their own working and cache directories. One writer: only the controller's store exists."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from runhelpers import usage_error, without
from test_shards import _tables


def _hosts(root: Path) -> list[str]:
    args = []
    for name in ("hostA", "hostB"):
        (root / name).mkdir(exist_ok=True)
        args += ["--tx", f"popen//chdir={root / name}//env:QUANTBENCH_CACHE_DIR={root / name}/cache"]
    return [*args, "--dist=load"]


@pytest.fixture
def two_host_args(pytester, qb_args, monkeypatch):
    """Options of a run over two simulated hosts; the controller has a cache of its own."""
    monkeypatch.setenv("QUANTBENCH_CACHE_DIR", str(pytester.path / "controller-cache"))
    return [*without(qb_args, "--quantbench-cache-dir"), "--quantbench-qtypes=q4_0",
            "--quantbench-tensors", r"blk\.[01]\.(attn_[qkv]|ffn_up)"]


def test_two_hosts_give_the_single_run_tables_and_only_the_controller_stores(
        pytester, two_host_args):
    root = pytester.path
    single = pytester.runpytest_subprocess(*two_host_args, "--quantbench-output=single")
    single.assert_outcomes(passed=8)
    shutil.rmtree(root / "controller-cache")
    run = pytester.runpytest_subprocess(*two_host_args, *_hosts(root), "--quantbench-output=multi")
    run.assert_outcomes(passed=8)
    assert _tables(root / "multi") == _tables(root / "single")
    for host in ("hostA", "hostB"):
        assert list((root / host).rglob("results-store.sqlite*")) == []
        assert len(list((root / host / "cache" / "baselines").glob("*.kld"))) == 1
    assert not (root / "controller-cache" / "baselines").exists()  # the controller measures nothing
    again = pytester.runpytest_subprocess(*two_host_args, *_hosts(root), "--quantbench-output=multi")
    again.assert_outcomes(passed=8)  # the controller hands the stored rows to the workers
    again.stdout.fnmatch_lines(["8 item(s) reused from the results store*"])


def test_hosts_with_different_baselines_are_not_mixed(pytester, two_host_args):
    root = pytester.path
    pytester.runpytest_subprocess(*two_host_args, *_hosts(root)).assert_outcomes(passed=8)
    base = next((root / "hostB" / "cache" / "baselines").glob("*.kld"))
    data = bytearray(base.read_bytes())
    data[-1] ^= 0x01  # one logit of the last chunk differs on host B
    base.write_bytes(bytes(data))
    run = pytester.runpytest_subprocess(*two_host_args, *_hosts(root), "--quantbench-rerun")
    assert run.ret != 0
    out = run.stdout.str()
    assert "baseline logits differ between hosts" in out
    assert f"chdir={root / 'hostA'}" in out and f"chdir={root / 'hostB'}" in out


def test_separate_path_argument_under_tx_is_a_usage_error(pytester, two_host_args, synth_model):
    args = [*without(two_host_args, "--quantbench-model"), "--quantbench-model", str(synth_model)]
    said = usage_error(pytester.runpytest_subprocess(*args, *_hosts(pytester.path)))
    assert f"--quantbench-model={synth_model}" in said


def test_a_dead_remote_worker_costs_only_its_item(pytester, two_host_args):
    import sqlite3

    from test_faults import CRASHING_CONFTEST, SEGFAULT

    root = pytester.path
    tx = _hosts(root)
    for host in ("hostA", "hostB"):  # each host loads its own conftest.py
        (root / host / "conftest.py").write_text(CRASHING_CONFTEST.format(crash=SEGFAULT))
    run = pytester.runpytest_subprocess(*two_host_args, *tx)
    run.assert_outcomes(passed=7, errors=1)
    crashed = "*worker 'gw?' crashed while running 'quantbench::blk.0.attn_v.weight[[]q4_0[]]'*"
    run.stdout.fnmatch_lines([crashed])
    with sqlite3.connect(root / "quantbench-results" / "results-store.sqlite") as conn:
        stored = sorted(t for (t,) in conn.execute("SELECT tensor FROM results"))
    assert len(stored) == 7 and "blk.0.attn_v.weight" not in stored


def test_fault_files_are_kept_only_by_workers_on_this_machine(tmp_path):
    """The controller reads a crashed worker's fault files from its own disk: an ssh host gets
    no path (it may not exist there), a popen worker (also with chdir) gets one."""
    from types import SimpleNamespace

    import execnet

    from pytest_quantbench.faults import WORKERINPUT_KEY, CrashReporter

    reporter = CrashReporter(SimpleNamespace(cache_dir=tmp_path, units=[]))
    nodes = {spec: SimpleNamespace(gateway=SimpleNamespace(spec=execnet.XSpec(spec)), workerinput={})
             for spec in ("ssh=gpu1//python=/venv/bin/python", f"popen//chdir={tmp_path}")}
    for node in nodes.values():
        reporter.pytest_configure_node(node)
    assert [WORKERINPUT_KEY in n.workerinput for n in nodes.values()] == [False, True]
