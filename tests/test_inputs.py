"""The content-hash memo of inputs.sha256_file: any replacement of a file is hashed again."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from pytest_quantbench import inputs


@pytest.fixture
def hashing(monkeypatch):
    """Count full content hashes (the memo's misses)."""
    calls = []
    real = inputs.content_sha256

    def counted(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(inputs, "content_sha256", counted)
    return calls


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _wait_for_ctime_change(path, before_ns: int, touch) -> None:
    """Call ``touch`` until ``path``'s ctime moves past ``before_ns`` (file-system clock tick)."""
    for _ in range(300):
        touch()
        if os.stat(path).st_ctime_ns != before_ns:
            return
        time.sleep(0.01)
    pytest.skip("this file system did not advance ctime within 3 s")


def test_an_unchanged_file_is_hashed_once(tmp_path, hashing, monkeypatch):
    monkeypatch.setattr(inputs, "RACY_NS", 0)
    a = tmp_path / "a.gguf"
    a.write_bytes(b"A" * 5000)
    assert inputs.sha256_file(a, tmp_path) == _sha(b"A" * 5000)
    assert inputs.sha256_file(a, tmp_path) == _sha(b"A" * 5000)
    assert len(hashing) == 1


@pytest.mark.parametrize("how", ["in place (cp)", "new inode (rsync -a)"])
def test_same_size_and_copied_mtime_is_hashed_again(tmp_path, hashing, monkeypatch, how):
    """Model B copied over model A with A's size and mtime: B's hash, not A's."""
    monkeypatch.setattr(inputs, "RACY_NS", 0)  # A's memo entry is trusted at once
    a = tmp_path / "model.gguf"
    a.write_bytes(b"A" * 5000)
    before = os.stat(a)
    assert inputs.sha256_file(a, tmp_path) == _sha(b"A" * 5000)
    if how.startswith("in place"):
        with open(a, "r+b") as fh:
            fh.write(b"B" * 5000)
    else:
        b = tmp_path / "b.tmp"
        b.write_bytes(b"B" * 5000)
        os.replace(b, a)

    def restore_times():
        os.utime(a, ns=(before.st_atime_ns, before.st_mtime_ns))

    _wait_for_ctime_change(a, before.st_ctime_ns, restore_times)
    after = os.stat(a)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert inputs.sha256_file(a, tmp_path) == _sha(b"B" * 5000)
    assert len(hashing) == 2


def test_rename_and_back_is_hashed_again(tmp_path, hashing, monkeypatch):
    """A rename changes the ctime (Linux file systems set it), and ctime is what tells a rewrite in
    place with a restored mtime apart, so a file renamed away and back is hashed once more."""
    monkeypatch.setattr(inputs, "RACY_NS", 0)
    a = tmp_path / "model.gguf"
    a.write_bytes(b"A" * 5000)
    before = os.stat(a)
    inputs.sha256_file(a, tmp_path)

    def rename_away_and_back():
        os.rename(a, tmp_path / "elsewhere.gguf")
        os.rename(tmp_path / "elsewhere.gguf", a)

    _wait_for_ctime_change(a, before.st_ctime_ns, rename_away_and_back)
    assert os.stat(a).st_ino == before.st_ino
    assert inputs.sha256_file(a, tmp_path) == _sha(b"A" * 5000)
    assert len(hashing) == 2


def test_a_file_hashed_right_after_its_last_change_is_hashed_again(tmp_path, hashing):
    """Racy entry (git's rule): a later change within the same clock tick would keep the ctime,
    so an entry made within RACY_NS of the change is not trusted."""
    a = tmp_path / "fresh.gguf"
    a.write_bytes(b"A" * 5000)
    inputs.sha256_file(a, tmp_path)
    inputs.sha256_file(a, tmp_path)
    assert len(hashing) == 2


def test_an_entry_whose_first_or_last_mib_differs_is_not_trusted(tmp_path, hashing, monkeypatch):
    monkeypatch.setattr(inputs, "RACY_NS", 0)
    a = tmp_path / "model.gguf"
    a.write_bytes(b"A" * 5000)
    inputs.sha256_file(a, tmp_path)
    memo_path = tmp_path / "hashes.json"
    memo = json.loads(memo_path.read_text())
    (entry,) = memo.values()
    entry["sha256"], entry["edges"] = "0" * 64, "1" * 64  # a stale entry for this key
    memo_path.write_text(json.dumps(memo))
    assert inputs.sha256_file(a, tmp_path) == _sha(b"A" * 5000)
    assert len(hashing) == 2


def test_a_replaced_shard_changes_the_hash_of_a_split_model(tmp_path):
    """A split model's hash covers every shard: `sha256sum <shards> | sha256sum`."""
    pytest.importorskip("gguf")
    from pytest_quantbench.gguf import read_model_header
    from synthmodel import build_synthetic_model

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = build_synthetic_model(tmp_path / "a" / "m.gguf", split_max_tensors=8, seed=0)
    build_synthetic_model(tmp_path / "b" / "m.gguf", split_max_tensors=8, seed=1)
    shards = read_model_header(first).shards
    assert len(shards) == 3
    lines = "".join(f"{_sha(Path(p).read_bytes())}  {Path(p).name}\n" for p in shards)
    before = inputs.model_sha256(shards, tmp_path)
    assert before == _sha(lines.encode())
    last, other = shards[2], tmp_path / "b" / os.path.basename(shards[2])
    stat = os.stat(last)
    assert os.path.getsize(other) == stat.st_size
    with open(other, "rb") as src, open(last, "r+b") as dst:
        dst.write(src.read())
    os.utime(last, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert inputs.model_sha256(shards, tmp_path) != before
