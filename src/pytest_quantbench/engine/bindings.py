"""ctypes bindings to ik_llama.cpp's ``libllama``: its structs and C signatures (ggml's are
declared in :mod:`.ggml`).

The struct layouts follow ``include/llama.h`` of the ik-llama-cpp-python wheel (0.1.5). A library
given by the user (``--quantbench-engine-lib`` or ``IK_LLAMA_CPP_LIB_PATH``) must be built from a
compatible ik_llama.cpp: :func:`load_library` checks that every symbol used here exists and says
which one is missing otherwise.
"""

from __future__ import annotations

import ctypes
import os
import re
from collections import deque
from pathlib import Path

llama_token = ctypes.c_int32
llama_pos = ctypes.c_int32
llama_seq_id = ctypes.c_int32

llama_progress_callback = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_float, ctypes.c_void_p)
ggml_backend_sched_eval_callback = ctypes.CFUNCTYPE(
    ctypes.c_bool, ctypes.c_void_p, ctypes.c_bool, ctypes.c_void_p
)
ggml_abort_callback = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p)
ggml_log_callback = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)


class llama_model_params(ctypes.Structure):
    """``struct llama_model_params`` of ik_llama.cpp (llama.h)."""

    _fields_ = [
        ("devices", ctypes.c_char_p),
        ("n_gpu_layers", ctypes.c_int32),
        ("mla", ctypes.c_int32),
        ("split_mode", ctypes.c_int),
        ("main_gpu", ctypes.c_int32),
        ("max_gpu", ctypes.c_int32),
        ("ncmoe", ctypes.c_int32),
        ("type_k", ctypes.c_int),
        ("type_v", ctypes.c_int),
        ("max_ctx_size", ctypes.c_uint32),
        ("n_seq_max", ctypes.c_int32),
        ("n_ubatch", ctypes.c_int32),
        ("amb", ctypes.c_int32),
        ("fit_margin", ctypes.c_int32),
        ("fit", ctypes.c_bool),
        ("worst_graph_tokens", ctypes.c_int32),
        ("type_k_first", ctypes.c_int),
        ("type_k_last", ctypes.c_int),
        ("type_v_first", ctypes.c_int),
        ("type_v_last", ctypes.c_int),
        ("n_k_first", ctypes.c_int32),
        ("n_k_last", ctypes.c_int32),
        ("n_v_first", ctypes.c_int32),
        ("n_v_last", ctypes.c_int32),
        ("tensor_split", ctypes.POINTER(ctypes.c_float)),
        ("rpc_servers", ctypes.c_char_p),
        ("progress_callback", llama_progress_callback),
        ("progress_callback_user_data", ctypes.c_void_p),
        ("kv_overrides", ctypes.c_void_p),
        ("tensor_buft_overrides", ctypes.c_void_p),
        ("vocab_only", ctypes.c_bool),
        ("use_mmap", ctypes.c_bool),
        ("use_mlock", ctypes.c_bool),
        ("check_tensors", ctypes.c_bool),
        ("repack_tensors", ctypes.c_bool),
        ("use_thp", ctypes.c_bool),
        ("validate_quants", ctypes.c_bool),
        ("merge_qkv", ctypes.c_bool),
        ("merge_up_gate_exps", ctypes.c_bool),
        ("mtp", ctypes.c_bool),
        ("dry_run", ctypes.c_bool),
        ("flash_attn", ctypes.c_bool),
    ]


