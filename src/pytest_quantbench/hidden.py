"""The hidden-state cache of prefix reuse: the input of layer L of every chunk, as f32.

An item whose first changed tensor is in layer L evaluates only layers L…N−1 and the head,
starting from the baseline's input of layer L (the engine's ``l_out-(L−1)``,
:mod:`pytest_quantbench.engine.tail`). Those rows are computed once per key across workers and
runs, with the discipline of the baseline cache (:mod:`pytest_quantbench.baseline`): a
:class:`filelock.FileLock`, content keys (the baseline's :class:`RunIdentity` plus the layer),
atomic files, and a manifest written last, so a reader sees a layer complete or not at all.

Layout: ``<cache>/hidden/<model12>-c<n_ctx>-<chunks>ch-<digest>/L<layer>/chunk<i>.npy``
(float32 (n_ctx, n_embd) each) and ``L<layer>/layer.json``. Size:
``layers × chunks × n_ctx × n_embd × 4`` bytes (:func:`hidden_bytes`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from filelock import FileLock

from .baseline import RunIdentity
from .diskspace import DiskSpaceError, format_bytes, free_bytes
from .report import atomic_write_text

PREFIX_REUSE_FIXES = (
    "set --quantbench-cache-dir to a directory on a disk with more free space, "
    "use fewer chunks (--quantbench-chunks), or turn prefix reuse off "
    "(--quantbench-prefix-reuse=off)"
)


def hidden_bytes(n_layers: int, n_chunk: int, n_ctx: int, n_embd: int) -> int:
    """Bytes of the hidden states of ``n_layers`` layers: layers × chunks × n_ctx × n_embd × 4
    (f32; the ``.npy`` headers add 128 bytes per chunk file, counted too)."""
    return n_layers * n_chunk * (n_ctx * n_embd * 4 + 128)


def check_free_space(
    directory: Path,
    needs: dict[str, int],
    fixes: str = PREFIX_REUSE_FIXES,
    free: Callable[[Path], int] = free_bytes,
) -> None:
    """Raise :class:`DiskSpaceError` when ``directory``'s disk has less free space than the sum
    of ``needs`` (what → bytes, e.g. ``{"hidden states": …, "baseline": …}``), naming each size,
    the free space and ``fixes``. ``free`` is the probe (a test patches it)."""
    need = sum(needs.values())
    have = free(directory)
    if need > have:
        parts = " + ".join(f"{what} {format_bytes(n)}" for what, n in needs.items() if n)
        raise DiskSpaceError(
            f"the quantbench cache {directory} needs {format_bytes(need)} "
            f"({parts}) but its disk has {format_bytes(have)} free: {fixes}"
        )


def hidden_root(cache_dir: Path, identity: RunIdentity) -> Path:
    """Directory of one baseline key's hidden states (named like the baseline file)."""
    name = f"{identity.model_sha256[:12]}-c{identity.n_ctx}-{identity.chunks}ch-{identity.digest()}"
    return Path(cache_dir) / "hidden" / name


def layer_dir(cache_dir: Path, identity: RunIdentity, layer: int) -> Path:
    """``hidden_root/L<layer>`` (3 digits)."""
    return hidden_root(cache_dir, identity) / f"L{layer:03d}"


def chunk_path(cache_dir: Path, identity: RunIdentity, layer: int, chunk: int) -> Path:
    """The ``.npy`` file of one chunk's input of ``layer``."""
    return layer_dir(cache_dir, identity, layer) / f"chunk{chunk:05d}.npy"


def tokens_digest(tokens: np.ndarray) -> str:
    """sha256 (16 hex) of the int32 chunk tokens: the manifest checks the rows belong to them."""
    return hashlib.sha256(np.ascontiguousarray(tokens, dtype=np.int32).tobytes()).hexdigest()[:16]


def _manifest(tokens: np.ndarray, n_embd: int) -> dict:
    n_chunk, n_ctx = tokens.shape
    return {
        "n_chunk": int(n_chunk),
        "n_ctx": int(n_ctx),
        "n_embd": int(n_embd),
        "tokens": tokens_digest(tokens),
        "dtype": "float32",
    }


def cached_layers(
    cache_dir: Path, identity: RunIdentity, layers: Iterable[int], tokens: np.ndarray, n_embd: int
) -> set[int]:
    """The layers among ``layers`` whose hidden states are complete in the cache for these
    tokens (manifest present, equal, every chunk file there)."""
    want = _manifest(tokens, n_embd)
    done = set()
    for layer in layers:
        d = layer_dir(cache_dir, identity, layer)
        try:
            if json.loads((d / "layer.json").read_text()) != want:
                continue
        except (OSError, ValueError):
            continue
        if all((d / f"chunk{i:05d}.npy").is_file() for i in range(want["n_chunk"])):
            done.add(layer)
    return done


