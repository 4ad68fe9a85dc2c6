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
        args += [
            "--tx",
            f"popen//chdir={root / name}//env:QUANTBENCH_CACHE_DIR={root / name}/cache",
        ]
    return [*args, "--dist=load"]


@pytest.fixture
def two_host_args(pytester, qb_args, monkeypatch):
    """Options of a run over two simulated hosts; the controller has a cache of its own."""
    monkeypatch.setenv("QUANTBENCH_CACHE_DIR", str(pytester.path / "controller-cache"))
    return [
        *without(qb_args, "--quantbench-cache-dir"),
        "--quantbench-qtypes=q4_0",
        "--quantbench-tensors",
        r"blk\.[01]\.(attn_[qkv]|ffn_up)",
    ]


def test_two_hosts_give_the_single_run_tables_and_only_the_controller_stores(
    pytester, two_host_args
):
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
    again = pytester.runpytest_subprocess(
        *two_host_args, *_hosts(root), "--quantbench-output=multi"
    )
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
    nodes = {
        spec: SimpleNamespace(gateway=SimpleNamespace(spec=execnet.XSpec(spec)), workerinput={})
        for spec in ("ssh=gpu1//python=/venv/bin/python", f"popen//chdir={tmp_path}")
    }
    for node in nodes.values():
        reporter.pytest_configure_node(node)
    assert [WORKERINPUT_KEY in n.workerinput for n in nodes.values()] == [False, True]


# ---- a real ssh host: a throw-away sshd on 127.0.0.1 ------------------------------------------

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ssh_host(tmp_path_factory):
    """``(ssh config file, host alias)`` of an sshd started for this test on 127.0.0.1, which
    lets this user in with a fresh key; skipped when sshd cannot run here."""
    import getpass
    import os
    import socket
    import subprocess
    import time

    if not (Path(SSHD).is_file() and shutil.which("ssh") and shutil.which("ssh-keygen")):
        pytest.skip("sshd, ssh or ssh-keygen is not installed (openssh-server, openssh-client)")
    if os.geteuid() == 0 and not Path("/run/sshd").is_dir():
        Path("/run/sshd").mkdir(mode=0o755)  # sshd's privilege separation directory
    d = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "user_key"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True
        )
    (d / "authorized_keys").write_text((d / "user_key.pub").read_text())
    port = _free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\n"
        f"AuthorizedKeysFile {d}/authorized_keys\nPidFile {d}/sshd.pid\nStrictModes no\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        "PermitRootLogin prohibit-password\n"
    )
    (d / "ssh_config").write_text(
        f"Host qbhost\n  HostName 127.0.0.1\n  Port {port}\n  User {getpass.getuser()}\n"
        f"  IdentityFile {d}/user_key\n  IdentitiesOnly yes\n  StrictHostKeyChecking no\n"
        "  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n  BatchMode yes\n"
    )
    with open(d / "sshd.log", "w") as log:  # the child keeps its own descriptor
        sshd = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stderr=log)
    try:
        for _ in range(50):
            if sshd.poll() is not None:
                pytest.skip(f"sshd did not start: {(d / 'sshd.log').read_text()[-300:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        yield d / "ssh_config", "qbhost"
    finally:
        sshd.terminate()
        sshd.wait(10)


def test_an_ssh_host_gives_the_single_run_tables(pytester, two_host_args, ssh_host):
    """The README's ssh worker, to 127.0.0.1: the remote Python gets this checkout's package
    (a wrapper sets PYTHONPATH: ssh starts a new environment), its own chdir and cache."""
    import os
    import sys

    config, host = ssh_host
    root = pytester.path
    wrapper = root / "remote-python"
    wrapper.write_text(
        f"#!/bin/sh\nexport PYTHONPATH={os.environ.get('PYTHONPATH', '')}\n"
        f'exec {sys.executable} "$@"\n'
    )
    wrapper.chmod(0o755)
    (root / "sshhost").mkdir()
    spec = (
        f"ssh={host}//ssh_config={config}//python={wrapper}//chdir={root / 'sshhost'}"
        f"//env:QUANTBENCH_CACHE_DIR={root / 'sshhost'}/cache"
    )
    pytester.runpytest_subprocess(*two_host_args, "--quantbench-output=single").assert_outcomes(
        passed=8
    )
    run = pytester.runpytest_subprocess(
        *two_host_args, "--tx", spec, "--tx", spec, "--dist=load", "--quantbench-output=multi"
    )
    run.assert_outcomes(passed=8)
    assert _tables(root / "multi") == _tables(root / "single")
    assert list((root / "sshhost").rglob("results-store.sqlite*")) == []
    assert len(list((root / "sshhost" / "cache" / "baselines").glob("*.kld"))) == 1
