"""GPU builds of the engine: one GPU per worker, CUDA graphs off, the device that measures, the
padding CUDA gives quantized tensors, and the types the CUDA backend has no matmul for.

Everything that must happen before the engine library is loaded in a process
(``CUDA_VISIBLE_DEVICES``, ``GGML_CUDA_DISABLE_GRAPHS``) is done by :func:`apply_process_env`,
called when the run's inputs are created (``runinputs.RunInputs``), before any model is loaded.
See ``docs/architecture.md#gpu-builds``.
"""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
import sys
from dataclasses import dataclass

from . import bindings

#: ``MATRIX_ROW_PADDING`` of ggml-cuda (ggml-cuda/common.cuh): the CUDA buffer type allocates each
#: quantized tensor with a zeroed tail of ``ggml_row_size(T, 512 - ne0 % 512)`` bytes that the
#: MMQ/MMVQ kernels read into (ggml-cuda.cu, ``ggml_backend_cuda_buffer_type_get_alloc_size``).
MATRIX_ROW_PADDING = 512

#: Environment variable the CUDA backend reads once per process (ggml-cuda.cu, the graph
#: capture in ``ggml_backend_cuda_graph_compute``): a captured graph is reused when node data
#: pointers, ops and shapes match, never the source's type, so a swap that changes a weight's
#: type replays stale kernels. Set to ``1`` before the library loads.
DISABLE_GRAPHS_ENV = "GGML_CUDA_DISABLE_GRAPHS"

#: The context parameter ``cuda_params`` that turns CUDA graphs off (ik_llama.cpp's llama-bench
#: passes the same text).
CUDA_PARAMS_NO_GRAPHS = b"graphs=0"


class GpuSpecError(ValueError):
    """``--quantbench-gpus`` is neither ``auto`` nor a list of device ids."""


def parse_gpus(value: str | None) -> str | tuple[str, ...] | None:
    """``--quantbench-gpus`` → None (unset), ``"auto"``, or the device ids as given.

    ``value``: ``auto`` or ids separated by commas/whitespace (``0,1``, ``2 3``, a YAML list
    ``[0, 1]``, or GPU UUIDs ``GPU-…`` as ``CUDA_VISIBLE_DEVICES`` takes them). Raises
    GpuSpecError naming the fix.
    """
    if value is None or not str(value).strip():
        return None
    text = str(value).strip()
    if text.lower() == "auto":
        return "auto"
    ids = tuple(p for p in re.split(r"[,\s\[\]'\"]+", text) if p)
    bad = [p for p in ids if not re.fullmatch(r"\d+|(GPU|MIG)-[0-9A-Za-z-]+", p)]
    if bad or not ids:
        raise GpuSpecError(
            f"--quantbench-gpus {value!r}: {bad or 'no id'} is not a device id; "
            "give 'auto' or device numbers such as 0,1,2,3"
        )
    return ids


def worker_index(worker_id: str | None) -> int | None:
    """The N of an xdist worker id ``gwN`` (None for the controller or a run without xdist)."""
    m = re.fullmatch(r"gw(\d+)", worker_id or "")
    return int(m.group(1)) if m else None


def worker_gpu(worker_id: str | None, gpus: tuple[str, ...]) -> str | None:
    """The device of worker ``gwN``: ``gpus[N % len(gpus)]``; without xdist the first one;
    None when ``gpus`` is empty (a CPU build under ``auto``)."""
    if not gpus:
        return None
    n = worker_index(worker_id)
    return gpus[(n or 0) % len(gpus)]


