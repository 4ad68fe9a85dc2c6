"""Prefix reuse for the item path: which items run a tail, which tail, in which order.

A unit whose first changed tensor is in layer L ≥ 1 (its start layer, :func:`start_layer`)
evaluates only layers L…N−1 and the head of a tail model (:mod:`pytest_quantbench.engine.tail`)
from the cached input of layer L (:mod:`pytest_quantbench.hidden`); the numbers are bit-identical
to a full evaluation, which the :class:`TailPool` checks on the first chunk before a tail serves
any item (else prefix reuse is off for the model in that run, with the reason). Prefix reuse
changes no number, so it enters no result or baseline key; each row says which path measured it
(:func:`eval_path`). See README.md#prefix-reuse.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
from filelock import FileLock

from .config import PREFIX_REUSE_MODES as MODES
from .hidden import load_hidden

if TYPE_CHECKING:  # pragma: no cover
    from .engine.swap import SwapModel
    from .engine.tail import TailModel

_BLK = re.compile(r"^blk\.(\d+)\.")
T = TypeVar("T")


def start_layer(tensor_names: Iterable[str]) -> int | None:
    """The smallest layer among the changed tensors, or None when the unit runs the full model:
    it changes ``token_embd``, another tensor outside ``blk.*``, a layer-0 tensor, or nothing."""
    layers = []
    for name in tensor_names:
        m = _BLK.match(name)
        if m is None:
            return None
        layers.append(int(m.group(1)))
    if not layers or min(layers) == 0:
        return None
    return min(layers)


def eval_path(layer: int | None) -> str:
    """The ``eval_path`` column: ``full`` or ``tail:L``."""
    return "full" if layer is None else f"tail:{layer}"


def prefix_reuse_enabled(mode: str, engine: str, n_gpu_layers: int) -> tuple[bool, str]:
    """Whether prefix reuse may run, and the header's note.

    mode: ``--quantbench-prefix-reuse`` (``auto`` or ``off``); engine: the item engine
    (``inplace`` swaps in this process; the file engine never uses tails); n_gpu_layers: > 0 on a
    GPU build, where tails stay off until verified on a device.
    Raises ValueError for another mode (the option's choices name them)."""
    if mode not in MODES:
        raise ValueError(f"--quantbench-prefix-reuse={mode!r}: use one of {', '.join(MODES)}")
    if mode == "off":
        return False, "prefix reuse: off (--quantbench-prefix-reuse=off)"
    if engine != "inplace":
        return False, f"prefix reuse: off (the {engine} engine evaluates whole models)"
    if n_gpu_layers > 0:
        return False, (
            "prefix reuse: off on a GPU build (n_gpu_layers > 0) until it is verified on a device"
        )
    return True, "prefix reuse: auto (tails where the first-chunk self-check passes)"


def layer_major(units: Sequence[T], layer_of: Callable[[T], int | None]) -> list[T]:
    """``units`` ordered so consecutive units share a tail: full-model units first, then by start
    layer ascending; the order within a layer is kept (a stable sort, so every xdist worker that
    collects the same units gets the same order)."""
    return sorted(units, key=lambda u: -1 if (layer := layer_of(u)) is None else layer)


def tail_gguf_path(cache_dir: Path, model_sha256: str, layer: int) -> Path:
    """``<cache>/tails/<model sha 16>-L<layer>.gguf``: one header-only tail per model and L."""
    return Path(cache_dir) / "tails" / f"{model_sha256[:16]}-L{layer:03d}.gguf"


def ensure_tail_gguf(cache_dir: Path, model_path: Path, model_sha256: str, layer: int) -> Path:
    """The tail GGUF of ``layer``, written once per cache under a file lock."""
    from .engine.tail import write_tail_gguf

    path = tail_gguf_path(cache_dir, model_sha256, layer)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            write_tail_gguf(model_path, layer, path)
    return path


class TailChunks:
    """Drop-in for the full model in the chunk loop: ``eval_chunks(tokens, out)`` evaluates the
    tail on the cached input of its layer for the next chunks, in order.

    Args: tail: a :class:`~pytest_quantbench.engine.tail.TailModel`; hidden: chunk indices →
    float32 (k, n_ctx, n_embd) (e.g. :func:`load_hidden` bound to the key and layer);
    tokens: int32 (n_chunk, n_ctx), the run's chunks (checked against what the loop passes).
    """

    def __init__(self, tail, hidden: Callable[[range], np.ndarray], tokens: np.ndarray) -> None:
        self.tail, self.hidden, self.tokens = tail, hidden, tokens
        self.settings = tail.settings
        self.next_chunk = 0

    def eval_chunks(self, tokens: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """float32 (k, S, V) logits of the next k chunks. Raises ValueError when ``tokens`` are
        not those chunks (the loop must go through the chunks in order, once)."""
        chunks = range(self.next_chunk, self.next_chunk + tokens.shape[0])
        if not np.array_equal(tokens, self.tokens[chunks.start : chunks.stop]):
            raise ValueError(
                f"the tail evaluates chunks in order; chunks {chunks.start}… do not "
                "hold the tokens passed"
            )
        self.next_chunk = chunks.stop % self.tokens.shape[0]
        return self.tail.eval_hidden(self.hidden(chunks), out)


class TailPool:
    """The tails of one worker: at most ``capacity`` loaded (least recently used closed first),
    each self-checked on chunk 0 against the full model before it serves an item.

    Args:
        full: the worker's loaded full model (``SwapModel.model``); settings: its eval settings;
        cache_dir, identity: the cache and the baseline key of the hidden states;
        model_sha256: the model's hash (tail file key); tokens: int32 (n_chunk, n_ctx);
        capacity: tails kept loaded.
    Attributes:
        off_reason: None, or why prefix reuse was turned off for this model in this run.
    """

    def __init__(
        self,
        full,
        settings,
        cache_dir: Path,
        identity,
        model_sha256: str,
        tokens: np.ndarray,
        capacity: int = 2,
    ) -> None:
        self.full, self.settings = full, settings
        self.cache_dir, self.identity, self.model_sha256 = Path(cache_dir), identity, model_sha256
        self.tokens, self.capacity = tokens, max(1, capacity)
        self.off_reason: str | None = None
        self._tails: OrderedDict[int, TailModel] = OrderedDict()
        self._full_logits: np.ndarray | None = None

    def _check_chunks(self) -> range:
        return range(min(self.settings.n_seq, self.tokens.shape[0]))

    def full_logits(self) -> np.ndarray:
        """The full model's logits of the first decode's chunks (computed once per worker)."""
        if self._full_logits is None:
            self._full_logits = self.full.eval_chunks(self.tokens[self._check_chunks()])
        return self._full_logits

    def hidden(self, layer: int) -> Callable[[range], np.ndarray]:
        """Chunk indices → the cached input of ``layer``, float32 (k, n_ctx, n_embd)."""
        return lambda chunks: load_hidden(self.cache_dir, self.identity, layer, chunks)

    def get(self, layer: int):
        """The loaded, self-checked tail of ``layer``, or None when prefix reuse is off for the
        model (see :attr:`off_reason`). Call it while no swap is active on the full model: a new
        tail takes the full model's tensor pointers as they are (:func:`evaluate_item` does)."""
        from .engine.llama import EngineError
        from .engine.tail import TailModel, self_check

        if self.off_reason is not None:
            return None
        tail = self._tails.get(layer)
        if tail is not None:
            self._tails.move_to_end(layer)
            return tail
        try:
            path = ensure_tail_gguf(self.cache_dir, self.full.path, self.model_sha256, layer)
            tail = TailModel(self.full, path, layer, self.settings)
        except (EngineError, ValueError, OSError) as exc:
            self.off_reason = f"the tail at layer {layer} could not be loaded: {exc}"
            return None
        problem = self_check(tail, self.hidden(layer)(self._check_chunks()), self.full_logits())
        if problem is not None:
            tail.close()
            self.off_reason = problem
            return None
        self._tails[layer] = tail
        while len(self._tails) > self.capacity:
            self._tails.popitem(last=False)[1].close()
        return tail

    def chunks(self, layer: int) -> TailChunks | None:
        """A :class:`TailChunks` for the item loop, or None (then evaluate the full model)."""
        tail = self.get(layer)
        return None if tail is None else TailChunks(tail, self.hidden(layer), self.tokens)

    def close(self) -> None:
        """Close every loaded tail."""
        while self._tails:
            self._tails.popitem()[1].close()


def ensure_baseline_and_hidden(
    model_path: Path,
    settings,
    lib_path: Path | None,
    cache_dir: Path,
    identity,
    tokens: np.ndarray,
    n_vocab: int,
    n_embd: int,
    layers: Iterable[int],
    base_path: Path,
    base_bytes: int,
):
    """The baseline file and the hidden states of ``layers``, each computed once per key.

    When hidden states are missing, one model is loaded with a
    :class:`~pytest_quantbench.engine.tail.HiddenCapture` of the missing layers, and the same
    pass writes the base file (when it is not cached either) and the rows; a baseline already
    cached gets its hidden states by one capture pass, not recomputed. Free space for both is
    checked first (:func:`pytest_quantbench.hidden.ensure_hidden_states`).

    Args: model_path, settings, lib_path: the worker's model and evaluation settings; cache_dir,
    identity: the cache and the baseline key; tokens: int32 (n_chunk, n_ctx); n_vocab, n_embd:
    the model's; layers: the start layers of the planned items; base_path: the baseline cache
    file; base_bytes: its size (``kldbase.expected_file_size``).
    Returns (the opened KLDBaseFile, bytes of the hidden states of ``layers``).
    Raises DiskSpaceError before any evaluation when the disk is too small; what
    :func:`pytest_quantbench.baseline.ensure_baseline` raises.
    """
    from .baseline import ensure_baseline, write_baseline
    from .engine.llama import LlamaModel
    from .engine.tail import HiddenCapture
    from .hidden import capture_pass, ensure_hidden_states

    def compute(writer) -> None:
        capture = HiddenCapture(writer.layers, n_embd, lib_path)
        decoded: list[int] = []

        def on_decode(first: int) -> None:
            decoded.append(first)
            writer.add(first, capture.take())

        with LlamaModel(
            Path(model_path), settings, lib_path, context_params_hook=capture.hook
        ) as model:
            ensure_baseline(
                base_path,
                tokens,
                n_vocab,
                lambda dest: write_baseline(model, tokens, dest, on_decode),
            )
            if not decoded:  # the baseline was cached already: one capture pass
                capture_pass(model, capture, tokens, writer)

    base_needed = 0 if Path(base_path).exists() else base_bytes
    size = ensure_hidden_states(
        cache_dir, identity, layers, tokens, n_embd, compute, extra_needs={"baseline": base_needed}
    )

    def compute_plain(dest: Path) -> None:
        with LlamaModel(Path(model_path), settings, lib_path) as model:
            write_baseline(model, tokens, dest)

    return ensure_baseline(base_path, tokens, n_vocab, compute_plain), size


def header_line(note: str, n_layers: int, hidden_size: int) -> str:
    """The run header's prefix-reuse line: the mode and, when on, the hidden states' layers and
    total size (:func:`pytest_quantbench.hidden.hidden_bytes`)."""
    from .hidden import format_bytes

    if not n_layers:
        return f"quantbench {note}"
    return f"quantbench {note}; hidden states of {n_layers} layer(s): {format_bytes(hidden_size)}"


def evaluate_item(
    pool: TailPool | None, swap, replacements: dict, evaluate, layer: int | None = None
) -> str:
    """Swap ``replacements`` in and run ``evaluate(model)`` on the tail of ``layer``, or on the
    full model; return the row's ``eval_path``.

    pool: the worker's :class:`TailPool`, or None when prefix reuse is off; swap: the worker's
    :class:`~pytest_quantbench.engine.swap.SwapModel`; replacements: full-model tensor name →
    swap replacement (as ``SwapModel.swapped`` takes it: only the tensors the item changes);
    evaluate: the chunk loop, called with the object whose ``eval_chunks``/``settings`` it uses
    (``swap.model``, or a :class:`TailChunks`); layer: the unit's start layer
    (:func:`start_layer` of all its tensors, a superset of ``replacements``: the tail holds
    every replaced tensor), None: the start layer of ``replacements``. A tail whose self-check
    failed, a unit changing ``token_embd``, a non-``blk`` tensor or layer 0 run the full model."""
    if layer is None:
        layer = start_layer(replacements)
    chunks = pool.chunks(layer) if pool is not None and layer is not None else None
    if chunks is None:
        with swap.swapped(replacements):
            evaluate(swap.model)
        return eval_path(None)
    with chunks.tail.swapped(replacements):
        evaluate(chunks)
    return eval_path(layer)


def summary_lines(rows: Iterable[dict]) -> list[str]:
    """The terminal summary's prefix-reuse line from this run's measured rows: how many items
    ran on tails and on the full model, and why prefix reuse turned itself off (``prefix_note``).
    Empty when no row carries an ``eval_path`` (reused or skipped items only)."""
    paths = [r["eval_path"] for r in rows if r.get("eval_path") and not r.get("reused")]
    if not paths:
        return []
    tails = sum(1 for p in paths if p != "full")
    notes = sorted({r["prefix_note"] for r in rows if r.get("prefix_note")})
    line = (
        f"prefix reuse: {tails} item(s) evaluated on tails, {len(paths) - tails} on the full "
        "model (eval_path column)"
    )
    return [line] + [f"prefix reuse turned off: {note}" for note in notes]


class PrefixReuse:
    """Prefix reuse in one process: whether it is on, the start layers of the planned units, the
    hidden states computed with the baseline, the worker's tails, each item's evaluation path.

    Args:
        inputs: the run's :class:`~pytest_quantbench.runinputs.RunInputs`;
        swap_model: returns the worker's :class:`~pytest_quantbench.engine.swap.SwapModel`
            (or None); units: returns the planned :class:`~pytest_quantbench.measure.WorkUnit`
            list (all of them: every xdist worker plans the same, so all want the same layers).
    """

    def __init__(
        self, inputs, swap_model: Callable[[], SwapModel | None], units: Callable[[], Sequence]
    ) -> None:
        self.inputs = inputs
        self._swap_model = swap_model
        self._units = units
        self._pool: TailPool | None = None

    @property
    def mode(self) -> tuple[bool, str]:
        """(on, note): :func:`prefix_reuse_enabled` for the run's settings; off with a user
        ``--quantbench-kld-base`` file (no pass over the model computes hidden states then)."""
        cfg = self.inputs.config
        on, note = prefix_reuse_enabled(cfg.prefix_reuse, cfg.engine, cfg.n_gpu_layers)
        if on and self.inputs.user_base is not None:
            return False, (
                "prefix reuse: off (the baseline is the --quantbench-kld-base file; "
                "no baseline pass computes hidden states)"
            )
        return on, note

    @property
    def start_layers(self) -> list[int]:
        """The start layers (≥ 1) of the planned units, ascending."""
        return sorted(
            {layer for unit in self._units() if (layer := start_layer(unit.tensors)) is not None}
        )

    @property
    def active(self) -> bool:
        """On, and some planned unit starts after layer 0."""
        return self.mode[0] and bool(self.start_layers)

    def _hidden_args(self) -> tuple:
        ins = self.inputs
        return ins.cache_dir, ins.run_identity, self.start_layers, ins.chunk_tokens

    def hidden_size(self) -> int:
        """Bytes of the hidden states of :attr:`start_layers` (:func:`hidden.hidden_bytes`)."""
        from .hidden import hidden_bytes

        n_chunk, n_ctx = self.inputs.chunk_tokens.shape
        return hidden_bytes(len(self.start_layers), n_chunk, n_ctx, self.inputs.model_header.n_embd)

    def header_lines(self) -> list[str]:
        """The run header's prefix-reuse line (:func:`header_line`)."""
        on, note = self.mode
        n_layers = len(self.start_layers) if on else 0
        return [header_line(note, n_layers, self.hidden_size() if n_layers else 0)]

    def _base_bytes(self) -> int:
        from .kldbase import expected_file_size

        n_chunk, n_ctx = self.inputs.chunk_tokens.shape
        return expected_file_size(n_ctx, self.inputs.tokenizer.n_vocab, n_chunk)

    def check_disk_space(self) -> None:
        """Before any item: raise :class:`~pytest_quantbench.hidden.DiskSpaceError` when the
        cache's disk cannot hold the hidden states still missing plus the run's base file (when
        that is missing too). Nothing when prefix reuse is inactive."""
        if not self.active:
            return
        from .baseline import baseline_cache_path
        from .hidden import cached_layers, check_free_space, hidden_bytes

        cache_dir, identity, layers, tokens = self._hidden_args()
        base_path = baseline_cache_path(cache_dir, identity)
        n_embd = self.inputs.model_header.n_embd
        missing = set(layers) - cached_layers(cache_dir, identity, layers, tokens, n_embd)
        if missing:
            n_chunk, n_ctx = tokens.shape
            check_free_space(
                cache_dir,
                {
                    "hidden states": hidden_bytes(len(missing), n_chunk, n_ctx, n_embd),
                    "baseline": 0 if Path(base_path).exists() else self._base_bytes(),
                },
            )

    def baseline(self, base_path: Path):
        """The baseline file at ``base_path`` and the hidden states of :attr:`start_layers`,
        each computed once across workers and runs (:func:`ensure_baseline_and_hidden`).
        Raises DiskSpaceError, EngineError, what :func:`baseline.ensure_baseline` raises."""
        ins = self.inputs
        cache_dir, identity, layers, tokens = self._hidden_args()
        base, _ = ensure_baseline_and_hidden(
            ins.model_path,
            ins.eval_settings,
            None,
            cache_dir,
            identity,
            tokens,
            ins.tokenizer.n_vocab,
            ins.model_header.n_embd,
            layers,
            base_path,
            self._base_bytes(),
        )
        return base

    @property
    def pool(self) -> TailPool:
        """The worker's :class:`TailPool` over the swap model (made on first use)."""
        if self._pool is None:
            ins = self.inputs
            swap = self._swap_model()
            assert swap is not None  # active only with the in-process engine (its model loaded)
            self._pool = TailPool(
                swap.model,
                ins.eval_settings,
                ins.cache_dir,
                ins.run_identity,
                ins.model_sha256,
                ins.chunk_tokens,
            )
        return self._pool

    def run_item(self, unit, row: dict, swap, replacements: dict, evaluate) -> str:
        """:func:`evaluate_item` for ``unit`` on its tail (when prefix reuse is active and the
        unit starts after layer 0), else on the full model; returns ``eval_path``. When a
        failed self-check sent the unit to the full model, ``row["prefix_note"]`` says why."""
        layer = start_layer(unit.tensors) if self.active else None
        pool = self.pool if layer is not None else None

        def noted(model) -> None:  # the path is in the row before the chunk loop runs, so an
            # early verdict (earlystop.EarlyVerdict raised from the loop) keeps it
            row["eval_path"] = eval_path(None if model is swap.model else layer)
            evaluate(model)

        path = evaluate_item(pool, swap, replacements, noted, layer)
        if pool is not None and pool.off_reason is not None:
            row["prefix_note"] = pool.off_reason
        return path

    def close(self) -> None:
        """Close the worker's tails (before the swap model they point at is freed)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None
