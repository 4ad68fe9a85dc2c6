"""Engine choice: which path measures a work unit (the in-process swap or a variant file), the
worker's one swap model, and the kernel probe that keeps a broken ggml type off the numbers.
"""

from __future__ import annotations

from functools import cached_property

from .measure import ItemSkip, WorkUnit, quantized

#: Largest mean KLD (nats) between a quantized tensor and its f32 dequantization that a working
#: kernel gives in :meth:`EngineChoice.check_kernel` (activation rounding only; a broken
#: kernel gives about 1).
KERNEL_PROBE_MAX_KLD = 0.05


class EngineChoice:
    """The engine paths of one process: :meth:`choose_engine`, :attr:`swap_model` and
    :meth:`check_kernel`.

    Args:
        inputs: the run's :class:`~pytest_quantbench.runinputs.RunInputs`.
    """

    def __init__(self, inputs) -> None:
        self.inputs = inputs
        self._swap_error: str | None = None
        self._kernel_checks: dict[str, tuple[str | None, float | None]] = {}

    def choose_engine(self, unit: WorkUnit) -> tuple[str, str | None]:
        """``("inplace", None)`` when the in-process swap can measure ``unit``, else
        ``("file", why)``: --quantbench-engine=file, a token_embd tied to the output (the
        engine's output duplicate is another tensor object), a non-float baseline tensor, an
        expert tensor with an importance matrix, or an engine library the swap cannot bind."""
        ins = self.inputs
        if ins.config.engine == "file":
            return "file", None
        if "token_embd.weight" in unit.tensors and self._tied_embeddings:
            return "file", (
                "token_embd.weight is tied to the output: the engine computes the "
                "output from its own duplicate of the tensor, which the in-process "
                "swap does not reach"
            )
        for name in unit.tensors:
            info = ins.model_header.tensor(name)
            if info.type_name not in ("f32", "f16", "bf16"):
                return (
                    "file",
                    f"{name} is {info.type_name} in the baseline (in-process needs float)",
                )
            if ins.imatrix is not None and len(info.shape) > 2 and info.shape[2] > 1:
                return "file", (
                    f"{name} has {info.shape[2]} experts: the in-process engine "
                    "applies importance matrices to 2-D tensors only"
                )
        if self.swap_model is None:
            return "file", self._swap_error
        for name in unit.tensors:  # split, merged or load-transformed tensors (GPU builds)
            info = ins.model_header.tensor(name)
            why = self.swap_model.swap_problem(name, info.type_name, tuple(info.shape))
            if why:
                return "file", why
        return "inplace", None

    def device_note(self, written) -> str | None:
        """:func:`engine.devices.device_note` for ``written`` (tensor → ggml type) with this run's
        offload: types without a CUDA matmul, measured on the CPU by the scheduler."""
        from .engine import devices

        ins = self.inputs
        offloaded = ins.eval_settings.n_gpu_layers > 0 and devices.is_gpu_build()
        base = {name: ins.model_header.tensor(name).type_name for name in written}
        return devices.device_note(written, base, offloaded)

    @cached_property
    def _tied_embeddings(self) -> bool:
        """No output.weight: the engine computes the output from a duplicate of token_embd."""
        return all(t.name != "output.weight" for t in self.inputs.model_header.tensors)

    @cached_property
    def swap_model(self):
        """The baseline loaded once in this process for in-process swaps (None if unusable)."""
        from .engine.llama import EngineError
        from .engine.swap import SwapModel

        try:
            return SwapModel(self.inputs.model_path, self.inputs.eval_settings)
        except EngineError as exc:
            self._swap_error = f"in-process engine unavailable: {exc}"
            return None

    def quantized(self, name: str, wtype):
        """:func:`measure.quantized` with this process's swap model and the run's imatrix."""
        return quantized(
            self.swap_model, self.inputs.model_header, self.inputs.imatrix, name, wtype
        )

    def probe_tensor(self, wtype) -> str | None:
        """The tensor the kernel of ``wtype`` is probed on: the first tensor of the model, in
        natural name order, that is a quantizable float matrix other than ``token_embd`` (read
        by row lookup, not by the matmul kernel) and that llama-quantize writes as ``wtype`` (no
        fallback), with importance-matrix data when the type needs it. The same tensor in every
        process of a run whatever the scheduling, so the probe is a fact of the type; None when
        no tensor qualifies."""
        from .qtypes import UnsupportedShapeError, needs_imatrix, predict_written_type
        from .selection import is_quantizable_tensor, natural_key

        ins = self.inputs
        for info in sorted(ins.model_header.tensors, key=lambda t: natural_key(t.name)):
            if (
                info.name == "token_embd.weight"
                or info.type_name not in ("f32", "f16", "bf16")
                or not is_quantizable_tensor(info.name, info.n_dims)
            ):
                continue
            try:
                written, _ = predict_written_type(
                    wtype, info.ne0, info.n_rows, tensor_name=info.name
                )
            except (UnsupportedShapeError, ValueError):
                continue
            if written.name != wtype.name:
                continue
            if needs_imatrix(wtype) and (
                ins.imatrix is None or ins.imatrix.weights_for(info.name) is None
            ):
                continue
            return info.name
        return None

    def check_kernel(self, name: str, wtype, baseline) -> float | None:
        """Make sure this engine build computes with ``wtype`` correctly, once per type and process.

        A type without a CPU ``vec_dot`` (e.g. the ARM-only q4_0_4x4) cannot be evaluated. Any
        other type whose ``to_float`` gives the weights back (relative error below 1) is probed:
        the tensor :meth:`probe_tensor` names (``name``, the item's tensor, only when none
        qualifies) quantized to ``wtype`` and the same weights dequantized to f32 must give
        nearly the same logits on the first chunk of ``baseline`` (the base file; mean KLD below
        :data:`KERNEL_PROBE_MAX_KLD`; only the activations' own rounding separates them). A build
        whose kernel for the type is broken would otherwise yield silently wrong numbers.
        Returns the probe's mean KLD (None when the type could not be probed): even a working
        kernel rounds the activations (e.g. to q8_1), and this shows by how much.
        Raises ItemSkip with the finding.
        """
        checked = self._kernel_checks
        if wtype.name not in checked:
            probe = self.probe_tensor(wtype) or name
            checked[wtype.name] = self._kernel_problem(probe, wtype, baseline)
        problem, kld = checked[wtype.name]
        if problem:
            raise ItemSkip(problem)
        return kld

    def _kernel_problem(self, name: str, wtype, baseline) -> tuple[str | None, float | None]:
        import numpy as np

        swap = self.swap_model
        info = self.inputs.model_header.tensor(name)
        if swap is None or info.type_name not in ("f32", "f16", "bf16"):
            return None, None
        traits = swap.traits(wtype.type_id)
        if traits is not None and not traits.vec_dot:
            return (
                f"this engine build has no CPU kernel for {wtype.name} (its vec_dot is "
                "missing; the type needs another build, e.g. ARM)"
            ), None
        replacement = self.quantized(name, wtype)
        deq = swap.dequantize(
            replacement[3],
            wtype.type_id,
            info.n_rows,
            info.ne0,
            wtype.row_size(info.ne0),
            wtype.interleave,
        )
        if deq is None:
            return None, None
        weights = swap.baseline_f32(name, info.type_name)
        if np.linalg.norm(deq - weights) > np.linalg.norm(weights):
            return None, None  # to_float does not give the weights back (e.g. *_bn keep the scale
            #              elsewhere): nothing to compare the kernel with
        chunk = baseline.tokens[0]
        logprobs = []
        for repl in (replacement, (0, 4, 4 * info.ne0, deq.reshape(-1).view(np.uint8))):
            with swap.swapped({name: repl}):
                logits = swap.model.eval_chunk(chunk).astype(np.float64)
            shifted = logits - logits.max(axis=1, keepdims=True)
            logprobs.append(shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True)))
        lq, ld = logprobs
        kld = float(np.mean(np.sum(np.exp(ld) * (ld - lq), axis=1)))
        if not np.isfinite(kld) or kld > KERNEL_PROBE_MAX_KLD:
            return (
                f"this engine build computes {wtype.name} wrongly: with {name} in "
                f"{wtype.name}, the logits differ from the same weights dequantized to f32 by "
                f"mean KLD {kld:.4f} on chunk 1 (a working kernel gives less than "
                f"{KERNEL_PROBE_MAX_KLD})"
            ), kld
        return None, kld

    def close(self) -> None:
        """Free the swap model if it was loaded."""
        if self.__dict__.get("swap_model") is not None:
            self.swap_model.close()
