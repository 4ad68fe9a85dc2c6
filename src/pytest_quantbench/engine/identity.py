"""The engine's identity: which library files compute the numbers, and with which CPU kernels.

The same q8_0 tensor measured a mean KLD of 2.0e-6 with the wheel's AVX2 kernels and 1.3e-4 with a
native AVX-512 build, so the identity is part of every cache key and result row.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from ..inputs import sha256_file
from . import bindings
from .devices import device_info
from .quantize import find_quantize_binary


@dataclass(frozen=True)
class EngineIdentity:
    """Library files in use, their content hashes, and the CPU features their kernels use.

    ``key`` (12 hex chars) summarises all of it; ``describe()`` is the one-line run-header text.
    """

    package_version: str
    libllama: str
    libggml: str
    quantize_binary: str
    files_sha256: str
    cpu_features: str
    device: str = "cpu"
    device_key: str = "cpu"

    @property
    def key(self) -> str:
        """Short id of everything that can change a logit: file hashes, kernel features and, on a
        GPU build, the GPU model names (``device_key``), so GPU and CPU results never mix."""
        text = f"{self.files_sha256}|{self.cpu_features}"
        if self.device_key != "cpu":
            text += f"|{self.device_key}"
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def describe(self) -> str:
        """``ik-llama-cpp-python 0.1.5, libllama <path> [AVX2 FMA F16C], engine id <key>``
        (``, device cuda:0 <GPU name>`` on a GPU build)."""
        device = f", device {self.device}" if self.device != "cpu" else ""
        return (
            f"ik-llama-cpp-python {self.package_version}, libllama {self.libllama} "
            f"[{self.cpu_features}]{device}, engine id {self.key}"
        )


@lru_cache(maxsize=4)
def engine_identity(lib_path: Path | None = None) -> EngineIdentity:
    """Load the engine library (if not yet loaded) and describe it.

    Raises bindings.EngineLibraryError / EngineError when the library or llama-quantize is missing.
    """
    lib = bindings.load_library(lib_path)
    libllama = str(lib.quantbench_path)
    libggml = bindings.mapped_library(r"^libggml")
    quantize = str(find_quantize_binary())
    hashes = [sha256_file(Path(p)) for p in (libllama, libggml, quantize) if p]
    info = (lib.llama_print_system_info() or b"").decode()
    features = " ".join(
        name
        for name, on in re.findall(r"(\w+) = (\d)", info)
        if on == "1" and name not in ("SSE3", "SSSE3")
    )
    try:
        version = metadata.version("ik-llama-cpp-python")
    except metadata.PackageNotFoundError:
        version = "unknown"
    dev = device_info()
    return EngineIdentity(
        version,
        libllama,
        libggml,
        quantize,
        hashlib.sha256("|".join(hashes).encode()).hexdigest(),
        features,
        dev.describe(),
        dev.key,
    )
