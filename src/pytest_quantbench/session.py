"""One process's quantbench state: inputs, baseline and the measurement of one work unit.

Every pytest process (controller or xdist worker) holds one :class:`QuantbenchSession` in
``config.stash``. Its expensive parts are lazy: the controller only reads headers and tokenizes
(for the run header), workers load the baseline model once, ensure the baseline logits (computed
once across workers by :mod:`baseline`) and measure items. Nothing here knows pytest: skips are
raised as :class:`ItemSkip`, engine failures as EngineError / ValueError.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from . import inputs
from .config import ConfigError, QuantbenchConfig


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


def default_threads(n_workers: int) -> int:
    """About cores / workers threads per process (at least 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, n_workers))


class QuantbenchSession:
    """Inputs, engine and baseline of one run, and :meth:`measure` for one work unit.

    Args:
        config: merged settings; cache_dir: where baselines/models live; n_workers: xdist workers
            (1 without xdist), used for the default thread count.
    """

    def __init__(self, config: QuantbenchConfig, cache_dir: Path, n_workers: int = 1) -> None:
        self.config = config
        self.cache_dir = cache_dir
        self.threads = config.threads or default_threads(n_workers)
        self._swap_error: str | None = None
        self.units: list[WorkUnit] = []
        self.command = "pytest"  # the invocation, for item logs (set by the plugin)
        self.groups: tuple = ()
        if config.engine_lib is not None:  # read by the engine bindings, inherited by workers
            if not config.engine_lib.is_file():
                raise ConfigError(f"--quantbench-engine-lib {config.engine_lib} does not exist: "
                                  "give the libllama.so of an ik_llama.cpp build")
            os.environ["IK_LLAMA_CPP_LIB_PATH"] = str(config.engine_lib)

    # ---- inputs -------------------------------------------------------------------------
    @cached_property
    def model_path(self) -> Path:
        """The baseline GGUF (the default one is converted on first use)."""
        if self.config.model is not None:
            return self.config.model
        return inputs.ensure_default_model(self.cache_dir, self.config.baseline_qtype,
                                           self.threads)

    @cached_property
    def model_header(self):
        """GGUF header of the baseline (every shard of a split model). Raises GGUFError, whose
        message names --quantbench-model when the user gave the model."""
        from .gguf import GGUFError, read_model_header

        try:
            return read_model_header(self.model_path)
        except GGUFError as exc:
            if self.config.model is None:
                raise
            raise GGUFError(f"--quantbench-model {exc}") from None

    @cached_property
    def model_sha256(self) -> str:
        return inputs.sha256_file(self.model_path, self.cache_dir)

    @cached_property
    def corpus_text(self) -> str:
        return inputs.read_corpus(self.config.corpus)

    @cached_property
    def identity_engine(self):
        from .engine.identity import engine_identity

        return engine_identity()

    @cached_property
    def eval_settings(self):
        """The evaluation settings of the baseline and every variant.

        Flash attention is on (llama-perplexity's default on ik) except when several chunks share
        a decode (--quantbench-n-seq > 1) and attention may run on the CPU: the wheel's CPU flash
        attention then can abort the process with ``GGML_ASSERT(S > 0)`` (seen here at n_ctx 64
        with 2 sequences; reported upstream for ``--parallel > 1``). The layout (``fa=0``)
        enters the run key, so such runs have their own baseline.
        """
        from .engine.llama import EvalSettings

        n_seq, n_gpu_layers = self.config.n_seq, self.config.n_gpu_layers
        all_on_gpu = n_gpu_layers > (self.model_header.n_layer or 0)
        return EvalSettings(n_ctx=self.n_ctx, threads=self.threads, n_gpu_layers=n_gpu_layers,
                            n_seq=n_seq, flash_attn=n_seq == 1 or all_on_gpu)

    @cached_property
    def tokenizer(self):
        """The baseline's vocabulary only (tokenizing loads no weights, so the controller of a
        700B run stays light)."""
        from .engine.llama import LlamaModel

        return LlamaModel(self.model_path, self.eval_settings, vocab_only=True)

    @cached_property
    def user_base(self):
        """The user's ``--quantbench-kld-base`` file, or None."""
        if self.config.kld_base is None:
            return None
        from .kldbase import KLDBaseFile

        return KLDBaseFile(self.config.kld_base)

    @property
    def n_ctx(self) -> int:
        return self.user_base.n_ctx if self.user_base is not None else self.config.ctx

    @cached_property
    def corpus_tokens(self):
        """All corpus tokens, int32 (N,), tokenized as llama-perplexity does."""
        return self.tokenizer.tokenize(self.corpus_text)

    @cached_property
    def chunk_tokens(self):
        """The evaluated chunks, int32 (n_chunk, n_ctx). Raises ConfigError when text is short."""
        if self.user_base is not None:
            return self.user_base.tokens
        tokens, n_ctx, want = self.corpus_tokens, self.n_ctx, self.config.chunks
        where = self.config.corpus or inputs.DEFAULT_CORPUS_NAME
        available = len(tokens) // n_ctx
        if len(tokens) < 2 * n_ctx:
            raise ConfigError(f"corpus {where} has {len(tokens)} tokens; llama-perplexity needs at "
                              f"least {2 * n_ctx} for n_ctx={n_ctx}: use a longer text or a "
                              "smaller --quantbench-ctx")
        if want is not None and want > available:
            raise ConfigError(f"--quantbench-chunks {want}: corpus {where} has {len(tokens)} "
                              f"tokens, which allows at most {available} chunks of n_ctx={n_ctx}; "
                              f"pass --quantbench-chunks {available} or less, or a longer corpus")
        n_chunk = available if want is None else want
        return tokens[: n_chunk * n_ctx].reshape(n_chunk, n_ctx)

    @cached_property
    def run_identity(self):
        from .baseline import RunIdentity

        if self.user_base is not None:
            corpus_hash = inputs.sha256_file(self.config.kld_base, self.cache_dir)
        elif self.config.corpus is not None:
            self.corpus_text  # validates the file (missing, directory, not UTF-8, empty) first
            corpus_hash = inputs.sha256_file(self.config.corpus, self.cache_dir)
        else:  # the sha256 of the default text written to a file, as `sha256sum` shows it
            corpus_hash = inputs.sha256_text(inputs.default_corpus_text())
        return RunIdentity(
            model_sha256=self.model_sha256,
            corpus_sha256=corpus_hash,
            n_ctx=self.n_ctx,
            chunks=int(self.chunk_tokens.shape[0]),
            engine=self.identity_engine.key,
            eval=self.eval_settings.layout,
        )

    def validate_inputs(self) -> None:
        """Check, before any item runs, what can be checked cheaply: the corpus yields the chunks
        asked for, the tokenizer loads, a user kld-base file fits the model.

        Raises ConfigError, EngineError, KLDBaseFormatError or ValueError with the fix.
        """
        self.chunk_tokens
        if self.config.imatrix not in (None, "auto"):
            self.imatrix  # wrong format or another model's: a usage error before any item
        if self.user_base is not None:
            from .baseline import check_user_baseline

            check_user_baseline(self.user_base, self.tokenizer.n_vocab)

    def header_lines(self) -> list[str]:
        """The run-header lines: model + hash, corpus + tokens, n_ctx, chunks, engine."""
        ident = self.run_identity
        corpus = (f"kld-base {self.config.kld_base}" if self.user_base is not None else
                  f"{self.config.corpus or inputs.DEFAULT_CORPUS_NAME} "
                  f"({len(self.corpus_tokens)} tokens, sha256 {ident.corpus_sha256[:12]})")
        return [
            f"quantbench model: {self.model_path} (sha256 {ident.model_sha256[:12]}, "
            f"baseline type {self.config.baseline_qtype})",
            f"quantbench corpus: {corpus}",
            f"quantbench n_ctx={ident.n_ctx}, chunks={ident.chunks}, threads={self.threads}, "
            f"{ident.eval}",
            f"quantbench engine: {self.identity_engine.describe()}",
        ] + self._imatrix_header()

    def _imatrix_header(self) -> list[str]:
        if self.config.imatrix is None:
            return []
        if self.config.imatrix == "auto":
            return ["quantbench imatrix: auto (computed from the corpus chunks once, cached in "
                    f"{self.cache_dir / 'imatrix'}; key {self._auto_imatrix_key})"]
        return [f"quantbench imatrix: {self.config.imatrix} (sha256 {self.imatrix_identity[:12]})"]

    # ---- baseline -----------------------------------------------------------------------
    @cached_property
    def baseline(self):
        """The baseline logits file (:class:`KLDBaseFile`), computed once across workers/runs."""
        from . import baseline

        n_vocab = self.tokenizer.n_vocab
        if self.user_base is not None:
            return baseline.check_user_baseline(self.user_base, n_vocab)
        return baseline.ensure_baseline(self.baseline_path, self.chunk_tokens, n_vocab,
                                        self._compute_baseline)

    def _compute_baseline(self, dest: Path) -> None:
        """Evaluate the baseline into the base file: with the swap model when items use it
        (same load, same settings), else with a model loaded for this and freed."""
        from . import baseline
        from .engine.llama import LlamaModel

        if self.config.engine == "inplace" and self.swap_model is not None:
            baseline.write_baseline(self.swap_model.model, self.chunk_tokens, dest)
            return  # the worker's one model load serves the baseline and every swap
        with LlamaModel(self.model_path, self.eval_settings) as model:
            baseline.write_baseline(model, self.chunk_tokens, dest)

    @property
    def baseline_path(self) -> Path:
        """Where this run's baseline logits are cached."""
        from .baseline import baseline_cache_path

        return baseline_cache_path(self.cache_dir, self.run_identity)

    def baseline_lines(self) -> list[str]:
        """Summary lines about the baseline: its own PPL line, time and cache size."""
        from .baseline import baseline_facts

        if self.user_base is not None:
            return [f"baseline: --quantbench-kld-base {self.config.kld_base}"]
        facts = baseline_facts(self.baseline_path)
        if not facts:
            return []
        return [f"baseline: {facts['final_estimate']} (cached: {self.baseline_path}, "
                f"{facts['bytes'] / 1e6:.1f} MB, computed once in {facts['seconds']:.1f} s)"]

    @cached_property
    def thresholds(self):
        from .thresholds import Thresholds, load_thresholds

        if self.config.thresholds is None:
            return Thresholds.empty()
        return load_thresholds(self.config.thresholds, run_qtypes=self.config.qtypes)

    @cached_property
    def work_dir(self) -> Path:
        """A private temporary directory for variant models (removed by :meth:`close`)."""
        root = self.cache_dir / "tmp"
        root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"variants-{os.getpid()}-", dir=root))

    def close(self) -> None:
        """Free the engine objects and remove temporary files."""
        if "tokenizer" in self.__dict__:
            self.tokenizer.close()
        if self.__dict__.get("swap_model") is not None:
            self.swap_model.close()
        if "store" in self.__dict__:
            self.store.close()
        self.__dict__.pop("chunk_buffers", None)
        if "work_dir" in self.__dict__:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    # ---- results store ----------------------------------------------------------------
    @cached_property
    def imatrix_identity(self) -> str | None:
        """What identifies the importance matrix in result keys: the user file's sha256, or
        ``auto:<key>`` (model, corpus, n_ctx, chunks, engine: what the computed one depends on);
        None without one. Cheap: the controller never computes an auto imatrix."""
        if self.config.imatrix is None:
            return None
        if self.config.imatrix == "auto":
            return f"auto:{self._auto_imatrix_key}"
        return inputs.sha256_file(self.config.imatrix, self.cache_dir)

    @property
    def _auto_imatrix_key(self) -> str:
        from .imatrix import auto_imatrix_key

        ident = self.run_identity
        return auto_imatrix_key(ident.model_sha256, ident.corpus_sha256, ident.n_ctx,
                                ident.chunks, ident.engine)

    @cached_property
    def imatrix(self):
        """The importance matrix (:class:`~pytest_quantbench.imatrix.Imatrix`) checked against
        the model, or None. ``auto`` computes it once across workers and runs (cached).

        Raises ImatrixError (a ValueError): wrong format, or a file for another model.
        """
        from .imatrix import check_imatrix, compute_imatrix, ensure_auto_imatrix, load_imatrix

        if self.config.imatrix is None:
            return None
        if self.config.imatrix == "auto":
            name = str(self.config.corpus or inputs.DEFAULT_CORPUS_NAME)
            # one chunk per decode with flash attention, whatever --quantbench-n-seq says: the
            # cached matrix's key holds no evaluation layout
            settings = replace(self.eval_settings, n_seq=1, flash_attn=True)
            path = ensure_auto_imatrix(self.cache_dir, self._auto_imatrix_key, lambda dest:
                                       compute_imatrix(self.model_path, settings,
                                                       self.chunk_tokens, dest, dataset=name))
        else:
            path = self.config.imatrix
        imx = load_imatrix(path)
        check_imatrix(imx, self.model_header, path)
        return imx

    @cached_property
    def imatrix_path(self) -> Path | None:
        """A legacy-layout file of :attr:`imatrix` for llama-quantize (ik reads only that
        layout: a GGUF imatrix is converted once into the work directory)."""
        from .imatrix import write_legacy

        imx = self.imatrix
        if imx is None:
            return None
        if imx.source_format == "legacy":
            return imx.path
        return write_legacy(imx, self.work_dir / "imatrix.dat")

    @cached_property
    def run_key(self) -> str:
        """The store's key of this run's settings (:func:`store.run_key`)."""
        from .store import run_key

        return run_key(self.run_identity.as_row(), self.imatrix_identity)

    @cached_property
    def store(self):
        """The durable :class:`~pytest_quantbench.store.ResultsStore` in the output directory."""
        from .store import STORE_FILE, ResultsStore

        return ResultsStore(self.config.output / STORE_FILE)

    def item_key(self, unit: WorkUnit) -> str:
        from .store import item_key

        return item_key(self.run_key, unit.tensors, unit.qtype)

    def write_item_log(self, unit: WorkUnit, row: dict[str, Any], stats: dict[str, Any]) -> None:
        """With ``--quantbench-logs DIR``: the item's suite-style log
        (``bench_ppl_kld_result.<tensor>.<qtype>.<chunks>.txt``, :mod:`itemlog`). Raises OSError."""
        if self.config.logs is None:
            return
        from .itemlog import write_item_log
        from .metrics import KLDStats

        facts = {k: row.get(k) for k in ("members", "requested_type", "written_type", "engine_mode",
                                          "n_ctx", "reused")}
        write_item_log(self.config.logs, unit.name, unit.qtype, self.run_identity.chunks,
                       KLDStats(**stats), command=self.command, facts=facts)

    # ---- one item -----------------------------------------------------------------------
    def identity_row(self, unit: WorkUnit) -> dict[str, Any]:
        """The row columns every result of ``unit`` carries (builtin types)."""
        return {"tensor": unit.name, "qtype": unit.qtype, "members": ",".join(unit.tensors),
                **self.run_identity.as_row()}

    def measure(self, unit: WorkUnit, row: dict[str, Any]) -> dict[str, Any]:
        """The statistics of ``unit``: reused from the results store when it holds them for these
        settings (unless ``--quantbench-rerun``), else measured and stored at once.

        ``row`` is updated in place as facts become known (``requested_type``, ``written_type``,
        ``engine``, ``reason``, ``reused``), so the caller keeps them even when this raises.
        Returns: :meth:`KLDStats.as_dict` (floats/ints).
        Raises: ItemSkip (fallback type, missing imatrix, a type this build cannot run),
            EngineError, StoreError, ValueError (non-finite logits: the message says where).
        """
        key = self.item_key(unit)
        stored = None if self.config.rerun else self.store.get(key)
        if stored is not None:
            row.update(stored["facts"], reused=True)
            if row.get("fallback") and not self.config.allow_fallback:
                raise ItemSkip(row["reason"])
            return stored["stats"]
        stats = self._measure(unit, row)
        facts = {k: row[k] for k in _FACTS if k in row}
        self.store.put(key, self.run_key, {"tensor": unit.name, "qtype": unit.qtype,
                                           "facts": facts, "stats": stats.as_dict()})
        return stats.as_dict()

    def _measure(self, unit: WorkUnit, row: dict[str, Any]):
        """Plan the written types, quantize, evaluate every chunk; return the KLDStats."""
        import time

        from .metrics import KLDAccumulator
        from .qtypes import resolve_qtype

        if unit.name in ("variant", "recipe"):  # issue 15: whole files and recipes (variants.py)
            from .variants import measure_whole
            return measure_whole(self, unit, row, self.whole_paths)
        started = time.perf_counter()
        qtype = resolve_qtype(unit.qtype)
        written = self.plan_types(unit, qtype, row)
        base = self.baseline
        engine, note = self.choose_engine(unit)
        row["engine_mode"] = engine  # "engine" (the run identity) is the engine library's id
        if note:
            row["engine_note"] = note
        probes = [self.check_kernel(name, wtype) for name, wtype in written.items()
                  if wtype.name != self.model_header.tensor(name).type_name]
        probes = [k for k in probes if k is not None]
        if probes:  # how far the engine's kernels are from the dequantized weights (nats)
            row["kernel_check_kld"] = max(probes)
        acc = KLDAccumulator()
        if engine == "inplace":
            self._measure_inplace(written, base, acc)
        else:
            self._measure_file(unit, qtype, written, row, base, acc)
        row["seconds"] = round(time.perf_counter() - started, 3)
        return acc.stats()

    def plan_types(self, unit: WorkUnit, qtype, row: dict[str, Any]) -> dict[str, Any]:
        """The ggml type llama-quantize writes for each tensor of ``unit`` (tensor → GGMLType).

        A ggml type goes through the row-length / row-count fallbacks (spec §5.4); a preset
        through its per-tensor mixture rules (``llama-quantize --dry-run``). Records
        ``requested_type``, ``written_type``, ``fallback`` and ``reason`` in ``row``.
        Raises ItemSkip: a fallback type (unless --quantbench-allow-fallback), a shape the type
        cannot hold, or a type that needs an importance matrix when none is given.
        """
        from .qtypes import TYPES_BY_NAME, UnsupportedShapeError, predict_written_type

        written: dict[str, Any] = {}
        fallbacks: list[tuple[str, str]] = []
        if qtype.kind == "preset":
            row["requested_type"] = f"preset {qtype.name}"
            chosen = self.preset_types(qtype)
            for name in unit.tensors:
                if chosen.get(name) not in TYPES_BY_NAME:
                    raise ItemSkip(f"preset {qtype.name} gives {name} type {chosen.get(name)}, "
                                   "which this build cannot quantize to")
                written[name] = TYPES_BY_NAME[chosen[name]]
        else:
            target = qtype.ggml_type
            row["requested_type"] = target.name
            for name in unit.tensors:
                info = self.model_header.tensor(name)
                try:
                    wtype, why = predict_written_type(target, info.ne0, info.n_rows,
                                                      tensor_name=name)
                except UnsupportedShapeError as exc:
                    raise ItemSkip(str(exc)) from None
                written[name] = wtype
                if wtype.name != target.name:
                    fallbacks.append((name, fallback_reason(name, wtype.name, target.name, why)))
        row["written_type"] = ",".join(sorted({t.name for t in written.values()}))
        if fallbacks:
            row["fallback"] = True
            more = (f" (and {len(fallbacks) - 1} more of the {len(unit.tensors)} members)"
                    if len(fallbacks) > 1 else "")
            row["reason"] = fallbacks[0][1] + more
            if not self.config.allow_fallback:
                raise ItemSkip(row["reason"])
        for name, wtype in written.items():
            problem = self._imatrix_problem(name, wtype)
            if problem:
                raise ItemSkip(problem)
        return written

    def _imatrix_problem(self, name: str, wtype) -> str | None:
        """Why ``name`` cannot be quantized to ``wtype`` for lack of importance-matrix data, or
        None (spec §5.5: the A types assert in ggml_quantize_chunk for every tensor; the R types
        are refused by llama-quantize except for token_embd and output)."""
        from .qtypes import needs_imatrix

        if not needs_imatrix(wtype) or wtype.name == self.model_header.tensor(name).type_name:
            return None
        if self.config.imatrix is None:
            return (f"{wtype.name} needs an importance matrix ({name}): pass "
                    "--quantbench-imatrix FILE, or --quantbench-imatrix=auto to compute one "
                    "from the corpus")
        if self.imatrix.weights_for(name) is not None:
            return None
        if wtype.imatrix == "rule" and name in ("token_embd.weight", "output.weight"):
            return None
        return (f"{wtype.name} needs importance-matrix data for {name}, and "
                f"{self.imatrix.path.name} has no entry for it (llama-quantize: Missing "
                "importance matrix for tensor in a very low-bit quantization)")

    def preset_types(self, qtype) -> dict[str, str]:
        """Tensor → ggml type name under llama-quantize preset ``qtype`` on the baseline model
        (its ``--dry-run``, once per preset and process). Raises ItemSkip when llama-quantize
        refuses the preset without an importance matrix, EngineError otherwise."""
        from .engine.llama import EngineError
        from .engine.quantize import preset_tensor_types

        cache = self.__dict__.setdefault("_preset_types", {})
        if qtype.name not in cache:
            try:
                cache[qtype.name] = preset_tensor_types(
                    self.model_path, qtype.preset.name, threads=self.threads,
                    imatrix=self.imatrix_path)
            except EngineError as exc:
                said = [line.strip() for line in str(exc).splitlines()
                        if "importance matrix" in line]
                if said and self.config.imatrix is None:
                    raise ItemSkip(f"preset {qtype.name.lower()} needs an importance matrix "
                                   f"(llama-quantize says: {said[-1]}): pass "
                                   "--quantbench-imatrix FILE") from None
                raise
        return cache[qtype.name]

    def choose_engine(self, unit: WorkUnit) -> tuple[str, str | None]:
        """``("inplace", None)`` when the in-process swap can measure ``unit``, else
        ``("file", why)``: --quantbench-engine=file, a token_embd tied to the output (the
        engine's output duplicate is another tensor object), a non-float baseline tensor, an
        expert tensor with an importance matrix, or an engine library the swap cannot bind."""
        if self.config.engine == "file":
            return "file", None
        if "token_embd.weight" in unit.tensors and self._tied_embeddings:
            return "file", ("token_embd.weight is tied to the output: the engine computes the "
                            "output from its own duplicate of the tensor, which the in-process "
                            "swap does not reach")
        for name in unit.tensors:
            info = self.model_header.tensor(name)
            if info.type_name not in ("f32", "f16", "bf16"):
                return "file", f"{name} is {info.type_name} in the baseline (in-process needs float)"
            if self.imatrix is not None and len(info.shape) > 2 and info.shape[2] > 1:
                return "file", (f"{name} has {info.shape[2]} experts: the in-process engine "
                                "applies importance matrices to 2-D tensors only")
        if self.swap_model is None:
            return "file", self._swap_error
        return "inplace", None

    @cached_property
    def _tied_embeddings(self) -> bool:
        """No output.weight: the engine computes the output from a duplicate of token_embd."""
        return all(t.name != "output.weight" for t in self.model_header.tensors)

    @cached_property
    def chunk_buffers(self) -> ChunkBuffers:
        """The chunk loop's logits and base log-prob arrays, kept for this session's items."""
        return ChunkBuffers()

    @cached_property
    def swap_model(self):
        """The baseline loaded once in this process for in-process swaps (None if unusable)."""
        from .engine.llama import EngineError
        from .engine.swap import SwapModel

        try:
            return SwapModel(self.model_path, self.eval_settings)
        except EngineError as exc:
            self._swap_error = f"in-process engine unavailable: {exc}"
            return None

    @staticmethod
    def _evaluate(model, base, acc, buffers: "ChunkBuffers | None" = None) -> None:
        """Evaluate every chunk of the baseline file with ``model`` into ``acc``, n_seq chunks per
        decode (the baseline's own layout, so identical weights give identical logits).

        The statistics of one decode's chunks run on a helper thread while the next decode runs
        (the engine and numpy release the GIL), in chunk order, so the results are those of a
        sequential loop; an error in either surfaces here (a statistics error one decode later).
        Logits and base log-probs go into ``buffers`` (the session passes its own, kept across
        items; None: arrays for this call only).
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

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="quantbench-stats") as stats:
            pending = None
            for d, start in enumerate(range(0, base.n_chunk, n_seq)):
                tokens = np.asarray(base.tokens[start:start + n_seq])
                logits = model.eval_chunks(tokens, out=logits_bufs[d % 2][:len(tokens)])
                if pending is not None:
                    pending.result()
                pending = stats.submit(add_chunks, start, logits)
            if pending is not None:
                pending.result()

    def _measure_inplace(self, written: dict[str, Any], base, acc) -> None:
        """Quantize each changed tensor in memory with ggml_quantize_chunk, swap them all in,
        evaluate, restore."""
        swap = self.swap_model
        replacements = {}
        for name, wtype in written.items():
            info = self.model_header.tensor(name)
            if wtype.name == info.type_name:
                continue  # a preset that leaves this tensor as it is
            replacements[name] = self._quantized(name, wtype)
        with swap.swapped(replacements):
            self._evaluate(swap.model, base, acc, self.chunk_buffers)

    def _quantized(self, name: str, wtype) -> tuple[int, int, int, Any]:
        """``name``'s baseline weights quantized to ``wtype`` in memory, as a swap replacement."""
        info = self.model_header.tensor(name)
        swap = self.swap_model
        weights = self.imatrix.weights_for(name) if self.imatrix is not None else None
        data = swap.quantize(swap.baseline_f32(name, info.type_name), wtype.type_id,
                             wtype.row_size(info.ne0), wtype.interleave, imatrix=weights)
        return wtype.type_id, wtype.type_size, wtype.row_size(info.ne0), data

    def check_kernel(self, name: str, wtype) -> None:
        """Make sure this engine build computes with ``wtype`` correctly, once per type and process.

        A type without a CPU ``vec_dot`` (e.g. the ARM-only q4_0_4x4) cannot be evaluated. Any
        other type whose ``to_float`` gives the weights back (relative error below 1) is probed:
        tensor ``name`` quantized to ``wtype`` and the same weights dequantized to f32 must give
        nearly the same logits on the first chunk (mean KLD below
        :data:`KERNEL_PROBE_MAX_KLD`; only the activations' own rounding separates them). A build
        whose kernel for the type is broken would otherwise yield silently wrong numbers.
        Returns the probe's mean KLD (None when the type could not be probed): even a working
        kernel rounds the activations (e.g. to q8_1), and this shows by how much.
        Raises ItemSkip with the finding.
        """
        checked = self.__dict__.setdefault("_kernel_checks", {})
        if wtype.name not in checked:
            checked[wtype.name] = self._kernel_problem(name, wtype)
        problem, kld = checked[wtype.name]
        if problem:
            raise ItemSkip(problem)
        return kld

    def _kernel_problem(self, name: str, wtype) -> tuple[str | None, float | None]:
        import numpy as np

        swap = self.swap_model
        info = self.model_header.tensor(name)
        if swap is None or info.type_name not in ("f32", "f16", "bf16"):
            return None, None
        traits = swap.traits(wtype.type_id)
        if traits is not None and not traits.vec_dot:
            return (f"this engine build has no CPU kernel for {wtype.name} (its vec_dot is "
                    "missing; the type needs another build, e.g. ARM)"), None
        quantized = self._quantized(name, wtype)
        deq = swap.dequantize(quantized[3], wtype.type_id, info.n_rows, info.ne0,
                              wtype.row_size(info.ne0), wtype.interleave)
        if deq is None:
            return None, None
        weights = swap.baseline_f32(name, info.type_name)
        if np.linalg.norm(deq - weights) > np.linalg.norm(weights):
            return None, None  # to_float does not give the weights back (e.g. *_bn keep the scale
            #              elsewhere): nothing to compare the kernel with
        chunk = self.baseline.tokens[0]
        logprobs = []
        for replacement in (quantized, (0, 4, 4 * info.ne0, deq.reshape(-1).view(np.uint8))):
            with swap.swapped({name: replacement}):
                logits = swap.model.eval_chunk(chunk).astype(np.float64)
            shifted = logits - logits.max(axis=1, keepdims=True)
            logprobs.append(shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True)))
        lq, ld = logprobs
        kld = float(np.mean(np.sum(np.exp(ld) * (ld - lq), axis=1)))
        if not np.isfinite(kld) or kld > KERNEL_PROBE_MAX_KLD:
            return (f"this engine build computes {wtype.name} wrongly: with {name} in "
                    f"{wtype.name}, the logits differ from the same weights dequantized to f32 by "
                    f"mean KLD {kld:.4f} on chunk 1 (a working kernel gives less than "
                    f"{KERNEL_PROBE_MAX_KLD})"), kld
        return None, kld

    def _measure_file(self, unit: WorkUnit, qtype, written: dict[str, Any], row: dict,
                      base, acc) -> None:
        """Write a variant GGUF with llama-quantize, check its types against the plan, load it,
        evaluate. llama-quantize gets the requested type (it applies its own fallbacks), or the
        preset's chosen type per tensor."""
        from .engine.llama import LlamaModel
        from .engine.quantize import run_llama_quantize
        from .gguf import read_model_header

        changes = {t: (w.name if qtype.kind == "preset" else qtype.ggml_type.name)
                   for t, w in written.items()
                   if w.name != self.model_header.tensor(t).type_name}
        if not changes:  # every tensor keeps its baseline type: the variant is the baseline
            with LlamaModel(self.model_path, self.eval_settings) as model:
                self._evaluate(model, base, acc, self.chunk_buffers)
            return
        variant = self.work_dir / f"variant-{unit.id}.gguf"
        try:
            run_llama_quantize(self.model_path, variant, changes,
                               baseline_type=self.config.baseline_qtype, threads=self.threads,
                               imatrix=self.imatrix_path)
            self._check_written(read_model_header(variant), unit, written)
            with LlamaModel(variant, self.eval_settings) as model:
                self._evaluate(model, base, acc, self.chunk_buffers)
        finally:
            variant.unlink(missing_ok=True)

    def _check_written(self, header, unit: WorkUnit, planned: dict[str, Any]) -> None:
        """Read back the variant's types: the unit's tensors must have the planned types and every
        other tensor its baseline type.

        Raises EngineError naming the first tensors that differ (llama-quantize and our plan
        disagree, or it changed tensors outside the item).
        """
        from .engine.llama import EngineError

        base_types = {t.name: t.type_name for t in self.model_header.tensors}
        expected = {**base_types, **{n: w.name for n, w in planned.items()}}
        written = {t.name: t.type_name for t in header.tensors}
        wrong = sorted(n for n in expected if written.get(n) != expected[n])
        if wrong:
            raise EngineError(
                f"llama-quantize wrote {[written.get(n) for n in wrong[:5]]} for {wrong[:5]} "
                f"where {[expected[n] for n in wrong[:5]]} was expected "
                f"({len(wrong)} tensor(s) differ; item members: {len(unit.tensors)}); check "
                "--quantbench-baseline-qtype and the engine build")


#: Largest mean KLD (nats) between a quantized tensor and its f32 dequantization that a working
#: kernel gives in :meth:`QuantbenchSession.check_kernel` (activation rounding only; a broken
#: kernel gives about 1).
KERNEL_PROBE_MAX_KLD = 0.05

#: The row facts the results store keeps with an item's statistics.
_FACTS = ("members", "requested_type", "written_type", "engine_mode", "engine_note",
          "kernel_check_kld", "reason", "fallback",
          "seconds",
          "file_size", "bpw", "types")  # issue 15: whole-file items (variants.file_facts)


def fallback_reason(tensor: str, written: str, requested: str, why: str | None) -> str:
    """The skip reason of a fallback type (both engines plan it alike): what llama-quantize
    writes for ``tensor`` and ``why`` (:func:`qtypes.predict_written_type`'s reason, whose
    " for <tensor>" is dropped: the tensor is named once)."""
    why = why.replace(f" for {tensor}", "") if why else "fallback"
    return f"llama-quantize writes {written} instead of {requested} for {tensor} ({why})"
