"""Type planning: the ggml type llama-quantize writes for each tensor of a work unit.

A ggml type goes through llama-quantize's row-length / row-count fallbacks
(:func:`qtypes.predict_written_type`); a preset through its per-tensor mixture rules
(``llama-quantize --dry-run``, once per preset and process). Both engines plan alike, so both
skip the same items for the same reasons (:class:`~measure.ItemSkip`).
"""

from __future__ import annotations

from typing import Any

from .measure import ItemSkip, WorkUnit, fallback_reason


class TypePlanner:
    """Plans the written types of work units on the baseline model of one run.

    Args:
        inputs: the run's :class:`~pytest_quantbench.runinputs.RunInputs` (config, model
            header and path, threads, importance matrix).
    """

    def __init__(self, inputs) -> None:
        self.inputs = inputs
        self._preset_types: dict[str, dict[str, str]] = {}

    def plan_types(self, unit: WorkUnit, qtype, row: dict[str, Any]) -> dict[str, Any]:
        """The ggml type llama-quantize writes for each tensor of ``unit`` (tensor → GGMLType).

        A ggml type goes through the row-length / row-count fallbacks
        (docs/llama-quantize.md#fallbacks); a preset through its per-tensor mixture rules
        (``llama-quantize --dry-run``). Records ``requested_type``, ``written_type``, ``fallback``
        and ``reason`` in ``row``. Raises ItemSkip: a fallback type (unless
        --quantbench-allow-fallback), a shape the type cannot hold, or a type that needs an
        importance matrix when none is given.
        """
        from .qtypes import TYPES_BY_NAME, UnsupportedShapeError, predict_written_type

        header = self.inputs.model_header
        written: dict[str, Any] = {}
        fallbacks: list[tuple[str, str]] = []
        if qtype.kind == "preset":
            row["requested_type"] = f"preset {qtype.name}"
            chosen = self.preset_types(qtype)
            for name in unit.tensors:
                if chosen.get(name) not in TYPES_BY_NAME:
                    raise ItemSkip(
                        f"preset {qtype.name} gives {name} type {chosen.get(name)}, "
                        "which this build cannot quantize to"
                    )
                written[name] = TYPES_BY_NAME[chosen[name]]
        else:
            target = qtype.ggml_type
            row["requested_type"] = target.name
            for name in unit.tensors:
                info = header.tensor(name)
                try:
                    wtype, why = predict_written_type(
                        target, info.ne0, info.n_rows, tensor_name=name
                    )
                except UnsupportedShapeError as exc:
                    raise ItemSkip(str(exc)) from None
                written[name] = wtype
                if wtype.name != target.name:
                    fallbacks.append((name, fallback_reason(name, wtype.name, target.name, why)))
        row["written_type"] = ",".join(sorted({t.name for t in written.values()}))
        if fallbacks:
            row["fallback"] = True
            more = (
                f" (and {len(fallbacks) - 1} more of the {len(unit.tensors)} members)"
                if len(fallbacks) > 1
                else ""
            )
            row["reason"] = fallbacks[0][1] + more
            if not self.inputs.config.allow_fallback:
                raise ItemSkip(row["reason"])
        for name, wtype in written.items():
            problem = self._imatrix_problem(name, wtype)
            if problem:
                raise ItemSkip(problem)
        return written

    def _imatrix_problem(self, name: str, wtype) -> str | None:
        """Why ``name`` cannot be quantized to ``wtype`` for lack of importance-matrix data, or
        None (docs/llama-quantize.md#imatrix-needs: the A types assert in ggml_quantize_chunk for
        every tensor; the R types are refused by llama-quantize except for token_embd and
        output)."""
        from .qtypes import needs_imatrix

        ins = self.inputs
        if not needs_imatrix(wtype) or wtype.name == ins.model_header.tensor(name).type_name:
            return None
        if ins.imatrix_source is None:
            return (
                f"{wtype.name} needs an importance matrix ({name}): pass "
                "--quantbench-imatrix FILE, or --quantbench-imatrix=auto to compute one "
                "from the corpus"
            )
        if ins.imatrix.weights_for(name) is not None:
            return None
        if wtype.imatrix == "rule" and name in ("token_embd.weight", "output.weight"):
            return None
        return (
            f"{wtype.name} needs importance-matrix data for {name}, and "
            f"{ins.imatrix.path.name} has no entry for it (llama-quantize: Missing "
            "importance matrix for tensor in a very low-bit quantization)"
        )

    def preset_types(self, qtype) -> dict[str, str]:
        """Tensor → ggml type name under llama-quantize preset ``qtype`` on the baseline model
        (its ``--dry-run``, once per preset and process). Raises ItemSkip when llama-quantize
        refuses the preset without an importance matrix, EngineError otherwise."""
        from .engine.llama import EngineError
        from .engine.quantize import preset_tensor_types

        ins = self.inputs
        cache = self._preset_types
        if qtype.name not in cache:
            try:
                cache[qtype.name] = preset_tensor_types(
                    ins.model_path, qtype.preset.name, threads=ins.threads, imatrix=ins.imatrix_path
                )
            except EngineError as exc:
                said = [
                    line.strip() for line in str(exc).splitlines() if "importance matrix" in line
                ]
                if said and ins.imatrix_source is None:
                    raise ItemSkip(
                        f"preset {qtype.name.lower()} needs an importance matrix "
                        f"(llama-quantize says: {said[-1]}): pass "
                        "--quantbench-imatrix FILE"
                    ) from None
                raise
        return cache[qtype.name]
