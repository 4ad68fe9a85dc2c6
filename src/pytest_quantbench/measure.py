"""Measuring one work unit: quantize its tensors, evaluate every chunk, accumulate the statistics.

The two measuring paths, on explicit inputs (no run state): :func:`measure_inplace` quantizes in
memory and swaps the tensors into the one loaded baseline model; :func:`measure_file` writes a
variant GGUF with llama-quantize and loads it. Both evaluate with :func:`evaluate`, the chunk loop
against the baseline file. Also the vocabulary of one item shared by the planning modules:
:class:`WorkUnit`, :class:`ItemSkip` and :func:`fallback_reason`. Nothing here knows pytest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class ItemSkip(Exception):
    """The item cannot be measured as asked (fallback type, missing imatrix…); str is the reason."""


@dataclass(frozen=True)
class WorkUnit:
    """What one item measures: ``tensors`` (names, natural order) quantized to ``qtype``.

    ``name`` is the column name (the tensor, or a group name); ``qtype`` the user's spelling.
    """

    name: str
    tensors: tuple[str, ...]
    qtype: str

    @property
    def id(self) -> str:
        """The pytest item name, ``<tensor>[<qtype>]``."""
        return f"{self.name}[{self.qtype}]"


def fallback_reason(tensor: str, written: str, requested: str, why: str | None) -> str:
    """The skip reason of a fallback type (both engines plan it alike): what llama-quantize
    writes for ``tensor`` and ``why`` (:func:`qtypes.predict_written_type`'s reason, whose
    " for <tensor>" is dropped: the tensor is named once)."""
    why = why.replace(f" for {tensor}", "") if why else "fallback"
    return f"llama-quantize writes {written} instead of {requested} for {tensor} ({why})"


class ChunkBuffers:
    """float32 arrays the chunk loop reuses, by role, across chunks and items.

    A fresh array per chunk costs its page faults on every decode (about 30 ms per 50 MB of
    logits on a 2-core VM, where copying into a kept array takes 5 ms); the loop copies the
    logits of two decodes in turn and decodes the base log-probs into arrays kept here. An array
    is replaced when a role asks for another shape.
    """

    def __init__(self) -> None:
        self._arrays: dict[str, Any] = {}

    def get(self, role: str, shape: tuple[int, ...]):
        """The float32 array of ``shape`` kept for ``role`` (uninitialised when new)."""
        import numpy as np

        array = self._arrays.get(role)
        if array is None or array.shape != shape:
            array = self._arrays[role] = np.empty(shape, dtype=np.float32)
        return array


def evaluate(model, base, acc, buffers: ChunkBuffers | None = None) -> None:
    """Evaluate every chunk of the baseline file with ``model`` into ``acc``, n_seq chunks per
    decode (the baseline's own layout, so identical weights give identical logits).

    The statistics of one decode's chunks run on a helper thread while the next decode runs
    (the engine and numpy release the GIL), in chunk order, so the results are those of a
    sequential loop; an error in either surfaces here (a statistics error one decode later).
    An accumulator with ``is_look(n_chunks_done)`` (an early-stopping one, :mod:`earlystop`)
    may end the loop by raising from ``add_chunk`` at a look: before a decode whose preceding
    chunks reach a look, the loop waits for their statistics, so a stopped item decodes no
    chunk past its verdict. Logits and base log-probs go into ``buffers`` (the session passes
    its own, kept across items; None: arrays for this call only).
    """
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    buffers = buffers if buffers is not None else ChunkBuffers()
    n_seq = model.settings.n_seq
    shape = (n_seq, base.n_scored, base.n_vocab)
    # two logits arrays in turn: decode d+1 writes one while the statistics of d read the other
    logits_bufs = (buffers.get("logits0", shape), buffers.get("logits1", shape))
    base_buf = buffers.get("base", shape[1:])

    def add_chunks(start, logits):
        for i, chunk_logits in enumerate(logits, start):
            acc.add_chunk(chunk_logits, base.chunk_logprobs(i, out=base_buf), base.targets(i))

    is_look = getattr(acc, "is_look", None)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="quantbench-stats") as stats:
        pending = None
        for d, start in enumerate(range(0, base.n_chunk, n_seq)):
            if (
                pending is not None
                and is_look is not None
                and any(is_look(k) for k in range(start - n_seq + 1, start + 1))
            ):
                pending.result()  # a verdict at this look raises here, before the next decode
                pending = None
            tokens = np.asarray(base.tokens[start : start + n_seq])
            logits = model.eval_chunks(tokens, out=logits_bufs[d % 2][: len(tokens)])
            if pending is not None:
                pending.result()
            pending = stats.submit(add_chunks, start, logits)
        if pending is not None:
            pending.result()


def quantized(swap, header, imatrix, name: str, wtype) -> tuple[int, int, int, Any]:
    """``name``'s baseline weights quantized to ``wtype`` in memory, as a swap replacement
    ``(type id, type size, row size, uint8 data)``.

    swap: :class:`~pytest_quantbench.engine.swap.SwapModel`; header: the baseline's
    :class:`~pytest_quantbench.gguf.GGUFHeader`; imatrix: checked
    :class:`~pytest_quantbench.imatrix.Imatrix` or None; wtype: the ggml type written.
    """
    info = header.tensor(name)
    weights = imatrix.weights_for(name) if imatrix is not None else None
    data = swap.quantize(
        swap.baseline_f32(name, info.type_name),
        wtype.type_id,
        wtype.row_size(info.ne0),
        wtype.interleave,
        imatrix=weights,
    )
    return wtype.type_id, wtype.type_size, wtype.row_size(info.ne0), data


def measure_inplace(
    swap,
    header,
    imatrix,
    written: dict[str, Any],
    base,
    acc,
    buffers: ChunkBuffers | None = None,
    run=None,
) -> str:
    """Quantize each changed tensor in memory with ggml_quantize_chunk, swap them all in,
    evaluate, restore; return the ``eval_path`` (``full`` or ``tail:L``).

    written: tensor → ggml type planned (:mod:`typeplan`); base: the baseline
    :class:`~pytest_quantbench.kldbase.KLDBaseFile`; acc: a
    :class:`~pytest_quantbench.metrics.KLDAccumulator`; run: ``run(swap, replacements,
    evaluate)`` swaps the replacements in and calls ``evaluate(model)`` on the full model or a
    tail, returning the eval_path (the session passes :meth:`prefix.PrefixReuse.run_item`);
    None: the full model. Other arguments as :func:`quantized`.
    """
    replacements = {}
    for name, wtype in written.items():
        info = header.tensor(name)
        if wtype.name == info.type_name:
            continue  # a preset that leaves this tensor as it is
        replacements[name] = quantized(swap, header, imatrix, name, wtype)
    if run is not None:
        return run(swap, replacements, lambda model: evaluate(model, base, acc, buffers))
    with swap.swapped(replacements):
        evaluate(swap.model, base, acc, buffers)
    return "full"


def measure_file(
    inputs,
    unit: WorkUnit,
    qtype,
    written: dict[str, Any],
    base,
    acc,
    buffers: ChunkBuffers | None = None,
) -> None:
    """Write a variant GGUF with llama-quantize, check its types against the plan, load it,
    evaluate. llama-quantize gets the requested type (it applies its own fallbacks), or the
    preset's chosen type per tensor.

    inputs: the run's :class:`~pytest_quantbench.runinputs.RunInputs` (model, header, settings,
    threads, imatrix file, work directory); qtype: the resolved qtype of ``unit``; other
    arguments as :func:`measure_inplace`. Raises EngineError (llama-quantize, model load,
    :func:`check_written`).
    """
    from .engine.llama import LlamaModel
    from .engine.quantize import run_llama_quantize
    from .gguf import read_model_header

    header = inputs.model_header
    changes = {
        t: (w.name if qtype.kind == "preset" else qtype.ggml_type.name)
        for t, w in written.items()
        if w.name != header.tensor(t).type_name
    }
    if not changes:  # every tensor keeps its baseline type: the variant is the baseline
        with LlamaModel(inputs.model_path, inputs.eval_settings) as model:
            evaluate(model, base, acc, buffers)
        return
    variant = inputs.work_dir / f"variant-{unit.id}.gguf"
    own = {t.name: t.type_name for t in header.tensors}  # a quantized baseline keeps its types
    floats = ("f32", "f16", "bf16")
    try:
        run_llama_quantize(
            inputs.model_path,
            variant,
            changes,
            baseline_type=inputs.config.baseline_qtype,
            threads=inputs.threads,
            imatrix=inputs.imatrix_path,
            keep=own,
            requantize=any(own[t] not in floats for t in changes),
        )
        check_written(header, read_model_header(variant), unit, written)
        with LlamaModel(variant, inputs.eval_settings) as model:
            evaluate(model, base, acc, buffers)
    finally:
        variant.unlink(missing_ok=True)


def check_written(baseline_header, header, unit: WorkUnit, planned: dict[str, Any]) -> None:
    """Read back the variant's types: the unit's tensors must have the planned types and every
    other tensor its baseline type.

    baseline_header / header: GGUF headers of the baseline and the variant.
    Raises EngineError naming the first tensors that differ (llama-quantize and our plan
    disagree, or it changed tensors outside the item).
    """
    from .engine.llama import EngineError

    base_types = {t.name: t.type_name for t in baseline_header.tensors}
    expected = {**base_types, **{n: w.name for n, w in planned.items()}}
    written = {t.name: t.type_name for t in header.tensors}
    wrong = sorted(n for n in expected if written.get(n) != expected[n])
    if wrong:
        raise EngineError(
            f"llama-quantize wrote {[written.get(n) for n in wrong[:5]]} for {wrong[:5]} "
            f"where {[expected[n] for n in wrong[:5]]} was expected "
            f"({len(wrong)} tensor(s) differ; item members: {len(unit.tensors)}); check "
            "--quantbench-baseline-qtype and the engine build"
        )
