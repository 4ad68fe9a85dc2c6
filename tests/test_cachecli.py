"""``python -m pytest_quantbench cache list|prune``."""

from __future__ import annotations

import os
import time

from filelock import FileLock

from pytest_quantbench.cachecli import main, scan


def _entry(path, size, days_ago):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    when = time.time() - days_ago * 86400
    os.utime(path, (when, when))
    return path


def _cache(root):
    return {
        "old_base": _entry(root / "baselines" / "aaaa-c64-2ch-1111.kld", 3000, 40),
        "new_base": _entry(root / "baselines" / "bbbb-c64-2ch-2222.kld", 2000, 1),
        "old_imatrix": _entry(root / "imatrix" / "cafe.imatrix.dat", 500, 40),
        "old_model": _entry(root / "models" / "SmolLM2-bf16.gguf", 7000, 40),
    }


def test_list_shows_kind_size_key_and_last_use(tmp_path, capsys):
    files = _cache(tmp_path)
    (files["old_base"].with_name(files["old_base"].name + ".json")).write_text("{}")
    assert main(["list", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "baseline" in out and "aaaa-c64-2ch-1111" in out and "3.0 kB" in out
    assert "imatrix" in out and "cafe" in out and "model" in out and "SmolLM2-bf16" in out
    assert "4 entries, 12.5 kB" in out
    assert {e.kind for e in scan(tmp_path)} == {"baseline", "imatrix", "model"}


def test_prune_removes_only_what_is_older_and_not_in_use(tmp_path, capsys):
    files = _cache(tmp_path)
    sidecar = files["old_base"].with_name(files["old_base"].name + ".json")
    sidecar.write_text("{}")
    os.utime(sidecar, (0, 0))
    assert main(["prune", "--older-than", "7", "--cache-dir", str(tmp_path), "--dry-run"]) == 0
    assert all(p.exists() for p in files.values())
    with FileLock(f"{files['old_model']}.lock"):  # being converted by another process
        assert main(["prune", "--older-than", "7", "--cache-dir", str(tmp_path)]) == 0
    assert not files["old_base"].exists() and not sidecar.exists()
    assert not files["old_imatrix"].exists()
    assert files["new_base"].exists() and files["old_model"].exists()
    assert "removed 2 entries" in capsys.readouterr().out


def test_bad_use_is_exit_4_with_the_fix(tmp_path, capsys):
    assert main(["prune", "--cache-dir", str(tmp_path)]) == 4
    assert "--older-than DAYS" in capsys.readouterr().err
    assert main(["list", "--cache-dir", str(tmp_path / "none")]) == 4
    assert "--cache-dir DIR" in capsys.readouterr().err


def test_prefix_reuse_files_are_listed_and_found_from_a_subfolder(tmp_path, monkeypatch):
    from pytest_quantbench.cachecli import default_cache_dir

    root = tmp_path / ".pytest_cache" / "d" / "quantbench"
    _entry(root / "hidden" / "aaaa-c64-2ch-1111" / "L001" / "chunk00000.npy", 4096, 1)
    tail = root / "tails" / "aaaa-L001.gguf"
    tail.parent.mkdir(parents=True)
    with open(tail, "wb") as f:  # a sparse tail model: a long file with one written block
        f.write(b"GGUF")
        f.truncate(50_000_000)
    kinds = {e.kind: e for e in scan(root)}
    assert kinds["hidden"].key == "aaaa-c64-2ch-1111" and kinds["hidden"].size >= 4096
    assert kinds["tail"].key == "aaaa-L001" and kinds["tail"].size < 1_000_000  # on disk
    monkeypatch.delenv("QUANTBENCH_CACHE_DIR", raising=False)
    (tmp_path / "demo").mkdir()
    assert default_cache_dir(tmp_path / "demo") == root  # pytest's rootdir is a parent