def _probe_cuda_devices(lib_path: str | None) -> tuple[str, ...]:
    """Device ids the CUDA build sees, probed in a child process (so that this process has not
    initialised CUDA before ``CUDA_VISIBLE_DEVICES`` is set). () on a CPU build."""
    code = (
        "import ctypes,sys\n"
        "from pytest_quantbench.engine import bindings\n"
        "from pathlib import Path\n"
        "bindings.load_library(Path(sys.argv[1]) if sys.argv[1] else None)\n"
        "g = ctypes.CDLL(bindings.mapped_library(r'^libggml'))\n"
        "f = getattr(g, 'ggml_backend_cuda_get_device_count', None)\n"
        "print(f() if f else 0)\n"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", code, lib_path or ""],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        ).stdout
        count = int(out.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError, OSError):
        return ()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:  # the user's own restriction: keep its ids and order
        return tuple(p for p in visible.split(",") if p)[:count]
    return tuple(str(i) for i in range(count))


def resolve_gpus(spec, probe=_probe_cuda_devices) -> tuple[str, ...]:
    """The run's device list: the ids given, or for ``auto`` every GPU the CUDA build sees
    (none on a CPU build). ``auto`` is probed once per run: the result is kept in the
    environment variable ``QUANTBENCH_GPUS_SEEN``, which xdist workers inherit."""
    if spec is None:
        return ()
    if spec != "auto":
        return tuple(spec)
    seen = os.environ.get("QUANTBENCH_GPUS_SEEN")
    if seen is None:
        seen = ",".join(probe(os.environ.get("IK_LLAMA_CPP_LIB_PATH")))
        os.environ["QUANTBENCH_GPUS_SEEN"] = seen
    return tuple(p for p in seen.split(",") if p)


class EngineAlreadyLoaded(RuntimeError):
    """The engine library is loaded before the process's GPU environment was set."""


def apply_process_env(
    spec, worker_id: str | None, environ=os.environ, probe=_probe_cuda_devices
) -> str | None:
    """Set what the engine reads once per process, before it is loaded: CUDA graphs off
    (:data:`DISABLE_GRAPHS_ENV`) and, with ``--quantbench-gpus``, ``CUDA_VISIBLE_DEVICES`` to the
    worker's one device (:func:`worker_gpu`). Returns that device id (None: none chosen).

    Raises EngineAlreadyLoaded when the engine library is already mapped into this process
    with a different device set (the variable would then have no effect).
    """
    environ.setdefault(DISABLE_GRAPHS_ENV, "1")
    gpus = resolve_gpus(spec, probe)
    device = worker_gpu(worker_id, gpus)
    if device is None:
        return None
    if environ.get("CUDA_VISIBLE_DEVICES") != device:
        if bindings.mapped_library(r"^libllama"):
            raise EngineAlreadyLoaded(
                f"--quantbench-gpus: the engine library is already loaded in this process, so "
                f"CUDA_VISIBLE_DEVICES={device} would not take effect; load the engine only "
                "after the quantbench session is configured"
            )
        environ["CUDA_VISIBLE_DEVICES"] = device
    return device


def cuda_padding(row_size, type_id: int, ne0: int, quantized: bool) -> int:
    """Bytes the CUDA buffer type adds after a tensor's last row: ``row_size(T, 512 − ne0 %
    512)`` for a quantized type when ``ne0 % 512 ≠ 0``, else 0 (ggml-cuda.cu,
    ``ggml_backend_cuda_buffer_type_get_alloc_size``). ``row_size``: ``ggml_row_size``."""
    if not quantized or ne0 % MATRIX_ROW_PADDING == 0:
        return 0
    return int(row_size(type_id, MATRIX_ROW_PADDING - ne0 % MATRIX_ROW_PADDING))


def has_cuda_matmul(type_name: str) -> bool:
    """Whether ik_llama.cpp's CUDA backend multiplies with ``type_name`` on the device
    (ggml-cuda.cu, ``ggml_backend_cuda_supports_op``): not Q8_KV, BF16_R16, Q8_K_R8, nor the
    row-interleaved ``_r4``/``_r8`` types other than ``iq*_k_r4`` and ``iq1_s_r4``/``iq1_m_r4``.
    Types without one are computed on the CPU by the scheduler, with a weight copy per decode."""
    name = type_name.lower()
    if name in ("q8_kv", "bf16_r16", "q8_k_r8"):
        return False
    if re.search(r"_r(4|8|16)$", name):
        return bool(re.fullmatch(r"iq\d_k[sl]?_r4|iq1_[sm]_r4", name))
    return True


@dataclass(frozen=True)
class DeviceInfo:
    """What computes in this process: ``kind`` ``"cpu"`` or ``"cuda"``; ``names``: the GPU
    model names the build sees (after ``CUDA_VISIBLE_DEVICES``); ``visible``: that variable."""

    kind: str
    names: tuple[str, ...] = ()
    visible: str | None = None

    def describe(self) -> str:
        """``cpu`` or ``cuda:<CUDA_VISIBLE_DEVICES> <name>``, the result rows' device column."""
        if self.kind == "cpu":
            return "cpu"
        where = self.visible if self.visible is not None else "all"
        return f"cuda:{where} {', '.join(self.names) or '(no device)'}"

    @property
    def key(self) -> str:
        """What enters the engine identity: the build kind and GPU model names (no ids)."""
        return "cpu" if self.kind == "cpu" else "cuda:" + "|".join(self.names)


def _libggml():
    path = bindings.mapped_library(r"^libggml")
    return ctypes.CDLL(path) if path else None


def device_info(lib: ctypes.CDLL | None = None) -> DeviceInfo:
    """The loaded engine's devices (load the engine first). A build without
    ``ggml_backend_cuda_get_device_count`` is a CPU build."""
    lib = lib if lib is not None else _libggml()
    count_fn = getattr(lib, "ggml_backend_cuda_get_device_count", None) if lib else None
    if count_fn is None:
        return DeviceInfo("cpu")
    count_fn.restype = ctypes.c_int
    desc = lib.ggml_backend_cuda_get_device_description
    desc.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
    desc.restype = None
    names = []
    for i in range(int(count_fn())):
        buf = ctypes.create_string_buffer(256)
        desc(i, buf, 256)
        names.append(buf.value.decode("utf-8", "replace"))
    return DeviceInfo("cuda", tuple(names), os.environ.get("CUDA_VISIBLE_DEVICES"))


def is_gpu_build() -> bool:
    """Whether the loaded engine has a CUDA backend."""
    return device_info().kind != "cpu"


def device_note(written: dict, baseline_types: dict[str, str], offloaded: bool) -> str | None:
    """The ``engine_note`` for an item whose written types have no CUDA matmul on a GPU build
    with layers offloaded (``offloaded``), else None. written: tensor → ggml type (``.name``);
    baseline_types: tensor → baseline type name (unchanged tensors need no note)."""
    if not offloaded:
        return None
    slow = sorted(
        {
            w.name
            for t, w in written.items()
            if w.name != baseline_types.get(t) and not has_cuda_matmul(w.name)
        }
    )
    if not slow:
        return None
    return (
        f"{', '.join(slow)} has no CUDA matmul in this engine: the scheduler computes it on "
        "the CPU with a weight copy per decode, as llama-perplexity would (slow, not wrong)"
    )