class llama_context_params(ctypes.Structure):
    """``struct llama_context_params`` of ik_llama.cpp (llama.h)."""

    _fields_ = [
        ("seed", ctypes.c_uint32),
        ("n_ctx", ctypes.c_uint32),
        ("n_batch", ctypes.c_uint32),
        ("n_ubatch", ctypes.c_uint32),
        ("n_seq_max", ctypes.c_uint32),
        ("n_threads", ctypes.c_uint32),
        ("n_threads_batch", ctypes.c_uint32),
        ("max_extra_alloc", ctypes.c_int32),
        ("worst_case_tokens", ctypes.c_int32),
        ("rope_scaling_type", ctypes.c_int),
        ("pooling_type", ctypes.c_int),
        ("attention_type", ctypes.c_int),
        ("rope_freq_base", ctypes.c_float),
        ("rope_freq_scale", ctypes.c_float),
        ("yarn_ext_factor", ctypes.c_float),
        ("yarn_attn_factor", ctypes.c_float),
        ("yarn_beta_fast", ctypes.c_float),
        ("yarn_beta_slow", ctypes.c_float),
        ("yarn_orig_ctx", ctypes.c_uint32),
        ("defrag_thold", ctypes.c_float),
        ("cb_eval", ggml_backend_sched_eval_callback),
        ("cb_eval_user_data", ctypes.c_void_p),
        ("type_k", ctypes.c_int),
        ("type_v", ctypes.c_int),
        ("type_reduce", ctypes.c_int),
        ("type_k_first", ctypes.c_int),
        ("type_k_last", ctypes.c_int),
        ("type_v_first", ctypes.c_int),
        ("type_v_last", ctypes.c_int),
        ("n_k_first", ctypes.c_int32),
        ("n_k_last", ctypes.c_int32),
        ("n_v_first", ctypes.c_int32),
        ("n_v_last", ctypes.c_int32),
        ("logits_all", ctypes.c_bool),
        ("embeddings", ctypes.c_bool),
        ("offload_kqv", ctypes.c_bool),
        ("flash_attn", ctypes.c_bool),
        ("mla_attn", ctypes.c_int),
        ("attn_max_batch", ctypes.c_int),
        ("fused_moe_up_gate", ctypes.c_bool),
        ("grouped_expert_routing", ctypes.c_bool),
        ("fused_up_gate", ctypes.c_bool),
        ("fused_mmad", ctypes.c_bool),
        ("rope_cache", ctypes.c_bool),
        ("graph_reuse", ctypes.c_bool),
        ("min_experts", ctypes.c_int),
        ("thresh_experts", ctypes.c_float),
        ("only_active_experts", ctypes.c_bool),
        ("k_cache_hadamard", ctypes.c_bool),
        ("v_cache_hadamard", ctypes.c_bool),
        ("split_mode_graph_scheduling", ctypes.c_bool),
        ("scheduler_async", ctypes.c_bool),
        ("mtp", ctypes.c_bool),
        ("mtp_op_type", ctypes.c_int),
        ("abort_callback", ggml_abort_callback),
        ("abort_callback_data", ctypes.c_void_p),
        ("offload_policy", ctypes.c_void_p),
        ("cuda_params", ctypes.c_void_p),
    ]


class llama_batch(ctypes.Structure):
    """``struct llama_batch`` (llama.h)."""

    _fields_ = [
        ("n_tokens", ctypes.c_int32),
        ("token", ctypes.POINTER(llama_token)),
        ("embd", ctypes.POINTER(ctypes.c_float)),
        ("pos", ctypes.POINTER(llama_pos)),
        ("n_seq_id", ctypes.POINTER(ctypes.c_int32)),
        ("seq_id", ctypes.POINTER(ctypes.POINTER(llama_seq_id))),
        ("logits", ctypes.POINTER(ctypes.c_int8)),
        ("all_pos_0", llama_pos),
        ("all_pos_1", llama_pos),
        ("all_seq_id", llama_seq_id),
    ]


_P = ctypes.c_void_p
_SIGNATURES: dict[str, tuple[list, object]] = {
    "llama_backend_init": ([], None),
    "llama_log_set": ([ggml_log_callback, _P], None),
    "llama_print_system_info": ([], ctypes.c_char_p),
    "llama_model_default_params": ([], llama_model_params),
    "llama_context_default_params": ([], llama_context_params),
    "llama_model_load_from_file": ([ctypes.c_char_p, llama_model_params], _P),
    "llama_free_model": ([_P], None),
    "llama_init_from_model": ([_P, llama_context_params], _P),
    "llama_free": ([_P], None),
    "llama_n_vocab": ([_P], ctypes.c_int32),
    "llama_n_ctx_train": ([_P], ctypes.c_int32),
    "llama_n_ctx": ([_P], ctypes.c_uint32),
    "llama_model_get_vocab": ([_P], _P),
    "llama_vocab_get_add_bos": ([_P], ctypes.c_bool),
    "llama_vocab_get_add_eos": ([_P], ctypes.c_bool),
    "llama_vocab_bos": ([_P], llama_token),
    "llama_tokenize": (
        [
            _P,
            ctypes.c_char_p,
            ctypes.c_int32,
            ctypes.POINTER(llama_token),
            ctypes.c_int32,
            ctypes.c_bool,
            ctypes.c_bool,
        ],
        ctypes.c_int32,
    ),
    "llama_batch_init": ([ctypes.c_int32, ctypes.c_int32, ctypes.c_int32], llama_batch),
    "llama_batch_free": ([llama_batch], None),
    "llama_decode": ([_P, llama_batch], ctypes.c_int32),
    "llama_synchronize": ([_P], None),  # before a device tensor swap (engine/swap.py)
    "llama_kv_cache_clear": ([_P], None),
    "llama_get_logits": ([_P], ctypes.POINTER(ctypes.c_float)),
    "llama_model_desc": ([_P, ctypes.c_char_p, ctypes.c_size_t], ctypes.c_int32),
}