class HiddenWriter:
    """Writes the captured rows of each decode as per-chunk files, then each layer's manifest.

    Args: cache_dir, identity: the baseline key; layers: the layers being written;
    tokens: int32 (n_chunk, n_ctx); n_embd: model width.
    Call :meth:`add` after every decode with its first chunk index and the capture's
    ``{L: float32 (k·n_ctx, n_embd)}``, then :meth:`finish` (writes the manifests).
    """

    def __init__(
        self,
        cache_dir: Path,
        identity: RunIdentity,
        layers: Iterable[int],
        tokens: np.ndarray,
        n_embd: int,
    ) -> None:
        self.cache_dir, self.identity = Path(cache_dir), identity
        self.layers = sorted(set(layers))
        self.tokens, self.n_embd = tokens, n_embd
        for layer in self.layers:
            layer_dir(cache_dir, identity, layer).mkdir(parents=True, exist_ok=True)

    def add(self, first_chunk: int, rows: dict[int, np.ndarray]) -> None:
        """Write chunks ``first_chunk …`` of every layer from one decode's captured rows.

        Raises ValueError when a layer is missing or the rows are not (k·n_ctx, n_embd)."""
        n_ctx = self.tokens.shape[1]
        for layer in self.layers:
            if layer not in rows:
                raise ValueError(f"no captured rows for layer {layer}")
            block = rows[layer]
            if block.ndim != 2 or block.shape[1] != self.n_embd or block.shape[0] % n_ctx:
                raise ValueError(
                    f"captured rows of layer {layer} have shape {block.shape}, "
                    f"expected (k·{n_ctx}, {self.n_embd})"
                )
            for j in range(block.shape[0] // n_ctx):
                dest = chunk_path(self.cache_dir, self.identity, layer, first_chunk + j)
                tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
                try:
                    with open(tmp, "wb") as fh:
                        np.save(
                            fh,
                            np.ascontiguousarray(
                                block[j * n_ctx : (j + 1) * n_ctx], dtype=np.float32
                            ),
                        )
                    os.replace(tmp, dest)
                finally:
                    tmp.unlink(missing_ok=True)

    def finish(self) -> None:
        """Write each layer's manifest (last: a layer without it is incomplete)."""
        text = json.dumps(_manifest(self.tokens, self.n_embd)) + "\n"
        for layer in self.layers:
            atomic_write_text(layer_dir(self.cache_dir, self.identity, layer) / "layer.json", text)


def ensure_hidden_states(
    cache_dir: Path,
    identity: RunIdentity,
    layers: Iterable[int],
    tokens: np.ndarray,
    n_embd: int,
    compute: Callable[[HiddenWriter], None],
    extra_needs: dict[str, int] | None = None,
    free: Callable[[Path], int] = free_bytes,
) -> int:
    """Make the hidden states of ``layers`` present in the cache; return their total bytes.

    Under the key's lock, the layers not cached yet are computed in one pass: ``compute`` gets a
    :class:`HiddenWriter` for exactly those layers and must evaluate every chunk with a
    :class:`~pytest_quantbench.engine.tail.HiddenCapture` of them, calling ``writer.add`` per
    decode (alone, or in the same pass that writes the baseline file). Before that, the free
    space is checked against their size plus ``extra_needs`` (e.g. ``{"baseline": bytes}``).

    Args:
        tokens: int32 (n_chunk, n_ctx); n_embd: model width.
    Raises:
        DiskSpaceError: the disk is too small (nothing written); whatever ``compute`` raises
        (the incomplete layers then have no manifest and are recomputed next time).
    """
    layers = sorted(set(layers))
    n_chunk, n_ctx = tokens.shape
    root = hidden_root(cache_dir, identity)
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        missing = [
            layer
            for layer in layers
            if layer not in cached_layers(cache_dir, identity, [layer], tokens, n_embd)
        ]
        if missing:
            needs = {
                "hidden states": hidden_bytes(len(missing), n_chunk, n_ctx, n_embd),
                **(extra_needs or {}),
            }
            check_free_space(Path(cache_dir), needs, free=free)
            writer = HiddenWriter(cache_dir, identity, missing, tokens, n_embd)
            compute(writer)
            writer.finish()
    return hidden_bytes(len(layers), n_chunk, n_ctx, n_embd)


def load_hidden(
    cache_dir: Path, identity: RunIdentity, layer: int, chunks: Iterable[int]
) -> np.ndarray:
    """The cached input of ``layer`` for ``chunks``: float32 (k, n_ctx, n_embd), read (not
    mapped: the tail's decode copies it into the batch anyway). Raises OSError when absent."""
    return np.stack([np.load(chunk_path(cache_dir, identity, layer, i)) for i in chunks])


def capture_pass(model, capture, tokens: np.ndarray, writer: HiddenWriter) -> None:
    """One evaluation pass that only captures: evaluate every chunk with ``model`` (a
    :class:`~pytest_quantbench.engine.llama.LlamaModel` whose context has ``capture``'s hook),
    ``model.settings.n_seq`` chunks per decode, and hand each decode's rows to ``writer``.
    This is how hidden states are added to a baseline that is already cached."""
    n_seq = model.settings.n_seq
    for first in range(0, tokens.shape[0], n_seq):
        model.eval_chunks(tokens[first : first + n_seq])
        writer.add(first, capture.take())
