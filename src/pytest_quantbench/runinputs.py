"""The run's inputs and identity: the baseline model and its header, the corpus and its chunks,
the evaluation settings, the importance matrix, and the :class:`~baseline.RunIdentity` that keys
baselines and results.

Every part is lazy and cached: the controller only reads headers and tokenizes (for the run
header); workers also load the importance matrix. Nothing here evaluates a model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import replace
from functools import cached_property
from pathlib import Path

from . import inputs
from .config import ConfigError, QuantbenchConfig, corpus_chunk_problem


def default_threads(n_workers: int) -> int:
    """About cores / workers threads per process (at least 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, n_workers))


def _process_gpu(config: QuantbenchConfig) -> str | None:
    """:func:`engine.devices.apply_process_env` for ``--quantbench-gpus`` in this process (an
    xdist worker ``gwN`` or the controller); its errors as ConfigError."""
    from .engine import devices

    try:
        spec = devices.parse_gpus(config.gpus)
        return devices.apply_process_env(spec, os.environ.get("PYTEST_XDIST_WORKER"))
    except (devices.GpuSpecError, devices.EngineAlreadyLoaded) as exc:
        raise ConfigError(str(exc)) from None


class RunInputs:
    """Model, corpus, chunks, settings, imatrix and identity of one run (each computed once).

    Args:
        config: merged settings; cache_dir: where baselines/models live; n_workers: xdist workers
            (1 without xdist), used for the default thread count.
    Raises ConfigError: ``--quantbench-engine-lib`` is not a file.
    """

    def __init__(self, config: QuantbenchConfig, cache_dir: Path, n_workers: int = 1) -> None:
        self.config = config
        self.cache_dir = cache_dir
        self.threads = config.threads or default_threads(n_workers)
        #: ggml types the planned items write that need an importance matrix
        #: (:func:`planfacts.types_needing_imatrix`, set after planning): with no
        #: --quantbench-imatrix, one is then computed from the corpus as with ``auto``.
        self.imatrix_needed_by: tuple[str, ...] = ()
        if config.engine_lib is not None:  # read by the engine bindings, inherited by workers
            if not config.engine_lib.is_file():
                raise ConfigError(
                    f"--quantbench-engine-lib {config.engine_lib} does not exist: "
                    "give the libllama.so of an ik_llama.cpp build"
                )
            os.environ["IK_LLAMA_CPP_LIB_PATH"] = str(config.engine_lib)
        self.gpu = _process_gpu(config)  # before the engine loads: the worker's GPU, graphs off

    @cached_property
    def model_path(self) -> Path:
        """The baseline GGUF (the default one is converted on first use)."""
        if self.config.model is not None:
            return self.config.model
        return inputs.ensure_default_model(self.cache_dir, self.config.baseline_qtype, self.threads)

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
        """sha256 (hex) of the model: of its one file, or of the ``sha256sum`` lines of every
        shard of a split model (:func:`inputs.model_sha256`), so a replaced shard is a new model."""
        return inputs.model_sha256(self.model_shards, self.cache_dir)

    @property
    def model_shards(self) -> tuple[Path, ...]:
        """The model's files: every shard of a split model, else the one file."""
        return tuple(self.model_header.shards or (self.model_path,))

    @cached_property
    def model_source(self) -> dict[str, str]:
        """What a cached baseline records of the model it came from (:func:`inputs.model_source`)."""
        return inputs.model_source(self.model_shards, self.model_sha256)

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
        return EvalSettings(
            n_ctx=self.n_ctx,
            threads=self.threads,
            n_gpu_layers=n_gpu_layers,
            n_seq=n_seq,
            flash_attn=n_seq == 1 or all_on_gpu,
            single_gpu=self.config.gpus is not None,
        )

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
        from .baseline import open_user_base

        return open_user_base(self.config)  # --quantbench-chunks / --quantbench-ctx checked there

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
        problem = corpus_chunk_problem(where, len(tokens), n_ctx, want)  # issue 11 item 13
        if problem is not None:
            raise problem
        n_chunk = len(tokens) // n_ctx if want is None else want
        return tokens[: n_chunk * n_ctx].reshape(n_chunk, n_ctx)

    @cached_property
    def run_identity(self):
        from .baseline import RunIdentity

        if self.user_base is not None:
            assert self.config.kld_base is not None  # the user base is read from it
            corpus_hash = inputs.sha256_file(self.config.kld_base, self.cache_dir)
        elif self.config.corpus is not None:
            _ = self.corpus_text  # validates the file (missing, directory, not UTF-8, empty) first
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
        asked for, the tokenizer loads, a user kld-base file fits the model (and the corpus, when
        one is given too).

        Raises ConfigError, EngineError, KLDBaseFormatError or ValueError with the fix.
        """
        _ = self.chunk_tokens
        if self.imatrix_source not in (None, "auto"):
            _ = self.imatrix  # wrong format or another model's: a usage error before any item
        if self.user_base is not None:
            from .baseline import check_user_baseline

            check_user_baseline(
                self.user_base,
                self.tokenizer.n_vocab,
                self.config.corpus,
                lambda: self.corpus_tokens,
            )

    @cached_property
    def cache_plan(self):
        """The files this run adds to the cache, with their sizes
        (:func:`diskspace.plan_cache_files`): the baseline unless a user base file is given, the
        auto imatrix with ``--quantbench-imatrix auto``."""
        from .baseline import baseline_cache_path
        from .diskspace import plan_cache_files
        from .imatrix import auto_imatrix_path

        return plan_cache_files(
            baseline=(
                None
                if self.user_base is not None
                else baseline_cache_path(self.cache_dir, self.run_identity)
            ),
            shape=self.chunk_tokens.shape,
            n_vocab=self.tokenizer.n_vocab,
            imatrix=(
                auto_imatrix_path(self.cache_dir, self._auto_imatrix_key)
                if self.imatrix_source == "auto"
                else None
            ),
            model_header=self.model_header,
        )

    def header_lines(self) -> list[str]:
        """The run-header lines: model + hash, corpus + tokens, n_ctx, chunks, engine, cache."""
        from .baseline import user_base_header
        from .diskspace import cache_header_line

        ident = self.run_identity
        corpus = (
            user_base_header(self.user_base)
            if self.user_base is not None
            else f"{self.config.corpus or inputs.DEFAULT_CORPUS_NAME} "
            f"({len(self.corpus_tokens)} tokens, sha256 {ident.corpus_sha256[:12]})"
        )
        return (
            [
                f"quantbench model: {self.model_path} (sha256 {ident.model_sha256[:12]}, "
                f"baseline type {self.config.baseline_qtype})",
                f"quantbench corpus: {corpus}",
                f"quantbench n_ctx={ident.n_ctx}, chunks={ident.chunks}, threads={self.threads}, "
                f"{ident.eval}",
                f"quantbench engine: {self.identity_engine.describe()}",
                cache_header_line(self.cache_dir, self.cache_plan),
            ]
            + self._device_header()
            + self._imatrix_header()
            + ([f"quantbench gpu: {self.gpu_problem}"] if self.gpu_problem else [])
        )

    @cached_property
    def gpu_problem(self) -> str | None:
        """Why ``--quantbench-n-gpu-layers N > 0`` offloads nothing, or None: the engine build
        has no GPU backend (its device is the CPU), so every layer runs on the CPU."""
        n = self.config.n_gpu_layers
        if not n or n <= 0 or self.identity_engine.device != "cpu":
            return None
        return (
            f"--quantbench-n-gpu-layers {n} has no effect: the engine build "
            f"{self.identity_engine.libllama} has no GPU backend, so everything runs on the "
            "CPU (pass --quantbench-engine-lib PATH to the libllama of a CUDA/Vulkan/Metal "
            "build of ik_llama.cpp to offload)"
        )

    def _device_header(self) -> list[str]:
        """The device line of a GPU build: which GPUs, one per worker or not, graphs off."""
        engine = self.identity_engine
        if engine.device == "cpu":
            return []
        per_worker = (
            f"one per worker from --quantbench-gpus {self.config.gpus}"
            if self.config.gpus is not None
            else "the engine's own split"
        )
        return [
            f"quantbench device: {engine.device} ({per_worker}; n_gpu_layers="
            f"{self.config.n_gpu_layers}; CUDA graphs off)"
        ]

    def _imatrix_header(self) -> list[str]:
        source = self.imatrix_source
        if source is None:
            return []
        if source == "auto":
            cached = f"once, cached in {self.cache_dir / 'imatrix'}; key {self._auto_imatrix_key}"
            if self.config.imatrix is None:
                types = ", ".join(self.imatrix_needed_by)
                verb = "needs" if len(self.imatrix_needed_by) == 1 else "need"
                return [
                    f"quantbench imatrix: computed from the corpus because {types} {verb} "
                    "one; pass --quantbench-imatrix FILE to use yours, or =none to skip such "
                    f"items ({cached})"
                ]
            return [f"quantbench imatrix: auto (computed from the corpus chunks {cached})"]
        sha = self.imatrix_identity or ""  # a file is the source here: its sha256
        return [f"quantbench imatrix: {source} (sha256 {sha[:12]})"]

    # ---- importance matrix ----------------------------------------------------------
    @property
    def imatrix_source(self) -> Path | str | None:
        """Where the run's importance matrix comes from: a file, ``"auto"`` (computed from the
        corpus: asked for, or no option given and :attr:`imatrix_needed_by` is not empty), or
        None (``--quantbench-imatrix=none``, or no option and no planned type needs one)."""
        given = self.config.imatrix
        if given == "none":
            return None
        if given is None:
            return "auto" if self.imatrix_needed_by else None
        return given

    @cached_property
    def imatrix_identity(self) -> str | None:
        """What identifies the importance matrix in result keys: the user file's sha256, or
        ``auto:<key>`` (model, corpus, n_ctx, chunks, engine: what the computed one depends on);
        None without one. Cheap: the controller never computes an auto imatrix."""
        source = self.imatrix_source
        if source is None:
            return None
        if source == "auto":
            return f"auto:{self._auto_imatrix_key}"
        return inputs.sha256_file(Path(source), self.cache_dir)

    @property
    def _auto_imatrix_key(self) -> str:
        from .imatrix import auto_imatrix_key

        ident = self.run_identity
        return auto_imatrix_key(
            ident.model_sha256, ident.corpus_sha256, ident.n_ctx, ident.chunks, ident.engine
        )

    @cached_property
    def imatrix(self):
        """The importance matrix (:class:`~pytest_quantbench.imatrix.Imatrix`) checked against
        the model, or None. ``auto`` computes it once across workers and runs (cached).

        Raises ImatrixError (a ValueError): wrong format, or a file for another model.
        """
        from .imatrix import (
            check_imatrix,
            compute_imatrix,
            ensure_auto_imatrix,
            load_imatrix,
        )

        source = self.imatrix_source
        if source is None:
            return None
        if source == "auto":
            name = str(self.config.corpus or inputs.DEFAULT_CORPUS_NAME)
            # one chunk per decode with flash attention, whatever --quantbench-n-seq says: the
            # cached matrix's key holds no evaluation layout
            settings = replace(self.eval_settings, n_seq=1, flash_attn=True)
            path = ensure_auto_imatrix(
                self.cache_dir,
                self._auto_imatrix_key,
                lambda dest: compute_imatrix(
                    self.model_path, settings, self.chunk_tokens, dest, dataset=name
                ),
            )
        else:
            path = source
        imx = load_imatrix(path)
        check_imatrix(imx, self.model_header, path)
        return imx

    def model_summary_lines(self, since: float) -> list[str]:
        """The summary line of the converted default model: where, its size and how long the
        conversion took ("in this run" when done after ``since``, Unix time); [] for a user
        model or an unknown conversion."""
        import json

        if self.config.model is not None or "model_path" not in self.__dict__:
            return []
        try:
            facts = json.loads(inputs.default_model_facts_path(self.model_path).read_text())
        except (OSError, ValueError):
            return []
        when = (
            "converted in this run"
            if facts.get("computed_at", 0) >= since
            else "taken from the cache; converted earlier"
        )
        return [
            f"default model: {when} in {facts['seconds']:.1f} s (cached: {self.model_path}, "
            f"{facts['bytes'] / 1e6:.1f} MB)"
        ]

    def imatrix_summary_lines(self, since: float) -> list[str]:
        """The summary line of a computed importance matrix: where it is cached, its size, and
        how long it took, said as "computed in this run" when it was written after ``since``
        (Unix time, the session's start) or "taken from the cache" otherwise; [] for a user file or none."""
        from .imatrix import auto_imatrix_path
        from .imatrix.cache import auto_imatrix_facts

        if self.imatrix_source != "auto":
            return []
        path = auto_imatrix_path(self.cache_dir, self._auto_imatrix_key)
        facts = auto_imatrix_facts(path)
        if not facts or not path.exists():
            return []
        when = (
            "computed in this run"
            if facts.get("computed_at", 0) >= since
            else "taken from the cache; computed earlier"
        )
        return [
            f"imatrix: {when} in {facts['seconds']:.1f} s (cached: {path}, "
            f"{facts['bytes'] / 1e6:.1f} MB)"
        ]

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
        """Free the tokenizer and remove the work directory."""
        if "tokenizer" in self.__dict__:
            self.tokenizer.close()
        if "work_dir" in self.__dict__:
            shutil.rmtree(self.work_dir, ignore_errors=True)