class EngineLibraryError(RuntimeError):
    """The ik_llama.cpp shared library cannot be found or lacks a symbol this plugin needs."""


def default_library_path() -> Path:
    """Path of ``libllama`` to use: ``IK_LLAMA_CPP_LIB_PATH`` if set, else the wheel's own.

    Raises :class:`EngineLibraryError` if neither exists (with the fix: install the wheel).
    """
    override = os.environ.get("IK_LLAMA_CPP_LIB_PATH")
    if override:
        return Path(override)
    import importlib.util

    spec = importlib.util.find_spec("ik_llama_cpp")
    if spec is None or spec.origin is None:
        raise EngineLibraryError(
            "the engine package ik-llama-cpp-python is not installed: pip install ik-llama-cpp-python"
        )
    return Path(spec.origin).parent / "lib" / "libllama.so"


class LogTail:
    """Keeps the engine's last log lines (for error messages) instead of printing them.

    ``lines`` is a deque of str, most recent last; ``text()`` joins them.
    ``LogTail.sinks`` (class-wide) are called with every piece of text as it arrives:
    :mod:`pytest_quantbench.faults` writes it to a file, so a worker that crashes in native code
    leaves its last log lines behind.
    """

    sinks: list = []

    def __init__(self, maxlen: int = 40) -> None:
        self.lines: deque[str] = deque(maxlen=maxlen)
        self._partial = ""

    def feed(self, text: str) -> None:
        """Add raw log text (may hold partial lines)."""
        for sink in LogTail.sinks:
            sink(text)
        text = self._partial + text
        *complete, self._partial = text.split("\n")
        self.lines.extend(line for line in complete if line.strip())

    def text(self) -> str:
        """The retained lines, newline-joined."""
        return "\n".join([*self.lines, self._partial] if self._partial else self.lines)


def mapped_library(pattern: str) -> str:
    """Path of the first shared object mapped into this process whose name matches ``pattern``."""
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 6 and re.search(pattern, Path(parts[-1]).name):
                    return parts[-1]
    except OSError:
        pass
    return ""


class EngineLibrary(ctypes.CDLL):
    """The loaded ``libllama``: a ``ctypes.CDLL`` that also carries what :func:`load_library`
    attaches (its log tail, its resolved path, and the C log callback kept alive with it)."""

    log_tail: LogTail
    quantbench_path: Path
    _log_callback: object


_loaded: dict[Path, EngineLibrary] = {}


def load_library(path: Path | None = None) -> EngineLibrary:
    """Load ``libllama`` once per process, declare signatures, and route its log into a tail.

    Args:
        path: the library file; ``None`` → :func:`default_library_path`.
    Returns:
        the :class:`EngineLibrary` (a ``ctypes.CDLL``) with ``argtypes``/``restype`` set and
        attributes ``log_tail`` (LogTail) and ``quantbench_path``.
    Raises:
        EngineLibraryError: missing file, failed dlopen, or a missing symbol (named).
    """
    path = Path(path) if path is not None else default_library_path()
    path = path.resolve()
    if path in _loaded:
        return _loaded[path]
    if not path.is_file():
        raise EngineLibraryError(
            f"engine library {path} does not exist: pass --quantbench-engine-lib PATH to a libllama "
            "of ik_llama.cpp, or unset IK_LLAMA_CPP_LIB_PATH to use the wheel's"
        )
    try:
        lib = EngineLibrary(str(path))
    except OSError as exc:
        raise EngineLibraryError(f"cannot load engine library {path}: {exc}") from None
    for name, (argtypes, restype) in _SIGNATURES.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            raise EngineLibraryError(
                f"engine library {path} has no symbol {name}: it is not an ik_llama.cpp build "
                "compatible with ik-llama-cpp-python 0.1.5"
            ) from None
        fn.argtypes = argtypes
        fn.restype = restype
    tail = LogTail()

    def _on_log(level: int, text: bytes | None, _user: object) -> None:
        if text:
            tail.feed(text.decode("utf-8", "replace"))

    callback = ggml_log_callback(_on_log)
    lib.llama_log_set(callback, None)
    lib.llama_backend_init()
    lib.log_tail = tail
    lib._log_callback = callback  # keep the C callback alive as long as the library
    lib.quantbench_path = path
    _loaded[path] = lib
    return lib
